"""Qwen3-VL vision tower in Flax Linen (transformers `Qwen3VLVisionModel`): 3D patch embedding, learned position grid
bilinearly resampled to each image's patch grid, 2D (axial) rotate-half RoPE, pre-norm ViT blocks with attention
full inside each image/frame, the 2x2 patch merger, and the DeepStack mergers fed by chosen block outputs.

Everything that depends only on `grid_thw` (patch coordinates, interpolation taps, rotary tables, the
block-diagonal attention mask) is numpy computed at trace time, so `grid_thw` is a static tuple of (t, h, w).
Patches arrive as the processor emits them: frame-major, then 2x2 merge blocks in raster order, then the 4 patches
of a block (`processor.preprocess_images`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.models.attention import attention
from qwenimage_jax.models.layers import rotate_half
from qwenimage_jax.models.qwen3_vl.text import Projection

Dtype = Any
Grid = tuple[tuple[int, int, int], ...]

_ACTIVATIONS = {"gelu_pytorch_tanh": True, "gelu_new": True, "gelu": False}  # name -> tanh approximation


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """Hyper-parameters of `Qwen3VLVisionModel` (defaults: the Qwen3-VL-8B tower except out_hidden_size)."""
    depth: int = 27
    hidden_size: int = 1152
    hidden_act: str = "gelu_pytorch_tanh"
    intermediate_size: int = 4304
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    out_hidden_size: int = 3584
    num_position_embeddings: int = 2304
    deepstack_visual_indexes: tuple[int, ...] = (8, 16, 24)
    rope_theta: float = 10000.0
    layer_norm_eps: float = 1e-6

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if (self.hidden_size // self.num_heads) % 4:
            raise ValueError(f"head_dim={self.hidden_size // self.num_heads} must be a multiple of 4 for the 2D RoPE")
        side = int(self.num_position_embeddings ** 0.5)
        if side * side != self.num_position_embeddings:
            raise ValueError(f"num_position_embeddings={self.num_position_embeddings} is not a square grid")
        if self.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; choose one of {sorted(_ACTIVATIONS)}")
        bad = [i for i in self.deepstack_visual_indexes if not 0 <= i < self.depth]
        if bad:
            raise ValueError(f"deepstack_visual_indexes {bad} are outside the {self.depth} vision blocks")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened pixel patch: C * T * P * P."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any]) -> "VisionConfig":
        """From the `vision_config` dict of a transformers `Qwen3VLConfig` (or a whole Qwen3VLConfig dict)."""
        config = dict(config.get("vision_config", config))
        rope = dict(config.get("rope_parameters") or {})
        if rope.get("rope_type", "axial") != "axial":
            raise ValueError(f"vision rope_type={rope.get('rope_type')!r} is not supported; Qwen3-VL uses 'axial'")
        defaults = cls()
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name in config:
                value = config[field.name]
                kwargs[field.name] = tuple(value) if isinstance(value, list) else value
        for name in ("patch_size", "temporal_patch_size"):
            value = kwargs.get(name, getattr(defaults, name))
            if isinstance(value, tuple):
                if len(set(value)) != 1:
                    raise ValueError(f"non-square {name}={value} is not supported")
                kwargs[name] = value[0]
        kwargs["rope_theta"] = float(rope.get("rope_theta", defaults.rope_theta))
        return cls(**kwargs)


def vision_config_from_hf(config: Mapping[str, Any]) -> VisionConfig:
    """Alias of `VisionConfig.from_hf_dict` (the composition looks this name up)."""
    return VisionConfig.from_hf_dict(config)


# ------------------------------------------------------------------------------------- static tables (numpy)
def normalize_grid(grid_thw) -> Grid:
    """(n, 3) array/list of (t, h, w) -> hashable tuple of int tuples (the static jit argument)."""
    grid = tuple(tuple(int(v) for v in row) for row in np.asarray(grid_thw).reshape(-1, 3))
    if not grid:
        raise ValueError("grid_thw is empty: no image to encode")
    return grid


def patch_coordinates(grid_thw: Grid, merge: int) -> np.ndarray:
    """(N, 2) int (row, col) of every patch, frames repeated, in merge-block order within a frame."""
    out = []
    for t, h, w in grid_thw:
        if h % merge or w % merge:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) is not divisible by spatial_merge_size={merge}")
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        shape = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        cols = cols.reshape(shape).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([rows, cols], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0)


def position_interpolation(grid_thw: Grid, num_grid_per_side: int, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Bilinear (align_corners=True) resampling of the square learned grid to each image's (h, w) patch grid.

    Returns indices (N, 4) int32 into the flattened table and weights (N, 4) float32, patch order as
    `patch_coordinates`; pos_embed = sum_k table[indices[:, k]] * weights[:, k].
    """
    side = num_grid_per_side
    coords = patch_coordinates(grid_thw, merge)
    sizes = np.concatenate([np.tile([[h, w]], (t * h * w, 1)) for t, h, w in grid_thw], axis=0)

    def axis(index, size):  # -> taps (N, 2), weights (N, 2); float32 arithmetic like the reference
        src = index.astype(np.float32) * np.float32(side - 1) / np.maximum(size - 1, 1).astype(np.float32)
        floor = np.floor(src)
        offsets = np.arange(2)
        taps = np.clip(floor.astype(np.int64)[:, None] + offsets, 0, side - 1)
        weights = np.clip(1 - np.abs(src[:, None] - floor[:, None] - offsets.astype(np.float32)), 0, None)
        return taps, weights.astype(np.float32)

    h_taps, h_weights = axis(coords[:, 0], sizes[:, 0])
    w_taps, w_weights = axis(coords[:, 1], sizes[:, 1])
    indices = (h_taps[:, :, None] * side + w_taps[:, None, :]).reshape(-1, 4)
    weights = (h_weights[:, :, None] * w_weights[:, None, :]).reshape(-1, 4)
    return indices.astype(np.int32), weights.astype(np.float32)


