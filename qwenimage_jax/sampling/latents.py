"""Latent layout helpers of the Qwen-Image-2 pipeline: image size checks, packing (one 64-channel latent pixel
= one DiT token, raster order) and initial noise.

    packed latents: (batch, h * w, channels), token index = y * w + x   (diffusers `_pack_latents`, patch size 1)
    spatial latents: (batch, h, w, channels) channels-last, what our VAE reads and writes
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

VAE_SCALE_FACTOR = 16          # pixels per latent pixel (one DiT token covers a 16x16 tile)
SIZE_MULTIPLE = 2 * VAE_SCALE_FACTOR  # height/width granularity: one VLM image slot = 2x2 latent tokens


def check_size(height: int, width: int) -> None:
    """Raises unless height and width are positive multiples of 32, naming the nearest valid values."""
    for name, value in (("height", height), ("width", width)):
        if not isinstance(value, int) or value <= 0 or value % SIZE_MULTIPLE:
            down = max(SIZE_MULTIPLE, (int(value) // SIZE_MULTIPLE) * SIZE_MULTIPLE) if isinstance(value, int) \
                else SIZE_MULTIPLE
            raise ValueError(f"{name} {value!r} is not a positive multiple of {SIZE_MULTIPLE}; use {down} or "
                             f"{down + SIZE_MULTIPLE}")


# The DiT's RoPE tables cover image positions down to -1024 (models.rope.MIN_POSITION) and an image spans
# [-(h - h // 2), h // 2), so one side holds at most 2048 latent pixels.
MAX_SIDE = 2 * 1024 * VAE_SCALE_FACTOR


def check_rope_range(height: int, width: int, what: str = "the output image") -> None:
    """Raises when a side exceeds what the DiT's RoPE tables cover (MAX_SIDE pixels)."""
    for name, value in (("height", height), ("width", width)):
        if value > MAX_SIDE:
            raise ValueError(f"{what}'s {name} {value} is beyond the DiT's RoPE range ({MAX_SIDE} px = "
                             f"{MAX_SIDE // VAE_SCALE_FACTOR} latent pixels per side); use at most {MAX_SIDE}")


def latent_grid(height: int, width: int) -> tuple[int, int]:
    """(h, w) latent pixels of a height x width image."""
    return height // VAE_SCALE_FACTOR, width // VAE_SCALE_FACTOR


def pack(latents: jax.Array) -> jax.Array:
    """(B, h, w, C) -> (B, h * w, C)."""
    b, h, w, c = latents.shape
    return latents.reshape(b, h * w, c)


def unpack(latents: jax.Array, height: int, width: int) -> jax.Array:
    """(B, h * w, C) -> (B, h, w, C) for a height x width image."""
    h, w = latent_grid(height, width)
    b, n, c = latents.shape
    if n != h * w:
        raise ValueError(f"latents hold {n} tokens but a {height}x{width} image has {h}x{w} = {h * w}")
    return latents.reshape(b, h, w, c)


def initial_noise(key: jax.Array, batch: int, height: int, width: int, channels: int, dtype=jnp.float32) -> jax.Array:
    """Standard normal packed latents (B, h * w, C), drawn in float32 and cast to `dtype`."""
    h, w = latent_grid(height, width)
    return jax.random.normal(key, (batch, h * w, channels), jnp.float32).astype(dtype)


def torch_packed_from_spatial(latents_nchw) -> "jax.Array":
    """Reference layout (B, C, 1, h, w) / (B, C, h, w) noise -> our packed (B, h * w, C) (for injecting noise drawn
    by diffusers' `prepare_latents`)."""
    import numpy as np

    x = np.asarray(latents_nchw)
    if x.ndim == 5:
        x = x[:, :, 0]
    b, c, h, w = x.shape
    return jnp.asarray(x.transpose(0, 2, 3, 1).reshape(b, h * w, c))
