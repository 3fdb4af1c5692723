"""Primitives shared by the models: the rotate-half RoPE rotation and the fp32 RMS normalisation.

The models' norm *modules* stay separate because their checkpoints differ (DiT: zero-centred `scale`; Qwen3-VL:
`weight` applied after the cast back; Wan VAE: an L2 norm times sqrt(C), not this one), but they normalise with
the same function.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rotate_half(x: jax.Array) -> jax.Array:
    """(..., D) -> (..., D): [-x2, x1] for x = [x1, x2] (the rotate-half RoPE layout of Qwen3-VL)."""
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rms_normalize(x32: jax.Array, eps: float) -> jax.Array:
    """x * rsqrt(mean(x^2, last axis) + eps); pass fp32 (the norms compute their statistics in fp32)."""
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + eps)