def rotary_cos_sin(grid_thw: Grid, head_dim: int, theta: float, merge: int) -> tuple[np.ndarray, np.ndarray]:
    """Axial 2D RoPE tables (N, head_dim) float32 in rotate-half layout: angles cat(row*inv, col*inv) twice."""
    quarter = head_dim // 2
    inv_freq = (1.0 / (np.float32(theta) ** (np.arange(0, quarter, 2, dtype=np.float32) / np.float32(quarter))))
    inv_freq = inv_freq.astype(np.float32)
    coords = patch_coordinates(grid_thw, merge).astype(np.float32)
    freqs = coords[:, :, None] * inv_freq  # (N, 2, head_dim/4)
    angles = np.concatenate([freqs[:, 0], freqs[:, 1]], axis=-1)  # (N, head_dim/2)
    angles = np.concatenate([angles, angles], axis=-1)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def frame_attention_mask(grid_thw: Grid) -> np.ndarray | None:
    """(N, N) bool block-diagonal mask, one block per frame of each image; None when there is a single frame."""
    lengths = [h * w for t, h, w in grid_thw for _ in range(t)]
    if len(lengths) == 1:
        return None
    segment = np.repeat(np.arange(len(lengths)), lengths)
    return segment[:, None] == segment[None, :]


# ------------------------------------------------------------------------------------------------- modules
def _layer_norm(dim_name: str, eps: float, param_dtype, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=eps, dtype=jnp.float32, param_dtype=param_dtype, use_fast_variance=False,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (dim_name,)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (dim_name,)), name=name)


def _apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (N, heads, head_dim), cos/sin (N, head_dim): fp32 x*cos + rotate_half(x)*sin, back to x's dtype."""
    x32 = x.astype(jnp.float32)
    return (x32 * cos[:, None] + rotate_half(x32) * sin[:, None]).astype(x.dtype)


class VisionBlock(nn.Module):
    """Pre-norm ViT block, shaped as an `nn.scan` body.

    carry = (x (N, D), taps (K, N, D)); after the block, x is written to taps[slot] when slot >= 0 (the DeepStack
    tap of this layer).
    """
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_backend: str = "xla"

    @nn.compact
    def __call__(self, carry, cos, sin, mask, slot):
        x, taps = carry
        cfg = self.config
        heads, head_dim = cfg.num_heads, cfg.head_dim
        normed = _layer_norm("norm", cfg.layer_norm_eps, self.param_dtype, "norm1")(x).astype(self.dtype)
        qkv = Projection((3, heads, head_dim), 1, ("embed", "qkv", "heads", "head_dim"), True, self.dtype,
                         self.param_dtype, name="qkv")(normed)  # (N, 3, H, Dh)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, ("activation_length", "activation_heads", "activation_head_dim"))
        out = attention(q[None], k[None], v[None], mask=mask, backend=self.attention_backend)[0]
        out = Projection((cfg.hidden_size,), 2, ("heads", "head_dim", "embed"), True, self.dtype, self.param_dtype,
                         name="proj")(out)
        x = x + out.astype(x.dtype)
        normed = _layer_norm("norm", cfg.layer_norm_eps, self.param_dtype, "norm2")(x).astype(self.dtype)
        hidden = Projection((cfg.intermediate_size,), 1, ("embed", "mlp"), True, self.dtype, self.param_dtype,
                            name="linear_fc1")(normed)
        hidden = jax.nn.gelu(hidden, approximate=_ACTIVATIONS[cfg.hidden_act])
        hidden = nn.with_logical_constraint(hidden, ("activation_length", "activation_mlp"))
        x = x + Projection((cfg.hidden_size,), 1, ("mlp", "embed"), True, self.dtype, self.param_dtype,
                           name="linear_fc2")(hidden).astype(x.dtype)
        x = nn.with_logical_constraint(x, ("activation_length", "activation_embed"))
        updated = jax.lax.dynamic_update_index_in_dim(taps, x.astype(taps.dtype), jnp.maximum(slot, 0), axis=0)
        taps = jnp.where(slot >= 0, updated, taps)
        return (x, taps), None


