"""grain input pipelines of images for VAE training and evaluation.

Sources (each a random-access grain data source whose records are RGB uint8 arrays (H, W, 3) of any size):
  photos          the photos bundled with the package (`qwenimage_jax.assets`), optionally a subset by name
  skimage         the ~20 CC0 / public-domain images scikit-image ships in its wheel (offline), by name
  folder          every image file under a directory (sorted, recursive)
  tfds            a TFDS dataset read through `tfds.data_source` (array_record; no TensorFlow needed)
  synthetic_text  glyphs (5-20 px by default, several fonts) rendered with PIL on natural-image backgrounds
  world           procedural scenes from `qwenimage_jax.data.world`, when that module is present

Training pipeline (`train_dataset`): weighted mixture of sources -> per-epoch global shuffle -> per-host slice
(jax.process_index) -> random resized crop + flip onto a multi-aspect bucket (one bucket per batch, the same
on every host) -> batch. Everything is a function of (seed, index), so the order is deterministic and the
iterator's state (`get_state`) is all a checkpoint needs to resume exactly.
"""
from __future__ import annotations

import functools
import glob
import os
from typing import Any, Sequence

import grain
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from qwenimage_jax.errors import InputKeyError, InputNotFoundError, MissingPackageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _to_rgb_uint8(image: Any) -> np.ndarray:
    """PIL image / encoded bytes / array (H, W), (H, W, 1|3|4) -> (H, W, 3) uint8."""
    if isinstance(image, (bytes, np.bytes_)):
        import io
        image = Image.open(io.BytesIO(image))
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float32) * (255.0 if image.max() <= 1.0 else 1.0)), 0, 255)
        image = image.astype(np.uint8)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return image[..., :3]


# ---------------------------------------------------------------------------------------------------- sources
class PhotoSource:
    """Bundled photos (sorted by name); `names` selects a subset, `exclude` drops some (held-out photos)."""

    def __init__(self, names: Sequence[str] | None = None, exclude: Sequence[str] = ()):
        from qwenimage_jax.assets import photo_paths

        paths = photo_paths()
        chosen = list(paths) if not names else list(names)
        missing = [n for n in list(chosen) + list(exclude) if n not in paths]
        if missing:
            raise InputKeyError(f"no bundled photo(s) named {missing}; choose from {', '.join(paths)}")
        self.paths = [paths[n] for n in chosen if n not in set(exclude)]
        if not self.paths:
            raise ValueError(f"photo selection names={names} exclude={list(exclude)} leaves no photos")

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        with Image.open(self.paths[index]) as pil:
            return np.asarray(pil.convert("RGB"))


# scikit-image's images that load without a network (see ../shared/design/ENVIRONMENT.md, section 4a); the
# stereo pair counts as two images. Gray ones are repeated to RGB; `horse` (binary) and `logo` (RGBA art) are left out.
SKIMAGE_IMAGES = ("astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel",
                  "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "page", "retina", "rocket",
                  "stereo_motorcycle:0", "stereo_motorcycle:1", "text")


class SkimageSource:
    """scikit-image's bundled images (all of SKIMAGE_IMAGES, or `names`), minus `exclude` (matched by base name)."""

    def __init__(self, names: Sequence[str] | None = None, exclude: Sequence[str] = ()):
        try:
            import skimage.data  # noqa: F401
        except ImportError as e:
            raise MissingPackageError("the 'skimage' image source needs scikit-image: pip install scikit-image "
                                      "(or pip install -e '.[test]')") from e
        chosen = list(names or SKIMAGE_IMAGES)
        unknown = [n for n in chosen + list(exclude) if n.split(":")[0] not in {m.split(":")[0] for m in SKIMAGE_IMAGES}]
        if unknown:
            raise InputKeyError(f"no offline scikit-image image(s) named {unknown}; choose from "
                                f"{', '.join(SKIMAGE_IMAGES)}")
        self.names = [n for n in chosen if n.split(":")[0] not in set(exclude)]
        if not self.names:
            raise ValueError(f"skimage selection names={names} exclude={list(exclude)} leaves no images")

    def __len__(self):
        return len(self.names)

    @functools.lru_cache(maxsize=32)
    def __getitem__(self, index):
        import skimage.data

        name, _, view = self.names[index].partition(":")
        image = getattr(skimage.data, name)()
        if isinstance(image, tuple):  # stereo_motorcycle -> (left, right, disparity)
            image = image[int(view or 0)]
        return _to_rgb_uint8(image)


