"""`qwenimage-jax <command>`: one entry point, one module per command.

Each command lives in `qwenimage_jax/commands/<name>.py` and exposes `add_arguments(parser)` and `run(args)`;
modules are imported only when their command runs, so `--help` is fast.

`main` is the one error boundary (docs/reliability.md, "Errors through the CLI"): an error the user can fix
(`qwenimage_jax.errors`, or a ValueError / OSError our code raised on purpose) is one line on stderr and the exit
code of its kind; Ctrl-C is one line and 130; anything else is a bug: one line naming a file that holds the
traceback, exit 1. `--debug` anywhere on the command line (or QWENIMAGE_JAX_DEBUG=1) also prints the traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import os
import platform
import shlex
import sys
import tempfile
import time
import traceback

from qwenimage_jax.errors import InputError, OutputError, QwenImageError

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
    "distill-pairs": ("qwenimage_jax.commands.distill_pairs", "precompute the teacher's (noise, solution) pairs "
                      "that distillation regresses to"),
    "eval-t2i": ("qwenimage_jax.commands.eval_t2i", "small-world GenEval: judge accuracy of generated images"),
    "aot": ("qwenimage_jax.commands.aot", "compile a step for a TPU topology here (v5p-512, v6e-256, v5e-4, ...): "
            "per-chip HBM and FLOPs"),
}


DEBUG_ENV = "QWENIMAGE_JAX_DEBUG"
DEBUG_HELP = f"on an error, also print the full traceback (or set {DEBUG_ENV}=1)"
REPORT_TO = "the qwenimage-jax maintainers (an issue on the project's tracker)"
# OSErrors that mean "the output could not be written" whatever the path: disk full, quota, read-only, too big.
OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG, errno.EEXIST}
# Argument names that hold outputs: an OSError on a path under one of them is an output error.
OUTPUT_ARGS = ("out", "dst", "workdir", "save", "json")
# Commands whose compiles are worth keeping across processes: `--compilation-cache DIR` (parallel/compile_cache.py).
COMPILE_CACHE_COMMANDS = ("sample", "train-dit", "train-vae", "train-lora", "distill", "distill-pairs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qwenimage-jax", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # --debug is the boundary's, not a command's: taken out before the command's parser sees the rest
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    name = argv[0]
    if name not in COMMANDS:
        build_parser().print_usage(sys.stderr)
        print(f"qwenimage-jax: unknown command {name!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, help_text = COMMANDS[name]
    prog = f"qwenimage-jax {name}"
    args = None
    try:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:
                print(f"qwenimage-jax: command {name!r} is not implemented yet", file=sys.stderr)
                return 2
            raise
        parser = argparse.ArgumentParser(prog=prog, description=help_text)
        module.add_arguments(parser)
        parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)  # for --help; main() strips it
        if name in COMPILE_CACHE_COMMANDS:
            parser.add_argument("--compilation-cache", default=None, metavar="DIR",
                                help="persistent XLA compilation cache (a path or gs://...): a later run with the "
                                     "same shapes loads its programs instead of compiling (or set "
                                     "JAX_COMPILATION_CACHE_DIR)")
        # `--config.key=value` overrides (trainers) pass through to the command as `args.config_overrides`.
        args, unknown = parser.parse_known_args(argv[1:])
        bad = [u for u in unknown if not u.startswith("--config.")]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.config_overrides = [u for u in unknown if u.startswith("--config.")]
        if name in COMPILE_CACHE_COMMANDS:  # before the command compiles anything
            from qwenimage_jax.parallel.compile_cache import enable_compilation_cache
            enable_compilation_cache(args.compilation_cache)
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - the boundary: every exception ends here as one line and a code
        return _report(e, prog, argv, args, debug)


def _exit_code(e: Exception, args) -> int | None:
    """The exit code of an error the user can fix, None for a bug."""
    if isinstance(e, QwenImageError):
        return e.exit_code
    if isinstance(e, OSError):  # files, disks, permissions, the network: the environment, not our logic
        if e.errno in OUTPUT_ERRNOS or isinstance(e, FileExistsError) or _is_output(e.filename, args):
            return OutputError.exit_code
        return InputError.exit_code
    if isinstance(e, ValueError):  # our checks raise ValueError with the value and the fix in the message
        return InputError.exit_code
    return None


def _is_output(filename, args) -> bool:
    """Whether `filename` is an output argument's path, lies inside it, or is a temporary file beside it."""
    if not isinstance(filename, str) or args is None:
        return False
    path = os.path.abspath(filename)
    for name in OUTPUT_ARGS:
        out = getattr(args, name, None)
        if isinstance(out, str) and out:
            out = os.path.abspath(out)
            if path == out or path.startswith((out + os.sep, out + ".")):
                return True
    return False


def _report(e: Exception, prog: str, argv: list[str], args, debug: bool) -> int:
    code = _exit_code(e, args)
    if debug:
        traceback.print_exception(e)
    if code is not None:
        message = str(e) or type(e).__name__
        if not isinstance(e, QwenImageError):  # a builtin may come from deeper code: name it, say how to see where
            message = f"{type(e).__name__}: {message} (--debug shows where it was raised)"
        print(f"{prog}: error: {message}", file=sys.stderr)
        return code
    summary = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    crash = None if debug else _save_crash(e, argv)
    if crash is None and not debug:  # the file could not be written: the traceback must not be lost
        traceback.print_exception(e)
    where = f"; traceback saved to {crash}" if crash else ""
    print(f"{prog}: internal error (a bug): {summary}{where}; please report it to {REPORT_TO}"
          + (" with that file" if crash else ""), file=sys.stderr)
    return 1


def _save_crash(e: Exception, argv: list[str]) -> str | None:
    """Writes the command line, versions and traceback to a new file in the temp directory; its path, or None."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    versions = [f"{m} {getattr(sys.modules[m], '__version__', '?')}" for m in ("jax", "jaxlib", "flax", "numpy")
                if m in sys.modules]  # only what this run imported: importing more here could fail too
    try:
        fd, path = tempfile.mkstemp(prefix=f"qwenimage-jax-crash-{stamp}-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(f"command: qwenimage-jax {shlex.join(argv)}\n")
            f.write(f"python {platform.python_version()} on {platform.platform()}; {', '.join(versions)}\n\n")
            f.write("".join(traceback.format_exception(e)))
    except OSError:
        return None
    return path


if __name__ == "__main__":
    sys.exit(main())