class PatchMerger(nn.Module):
    """LayerNorm (per patch, or after the 2x2 shuffle when `postshuffle_norm`) -> 2x2 concat -> Linear -> GELU
    (exact) -> Linear: (N, D) -> (N / merge^2, out_hidden_size)."""
    config: VisionConfig
    postshuffle_norm: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        merged = cfg.hidden_size * cfg.spatial_merge_size ** 2
        norm = _layer_norm("norm", cfg.layer_norm_eps, self.param_dtype, "norm")
        if self.postshuffle_norm:
            x = norm(x.reshape(-1, merged))
        else:
            x = norm(x).reshape(-1, merged)
        x = x.astype(self.dtype)
        x = Projection((merged,), 1, ("embed", "mlp"), True, self.dtype, self.param_dtype, name="linear_fc1")(x)
        x = jax.nn.gelu(x, approximate=False)
        return Projection((cfg.out_hidden_size,), 1, ("mlp", "embed"), True, self.dtype, self.param_dtype,
                          name="linear_fc2")(x)


class Qwen3VLVisionModel(nn.Module):
    """`Qwen3VLVisionModel`. Params: patch_embed/proj, pos_embed, blocks (scanned, leading `layers` axis), merger,
    deepstack_merger_list_{k}."""
    config: VisionConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    attention_backend: str = "xla"   # see models.attention.BACKENDS
    remat_policy: str = "none"       # "none" or a name in jax.checkpoint_policies

    @nn.compact
    def __call__(self, pixel_values: jax.Array, grid_thw: Sequence[Sequence[int]]):
        """pixel_values (N_patches, C*T*P*P), grid_thw static ((t, h, w), ...) in patches ->
        (image_embeds (N_patches / merge^2, out_hidden), deepstack tuple of the same shape, one per tapped block)."""
        cfg = self.config
        grid = normalize_grid(grid_thw)
        n = sum(t * h * w for t, h, w in grid)
        if pixel_values.ndim != 2 or pixel_values.shape != (n, cfg.patch_dim):
            raise ValueError(f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw {grid} needs "
                             f"({n}, {cfg.patch_dim}) (patches x C*T*P*P)")
        merge = cfg.spatial_merge_size

        x = Projection((cfg.hidden_size,), 1, ("in_features", "embed"), True, self.dtype, self.param_dtype,
                       name="patch_embed")(pixel_values.astype(self.dtype))
        table = self.param("pos_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                                     ("in_features", "embed")),
                           (cfg.num_position_embeddings, cfg.hidden_size), self.param_dtype)
        side = int(round(cfg.num_position_embeddings ** 0.5))
        indices, weights = position_interpolation(grid, side, merge)
        pos = jnp.einsum("nkd,nk->nd", table[jnp.asarray(indices)].astype(jnp.float32), jnp.asarray(weights))
        x = x + pos.astype(x.dtype)
        x = nn.with_logical_constraint(x, ("activation_length", "activation_embed"))

        cos, sin = (jnp.asarray(a) for a in rotary_cos_sin(grid, cfg.head_dim, cfg.rope_theta, merge))
        mask = frame_attention_mask(grid)
        taps_k = len(cfg.deepstack_visual_indexes)
        slots = np.full((cfg.depth,), -1, np.int32)
        for k, layer in enumerate(cfg.deepstack_visual_indexes):
            slots[layer] = k
        taps = jnp.zeros((max(taps_k, 1),) + x.shape, x.dtype)

        block = VisionBlock
        if self.remat_policy != "none":
            block = nn.remat(block, policy=getattr(jax.checkpoint_policies, self.remat_policy), prevent_cse=False)
        blocks = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0), length=cfg.depth,
                         metadata_params={nn.PARTITION_NAME: "layers"})(
            cfg, self.dtype, self.param_dtype, self.attention_backend, name="blocks")
        (x, taps), _ = blocks((x, taps), cos, sin, mask, jnp.asarray(slots))

        image_embeds = PatchMerger(cfg, False, self.dtype, self.param_dtype, name="merger")(x)
        deepstack = tuple(PatchMerger(cfg, True, self.dtype, self.param_dtype, name=f"deepstack_merger_list_{k}")(
            taps[k]) for k in range(taps_k))
        return image_embeds, deepstack
