"""Qwen3-VL (the Qwen-Image-2 text encoder) in Flax: text decoder, vision tower, composition (the loaded object is `text.encoder.TextEncoder`, built by
`checkpoints.load("text_encoder", path)`)."""
from qwenimage_jax.models.qwen3_vl.config import MultimodalIds, TextConfig, text_config_from_hf
from qwenimage_jax.models.qwen3_vl.model import Qwen3VL, build_module
from qwenimage_jax.models.qwen3_vl.text import TextDecoder, init_kv_cache

__all__ = ["MultimodalIds", "TextConfig", "text_config_from_hf", "Qwen3VL", "build_module",
           "TextDecoder", "init_kv_cache"]
