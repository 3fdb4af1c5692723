"""Typed key/value caches: pytrees (flax.struct dataclasses) with the logical axis names of their arrays.

`KVCache` is the Qwen3-VL decoder's preallocated generation cache; `PrefixKV` is what the DiT's "extract" mode
returns and its "cached" mode reads: the text/condition prefix's keys and values, which do not depend on the
timestep, so a sampler computes them once. Both keep dict-style reads (`cache["k"]`) for existing callers.
"""
from __future__ import annotations

from typing import ClassVar

import flax
import flax.linen as nn
import jax


class _ByName:
    def __getitem__(self, name: str):
        return getattr(self, name)


@flax.struct.dataclass
class KVCache(_ByName):
    """k, v: (layers, batch, max_length, kv_heads, head_dim); inside the layer scan each holds one layer."""
    k: jax.Array
    v: jax.Array
    AXES: ClassVar[tuple[str, ...]] = ("layers", "activation_batch", "activation_length", "activation_kv_heads",
                                       "activation_head_dim")

    def constrained(self) -> "KVCache":
        """Constrained by the caller's logical rules (a no-op when none are installed)."""
        axes = self.AXES[-self.k.ndim:]
        return KVCache(nn.with_logical_constraint(self.k, axes), nn.with_logical_constraint(self.v, axes))


@flax.struct.dataclass
class PrefixKV(_ByName):
    """k, v: (layers, batch, prefix_len, heads, head_dim) of the DiT's prefix tokens; key_valid: (batch,
    prefix_len) bool, False at padded text positions."""
    k: jax.Array
    v: jax.Array
    key_valid: jax.Array
    AXES: ClassVar[tuple[str, ...]] = ("layers", "activation_batch", "activation_length", "activation_heads",
                                       "activation_head_dim")

    def constrained(self) -> "PrefixKV":
        valid_axes = ("activation_batch", "activation_length")
        return PrefixKV(nn.with_logical_constraint(self.k, self.AXES), nn.with_logical_constraint(self.v, self.AXES),
                        nn.with_logical_constraint(self.key_valid, valid_axes))
