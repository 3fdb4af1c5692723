"""Qwen3-VL image preprocessing and multimodal rope index in numpy (no torch), equal to transformers 5.24:

* `preprocess_images`: what `Qwen3VLProcessor`'s image processor (`Qwen2VLImageProcessorPil`, the backend
  `AutoImageProcessor` picks for `qwen3_vl` without torchvision) returns: RGB conversion (transparency composited
  over white), `smart_resize` to multiples of patch*merge with PIL resampling, x*rescale_factor, (x-mean)/std, the
  still image repeated over the temporal patch, patches flattened as (C, T, P, P) rows in merge-block order, and
  `image_grid_thw` = (1, H/P, W/P) per image.
* `get_rope_index`: `Qwen3VLModel.get_rope_index` — 3D (t, h, w) MRoPE positions for a left/right padded batch with
  images, from the token types (0 text, 1 image).

RGBA inputs: Qwen-Image-2 (diffusers `QwenImage21Pipeline`) composites RGBA condition images over white with
`Image.paste(img, mask=alpha)` *before* the processor (`rgba_over_white`); any image still carrying transparency
here is composited by transformers' `convert_to_rgb` rule (`Image.alpha_composite` over opaque white), which this
module reproduces. The two composites can differ by one grey level, so pass pipeline images through
`rgba_over_white` first to match the pipeline.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence

import numpy as np

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ImageProcessorConfig:
    """Fields of a Qwen2-VL/Qwen3-VL `preprocessor_config.json` (defaults: Qwen3-VL's released processor)."""
    patch_size: int = 16
    temporal_patch_size: int = 2
    merge_size: int = 2
    min_pixels: int = 65536          # size["shortest_edge"]
    max_pixels: int = 16777216       # size["longest_edge"]
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    do_resize: bool = True
    do_rescale: bool = True
    do_normalize: bool = True
    do_convert_rgb: bool = True
    resample: int = 3                # PIL.Image.BICUBIC

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_hf_dict(cls, config: Mapping[str, Any]) -> "ImageProcessorConfig":
        """From a `preprocessor_config.json` dict (`size` {shortest_edge, longest_edge} or legacy min/max_pixels;
        transformers' Qwen2-VL class defaults fill what is absent)."""
        size = dict(config.get("size") or {})
        base = dict(patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=56 * 56,
                    max_pixels=28 * 28 * 1280, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
        kwargs = {}
        for field in dataclasses.fields(cls):
            if field.name in config and config[field.name] is not None:
                value = config[field.name]
                kwargs[field.name] = tuple(value) if isinstance(value, list) else value
        for name in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std"):
            kwargs.setdefault(name, base[name])
        kwargs["min_pixels"] = size.get("shortest_edge", config.get("min_pixels") or base["min_pixels"])
        kwargs["max_pixels"] = size.get("longest_edge", config.get("max_pixels") or base["max_pixels"])
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, directory: str) -> "ImageProcessorConfig":
        """Reads `<directory>/preprocessor_config.json`."""
        path = os.path.join(directory, "preprocessor_config.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"no preprocessor_config.json in {directory!r}; pass a Qwen3-VL processor "
                                    f"directory (or build an ImageProcessorConfig by hand)")
        with open(path, encoding="utf-8") as f:
            return cls.from_hf_dict(json.load(f))


def smart_resize(height: int, width: int, factor: int = 32, min_pixels: int = 65536,
                 max_pixels: int = 16777216) -> tuple[int, int]:
    """(height, width) rounded to multiples of `factor` with min_pixels <= h*w <= max_pixels, aspect kept as
    closely as possible (Python's round-half-even, as the reference)."""
    if min(height, width) <= 0:
        raise ValueError(f"image size must be positive, got height={height}, width={width}")
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}"
                         f" for height={height}, width={width}; crop or pad the image first")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def rgba_over_white(image):
    """Qwen-Image-2's composite for the VLM: RGBA -> RGB over white via `paste(mask=alpha)`; other modes unchanged."""
    from PIL import Image
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if image.mode != "RGBA":
        return image
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))
    return white


