"""The one table that maps logical axis names to mesh axes, and helpers that apply it.

Every parameter is created with `nn.with_logical_partitioning(init, names)` and every key activation is
constrained with `nn.with_logical_constraint(x, names)`; this table alone decides where they live.
Mesh axes: `data` (pure data parallel), `fsdp` (data parallel + parameter sharding), `tensor` (Megatron-style
model parallel over heads / mlp / vocab), `context` (reserved for sequence sharding).
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax

MESH_AXES = ("data", "fsdp", "tensor", "context")

# (logical name, mesh axes). Parameters use the plain names, activations the `activation_*` names.
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("qkv", None),
    ("kv", None),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("lora_rank", None),      # LoRA factors: the rank axis is tiny, the other axis follows its base kernel
    ("norm", None),
    ("conv_height", None),
    ("conv_width", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("modulation", "tensor"),
    ("in_features", None),
    ("out_features", None),
    # activations
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", "context"),
    ("activation_embed", None),
    ("activation_heads", "tensor"),
    ("activation_kv_heads", "tensor"),
    ("activation_head_dim", None),
    ("activation_mlp", "tensor"),
    ("activation_vocab", "tensor"),
    ("activation_height", None),
    ("activation_width", None),
    ("activation_channels", None),
)


# Named presets a config selects with `sharding_rules` (default "fsdp"): the same logical names, other placements.
_PARAM_NAMES = ("embed", "mlp", "heads", "kv_heads", "vocab", "conv_out", "modulation")


def _override(rules, **changes):
    return tuple((name, changes.get(name, axes)) for name, axes in rules)


RULE_PRESETS: dict[str, tuple[tuple[str, Any], ...]] = {
    # ZeRO-3 style: weights split over fsdp (embed) and tensor (heads, mlp, vocab); batch over data x fsdp;
    # sequence over context
    "fsdp": LOGICAL_RULES,
    # pure data parallelism: every weight replicated (small models, where fsdp's all-gathers cost more than
    # the memory they save); the batch still splits over data x fsdp
    "replicated": _override(LOGICAL_RULES, **{name: None for name in _PARAM_NAMES}),
    # tensor parallel only: weights split over heads / mlp, never over fsdp, so sampling does no per-step weight
    # all-gather (GPU inference on a few devices)
    "tensor": _override(LOGICAL_RULES, embed=None),
}


def rules_for(config) -> tuple[tuple[str, Any], ...]:
    """The rules table a config asks for (`sharding_rules`, default "fsdp")."""
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    name = get("sharding_rules", None) or "fsdp"
    if name not in RULE_PRESETS:
        raise ValueError(f"sharding_rules={name!r} is not a preset; choose one of {sorted(RULE_PRESETS)}")
    return RULE_PRESETS[name]


def ambient_rules() -> tuple[tuple[str, Any], ...]:
    """The rules a caller installed with `nn.logical_axis_rules(...)`, else the default table: models constrain
    their activations with these, so a preset chosen by the caller also places the activations."""
    return tuple(nn.get_logical_axis_rules()) or LOGICAL_RULES


def logical_shardings(abstract_tree: Any, mesh: jax.sharding.Mesh, rules: Sequence = LOGICAL_RULES) -> Any:
    """NamedShardings for a (possibly `nn.Partitioned`-boxed) abstract tree, e.g. from `jax.eval_shape(init)`."""
    specs = nn.get_partition_spec(abstract_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


def shard_params(params: Any, shardings: Any) -> Any:
    """Places an (unboxed) params tree onto `shardings` (same tree structure)."""
    return jax.tree.map(lambda x, s: jax.device_put(x, s), params, shardings)
