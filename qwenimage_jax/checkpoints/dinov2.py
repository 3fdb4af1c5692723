"""Torch-key -> Flax-path plan for transformers `Dinov2Model` checkpoints.

Accepts both key layouts: the one on the Hub and written by `save_pretrained` (`attention.attention.query`,
`attention.output.dense`, SwiGLU `mlp.weights_in` = [gate; up] stacked on the output axis, `mlp.weights_out`) and
transformers 5's in-memory names (`attention.q_proj`, ..., `mlp.gate_proj/up_proj/down_proj`), with an optional
`dinov2.` prefix (checkpoints of `Dinov2ForImageClassification`; its classifier is ignored). Linear `(out, in)` ->
Dense `(in, out)`; the patch Conv2d `(O, I, p, p)` -> `(p, p, I, O)`; per-layer leaves are stacked for `nn.scan`.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

import numpy as np

from qwenimage_jax.checkpoints.params import WeightSpec, conv2d_kernel, linear_kernel, stack_layers, unchanged

if TYPE_CHECKING:
    from qwenimage_jax.models.dinov2 import Dinov2Config

# Present in checkpoints, unused for inference: the masked-image-modelling token and a classification head.
DINOV2_IGNORE = ("embeddings.mask_token", "dinov2.embeddings.mask_token", "classifier.*")


def _half(key: str, index: int) -> WeightSpec:
    """One half (0: gate, 1: up) of the fused SwiGLU input projection, split on the torch output axis;
    a weight `(2H, in)` becomes a Dense kernel `(in, H)`, a bias `(2H,)` becomes `(H,)`."""
    def transform(arrays):
        half = np.split(arrays[0], 2, axis=0)[index]
        return np.transpose(half) if half.ndim == 2 else half
    return WeightSpec((key,), transform)


def dinov2_plan(cfg: "Dinov2Config", checkpoint_keys: Iterable[str]) -> dict[tuple[str, ...], WeightSpec]:
    keys = set(checkpoint_keys)
    prefix = "dinov2." if "dinov2.embeddings.cls_token" in keys else ""
    legacy = f"{prefix}encoder.layer.0.attention.q_proj.weight" not in keys
    linear_names = ({"q_proj": "attention.attention.query", "k_proj": "attention.attention.key",
                     "v_proj": "attention.attention.value", "o_proj": "attention.output.dense"} if legacy else
                    {name: f"attention.{name}" for name in ("q_proj", "k_proj", "v_proj", "o_proj")})
    if cfg.use_swiglu_ffn:
        if legacy:
            mlp = {"gate_proj": lambda p, leaf: _half(f"{p}mlp.weights_in.{leaf}", 0),
                   "up_proj": lambda p, leaf: _half(f"{p}mlp.weights_in.{leaf}", 1),
                   "down_proj": lambda p, leaf: _T[leaf](f"{p}mlp.weights_out.{leaf}")}
        else:
            mlp = {n: (lambda p, leaf, n=n: _T[leaf](f"{p}mlp.{n}.{leaf}"))
                   for n in ("gate_proj", "up_proj", "down_proj")}
    else:
        mlp = {n: (lambda p, leaf, n=n: _T[leaf](f"{p}mlp.{n}.{leaf}")) for n in ("fc1", "fc2")}

    layers = [f"{prefix}encoder.layer.{i}." for i in range(cfg.num_hidden_layers)]
    per_layer: dict[tuple[str, ...], list[WeightSpec]] = {}

    def add(path: tuple[str, ...], make):
        per_layer[path] = [make(p) for p in layers]

    for flax_name, torch_name in linear_names.items():
        add((flax_name, "kernel"), lambda p, t=torch_name: linear_kernel(f"{p}{t}.weight"))
        if cfg.qkv_bias or flax_name == "o_proj":
            add((flax_name, "bias"), lambda p, t=torch_name: unchanged(f"{p}{t}.bias"))
    for flax_name, make in mlp.items():
        for leaf in ("weight", "bias"):
            add((flax_name, _FLAX_LEAF[leaf]), lambda p, m=make, leaf=leaf: m(p, leaf))
    for norm in ("norm1", "norm2"):
        add((norm, "scale"), lambda p, n=norm: unchanged(f"{p}{n}.weight"))
        add((norm, "bias"), lambda p, n=norm: unchanged(f"{p}{n}.bias"))
    for scale in ("layer_scale1", "layer_scale2"):
        add((scale,), lambda p, s=scale: unchanged(f"{p}{s}.lambda1"))

    plan: dict[tuple[str, ...], WeightSpec] = {
        ("embeddings", "cls_token"): unchanged(f"{prefix}embeddings.cls_token"),
        ("embeddings", "position_embeddings"): unchanged(f"{prefix}embeddings.position_embeddings"),
        ("embeddings", "patch_embeddings", "kernel"):
            conv2d_kernel(f"{prefix}embeddings.patch_embeddings.projection.weight"),
        ("embeddings", "patch_embeddings", "bias"): unchanged(f"{prefix}embeddings.patch_embeddings.projection.bias"),
        ("layernorm", "scale"): unchanged(f"{prefix}layernorm.weight"),
        ("layernorm", "bias"): unchanged(f"{prefix}layernorm.bias"),
    }
    for path, specs in per_layer.items():
        plan[("encoder",) + path] = stack_layers(specs)
    return plan


_T = {"weight": linear_kernel, "bias": unchanged}
_FLAX_LEAF = {"weight": "kernel", "bias": "bias"}
