"""The loss pieces of Distribution Matching Distillation (DMD, arXiv 2311.18828; DMD2, arXiv 2405.14867) as pure
functions, in the flow-matching convention of the reference: x_t = (1 - t) x0 + t eps, networks predict v = eps - x0.

    x0_from_velocity(x_t, v, t)                      x0 = x_t - t v
    guided_velocity(v_cond, v_uncond, scale)         true CFG: v_uncond + s (v_cond - v_uncond) (no rescale)
    dmd_gradient(x0_student, x0_real, x0_fake)       (x0_fake - x0_real) / mean|x0_student - x0_real| per sample
    dmd_loss(x0_student, grad)                       0.5 |x0 - sg(x0 - grad)|^2: its gradient wrt x0 is grad / size
    fake_score_loss(v_fake, x0, noise)               flow matching of the fake score on (stop-gradient) samples
    sample_times(key, batch, ...)                    t for re-noising student samples, in [t_min, t_max]
    backward_simulate(velocity_fn, noise, sigmas, model_t, k)
                                                     k Euler steps of the student from pure noise along its own grid:
                                                     the intermediate state x_{sigma_k} the student sees at inference

Why the score difference is an x0 difference: for x_t = (1 - t) x0 + t eps the score of p_t is
-(x_t - (1 - t) E[x0 | x_t]) / t^2, so s_fake - s_real = (1 - t) / t^2 (x0_fake - x0_real) and the DMD direction
is x0_fake - x0_real up to a positive per-t weight, which DMD replaces by the normaliser mean|x0_student - x0_real|.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _bcast(t: jax.Array, x: jax.Array) -> jax.Array:
    """(B,) -> (B, 1, ..., 1) matching x's rank."""
    return jnp.asarray(t, jnp.float32).reshape((-1,) + (1,) * (x.ndim - 1))


def x0_from_velocity(x_t: jax.Array, v: jax.Array, t: jax.Array) -> jax.Array:
    """x_t, v: (B, ...); t: (B,) -> x0 estimate (B, ...) in float32."""
    return x_t.astype(jnp.float32) - _bcast(t, x_t) * v.astype(jnp.float32)


