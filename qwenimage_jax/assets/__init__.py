"""Small real photos bundled with the package (public domain / CC0, see photos/ATTRIBUTION.md) for demos and tests.

    photo_names()                 -> ['astronaut', 'brick', ...]
    photo_paths()                 -> {name: Path}
    load_photo(name, size=None)   -> np.uint8 array (H, W, 3), RGB
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qwenimage_jax.errors import InputKeyError

PHOTO_DIR = Path(__file__).resolve().parent / "photos"
_EXTENSIONS = (".png", ".jpg", ".jpeg")


def photo_paths() -> dict[str, Path]:
    """Bundled photos by name (file stem), sorted by name."""
    paths = sorted(p for p in PHOTO_DIR.iterdir() if p.suffix.lower() in _EXTENSIONS)
    if not paths:
        raise FileNotFoundError(f"no bundled photos found in {PHOTO_DIR}; the package data was not installed")
    return {p.stem: p for p in paths}


def photo_names() -> list[str]:
    return list(photo_paths())


def resize_and_crop(image: np.ndarray, size: int | tuple[int, int]) -> np.ndarray:
    """Resizes (Lanczos) so the image covers `size`, then centre-crops to it.

    image: (H, W, C) uint8; size: int (square) or (height, width). Returns (height, width, C) uint8.
    """
    from PIL import Image

    height, width = (size, size) if isinstance(size, int) else tuple(size)
    if height <= 0 or width <= 0:
        raise ValueError(f"size {size!r} must be positive")
    pil = Image.fromarray(image)
    scale = max(height / pil.height, width / pil.width)
    new_h, new_w = max(height, round(pil.height * scale)), max(width, round(pil.width * scale))
    if (new_h, new_w) != (pil.height, pil.width):
        pil = pil.resize((new_w, new_h), Image.Resampling.LANCZOS)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return np.asarray(pil.crop((left, top, left + width, top + height)))


def load_image(path: str | Path, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """Any image file as RGB uint8 (H, W, 3); optionally resized + centre-cropped to `size`."""
    from PIL import Image

    with Image.open(path) as pil:
        image = np.asarray(pil.convert("RGB"))
    return image if size is None else resize_and_crop(image, size)


def load_photo(name: str, size: int | tuple[int, int] | None = None) -> np.ndarray:
    """A bundled photo as RGB uint8 (H, W, 3).

    size: None keeps the stored size (both sides multiples of 16); an int gives a size x size centre crop after
    resizing the shorter side; (height, width) resizes to cover and centre-crops.
    """
    paths = photo_paths()
    if name not in paths:
        raise InputKeyError(f"no bundled photo named {name!r}; choose from {', '.join(paths)}")
    return load_image(paths[name], size)
