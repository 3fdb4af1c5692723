"""`qwenimage-jax aot --config configs/<name>.py --topology NAME [--config.key=value ...] [--json FILE]
[--save FILE]`: compile a training/sampling program for a Cloud TPU topology on this (CPU) host and print its
per-chip memory and FLOPs; exits 1 when it does not fit the chip's HBM."""
from __future__ import annotations

import argparse

from qwenimage_jax.errors import InputError, MissingPackageError
from qwenimage_jax.parallel.topology import EXAMPLES

EPILOG = f"""\
topologies: product names count chips as Google sells them: v5p-N and v4-N count TensorCores (2 per chip), so
  v5p-512 = 256 chips (jax: v5:4x8x8), v5p-128 = 64 chips, v5p-64 = 32 chips; v6e-N and v5e-N (v5litepod-N)
  count chips: v6e-256 = 256 chips (v6e:16x16), v5e-4 = 4 chips. jax's own names work too.
  Examples: {EXAMPLES}.
programs (from the config, or --program): train-dit (configs/dit_7b_train.py, dit_1b_train.py), distill
  (configs/distill_7b.py), train-vae (configs/vae_train_f16c64.py), sample (configs/dit_7b.py: the pipeline's
  sampling loop; --steps, --cfg, --batch, --prompt-tokens), encode-prompt (configs/qwen3_vl_8b.py).
Any --config.key=value overrides a config field, e.g. --config.attention=splash --config.mesh.fsdp=64.
Needs libtpu on this host (pip install -e '.[aot]'), no TPU."""


def add_arguments(parser):
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--config", required=True, help="config file with get_config(); `path.py:arg` passes arg")
    parser.add_argument("--topology", required=True, help="e.g. v5p-512, v6e-256, v5e-4, v5:2x2x1 (see below)")
    parser.add_argument("--program", default=None, help="train-dit | distill | train-vae | sample | encode-prompt "
                        "(default: from the config)")
    parser.add_argument("--resolution", type=int, default=None,
                        help="image side in pixels (DiT programs: 1024; train-vae: config.data.resolution)")
    parser.add_argument("--steps", type=int, default=40, help="sample: denoising steps (default 40)")
    parser.add_argument("--cfg", type=float, default=1.0, help="sample: true CFG scale; > 1 doubles the batch")
    parser.add_argument("--batch", type=int, default=None, help="sample / encode-prompt: global batch "
                        "(default: one per data x fsdp shard)")
    parser.add_argument("--prompt-tokens", type=int, default=None, help="sample / encode-prompt: prompt length")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this file")
    parser.add_argument("--save", default=None, help="write the serialized executable here (valid only for the "
                        "same jax/jaxlib/libtpu versions and topology; see docs/tpu_training.md)")
    parser.epilog = EPILOG


def run(args):
    from qwenimage_jax.config_cli import load_config
    from qwenimage_jax.io_utils import provenance, write_json
    from qwenimage_jax.parallel import topology as topo
    from qwenimage_jax import aot

    try:
        target = topo.resolve(args.topology)
    except ValueError as e:
        raise InputError(f"--topology {args.topology}: {e}") from None
    config = load_config(args.config, args.config_overrides)
    try:
        devices = topo.devices(target)
    except ImportError as e:  # libtpu missing: the message names the extra to install
        raise MissingPackageError(str(e)) from e
    program = aot.build(config, devices, args.program, resolution=args.resolution, steps=args.steps,
                        cfg_scale=args.cfg, batch=args.batch, prompt_tokens=args.prompt_tokens)
    report = aot.compile_program(program, target, save=args.save)
    print(report.summary(), flush=True)
    if args.json:
        record = provenance(_command_line(args))
        write_json(args.json, {"command": record["command"], "commit": record["commit"], "provenance": record,
                               "config": args.config,
                               "overrides": list(args.config_overrides), **report.as_dict()}, indent=1)
    return 0 if report.fits else 1


def _command_line(args) -> str:
    """The command that reproduces this report (without --json/--save)."""
    parts = ["qwenimage-jax aot", "--config", args.config, "--topology", args.topology]
    for flag, value in (("--program", args.program), ("--resolution", args.resolution), ("--batch", args.batch),
                        ("--prompt-tokens", args.prompt_tokens)):
        if value is not None:
            parts += [flag, str(value)]
    if args.steps != 40:
        parts += ["--steps", str(args.steps)]
    if args.cfg != 1.0:
        parts += ["--cfg", str(args.cfg)]
    return " ".join(parts + list(args.config_overrides))