def to_rgb(image):
    """PIL image or uint8 array (H, W[, C]) -> PIL RGB image; transparency is composited over white with
    `alpha_composite` (transformers' `convert_to_rgb`)."""
    from PIL import Image
    if not isinstance(image, Image.Image):
        array = np.asarray(image)
        if array.dtype != np.uint8:
            raise ValueError(f"array images must be uint8 (H, W[, C]) with values 0..255, got dtype {array.dtype}; "
                             "convert floats with (x * 255).round().astype(np.uint8)")
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        image = Image.fromarray(array)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def patchify(image: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int) -> np.ndarray:
    """(H, W, C) float32 -> (H/P * W/P, C*T*P*P): rows in merge-block order (block row, block col, in-row, in-col),
    each row the patch as (C, T, P, P) with the still frame repeated T times."""
    h, w, c = image.shape
    p, m = patch_size, merge_size
    gh, gw = h // p, w // p
    blocks = image.reshape(gh // m, m, p, gw // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)  # (gh/m,gw/m,m,m,C,P,P)
    blocks = np.broadcast_to(blocks[:, :, :, :, :, None], blocks.shape[:5] + (temporal_patch_size, p, p))
    return np.ascontiguousarray(blocks).reshape(gh * gw, c * temporal_patch_size * p * p)


def preprocess_image(image, config: ImageProcessorConfig = ImageProcessorConfig()) -> tuple[np.ndarray, tuple]:
    """One image -> (pixel_values (H/P*W/P, C*T*P*P) float32, (1, H/P, W/P))."""
    from PIL import Image
    if config.do_convert_rgb:
        image = to_rgb(image)
    elif not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if config.do_resize:
        height, width = smart_resize(image.height, image.width, config.factor, config.min_pixels, config.max_pixels)
        image = image.resize((width, height), resample=config.resample)
    array = np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    h, w = array.shape[:2]
    if h % config.factor or w % config.factor:
        raise ValueError(f"image of {h}x{w} is not a multiple of patch_size*merge_size={config.factor}; "
                         "enable do_resize or resize it first")
    if config.do_rescale:
        array = (array.astype(np.float64) * config.rescale_factor).astype(np.float32)
    else:
        array = array.astype(np.float32)
    if config.do_normalize:
        mean = np.asarray(config.image_mean, np.float32)
        std = np.asarray(config.image_std, np.float32)
        array = (array - mean) / std
    patches = patchify(array, config.patch_size, config.merge_size, config.temporal_patch_size)
    return patches, (1, h // config.patch_size, w // config.patch_size)


def preprocess_images(images: Sequence[Any], config: ImageProcessorConfig = ImageProcessorConfig()
                      ) -> tuple[np.ndarray, np.ndarray]:
    """PIL images (or uint8 arrays) -> (pixel_values (sum of patches, C*T*P*P) float32, image_grid_thw (n, 3) int64),
    as the transformers processor emits them."""
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("images is empty")
    results = [preprocess_image(image, config) for image in images]
    pixel_values = np.concatenate([r[0] for r in results], axis=0)
    grid = np.asarray([r[1] for r in results], dtype=np.int64)
    return pixel_values, grid


class ImageProcessor:
    """Drop-in for the transformers image processor used by `TextEncoder.image_processor`:
    `processor(images=[...], return_tensors="np") -> {"pixel_values", "image_grid_thw"}`, with `.merge_size`."""

    def __init__(self, config: ImageProcessorConfig = ImageProcessorConfig()):
        self.config = config

    @classmethod
    def from_pretrained(cls, directory: str) -> "ImageProcessor":
        return cls(ImageProcessorConfig.from_pretrained(directory))

    @property
    def merge_size(self) -> int:
        return self.config.merge_size

    def __call__(self, images, return_tensors: Optional[str] = "np", **unused) -> dict:
        if return_tensors not in (None, "np"):
            raise ValueError(f"return_tensors={return_tensors!r}: this numpy processor only returns numpy arrays")
        pixel_values, grid = preprocess_images(images, self.config)
        return {"pixel_values": pixel_values, "image_grid_thw": grid}


def get_rope_index(input_ids, attention_mask=None, image_grid_thw=None, image_token_id: int = 151655,
                   vision_start_token_id: int = 151652, spatial_merge_size: int = 2, mm_token_type_ids=None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """`Qwen3VLModel.get_rope_index` for images: (position_ids (3, B, S) int64, rope_deltas (B, 1) int64).

    input_ids/attention_mask/mm_token_type_ids (B, S); image_grid_thw (n_images, 3), consumed in reading order over
    the batch. Token types default to 1 where input_ids == image_token_id (what the processor's
    `mm_token_type_ids` holds for images). Padded slots (mask 0) get position 0 and are skipped; each run of image
    tokens takes the next grid: t = p + frame, h = p + row, w = p + col on the merged grid, then p += max(h, w)/merge;
    text advances p by one per token on all three axes. `vision_start_token_id` is accepted for signature
    compatibility (5.24 finds images from the token types, not from the start token).
    """
    del vision_start_token_id
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (batch, tokens), got shape {input_ids.shape}")
    batch, length = input_ids.shape
    mask = np.ones_like(input_ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    types = (input_ids == image_token_id).astype(np.int64) if mm_token_type_ids is None else np.asarray(
        mm_token_type_ids)
    if (types == 2).any():
        raise NotImplementedError("video tokens (mm_token_type_ids == 2) are not supported; only images are ported")
    grids = iter([]) if image_grid_thw is None else iter(np.asarray(image_grid_thw).reshape(-1, 3).tolist())
    merge = int(spatial_merge_size)
    position_ids = np.zeros((3, batch, length), np.int64)
    deltas = np.zeros((batch, 1), np.int64)
    for b in range(batch):
        row_types = types[b][mask[b]]
        pieces, pos = [], 0
        for kind, group in itertools.groupby(row_types.tolist()):
            run = len(list(group))
            if kind == 0:
                pieces.append(np.broadcast_to(np.arange(run) + pos, (3, run)))
                pos += run
                continue
            grid = next(grids, None)
            if grid is None:
                raise ValueError(f"row {b} holds more image-token runs than image_grid_thw has rows")
            t, h, w = (int(v) for v in grid)
            gh, gw = h // merge, w // merge
            if t * gh * gw != run:
                raise ValueError(f"row {b}: an image-token run of {run} tokens does not match grid (t={t}, h={h}, "
                                 f"w={w}) = {t * gh * gw} tokens after {merge}x{merge} merging")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
            pieces.append(np.stack([tt.reshape(-1), hh.reshape(-1), ww.reshape(-1)]) + pos)
            pos += max(h, w) // merge
        positions = np.concatenate(pieces, axis=1) if pieces else np.zeros((3, 0), np.int64)
        position_ids[:, b, mask[b]] = positions
        deltas[b, 0] = (positions.max() + 1 if positions.size else 0) - len(row_types)
    return position_ids, deltas
