"""`qwenimage-jax train-vae --config configs/<name>.py[:arg] --workdir DIR [--config.key=value ...]`.

Overrides follow ml_collections config_flags (parsed by `qwenimage_jax.config_cli`): a dotted path into the
config and a Python literal, e.g. `--config.total_steps=500 --config.losses.align.aligner=none`.
Running it again with the same workdir resumes from the latest checkpoint; SIGTERM saves and stops.
"""
from __future__ import annotations

import logging


def add_arguments(parser):
    parser.add_argument("--config", required=True, help="configs/<name>.py, optionally :arg")
    parser.add_argument("--workdir", required=True, help="checkpoints, TensorBoard logs, exported VAE")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.epilog = "Further --config.<field>=<value> arguments override config fields."


def run(args):
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)   # Orbax's per-save INFO lines
    from qwenimage_jax.config_cli import load_config
    from qwenimage_jax.parallel.distributed import maybe_initialize
    maybe_initialize()
    from qwenimage_jax.training import vae as vae_trainer

    config = load_config(args.config, list(getattr(args, "config_overrides", [])))
    logging.info("config:\n%s", config)
    result = vae_trainer.train(config, args.workdir, show_progress=not args.no_progress)
    print(f"trained to step {int(result['state'].step)} in {args.workdir}"
          + (" (stopped by a signal; run again to resume)" if result["stopped_early"] else ""))
    return 0
