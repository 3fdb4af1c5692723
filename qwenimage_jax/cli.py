"""`qwenimage-jax <command>`: one entry point, one module per command.

Each command lives in `qwenimage_jax/commands/<name>.py` and exposes `add_arguments(parser)` and `run(args)`;
modules are imported only when their command runs, so `--help` is fast.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# command -> (module, one-line help)
COMMANDS = {
    "demo": ("qwenimage_jax.commands.demo", "run the main job on the embedded default assets"),
    "convert": ("qwenimage_jax.commands.convert", "convert a diffusers/transformers component to an Orbax checkpoint"),
    "reconstruct": ("qwenimage_jax.commands.reconstruct", "VAE encode+decode images; side-by-side PNGs, PSNR/SSIM"),
    "sample": ("qwenimage_jax.commands.sample", "text-to-image / editing with a Qwen-Image-2 model directory"),
    "expand-prompt": ("qwenimage_jax.commands.expand_prompt", "expand a short prompt with a decoder LM (KV cache)"),
    "train-vae": ("qwenimage_jax.commands.train_vae", "train the VAE (L1 + LPIPS + annealed alignment)"),
    "eval-vae": ("qwenimage_jax.commands.eval_vae", "VAE reconstruction metrics (PSNR/SSIM/LPIPS/rFD) vs bicubic"),
    "cache-latents": ("qwenimage_jax.commands.cache_latents", "encode images + captions into DiT training shards"),
    "train-dit": ("qwenimage_jax.commands.train_dit", "train the DiT with flow matching"),
    "train-lora": ("qwenimage_jax.commands.train_lora", "train a LoRA adapter on a frozen DiT (diffusers format out)"),
    "distill": ("qwenimage_jax.commands.distill", "DMD step distillation of the DiT"),
    "eval-t2i": ("qwenimage_jax.commands.eval_t2i", "small-world GenEval: judge accuracy of generated images"),
    "aot": ("qwenimage_jax.commands.aot", "compile a step for a TPU topology here (v5p-512, v6e-256, v5e-4, ...): "
            "per-chip HBM and FLOPs"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenimage-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        build_parser().print_usage(sys.stderr)
        print(f"qwenimage-jax: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name == module_name:
            print(f"qwenimage-jax: command {name!r} is not implemented yet", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"qwenimage-jax {name}", description=help_text)
    module.add_arguments(parser)
    # `--config.key=value` overrides (trainers) pass through to the command as `args.config_overrides`.
    args, unknown = parser.parse_known_args(argv[1:])
    bad = [u for u in unknown if not u.startswith("--config.")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.config_overrides = [u for u in unknown if u.startswith("--config.")]
    return int(module.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
