"""Qwen3-VL as the frozen Qwen-Image-2 text encoder: the composed Linen module (token embeddings, image embeddings
scattered into `<|image_pad|>` slots, DeepStack, text decoder). The loaded object with tokenizer, image processor
and jitted `encode` / `logits` / `encode_prompt` / `generate` is `text.encoder.TextEncoder`.

The vision tower is `vision.py`'s `Qwen3VLVisionModel`; the multimodal rope index is `text.processor.get_rope_index`.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenimage_jax.models.qwen3_vl.config import (MultimodalIds, TextConfig, multimodal_ids_from_hf,
                                                  text_config_from_hf)
from qwenimage_jax.models.qwen3_vl.text import TextDecoder
from qwenimage_jax.models.qwen3_vl.vision import Qwen3VLVisionModel, vision_config_from_hf

Dtype = Any


def scatter_image_tokens(text_embeds: jax.Array, image_mask: jax.Array, image_embeds: jax.Array) -> jax.Array:
    """`masked_scatter`: rows of image_embeds (N, D) fill the True slots of image_mask (B, S) in row-major order.

    text_embeds (B, S, D) -> (B, S, D). Also used for DeepStack rows with zeros as `text_embeds`.
    """
    flat = image_mask.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, max(image_embeds.shape[0] - 1, 0))
    gathered = image_embeds[index].reshape(text_embeds.shape).astype(text_embeds.dtype)
    return jnp.where(image_mask[..., None], gathered, text_embeds)


class Qwen3VL(nn.Module):
    """`Qwen3VLForConditionalGeneration` without the video path. Params: language_model (+ visual)."""
    text_config: TextConfig
    ids: MultimodalIds = MultimodalIds()
    vision_config: Any = None  # the vision module's config, or None for a text-only module
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.language_model = TextDecoder(self.text_config, self.dtype, self.param_dtype)
        if self.vision_config is not None:
            self.visual = Qwen3VLVisionModel(self.vision_config, dtype=self.dtype, param_dtype=self.param_dtype)

    def embed_inputs(self, input_ids, pixel_values=None, grid_thw=None):
        """input_ids (B, S) [+ pixel_values (N_patches, C*T*P*P), grid_thw static ((t, h, w), ...)] ->
        (inputs_embeds (B, S, D), deepstack (K, B, S, D) or None)."""
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            return embeds, None
        if self.vision_config is None:
            raise ValueError("this text encoder was built without a vision tower; cannot take pixel_values")
        image_embeds, deepstack = self.visual(pixel_values, grid_thw)
        image_mask = input_ids == self.ids.image_token_id
        embeds = scatter_image_tokens(embeds, image_mask, image_embeds)
        if not deepstack:
            return embeds, None
        zeros = jnp.zeros_like(embeds)
        dense = jnp.stack([scatter_image_tokens(zeros, image_mask, d) for d in deepstack])
        return embeds, dense

    def __call__(self, input_ids, attention_mask, position_ids, pixel_values=None, grid_thw=None,
                 compute_logits=True):
        """input_ids/attention_mask (B, S); position_ids (3, B, S) -> dict(pre_norm (B, S, D), logits (B, S, V))."""
        embeds, deepstack = self.embed_inputs(input_ids, pixel_values, grid_thw)
        return self.language_model(embeds, position_ids, attention_mask, deepstack, compute_logits=compute_logits)

    def step(self, input_ids, positions, kv_mask, cache, cache_index, extra=None):
        """Generation step (see `text.generate.Decoder`): logits (B, T, V), cache.

        extra: None, or {"position_ids": (3, B, T)} and/or {"inputs_embeds": (B, T, D), "deepstack": (K, B, T, D)}.
        """
        extra = extra or {}
        embeds = extra.get("inputs_embeds")
        if embeds is None:
            embeds = self.language_model.embed(input_ids)
        position_ids = extra.get("position_ids", positions)
        out = self.language_model(embeds, position_ids, None, extra.get("deepstack"), cache=cache,
                                  cache_index=cache_index, kv_mask=kv_mask)
        return out["logits"], out["cache"]


def build_module(hf_config: dict, dtype=jnp.float32, param_dtype=None, with_vision: Optional[bool] = None) -> Qwen3VL:
    """Qwen3VL module from a transformers config dict. with_vision: None = a vision tower when the config has a
    `vision_config`; True = require one; False = text only."""
    if with_vision and "vision_config" not in hf_config:
        raise ValueError("with_vision=True but the config has no vision_config; pass with_vision=False or None")
    vision_cfg = None
    if with_vision is not False and "vision_config" in hf_config:
        vision_cfg = vision_config_from_hf(hf_config["vision_config"])
    return Qwen3VL(text_config_from_hf(hf_config), multimodal_ids_from_hf(hf_config), vision_cfg, dtype,
                   param_dtype if param_dtype is not None else dtype)


def abstract_params(module: Qwen3VL, hf_config: Optional[dict] = None):
    """Boxed (nn.Partitioned) ShapeDtypeStruct params tree, without allocating.

    With a vision tower, a dummy one-token image (grid (1, merge, merge)) is traced so its params exist too;
    hf_config supplies the patch geometry then.
    """
    ids = jnp.zeros((1, 4), jnp.int32)
    pos = jnp.zeros((3, 1, 4), jnp.int32)
    pixels = grid = None
    if module.vision_config is not None:
        vision = (hf_config or {}).get("vision_config", {})
        merge = vision.get("spatial_merge_size", 2)
        patch_dim = (vision.get("in_channels", 3) * vision.get("temporal_patch_size", 2)
                     * vision.get("patch_size", 16) ** 2)
        ids = ids.at[0, 1].set(module.ids.image_token_id)
        pixels = jnp.zeros((merge * merge, patch_dim), module.dtype)
        grid = ((1, merge, merge),)

    def init():
        return module.init(jax.random.PRNGKey(0), ids, jnp.ones((1, 4), jnp.int32), pos, pixels, grid,
                           compute_logits=True)["params"]

    return jax.eval_shape(init)
