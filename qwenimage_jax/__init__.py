"""qwenimage-jax: Qwen-Image-2 (VAE f16c64, single-stream DiT, Qwen3-VL text encoder) in JAX/Flax.

Public entry points (imported lazily so `import qwenimage_jax` stays cheap):

    load(kind, path, dtype=jnp.float32, mesh=None) -> the loaded component (checkpoints.load; kinds vae,
                                                   transformer, text_encoder, dinov2, lpips; reference or Orbax dir)
    export(kind, params, config, path)           -> checkpoints.export (diffusers/transformers or Orbax format)
    load_vae / load_transformer / load_text_encoder / load_dinov2 / load_lpips(path, dtype)   the same per kind
    QwenImagePipeline.from_pretrained(path)      -> sampling.pipeline.QwenImagePipeline
"""
import importlib

__version__ = "0.1.0"

_LAZY = {
    "load": "qwenimage_jax.checkpoints",
    "export": "qwenimage_jax.checkpoints",
    "load_vae": "qwenimage_jax.checkpoints",
    "load_transformer": "qwenimage_jax.checkpoints",
    "init_transformer": "qwenimage_jax.models.dit",
    "init_vae": "qwenimage_jax.models.vae",
    "load_text_encoder": "qwenimage_jax.checkpoints",
    "QwenImagePipeline": "qwenimage_jax.sampling.pipeline",
    "make_mesh": "qwenimage_jax.parallel.mesh",
    "load_lpips": "qwenimage_jax.checkpoints",
    "load_dinov2": "qwenimage_jax.checkpoints",
}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'qwenimage_jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_LAZY))
