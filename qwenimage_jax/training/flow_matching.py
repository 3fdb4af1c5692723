"""Flow matching with the reference's convention: x_sigma = (1 - sigma) x0 + sigma noise, target v = noise - x0.

Training sigmas are logit-normal (`sigmoid(N(mean, std))`) and then shifted towards noise for larger images, either
with the scheduler's exponential shift (`mu` from the image token count, the same formula sampling uses) or with a
constant SD3-style shift.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from qwenimage_jax.sampling.scheduler import qwen_image_mu as mu_for_tokens  # noqa: F401  (one mu formula)


def shift_sigmas(sigmas: jax.Array, *, mu: float | None = None, shift: float = 1.0) -> jax.Array:
    """Exponential shift `e^mu / (e^mu + 1/s - 1)` when `mu` is given, else `shift s / (1 + (shift - 1) s)`."""
    if mu is not None:
        return math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    if shift != 1.0:
        return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)
    return sigmas


def sample_sigmas(key: jax.Array, batch: int, *, distribution: str = "logit_normal", mean: float = 0.0,
                  std: float = 1.0, mu: float | None = None, shift: float = 1.0,
                  eps: float = 1e-5) -> jax.Array:
    """(batch,) float32 training sigmas in (0, 1)."""
    if distribution == "logit_normal":
        sigmas = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
    elif distribution == "uniform":
        sigmas = jax.random.uniform(key, (batch,), jnp.float32)
    else:
        raise ValueError(f"unknown sigma distribution {distribution!r}; use 'logit_normal' or 'uniform'")
    sigmas = jnp.clip(sigmas, eps, 1.0 - eps)
    return shift_sigmas(sigmas, mu=mu, shift=shift)


def noisy_latents(x0: jax.Array, noise: jax.Array, sigmas: jax.Array) -> jax.Array:
    """x_sigma = (1 - sigma) x0 + sigma noise, sigma broadcast over all but the batch axis."""
    s = sigmas.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    return noise - x0


def flow_matching_loss(prediction: jax.Array, target: jax.Array) -> jax.Array:
    """Mean squared error in fp32."""
    diff = prediction.astype(jnp.float32) - target.astype(jnp.float32)
    return jnp.mean(jnp.square(diff))
