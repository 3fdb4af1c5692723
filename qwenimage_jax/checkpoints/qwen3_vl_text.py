"""Torch-key -> Flax-path plan for the Qwen3-VL text decoder (`model.language_model.*` + `lm_head`).

Torch Linear (out, in) becomes a DenseGeneral kernel: q/k/v (embed, heads, head_dim), o (heads, head_dim, embed),
MLP (in, out); per-layer tensors are stacked on a leading `layers` axis for `nn.scan`.
"""
from __future__ import annotations

import numpy as np

from qwenimage_jax.checkpoints.params import WeightSpec, stack_layers, unchanged
from qwenimage_jax.models.qwen3_vl.config import TextConfig


def _in_heads(key: str, heads: int, head_dim: int) -> WeightSpec:
    """(heads*head_dim, embed) -> (embed, heads, head_dim)."""
    return WeightSpec((key,), lambda a: np.transpose(a[0]).reshape(a[0].shape[1], heads, head_dim))


def _out_heads(key: str, heads: int, head_dim: int) -> WeightSpec:
    """(embed, heads*head_dim) -> (heads, head_dim, embed)."""
    return WeightSpec((key,), lambda a: np.transpose(a[0]).reshape(heads, head_dim, a[0].shape[0]))


def _heads_bias(key: str, heads: int, head_dim: int) -> WeightSpec:
    return WeightSpec((key,), lambda a: a[0].reshape(heads, head_dim))


def _linear(key: str) -> WeightSpec:
    return WeightSpec((key,), lambda a: np.transpose(a[0]))


def text_plan(config: TextConfig, prefix: str = "model.language_model.", lm_head_key: str = "lm_head.weight",
              flax_prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], WeightSpec]:
    """`{flax_path: WeightSpec}` for `TextDecoder` params, rooted at `flax_prefix`."""
    h, kvh, dh = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    n = config.num_hidden_layers

    def layer_key(i, name):
        return f"{prefix}layers.{i}.{name}"

    def stacked(fn, name):
        return stack_layers([fn(layer_key(i, name)) for i in range(n)])

    plan: dict[tuple[str, ...], WeightSpec] = {
        ("embed_tokens", "embedding"): unchanged(f"{prefix}embed_tokens.weight"),
        ("norm", "weight"): unchanged(f"{prefix}norm.weight"),
    }
    if not config.tie_word_embeddings:
        plan[("lm_head", "kernel")] = _linear(lm_head_key)
    layers = ("layers",)
    attn = layers + ("self_attn",)
    plan[attn + ("q_proj", "kernel")] = stacked(lambda k: _in_heads(k, h, dh), "self_attn.q_proj.weight")
    plan[attn + ("k_proj", "kernel")] = stacked(lambda k: _in_heads(k, kvh, dh), "self_attn.k_proj.weight")
    plan[attn + ("v_proj", "kernel")] = stacked(lambda k: _in_heads(k, kvh, dh), "self_attn.v_proj.weight")
    plan[attn + ("o_proj", "kernel")] = stacked(lambda k: _out_heads(k, h, dh), "self_attn.o_proj.weight")
    if config.attention_bias:
        plan[attn + ("q_proj", "bias")] = stacked(lambda k: _heads_bias(k, h, dh), "self_attn.q_proj.bias")
        plan[attn + ("k_proj", "bias")] = stacked(lambda k: _heads_bias(k, kvh, dh), "self_attn.k_proj.bias")
        plan[attn + ("v_proj", "bias")] = stacked(lambda k: _heads_bias(k, kvh, dh), "self_attn.v_proj.bias")
        plan[attn + ("o_proj", "bias")] = stacked(unchanged, "self_attn.o_proj.bias")
    plan[attn + ("q_norm", "weight")] = stacked(unchanged, "self_attn.q_norm.weight")
    plan[attn + ("k_norm", "weight")] = stacked(unchanged, "self_attn.k_norm.weight")
    for name in ("gate_proj", "up_proj", "down_proj"):
        plan[layers + ("mlp", name, "kernel")] = stacked(_linear, f"mlp.{name}.weight")
    for name in ("input_layernorm", "post_attention_layernorm"):
        plan[layers + (name, "weight")] = stacked(unchanged, f"{name}.weight")
    return {flax_prefix + path: spec for path, spec in plan.items()}
