"""Host-side image handling of the Qwen-Image-2 pipeline: condition-image resizing (as QwenImage21Pipeline does it),
decoded-image post-processing, grids and PNGs with metadata.

    calculate_dimensions(area, ratio) -> (width, height), sides rounded to multiples of 32
    prepare_condition_image(img, area, vae_channels) -> ConditionImage(vlm PIL RGB, vae (H, W, C) in [-1, 1], size)
    to_unit_range(x (B, H, W, C) in [-1, 1]) -> [0, 1];  numpy_to_pil;  make_grid;  save_png(..., metadata)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo


def calculate_dimensions(target_area: float, ratio: float) -> tuple[int, int]:
    """(width, height) with width / height ~= ratio and width * height ~= target_area, each rounded to 32."""
    width = math.sqrt(target_area * ratio)
    height = width / ratio
    return round(width / 32) * 32, round(height / 32) * 32


def to_pil(image: Any) -> Image.Image:
    """A PIL image or an (H, W[, C]) uint8 numpy array -> PIL (the reference's `PILImage.fromarray`)."""
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"numpy condition images must be uint8 (H, W[, C]) like PIL's, got dtype {image.dtype}; "
                             "convert with (x * 255).round().astype(np.uint8)")
        return Image.fromarray(image)
    if isinstance(image, (list, tuple)):
        raise ValueError("`image` is one flat set of condition images shared by every prompt, so it cannot be nested "
                         "per prompt; call the pipeline once per prompt when they need different images")
    raise ValueError(f"`image` accepts a PIL image or a uint8 numpy array (or a list of them), got "
                     f"{type(image).__name__}")


def composite_over_white(image: Image.Image) -> Image.Image:
    """RGBA -> RGB with the alpha composited over white (what the vision encoder reads); other modes unchanged."""
    if image.mode != "RGBA":
        return image
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


def to_rgba(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGBA, the conversions documented in docs/reliability.md: greyscale (L, LA, 1), palette
    (P, PA; transparency kept) and RGB(A)-like modes through PIL; CMYK and YCbCr/LAB/HSV through RGB; 16/32-bit
    integer greyscale (I;16*, I) scaled by 255/65535; float greyscale (F) clipped to [0, 255]."""
    if image.mode == "RGBA":
        return image
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if image.mode != "F":
            values = values * (255.0 / 65535.0)
        image = Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8), mode="L")
    elif image.mode in ("CMYK", "YCbCr", "LAB", "HSV"):
        image = image.convert("RGB")
    try:
        return image.convert("RGBA")
    except ValueError as e:
        raise ValueError(f"condition image mode {image.mode!r} cannot be converted to RGBA ({e}); save it as an "
                         "8-bit RGB or RGBA PNG") from None


@dataclasses.dataclass
class ConditionImage:
    """One resized condition image: `vlm` for the text encoder, `vae` (H, W, C) float32 in [-1, 1], `size` (w, h)."""
    vlm: Image.Image
    vae: np.ndarray
    size: tuple[int, int]


def prepare_condition_image(image: Any, target_area: float, vae_channels: int = 4) -> ConditionImage:
    """Resizes (aspect kept, area `target_area`, sides multiples of 32, Lanczos) as QwenImage21Pipeline does; the
    text encoder gets the RGBA image composited over white, the VAE all four channels (RGB composited for a
    3-channel VAE)."""
    image = to_rgba(to_pil(image))
    width, height = calculate_dimensions(target_area, image.size[0] / image.size[1])
    if width < 32 or height < 32:
        raise ValueError(f"a {image.size[0]}x{image.size[1]} condition image has aspect ratio "
                         f"{image.size[0] / image.size[1]:.4g}, too extreme to resize to a {int(target_area)}-pixel "
                         "area with sides of at least 32; crop it closer to square")
    resized = image.resize((width, height), resample=Image.Resampling.LANCZOS)
    vlm = composite_over_white(resized)
    if vae_channels == 4:
        pixels = np.asarray(resized)
    elif vae_channels == 3:
        pixels = np.asarray(vlm)
    else:
        raise ValueError(f"the VAE reads {vae_channels} channels; condition images support 3 (RGB) or 4 (RGBA)")
    vae = 2.0 * (pixels.astype(np.float32) / 255.0) - 1.0
    return ConditionImage(vlm=vlm, vae=vae, size=(width, height))


def to_unit_range(images: np.ndarray) -> np.ndarray:
    """Decoded images in [-1, 1] -> float32 [0, 1] (the reference's denormalize: x * 0.5 + 0.5, clamped)."""
    return np.clip(np.asarray(images, np.float32) * 0.5 + 0.5, 0.0, 1.0)


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """(B, H, W, C) [0, 1] -> PIL images (RGBA for 4 channels, RGB for 3, L for 1)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype(np.uint8)
    if images.shape[-1] == 1:
        return [Image.fromarray(img[..., 0], mode="L") for img in images]
    return [Image.fromarray(img) for img in images]


def make_grid(images: Sequence[Image.Image], cols: int | None = None) -> Image.Image:
    """Tiles same-size images row-major into one image (cols defaults to ~sqrt(n))."""
    images = list(images)
    if not images:
        raise ValueError("make_grid needs at least one image")
    n = len(images)
    cols = cols or math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    w, h = images[0].size
    grid = Image.new(images[0].mode, (cols * w, rows * h), (0,) * len(images[0].getbands()))
    for i, img in enumerate(images):
        grid.paste(img, ((i % cols) * w, (i // cols) * h))
    return grid


def save_png(image: Image.Image, path: str, metadata: Mapping[str, Any] | None = None) -> None:
    """Writes a PNG with each metadata item as a tEXt chunk (values str()-ed)."""
    info = PngInfo()
    for key, value in (metadata or {}).items():
        info.add_text(str(key), str(value))
    image.save(path, format="PNG", pnginfo=info)
