"""PSNR and SSIM in jax.numpy, per image, for batches of NHWC images.

Conventions: `data_range` is the span of valid pixel values (2.0 for images in [-1, 1], 1.0 for [0, 1], 255 for
uint8); always pass it explicitly. SSIM follows Wang et al. 2004 as scikit-image computes it with
`gaussian_weights=True, sigma=1.5, use_sample_covariance=False`: an 11-tap Gaussian window (sigma 1.5), the SSIM
map averaged over the region where the window fits entirely inside the image, then averaged over channels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SSIM_SIGMA = 1.5
SSIM_RADIUS = 5  # int(3.5 * sigma + 0.5): scikit-image's truncation, window 11
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_batch(a, b, name: str):
    a = jnp.asarray(a)
    b = jnp.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"{name}: image shapes differ: {a.shape} vs {b.shape}; compare images of the same size")
    if a.ndim not in (3, 4):
        raise ValueError(f"{name}: expected (H, W, C) or (batch, H, W, C) images, got shape {a.shape}")
    dtype = jnp.promote_types(jnp.result_type(a, b), jnp.float32)
    return a.astype(dtype), b.astype(dtype), a.ndim == 3


def psnr(a, b, data_range: float):
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE).

    a, b: (H, W, C) or (batch, H, W, C). Returns a scalar or (batch,).
    """
    a, b, single = _as_batch(a, b, "psnr")
    if single:
        a, b = a[None], b[None]
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    value = 10.0 * jnp.log10(jnp.asarray(data_range, a.dtype) ** 2 / mse)
    return value[0] if single else value


PSNR_CAP_DB = 100.0


def mean_psnr(a, b, data_range: float) -> float:
    """The mean over a batch of per-image PSNR, each capped at PSNR_CAP_DB: one exact copy (a plain-background
    scene reconstructs exactly) would otherwise make the whole batch's mean infinite."""
    return float(np.mean(np.minimum(np.asarray(psnr(a, b, data_range)), PSNR_CAP_DB)))


def _gaussian_taps(dtype) -> jax.Array:
    offsets = np.arange(-SSIM_RADIUS, SSIM_RADIUS + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (offsets / SSIM_SIGMA) ** 2)
    return jnp.asarray(taps / taps.sum(), dtype)


def _blur_valid(images: jax.Array, taps: jax.Array) -> jax.Array:
    """Separable Gaussian filter, keeping only positions where the window fits. (B, H, W, C) -> (B, H-10, W-10, C)."""
    size = taps.shape[0]
    height, width = images.shape[1] - size + 1, images.shape[2] - size + 1
    rows = sum(taps[i] * images[:, i:i + height] for i in range(size))
    return sum(taps[j] * rows[:, :, j:j + width] for j in range(size))


def ssim(a, b, data_range: float):
    """Mean structural similarity (Gaussian window 11, sigma 1.5, population covariance), channel-averaged.

    a, b: (H, W, C) or (batch, H, W, C) with H, W >= 11. Returns a scalar or (batch,).
    """
    a, b, single = _as_batch(a, b, "ssim")
    if single:
        a, b = a[None], b[None]
    size = 2 * SSIM_RADIUS + 1
    if a.shape[1] < size or a.shape[2] < size:
        raise ValueError(f"ssim: images of {a.shape[1]}x{a.shape[2]} are smaller than the {size}x{size} window")
    value = _ssim_per_image(a, b, jnp.asarray(data_range, a.dtype))
    return value[0] if single else value


@jax.jit
def _ssim_per_image(a, b, data_range):
    """(B, H, W, C) pair -> (B,) mean SSIM."""
    taps = _gaussian_taps(a.dtype)
    mu_a, mu_b = _blur_valid(a, taps), _blur_valid(b, taps)
    var_a = _blur_valid(a * a, taps) - mu_a * mu_a
    var_b = _blur_valid(b * b, taps) - mu_b * mu_b
    cov = _blur_valid(a * b, taps) - mu_a * mu_b
    c1 = (SSIM_K1 * data_range) ** 2
    c2 = (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return jnp.mean(ssim_map, axis=(1, 2, 3))  # equal-size channels: mean of per-channel means

