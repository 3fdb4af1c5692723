"""`qwenimage-jax convert --component {vae,transformer,text_encoder,dinov2} SRC DST`: reference dir -> Orbax dir."""
from __future__ import annotations

import time

# The kinds of `checkpoints.load` that have a diffusers/transformers directory to convert from.
COMPONENTS = ("vae", "transformer", "text_encoder", "dinov2")


def add_arguments(parser):
    parser.add_argument("--component", required=True, choices=sorted(COMPONENTS),
                        help="which component SRC holds")
    parser.add_argument("src", help="diffusers/transformers component directory (config.json + *.safetensors)")
    parser.add_argument("dst", help="output directory (config.json + Orbax params/)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the parameters are stored in")


def run(args):
    import jax.numpy as jnp

    from qwenimage_jax import checkpoints

    start = time.perf_counter()
    model = checkpoints.load(args.component, args.src, dtype=getattr(jnp, args.dtype))
    checkpoints.export(args.component, model.params, model.config, args.dst, format="orbax")
    print(f"wrote {args.component} to {args.dst} in {time.perf_counter() - start:.1f}s")
    return 0
