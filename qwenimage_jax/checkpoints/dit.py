"""Torch-key -> Flax-path plan for the Qwen-Image-2 DiT (`QwenImage21Transformer2DModel` -> `models.dit.DiT`).

Per-block tensors are stacked on a leading `layers` axis (the blocks run under `nn.scan`); attention projections
are reshaped to (embed, heads, head_dim) / (heads, head_dim, embed) so heads can be sharded by name. Every spec
carries its reference shapes, so `export_tensors` inverts this plan without torch (`checkpoints/exporters.py`).
"""
from __future__ import annotations

import numpy as np

from qwenimage_jax.checkpoints.params import WeightSpec, linear_kernel, stack_layers, unchanged


def _heads_in(key: str, heads: int, head_dim: int) -> WeightSpec:
    """torch (heads*head_dim, embed) -> (embed, heads, head_dim)."""
    return WeightSpec((key,), lambda a: np.transpose(a[0]).reshape(-1, heads, head_dim),
                      lambda s: ((s[1] * s[2], s[0]),))


def _heads_out(key: str, heads: int, head_dim: int) -> WeightSpec:
    """torch (embed, heads*head_dim) -> (heads, head_dim, embed)."""
    return WeightSpec((key,), lambda a: np.transpose(a[0]).reshape(heads, head_dim, -1),
                      lambda s: ((s[2], s[0] * s[1]),))


def dit_plan(config) -> dict[tuple[str, ...], WeightSpec]:
    """`config`: a `models.dit.DiTConfig`. Returns `{flax_path: WeightSpec}` for `assemble_params`."""
    heads, head_dim, layers = config.num_attention_heads, config.attention_head_dim, config.num_layers
    plan = {
        ("img_in", "kernel"): linear_kernel("img_in.weight"),
        ("time_linear_1", "kernel"): linear_kernel("time_text_embed.timestep_embedder.linear_1.weight"),
        ("time_linear_2", "kernel"): linear_kernel("time_text_embed.timestep_embedder.linear_2.weight"),
        ("modulation", "kernel"): linear_kernel("modulation.1.weight"),
        ("txt_in", "text_norm", "scale"): unchanged("txt_in.text_norm.weight"),
        ("txt_in", "in_layer", "kernel"): linear_kernel("txt_in.in_layer.weight"),
        ("txt_in", "out_layer", "kernel"): linear_kernel("txt_in.out_layer.weight"),
        ("norm_out", "kernel"): linear_kernel("norm_out.linear.weight"),
        ("proj_out", "kernel"): linear_kernel("proj_out.weight"),
    }

    def block(fn, suffix):
        return stack_layers([fn(f"transformer_blocks.{i}.{suffix}") for i in range(layers)])

    for name in ("to_q", "to_k", "to_v"):
        plan[("blocks", "attn", name, "kernel")] = block(lambda k: _heads_in(k, heads, head_dim),
                                                         f"attn.{name}.weight")
    plan[("blocks", "attn", "to_out", "kernel")] = block(lambda k: _heads_out(k, heads, head_dim),
                                                         "attn.to_out.0.weight")
    for name in ("norm_q", "norm_k"):
        plan[("blocks", "attn", name, "scale")] = block(unchanged, f"attn.{name}.weight")
    for name in ("proj", "gate_layer", "out"):
        plan[("blocks", "mlp", name, "kernel")] = block(linear_kernel, f"img_mlp.{name}.weight")
    return plan
