"""Torch-key -> Flax-path plan for the Qwen3-VL vision tower (`model.visual.*`), paths relative to
`Qwen3VLVisionModel` (the composed model nests them under ("visual",)).

Conv3d patch embedding (O, C, T, P, P) becomes a (C*T*P*P, O) matrix (kernel == stride == the patch); the fused qkv
Linear (3*D, D) becomes (D, 3, heads, head_dim); proj (D, D) becomes (heads, head_dim, D); LayerNorm weight ->
scale; per-block tensors are stacked on a leading `layers` axis for `nn.scan`.
"""
from __future__ import annotations

import numpy as np

from qwenimage_jax.checkpoints.params import WeightSpec, linear_kernel, stack_layers, unchanged
from qwenimage_jax.models.qwen3_vl.vision import VisionConfig


def _patch_kernel(key: str) -> WeightSpec:
    return WeightSpec((key,), lambda a: np.reshape(a[0], (a[0].shape[0], -1)).T)


def _qkv_kernel(key: str, heads: int, head_dim: int) -> WeightSpec:
    return WeightSpec((key,), lambda a: np.transpose(a[0]).reshape(a[0].shape[1], 3, heads, head_dim))


def _qkv_bias(key: str, heads: int, head_dim: int) -> WeightSpec:
    return WeightSpec((key,), lambda a: a[0].reshape(3, heads, head_dim))


def _proj_kernel(key: str, heads: int, head_dim: int) -> WeightSpec:
    return WeightSpec((key,), lambda a: np.transpose(a[0]).reshape(heads, head_dim, a[0].shape[0]))


def _merger(flax_name: str, torch_prefix: str) -> dict[tuple[str, ...], WeightSpec]:
    return {
        (flax_name, "norm", "scale"): unchanged(f"{torch_prefix}norm.weight"),
        (flax_name, "norm", "bias"): unchanged(f"{torch_prefix}norm.bias"),
        (flax_name, "linear_fc1", "kernel"): linear_kernel(f"{torch_prefix}linear_fc1.weight"),
        (flax_name, "linear_fc1", "bias"): unchanged(f"{torch_prefix}linear_fc1.bias"),
        (flax_name, "linear_fc2", "kernel"): linear_kernel(f"{torch_prefix}linear_fc2.weight"),
        (flax_name, "linear_fc2", "bias"): unchanged(f"{torch_prefix}linear_fc2.bias"),
    }


def vision_plan(config: VisionConfig, prefix: str = "model.visual.") -> dict[tuple[str, ...], WeightSpec]:
    """`{flax_path: WeightSpec}` for `Qwen3VLVisionModel` params (paths relative to the vision module)."""
    heads, head_dim = config.num_heads, config.head_dim

    def stacked(fn, name):
        return stack_layers([fn(f"{prefix}blocks.{i}.{name}") for i in range(config.depth)])

    plan: dict[tuple[str, ...], WeightSpec] = {
        ("patch_embed", "kernel"): _patch_kernel(f"{prefix}patch_embed.proj.weight"),
        ("patch_embed", "bias"): unchanged(f"{prefix}patch_embed.proj.bias"),
        ("pos_embed",): unchanged(f"{prefix}pos_embed.weight"),
    }
    blocks = ("blocks",)
    for norm in ("norm1", "norm2"):
        plan[blocks + (norm, "scale")] = stacked(unchanged, f"{norm}.weight")
        plan[blocks + (norm, "bias")] = stacked(unchanged, f"{norm}.bias")
    plan[blocks + ("qkv", "kernel")] = stacked(lambda k: _qkv_kernel(k, heads, head_dim), "attn.qkv.weight")
    plan[blocks + ("qkv", "bias")] = stacked(lambda k: _qkv_bias(k, heads, head_dim), "attn.qkv.bias")
    plan[blocks + ("proj", "kernel")] = stacked(lambda k: _proj_kernel(k, heads, head_dim), "attn.proj.weight")
    plan[blocks + ("proj", "bias")] = stacked(unchanged, "attn.proj.bias")
    for name in ("linear_fc1", "linear_fc2"):
        plan[blocks + (name, "kernel")] = stacked(linear_kernel, f"mlp.{name}.weight")
        plan[blocks + (name, "bias")] = stacked(unchanged, f"mlp.{name}.bias")
    plan.update(_merger("merger", f"{prefix}merger."))
    for k in range(len(config.deepstack_visual_indexes)):
        plan.update(_merger(f"deepstack_merger_list_{k}", f"{prefix}deepstack_merger_list.{k}."))
    return plan