class ImageFolderSource:
    """Every image file under `root` (recursive, sorted, so the order is the same on every host).

    on_bad_image: what an unreadable file (truncated, corrupt, not an image) does when it is read:
      "error" (default) raises naming the file; "skip" logs it, counts it in `skipped` (the set of bad paths) and
      returns the next readable file instead, so the record count, the order and resumption stay deterministic.
    """

    def __init__(self, root: str, on_bad_image: str = "error"):
        if on_bad_image not in ("error", "skip"):
            raise ValueError(f"on_bad_image={on_bad_image!r}; choose 'error' or 'skip'")
        if not os.path.isdir(root):
            raise InputNotFoundError(f"image folder {root!r} does not exist; point the folder source's path at a "
                                     "directory of images")
        self.paths = sorted(p for p in glob.glob(os.path.join(root, "**", "*"), recursive=True)
                            if p.lower().endswith(IMAGE_EXTENSIONS))
        if not self.paths:
            raise ValueError(f"no {'/'.join(IMAGE_EXTENSIONS)} files under {root!r}")
        self.on_bad_image = on_bad_image
        self.skipped: set[str] = set()

    def __len__(self):
        return len(self.paths)

    def _read(self, path: str) -> np.ndarray:
        with Image.open(path) as pil:
            return np.asarray(pil.convert("RGB"))

    def __getitem__(self, index):
        for offset in range(len(self.paths)):
            path = self.paths[(index + offset) % len(self.paths)]
            try:
                return self._read(path)
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                if self.on_bad_image == "error":
                    raise ValueError(f"cannot read image {path}: {type(e).__name__}: {e}; remove or re-encode it, "
                                     "or set on_bad_image='skip' in this folder source's config to skip such "
                                     "files") from None
                if path not in self.skipped:
                    self.skipped.add(path)
                    import logging
                    logging.getLogger("qwenimage_jax.data").warning(
                        "skipping unreadable image %s (%s: %s); %d skipped so far", path, type(e).__name__, e,
                        len(self.skipped))
        raise ValueError(f"none of the {len(self.paths)} files under the folder is a readable image")


class TfdsSource:
    """A TFDS split through `tfds.data_source` (array_record); `image_key` names the image feature, which may
    be a decoded array, a PIL image or encoded PNG/JPEG bytes."""

    def __init__(self, dataset: str, split: str = "train", data_dir: str | None = None, image_key: str = "image"):
        import tensorflow_datasets as tfds

        self.source = tfds.data_source(dataset, split=split, data_dir=data_dir, download=False)
        self.image_key = image_key

    def __len__(self):
        return len(self.source)

    def __getitem__(self, index):
        record = self.source[index]
        if self.image_key not in record:
            raise InputKeyError(f"TFDS record has no {self.image_key!r}; its features are {sorted(record)}: set the "
                                "source's image_key to one of them")
        return _to_rgb_uint8(record[self.image_key])


def font_paths() -> list[str]:
    """TrueType fonts usable for text rendering: system DejaVu/Noto/Liberation, else none (PIL default)."""
    found = []
    for pattern in ("/usr/share/fonts/truetype/**/*.ttf", "/usr/share/fonts/opentype/**/*.otf",
                    "/usr/share/fonts/truetype/**/*.ttc"):
        found += glob.glob(pattern, recursive=True)
    return sorted(found)


_WORDS = ("the quick brown fox jumps over lazy dog image latent decoder encoder pixel text glyph sharp "
          "menu price total open close street station north south coffee tea bread water 2026 404 3.14 "
          "Qwen JAX Flax TPU GPU VAE DiT OK STOP EXIT km/h $9.99 #42 @home A1 B2 C3 x+y=z").split()


def render_text(background: np.ndarray, rng: np.random.Generator, fonts: Sequence[str],
                font_sizes: tuple[int, int] = (5, 20), max_lines: int = 6) -> np.ndarray:
    """Draws 1-`max_lines` random lines of words on `background` (H, W, 3) uint8 and returns the new image."""
    pil = Image.fromarray(background)
    draw = ImageDraw.Draw(pil)
    height, width = background.shape[:2]
    for _ in range(int(rng.integers(1, max_lines + 1))):
        size = int(rng.integers(font_sizes[0], font_sizes[1] + 1))
        if fonts:
            font = ImageFont.truetype(fonts[int(rng.integers(len(fonts)))], size)
        else:
            font = ImageFont.load_default(size=size)
        words = [_WORDS[int(i)] for i in rng.integers(0, len(_WORDS), int(rng.integers(1, 6)))]
        text = " ".join(words)
        text_width = int(draw.textlength(text, font=font))
        x = int(rng.integers(0, max(1, width - text_width)))
        y = int(rng.integers(0, max(1, height - size)))
        region = background[y:y + size, x:x + max(1, text_width)]
        luminance = float(region.mean()) if region.size else 128.0
        base = 0 if luminance > 128 else 255
        colour = tuple(int(np.clip(base + rng.integers(-40, 41), 0, 255)) for _ in range(3))
        if rng.random() < 0.2:  # a label box behind the text, as on signs and documents
            box = draw.textbbox((x, y), text, font=font)
            fill = tuple(255 - c for c in colour)
            draw.rectangle(box, fill=fill)
        draw.text((x, y), text, fill=colour, font=font)
    return np.asarray(pil)


