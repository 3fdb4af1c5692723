"""qwenimage-jax: Qwen-Image-2 (VAE f16c64, single-stream DiT, Qwen3-VL text encoder) in JAX/Flax.

Public entry points (imported lazily so `import qwenimage_jax` stays cheap):

    load_vae(path, dtype=jnp.float32)            -> models.vae.VAE            (diffusers dir or our Orbax dir)
    load_transformer(path, dtype=jnp.float32)    -> models.dit.Transformer    (diffusers dir or our Orbax dir)
    load_text_encoder(path, dtype=jnp.float32)   -> models.qwen3_vl.TextEncoder (transformers dir)
    QwenImagePipeline.from_pretrained(path)      -> sampling.pipeline.QwenImagePipeline
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "load_vae": "qwenimage_jax.models.vae",
    "load_transformer": "qwenimage_jax.models.dit",
    "init_transformer": "qwenimage_jax.models.dit",
    "init_vae": "qwenimage_jax.models.vae",
    "load_text_encoder": "qwenimage_jax.models.qwen3_vl",
    "QwenImagePipeline": "qwenimage_jax.sampling.pipeline",
    "make_mesh": "qwenimage_jax.parallel.mesh",
    "load_lpips": "qwenimage_jax.models.lpips",
    "load_dinov2": "qwenimage_jax.models.dinov2",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwenimage_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
