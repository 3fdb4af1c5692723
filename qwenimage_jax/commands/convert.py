"""`qwenimage-jax convert --component {vae,transformer,text_encoder,dinov2} SRC DST`: reference dir -> Orbax dir.

`--quantize {int8,fp8,int4}` (transformer, text_encoder): DST holds the quantized weights instead
(`checkpoints.quantize.save_quantized`: values, scales and the mode in config.json), quantized tensor by tensor as
SRC is read; `sample --model`, the pipeline and `checkpoints.load` read it back without quantizing again.

DST is written under a temporary name beside it and renamed into place at the end (`io_utils.atomic_dir`), so a
convert that fails or is interrupted leaves no partial DST; a DST that already holds something is replaced only
with `--overwrite`, and that is checked before SRC is read.
"""
from __future__ import annotations

import time

from qwenimage_jax.errors import OutputExistsError

# The kinds of `checkpoints.load` that have a diffusers/transformers directory to convert from.
COMPONENTS = ("vae", "transformer", "text_encoder", "dinov2")


def add_arguments(parser):
    parser.add_argument("--component", required=True, choices=sorted(COMPONENTS),
                        help="which component SRC holds")
    parser.add_argument("src", help="diffusers/transformers component directory (config.json + *.safetensors)")
    parser.add_argument("dst", help="output directory (config.json + Orbax params/); must be absent or empty "
                                    "unless --overwrite")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the parameters are stored in")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "fp8", "int4"],
                        help="transformer / text_encoder: store weight-only quantized kernels (docs/quantization.md)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace DST when it already holds files (the old contents are removed only once the "
                             "new component is complete)")


def check_destination(dst: str, overwrite: bool) -> None:
    """Refuses a DST that holds anything, before any weight is read: a convert used to write its config.json over
    another component's and exit 0."""
    from qwenimage_jax.io_utils import dir_contents

    held = dir_contents(dst)
    if held is None or overwrite:
        return
    shown = ", ".join(held[:5]) + (f", ... ({len(held)} entries)" if len(held) > 5 else "")
    raise OutputExistsError(f"{dst} already holds {shown}; pass --overwrite to replace it, or choose an empty or "
                            "new directory")


def run(args):
    import jax.numpy as jnp

    from qwenimage_jax import checkpoints
    from qwenimage_jax.io_utils import atomic_dir

    from qwenimage_jax.checkpoints import quantize as quant
    from qwenimage_jax.errors import InputValueError

    mode = quant.check_mode(args.quantize)
    if mode is not None and args.component not in ("transformer", "text_encoder"):
        raise InputValueError(f"--quantize {mode} applies to --component transformer or text_encoder, not "
                              f"{args.component} (the VAE and DINOv2 keep their dtype)")
    check_destination(args.dst, args.overwrite)
    start = time.perf_counter()
    if mode is not None:
        model = checkpoints.load(args.component, args.src, dtype=getattr(jnp, args.dtype), quantize=mode)
        quant.save_quantized(model, args.dst, overwrite=args.overwrite)
    else:
        model = checkpoints.load(args.component, args.src, dtype=getattr(jnp, args.dtype))
        with atomic_dir(args.dst, overwrite=args.overwrite) as tmp:
            checkpoints.export(args.component, model.params, model.config, tmp, format="orbax")
    print(f"wrote {args.component}{f' ({mode})' if mode else ''} to {args.dst} in {time.perf_counter() - start:.1f}s")
    return 0