def renoise(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t = (1 - t) x0 + t noise; t: (B,)."""
    t = _bcast(t, x0)
    return (1.0 - t) * x0.astype(jnp.float32) + t * noise.astype(jnp.float32)


def guided_velocity(v_cond: jax.Array, v_uncond: jax.Array | None, scale: float) -> jax.Array:
    """True classifier-free guidance as the 2.x pipeline does it (no norm rescale); scale 1 (or no uncond) = cond."""
    if v_uncond is None or scale == 1.0:
        return v_cond
    return v_uncond + scale * (v_cond - v_uncond)


def dmd_gradient(x0_student: jax.Array, x0_real: jax.Array, x0_fake: jax.Array, eps: float = 1e-6) -> jax.Array:
    """DMD's normalised distribution-matching direction, all inputs (B, ...); returns (B, ...) float32.

    Descending along it moves student samples from where the fake score (the student's own distribution) points
    towards where the real score (the teacher) points. The normaliser is DMD's weighting
    1 / mean(|x0_student - x0_real|) per sample; everything here is a constant for the student's optimiser."""
    x0_student, x0_real, x0_fake = (jax.lax.stop_gradient(a.astype(jnp.float32))
                                    for a in (x0_student, x0_real, x0_fake))
    axes = tuple(range(1, x0_student.ndim))
    weight = jnp.mean(jnp.abs(x0_student - x0_real), axis=axes, keepdims=True)
    return (x0_fake - x0_real) / (weight + eps)


def dmd_loss(x0_student: jax.Array, grad: jax.Array) -> jax.Array:
    """0.5 mean((x0 - sg(x0 - grad))^2): a surrogate whose gradient wrt x0 is exactly grad / x0.size."""
    x0 = x0_student.astype(jnp.float32)
    target = jax.lax.stop_gradient(x0 - grad)
    return 0.5 * jnp.mean(jnp.square(x0 - target))


def fake_score_loss(v_fake: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
    """Flow-matching MSE of the fake score at (sg(x0), noise): target v = noise - x0."""
    target = noise.astype(jnp.float32) - jax.lax.stop_gradient(x0.astype(jnp.float32))
    return jnp.mean(jnp.square(v_fake.astype(jnp.float32) - target))


def regression_loss(x0_student: jax.Array, x0_teacher: jax.Array) -> jax.Array:
    """MSE to the teacher's ODE solution from the same noise (DMD1's paired regression, in latent space)."""
    return jnp.mean(jnp.square(x0_student.astype(jnp.float32) - jax.lax.stop_gradient(x0_teacher)))


def sample_times(key: jax.Array, batch: int, *, t_min: float = 0.02, t_max: float = 0.98,
                 distribution: str = "uniform", mean: float = 0.0, std: float = 1.0,
                 mu: float | None = None) -> jax.Array:
    """(batch,) float32 re-noising times in [t_min, t_max]: uniform, or logit-normal (optionally mu-shifted like
    the scheduler) clipped to the interval."""
    if distribution == "uniform":
        u = jax.random.uniform(key, (batch,), jnp.float32)
        return t_min + (t_max - t_min) * u
    if distribution == "logit_normal":
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
        if mu is not None:
            t = jnp.exp(mu) / (jnp.exp(mu) + (1.0 / t - 1.0))
        return jnp.clip(t, t_min, t_max)
    raise ValueError(f"unknown time distribution {distribution!r}; use 'uniform' or 'logit_normal'")


def backward_simulate(velocity_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array,
                      sigmas: jax.Array, model_t: jax.Array, k: jax.Array, mode: str = "euler",
                      key: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Runs the student k steps from `noise` (= x at sigma_0 = 1) along its grid, without gradients.

    velocity_fn(x (B, ...), t (B,)) -> v; sigmas: (n + 1,) grid ending in 0; model_t: (n,) the times the network
    reads at each grid point (the pipeline's timestep / 1000); k: int32 scalar in [0, n - 1], may be traced.
    mode "euler": x_{j+1} = x_j + (sigma_{j+1} - sigma_j) v (the deterministic sampler the exported pipeline runs);
    "renoise": x_{j+1} = (1 - sigma_{j+1}) x0_hat + sigma_{j+1} fresh_noise (DMD2's stochastic multi-step sampler;
    needs `key`). Returns (x_k, sigma_k (B,), t_k (B,)).
    """
    if mode not in ("euler", "renoise"):
        raise ValueError(f"backward simulation mode {mode!r}; use 'euler' or 'renoise'")
    if mode == "renoise" and key is None:
        raise ValueError("backward_simulate(mode='renoise') needs a PRNG key for the fresh noise")
    batch = noise.shape[0]
    sigmas = jnp.asarray(sigmas, jnp.float32)
    model_t = jnp.asarray(model_t, jnp.float32)

    def body(j, x):
        t = jnp.broadcast_to(model_t[j], (batch,))
        v = jax.lax.stop_gradient(velocity_fn(x, t)).astype(jnp.float32)
        if mode == "euler":
            return (x + (sigmas[j + 1] - sigmas[j]) * v).astype(x.dtype)
        x0 = x0_from_velocity(x, v, jnp.broadcast_to(sigmas[j], (batch,)))
        fresh = jax.random.normal(jax.random.fold_in(key, j), x.shape, jnp.float32)
        return renoise(x0, fresh, jnp.broadcast_to(sigmas[j + 1], (batch,))).astype(x.dtype)

    x = jax.lax.fori_loop(0, k, body, noise.astype(jnp.float32))
    x = jax.lax.stop_gradient(x)
    return x, jnp.broadcast_to(sigmas[k], (batch,)), jnp.broadcast_to(model_t[k], (batch,))