class SyntheticTextSource:
    """`length` records; record i renders random text (seeded by (seed, i)) on a random crop of a background
    drawn from `backgrounds` (any source of natural images), at `canvas` x `canvas` pixels."""

    def __init__(self, backgrounds, length: int = 1000, seed: int = 0, canvas: int = 256,
                 font_sizes: tuple[int, int] = (5, 20)):
        self.backgrounds = backgrounds
        self.length = int(length)
        self.seed = int(seed)
        self.canvas = int(canvas)
        self.font_sizes = tuple(font_sizes)
        self.fonts = font_paths()

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        rng = np.random.default_rng([self.seed, int(index)])
        background = self.backgrounds[int(rng.integers(len(self.backgrounds)))]
        background = random_resized_crop(background, (self.canvas, self.canvas), rng, scale=(0.3, 1.0))
        return render_text(background, rng, self.fonts, self.font_sizes)


class RecordImages:
    """An image source over a record source (e.g. `data.world_source.WorldSource`): record[key] as RGB uint8."""

    def __init__(self, records, key: str = "image"):
        self.records, self.key = records, key

    def __len__(self):
        return len(self.records)

    def __getitem__(self, index):
        return _to_rgb_uint8(self.records[int(index)][self.key])


def make_source(spec) -> Any:
    """A source from a config entry: dict(name=photos|folder|tfds|synthetic_text|world, ...fields)."""
    spec = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
    name = spec.pop("name")
    spec.pop("weight", None)
    if name == "photos":
        return PhotoSource(names=spec.get("names"), exclude=spec.get("exclude", ()))
    if name == "skimage":
        return SkimageSource(names=spec.get("names"), exclude=spec.get("exclude", ()))
    if name == "folder":
        return ImageFolderSource(spec["path"], spec.get("on_bad_image", "error"))
    if name == "tfds":
        return TfdsSource(spec["dataset"], spec.get("split", "train"), spec.get("data_dir"),
                          spec.get("image_key", "image"))
    if name == "synthetic_text":
        backgrounds = make_source(spec.get("backgrounds", {"name": "photos"}))
        return SyntheticTextSource(backgrounds, spec.get("length", 1000), spec.get("seed", 0),
                                   spec.get("canvas", 256), tuple(spec.get("font_sizes", (5, 20))))
    if name == "world":
        from qwenimage_jax.data.world_source import WorldSource

        return RecordImages(WorldSource(spec.get("length", 1000), spec.get("seed", 0), spec.get("split", "train"),
                                        spec.get("size", 128)))
    raise ValueError(f"unknown image source {name!r}; choose from photos, skimage, folder, tfds, synthetic_text, world")


# ------------------------------------------------------------------------------------------------- transforms
def random_resized_crop(image: np.ndarray, size: tuple[int, int], rng: np.random.Generator,
                        scale: tuple[float, float] = (0.35, 1.0), ratio: tuple[float, float] = (0.8, 1.25),
                        flip: bool = False) -> np.ndarray:
    """Crop a random region covering `scale` of the largest crop with the target's aspect (jittered by `ratio`),
    resize it to `size` = (height, width) with an anti-aliased bicubic filter; optionally flip left-right."""
    height, width = size
    img_h, img_w = image.shape[:2]
    aspect = width / height * float(np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1]))))
    max_h = min(img_h, img_w / aspect)
    crop_h = max_h * np.sqrt(rng.uniform(scale[0], scale[1]))
    crop_w = min(img_w, crop_h * aspect)
    crop_h, crop_w = max(1, int(round(crop_h))), max(1, int(round(crop_w)))
    top = int(rng.integers(0, img_h - crop_h + 1))
    left = int(rng.integers(0, img_w - crop_w + 1))
    pil = Image.fromarray(image[top:top + crop_h, left:left + crop_w])
    out = np.asarray(pil.resize((width, height), Image.Resampling.BICUBIC))
    if flip and rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out)


def center_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize to cover `size` then centre-crop: the deterministic view used for evaluation."""
    from qwenimage_jax.assets import resize_and_crop
    return resize_and_crop(image, tuple(size))


def to_model_range(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 in [-1, 1]."""
    return image.astype(np.float32) / 127.5 - 1.0


