"""`qwenimage-jax convert --component {vae,transformer,text_encoder} SRC DST`: reference dir -> Orbax dir."""
from __future__ import annotations

import importlib
import time

# component -> (module, loader function). Each loader returns an object with `.params` and `.config`.
LOADERS = {
    "vae": ("qwenimage_jax.models.vae", "load_vae"),
    "transformer": ("qwenimage_jax.models.dit", "load_transformer"),
    "text_encoder": ("qwenimage_jax.models.qwen3_vl", "load_text_encoder"),
    "dinov2": ("qwenimage_jax.models.dinov2", "load_dinov2"),
}


def add_arguments(parser):
    parser.add_argument("--component", required=True, choices=sorted(LOADERS),
                        help="which component SRC holds")
    parser.add_argument("src", help="diffusers/transformers component directory (config.json + *.safetensors)")
    parser.add_argument("dst", help="output directory (config.json + Orbax params/)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="dtype the parameters are stored in")


def run(args):
    import jax.numpy as jnp

    from qwenimage_jax.convert.orbax_io import save_component

    module, fn = LOADERS[args.component]
    loader = getattr(importlib.import_module(module), fn)
    start = time.perf_counter()
    model = loader(args.src, dtype=getattr(jnp, args.dtype))
    save_component(args.dst, model.params, dict(model.config), args.component)
    print(f"wrote {args.component} to {args.dst} in {time.perf_counter() - start:.1f}s")
    return 0
