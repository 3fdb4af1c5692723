"""3-axis (frame, height, width) rotary position embedding of the Qwen-Image-2 DiT, complex-pair convention.

Positions are laid out on the host (numpy, exact integers) because they depend only on the static token layout;
the angles are computed in float32 exactly as the reference does (`position * inv_freq`, both float32) and the
rotation treats channel pairs `(x[2i], x[2i+1])` as one complex number (diffusers `apply_rotary_emb_qwen`,
`use_real=False`).

Layout rule (diffusers `QwenImage21Rope.forward`): walk the joint sequence with a running `position` from 0; every
text token gets `(p, p, p)` and advances `p` by one; an image block of latent grid `(f, h, w)` starting at the first
image token after the previous block puts all its tokens at frame `p` with a centred `(y, x)` raster grid,
`y in [-(h - h//2), h//2 - 1]`, `x in [-(w - w//2), w//2 - 1]`, then advances `p` by `max(h, w)`.
"""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

# The reference tables cover positions [0, 8192) and, through Python negative indexing, [-1024, 0).
MAX_POSITION = 8192
MIN_POSITION = -1024


def rope_position_ids(img_shapes: Sequence[Sequence[int]], image_pad_mask: np.ndarray) -> np.ndarray:
    """(seq,) bool image mask + per-image (frame, height, width) -> (seq, 3) int64 (frame, y, x) position ids."""
    is_image = np.asarray(image_pad_mask, dtype=bool)
    total = int(is_image.shape[-1])
    frame: list[int] = []
    image_y: list[int] = []
    image_x: list[int] = []
    cursor = position = 0
    for shape in img_shapes:
        _, height, width = (int(v) for v in shape)
        later = np.nonzero(is_image[cursor:])[0]
        if later.size == 0:
            raise ValueError(f"img_shapes lists image {tuple(shape)} but the image mask has no image token after "
                             f"position {cursor}; img_shapes and img_mask describe different layouts")
        block_start = cursor + int(later[0])
        text_len = block_start - cursor
        frame.extend(range(position, position + text_len))
        position += text_len
        cursor = block_start + height * width
        frame.extend([position] * (height * width))
        position += max(height, width)
        image_y.extend(y for y in range(-(height - height // 2), height // 2) for _ in range(width))
        image_x.extend(x for _ in range(height) for x in range(-(width - width // 2), width // 2))
    if cursor < total:
        frame.extend(range(position, position + total - cursor))
    frame_ids = np.asarray(frame, dtype=np.int64)
    if frame_ids.shape[0] != total or len(image_y) != int(is_image.sum()):
        raise ValueError(f"img_shapes {list(map(tuple, img_shapes))} account for {len(image_y)} image tokens but the "
                         f"image mask marks {int(is_image.sum())} of {total} positions")
    ids = np.stack([frame_ids, frame_ids.copy(), frame_ids.copy()], axis=-1)
    ids[is_image, 1] = np.asarray(image_y, dtype=np.int64)
    ids[is_image, 2] = np.asarray(image_x, dtype=np.int64)
    if ids.max(initial=0) >= MAX_POSITION or ids.min(initial=0) < MIN_POSITION:
        raise ValueError(f"RoPE positions span [{ids.min()}, {ids.max()}], outside the reference tables "
                         f"[{MIN_POSITION}, {MAX_POSITION}); shorten the prompt or shrink the images")
    return ids


def rope_inv_freqs(axes_dims: Sequence[int], theta: float = 10000.0) -> list[np.ndarray]:
    """Per-axis float32 inverse frequencies `1 / theta**(2j / d)`, j < d/2 (computed like torch, in float32)."""
    out = []
    for dim in axes_dims:
        if dim % 2:
            raise ValueError(f"RoPE axis dim {dim} must be even")
        exponent = np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)
        out.append((np.float32(1.0) / np.power(np.float32(theta), exponent, dtype=np.float32)).astype(np.float32))
    return out


def rope_angles(position_ids, axes_dims: Sequence[int], theta: float = 10000.0, xp=jnp):
    """(..., seq, 3) int positions -> (..., seq, sum(axes_dims)/2) float32 angles, frame | height | width channel
    blocks (a leading batch axis: per-sample positions)."""
    parts = []
    for axis, inv_freq in enumerate(rope_inv_freqs(axes_dims, theta)):
        pos = xp.asarray(position_ids)[..., axis].astype(xp.float32)
        parts.append(pos[..., None] * xp.asarray(inv_freq))
    return xp.concatenate(parts, axis=-1)


def rope_cos_sin(position_ids, axes_dims: Sequence[int], theta: float = 10000.0, xp=jnp):
    """(..., seq, 3) int positions -> (cos, sin), each (..., seq, head_dim/2) float32: the reference table's
    real/imag parts."""
    angles = rope_angles(position_ids, axes_dims, theta, xp=xp)
    return xp.cos(angles), xp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotates channel pairs (x[2i], x[2i+1]) by the angle whose cos/sin are given, in float32.

    x: (batch, seq, heads, head_dim); cos, sin: (seq, head_dim/2) or per sample (batch, seq, head_dim/2).
    Returns x's dtype.
    """
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos = cos[..., None, :] if cos.ndim == 3 else cos[None, :, None, :]
    sin = sin[..., None, :] if sin.ndim == 3 else sin[None, :, None, :]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