def buckets_for(resolution: int, aspect_ratios: Sequence[float], multiple: int) -> list[tuple[int, int]]:
    """(height, width) buckets holding about resolution**2 pixels each, sides multiples of `multiple`."""
    buckets = []
    for ar in aspect_ratios:  # ar = width / height
        h = max(multiple, int(round(resolution / np.sqrt(ar) / multiple)) * multiple)
        w = max(multiple, int(round(resolution * np.sqrt(ar) / multiple)) * multiple)
        if (h, w) not in buckets:
            buckets.append((h, w))
    return buckets


def _bucket_of_batch(batch_index: int, seed: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    if len(buckets) == 1:
        return tuple(buckets[0])
    rng = np.random.default_rng([seed, 7919, int(batch_index)])
    return tuple(buckets[int(rng.integers(len(buckets)))])


def _train_example(index: int, image: np.ndarray, *, seed: int, per_host_batch: int, buckets, scale, ratio,
                   flip: bool) -> np.ndarray:
    rng = np.random.default_rng([seed, int(index)])
    size = _bucket_of_batch(index // per_host_batch, seed, buckets)
    return to_model_range(random_resized_crop(image, size, rng, scale, ratio, flip))


# --------------------------------------------------------------------------------------------------- datasets
def _mixture(source_specs, seed: int) -> grain.MapDataset:
    """Infinite mixture of the configured sources (weights from each spec's `weight`); each source is shuffled
    globally, differently in every epoch."""
    datasets, weights = [], []
    for k, spec in enumerate(source_specs):
        spec_dict = dict(spec.to_dict() if hasattr(spec, "to_dict") else spec)
        datasets.append(grain.MapDataset.source(make_source(spec_dict)).shuffle(seed=(seed * 1009 + k) % 2**32).repeat())
        weights.append(float(spec_dict.get("weight", 1.0)))
    if not datasets:
        raise ValueError("config.data.sources is empty; name at least one source, e.g. dict(name='photos')")
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)


def train_dataset(data_config, global_batch_size: int, seed: int, multiple: int,
                  process_index: int | None = None, process_count: int | None = None) -> grain.IterDataset:
    """Per-host training batches: float32 (global_batch_size / process_count, H, W, 3) in [-1, 1].

    data_config fields: sources (list of source specs with `weight`), resolution, aspect_ratios (width/height
    per bucket; (1.0,) = square only), min_scale / max_scale, ratio_jitter, flip, num_threads, prefetch.
    `multiple` = the VAE's spatial compression (bucket sides are its multiples).
    """
    import jax

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if global_batch_size % process_count:
        raise ValueError(f"global batch size {global_batch_size} is not divisible by {process_count} hosts")
    per_host_batch = global_batch_size // process_count
    buckets = buckets_for(int(data_config.resolution), tuple(data_config.get("aspect_ratios", (1.0,))), multiple)
    jitter = float(data_config.get("ratio_jitter", 1.0))
    example = functools.partial(
        _train_example, seed=int(seed), per_host_batch=per_host_batch, buckets=buckets,
        scale=(float(data_config.get("min_scale", 0.35)), float(data_config.get("max_scale", 1.0))),
        ratio=(1.0 / jitter, jitter), flip=bool(data_config.get("flip", True)))
    ds = _mixture(data_config.sources, int(seed))
    ds = ds[process_index::process_count]
    ds = ds.map_with_index(example).batch(per_host_batch, drop_remainder=True)
    options = grain.ReadOptions(num_threads=int(data_config.get("num_threads", 2)),
                                prefetch_buffer_size=int(data_config.get("prefetch", 4)))
    return ds.to_iter_dataset(options)


def eval_images(source_spec, resolution: int | tuple[int, int], limit: int | None = None) -> np.ndarray:
    """Deterministic evaluation set: every record (or the first `limit`) centre-cropped, float32 (N, H, W, 3)."""
    source = make_source(source_spec)
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    count = len(source) if limit is None else min(limit, len(source))
    return np.stack([to_model_range(center_crop(source[i], size)) for i in range(count)])


def eval_crops(source_spec, resolution: int, crops_per_image: int, seed: int = 0) -> np.ndarray:
    """Held-out evaluation crops: `crops_per_image` seeded random crops (no flip) of every record, (N, H, W, 3)."""
    source = make_source(source_spec)
    out = []
    for i in range(len(source)):
        image = source[i]
        for j in range(crops_per_image):
            rng = np.random.default_rng([seed, 104729, i, j])
            out.append(to_model_range(random_resized_crop(image, (resolution, resolution), rng, (0.2, 1.0))))
    return np.stack(out)
