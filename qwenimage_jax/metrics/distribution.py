"""Sliced Wasserstein distance between two sample sets: the distillation figures' distribution distance.

SW_p(X, Y) = (E_theta[W_p(theta.X, theta.Y)^p])^(1/p) over random unit directions theta; each 1-D W_p between equal
sized sets is the distance between sorted projections. Cheap, seed-deterministic, and a true metric on
distributions (unlike per-sample MSE it does not reward a student that collapses onto the mean)."""
from __future__ import annotations

import numpy as np


def sliced_wasserstein(x: np.ndarray, y: np.ndarray, num_projections: int = 512, p: int = 2,
                       seed: int = 0) -> float:
    """x: (n, ...) and y: (n, ...) samples (flattened per sample; the same n); returns SW_p."""
    x = np.asarray(x, np.float64).reshape(len(x), -1)
    y = np.asarray(y, np.float64).reshape(len(y), -1)
    if x.shape != y.shape:
        raise ValueError(f"sliced_wasserstein needs two sets of the same size and dimension, got {x.shape} and "
                         f"{y.shape}")
    directions = np.random.default_rng(seed).normal(size=(x.shape[1], num_projections))
    directions /= np.linalg.norm(directions, axis=0, keepdims=True)
    px, py = np.sort(x @ directions, axis=0), np.sort(y @ directions, axis=0)
    return float(np.mean(np.abs(px - py) ** p) ** (1.0 / p))


def image_features(images: np.ndarray, size: int = 16) -> np.ndarray:
    """uint8 (n, h, w, 3) -> float (n, size * size * 3) in [0, 1]: box-downsampled pixels, the space the
    distillation figures measure distances in (layout and colour, not pixel noise)."""
    images = np.asarray(images, np.float64)[..., :3] / 255.0
    n, h, w, c = images.shape
    if h % size or w % size:
        raise ValueError(f"image size {h}x{w} is not a multiple of {size}")
    return images.reshape(n, size, h // size, size, w // size, c).mean(axis=(2, 4)).reshape(n, -1)


def foreground_features(images: np.ndarray, size: int = 32, threshold: float = 0.25) -> np.ndarray:
    """uint8 (n, h, w, 3) -> float (n, size * size): box-downsampled foreground masks, the pixels farther than
    `threshold` (RGB in [0, 1], Euclidean) from the image's most common colour (its plain background). Colour
    blind, so a distance in this space sees where objects are and what outline they have: shape, count, size."""
    images = np.asarray(images)[..., :3]
    n, h, w, _ = images.shape
    if h % size or w % size:
        raise ValueError(f"image size {h}x{w} is not a multiple of {size}")
    masks = np.empty((n, h, w), np.float64)
    for i, image in enumerate(images):
        # the mode over 16 levels per channel (a decoded flat background is not one exact RGB value), then the
        # mean colour of the pixels in that bin
        pixels = image.reshape(-1, 3)
        bins = (pixels // 16).astype(np.int64) @ np.array([256, 16, 1])
        in_mode = bins == np.bincount(bins).argmax()
        background = pixels[in_mode].mean(axis=0) / 255.0
        masks[i] = np.linalg.norm(image.astype(np.float64) / 255.0 - background, axis=-1) > threshold
    return masks.reshape(n, size, h // size, size, w // size).mean(axis=(2, 4)).reshape(n, -1)
