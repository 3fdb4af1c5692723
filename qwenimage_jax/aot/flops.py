"""FLOPs of one program call for the AOT reports: analytic for the DiT (a scanned layer stack and the sampling loop
are while loops, which XLA's cost analysis counts once), counted from the jaxpr for programs without while loops."""
from __future__ import annotations

import math
from typing import Callable

import jax

def dit_forward_flops(cfg, q_tokens: int, kv_tokens: int, text_tokens: int) -> float:
    """Analytic forward FLOPs of one DiT call for one example: `q_tokens` rows through every layer, attending
    `kv_tokens` keys (a cached sampling step: q = target, kv = prefix + target), `text_tokens` projected in.
    Same terms as `training.dit.train_flops_per_example` (which is 3x this with q = kv = sequence)."""
    d, r, layers = cfg.inner_dim, cfg.mlp_ratio, cfg.num_layers
    per_token_layer = 8 * d * d + 6 * r * d * d + 4 * kv_tokens * d
    flops = layers * q_tokens * per_token_layer
    flops += text_tokens * 2 * (cfg.context_in_dim * d + d * d)
    flops += q_tokens * 2 * d * (cfg.input_features + cfg.output_features)
    return float(flops)


def jaxpr_flops(fn: Callable, *args, **kwargs) -> float:
    """2 x multiply-adds of every dot_general and convolution in `fn`'s jaxpr (scans counted `length` times;
    recomputation under remat included, element-wise work ignored). For programs without while loops."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return _count(closed.jaxpr)


def _count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / rhs[out_feature_dim]
        mult = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += mult * _count(inner)
    return total
