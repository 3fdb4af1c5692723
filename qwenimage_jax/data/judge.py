"""The small world's programmatic judge (its GenEval): checks an image against a `Scene` record.

Every pixel gets the name of its nearest palette colour (or "other" when far from all). For each object group the
judge takes the connected components of the group's colour that are big enough to be an object and checks:
colour (any such component), shape (most components classify as the stated shape from fill ratio, holes and
mass distribution), count (number of components), position (region of the group's pixel centroid) and size
(bounding-box extent). The word is legible when the largest cluster of word-coloured pixels, cropped and resized,
correlates best with the stated word's template among the whole vocabulary (and above a floor). The background
is right when its colour is the most frequent one. Fields set to None in the record are not checked.
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional

import numpy as np
from PIL import Image
from scipy import ndimage

from qwenimage_jax.data import world

PALETTE_NAMES = tuple(world.PALETTE)
_PALETTE_RGB = np.asarray([world.PALETTE[n] for n in PALETTE_NAMES], np.float32)  # (colours, 3)
OTHER = -1
MAX_COLOUR_DISTANCE = 110.0  # farther than this from every palette colour -> "other"
WORD_MIN_CORRELATION = 0.5
MIN_BOX_FILL = 0.35  # a component counts as an object only if it fills this much of its bounding box
_TEMPLATE_SHAPE = (20, 60)  # (height, width) both the template and the candidate are resized to
_EIGHT_CONNECTED = np.ones((3, 3), bool)
GROUP_ATTRIBUTES = ("colour", "shape", "count", "position", "size")
ATTRIBUTES = GROUP_ATTRIBUTES + ("word", "background")


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """Index into PALETTE_NAMES of each pixel's nearest colour, OTHER if none is close. # (h, w, 3) -> (h, w)"""
    rgb = np.asarray(image)[..., :3].astype(np.int32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    unique, inverse = np.unique(packed.ravel(), return_inverse=True)  # classify each distinct colour once
    colours = np.stack([unique >> 16, (unique >> 8) & 255, unique & 255], axis=-1).astype(np.float32)  # (n, 3)
    # squared distance = |p|^2 - 2 p.c + |c|^2, as one matmul
    partial = (_PALETTE_RGB**2).sum(-1) - 2.0 * (colours @ _PALETTE_RGB.T)  # (n, palette)
    labels = np.argmin(partial, axis=-1)
    nearest = partial[np.arange(len(unique)), labels] + (colours**2).sum(-1)
    labels = np.where(nearest <= MAX_COLOUR_DISTANCE**2, labels, OTHER)
    return labels[inverse].reshape(packed.shape)


def min_object_area(image_size: int) -> float:
    """Smallest component (px) counted as an object: ~30% of the smallest object the world draws."""
    return 0.13 * world.object_diameter("small", image_size) ** 2


def classify_shape(mask: np.ndarray) -> str:
    """Shape name of one object's bool mask cropped to its bounding box. # (h, w)"""
    filled = ndimage.binary_fill_holes(mask)
    filled_area = float(filled.sum())
    h, w = mask.shape
    holes, count = ndimage.label(filled & ~mask)
    largest_hole = float(np.bincount(holes.ravel())[1:].max()) if count else 0.0
    if largest_hole / filled_area > 0.08:  # one real hole, not speckle
        return "ring"
    if filled_area / (h * w) > 0.88:
        return "square"
    rows = filled.sum(axis=1).astype(np.float64)
    weights = np.clip(np.arange(h) + 1 - h / 2.0, 0.0, 1.0)  # share of each row below the middle line
    if float((rows * weights).sum() / rows.sum()) > 0.62:  # mass sits low: a triangle pointing up
        return "triangle"
    # a quarter of the way in, a circle's chord spans ~87% of it, a plus sign's arm only a third
    qh, qw = h // 4, w // 4
    lines = [filled[qh].mean(), filled[h - 1 - qh].mean(), filled[:, qw].mean(), filled[:, w - 1 - qw].mean()]
    return "cross" if np.mean(lines) < 0.65 else "circle"


def _objects(labels: np.ndarray, colour: str, image_size: int):
    """Object-like components of `colour`: list of (bool mask cropped to its box, slice pair)."""
    mask = labels == PALETTE_NAMES.index(colour)
    components, _ = ndimage.label(mask)  # 4-connected
    areas = np.bincount(components.ravel())
    components[(areas < min_object_area(image_size))[components]] = 0  # too small to be an object
    kept = []
    for index, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        crop = components[box] == index
        # every drawn shape fills >= ~45% of its box once holes are filled; scattered speckle does not
        if ndimage.binary_fill_holes(crop).mean() >= MIN_BOX_FILL:
            kept.append((crop, box))
    return kept


def _judge_group(labels: np.ndarray, group: world.ObjectGroup, image_size: int) -> dict[str, float]:
    objects = _objects(labels, group.colour, image_size)
    scores = {"colour": float(bool(objects))}
    if not objects:
        for name, value in (("shape", group.shape), ("count", group.count), ("position", group.position),
                            ("size", group.size)):
            if value is not None:
                scores[name] = 0.0
        return scores
    shapes = [classify_shape(crop) for crop, _ in objects]
    scores["shape"] = float(shapes.count(group.shape) * 2 > len(shapes))
    if group.count is not None:
        scores["count"] = float(len(objects) == group.count)
    if group.position is not None:
        ys, xs = [], []
        for crop, box in objects:
            rows, cols = np.nonzero(crop)
            ys.append(rows + box[0].start)
            xs.append(cols + box[1].start)
        cy, cx = np.concatenate(ys).mean() + 0.5, np.concatenate(xs).mean() + 0.5
        scores["position"] = float(world.position_of(cx / labels.shape[1], cy / labels.shape[0]) == group.position)
    if group.size is not None:
        extents = [max(crop.shape) for crop, _ in objects]
        measured = "large" if np.median(extents) > world.size_threshold(image_size) else "small"
        scores["size"] = float(measured == group.size)
    return scores


def _normalised(mask: np.ndarray) -> np.ndarray:
    resized = Image.fromarray(mask.astype(np.float32)).resize(_TEMPLATE_SHAPE[::-1], Image.BILINEAR)
    values = np.asarray(resized, np.float64).ravel()
    values = values - values.mean()
    return values / max(np.linalg.norm(values), 1e-8)


@functools.lru_cache(maxsize=8)
def _templates(image_size: int) -> np.ndarray:
    font_px = world.word_font_size(image_size)
    return np.stack([_normalised(world.render_word_mask(word, font_px)) for word in world.WORDS])  # (words, feats)


def read_word(labels: np.ndarray, colour: str, image_size: int) -> tuple[Optional[str], float]:
    """Best-matching vocabulary word written in `colour` and its correlation (None, 0 if no such ink)."""
    font_px = world.word_font_size(image_size)
    ink = labels == PALETTE_NAMES.index(colour)
    components, _ = ndimage.label(ink, structure=_EIGHT_CONNECTED)
    sizes = ndimage.sum_labels(ink, components, index=np.arange(1, components.max() + 1))
    ink = np.isin(components, 1 + np.nonzero(sizes >= max(3.0, (font_px / 8) ** 2))[0])
    if not ink.any():
        return None, 0.0
    # group letters into words: dilate by a third of the font size, keep the cluster holding the most ink
    reach = max(1, font_px // 3)
    grown = ndimage.binary_dilation(ndimage.binary_dilation(ink, np.ones((reach, 1), bool)), np.ones((1, reach), bool))
    clusters, count = ndimage.label(grown)
    ink_per_cluster = ndimage.sum_labels(ink, clusters, index=np.arange(1, count + 1))
    best = int(np.argmax(ink_per_cluster)) + 1
    word_ink = ink & (clusters == best)
    rows, cols = np.nonzero(word_ink)
    crop = word_ink[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    if min(crop.shape) < 3:
        return None, 0.0
    correlations = _templates(image_size) @ _normalised(crop)
    index = int(np.argmax(correlations))
    return world.WORDS[index], float(correlations[index])


def judge(image: np.ndarray, record: world.Scene) -> dict[str, float]:
    """Per-attribute accuracy of `image` (uint8 (h, w, 3), square) against `record`.

    Returns {attribute: score in [0, 1]} for each checked attribute (group attributes averaged over groups),
    "overall" (mean over all individual checks) and "all_correct" (1.0 iff every check passed); for a record on
    `world.NOVEL_BACKGROUND`, also "novel_background" (its background score, counted in the novel split only).
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[-1] < 3 or image.shape[0] != image.shape[1]:
        raise ValueError(f"judge expects a square (h, w, 3) RGB image; got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"judge expects uint8 pixels in [0, 255]; got {image.dtype} (convert with to_uint8)")
    image_size = image.shape[0]
    labels = classify_pixels(image)
    checks: dict[str, list[float]] = {}
    for group in record.groups:
        for name, score in _judge_group(labels, group, image_size).items():
            checks.setdefault(name, []).append(score)
    if record.word is not None:
        if record.word_colour is None:
            ink_colours = [c for c in world.COLOURS if c not in {g.colour for g in record.groups}]
        else:
            ink_colours = [record.word_colour]
        legible = 0.0
        for colour in ink_colours:
            word, correlation = read_word(labels, colour, image_size)
            if word == record.word and correlation >= WORD_MIN_CORRELATION:
                legible = 1.0
        checks["word"] = [legible]
    if record.background is not None:
        counts = np.bincount(labels[labels != OTHER].ravel(), minlength=len(PALETTE_NAMES))
        index = PALETTE_NAMES.index(record.background)
        checks["background"] = [float(np.argmax(counts) == index and counts[index] >= 0.3 * labels.size)]
    result = {name: float(np.mean(values)) for name, values in checks.items()}
    every = [v for values in checks.values() for v in values]
    result["overall"] = float(np.mean(every)) if every else 0.0
    result["all_correct"] = float(bool(every) and all(v == 1.0 for v in every))
    if record.background == world.NOVEL_BACKGROUND:  # the "novel" split's purple background, what a LoRA teaches
        result["novel_background"] = result["background"]
    return result


def summarise(results: Iterable[dict[str, float]]) -> dict[str, float]:
    """Mean of each key over the judge results that have it (e.g. "word" only over scenes with a word)."""
    totals: dict[str, list[float]] = {}
    for result in results:
        for name, value in result.items():
            totals.setdefault(name, []).append(value)
    return {name: float(np.mean(values)) for name, values in totals.items()}


def to_uint8(images: np.ndarray) -> np.ndarray:
    """Float images in [-1, 1] -> uint8 [0, 255] (the model's output range to the judge's input)."""
    return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


def evaluate(images: np.ndarray, records: Iterable[world.Scene]) -> dict[str, float]:
    """Judge a batch: images uint8 [0, 255] or float [-1, 1], (batch, h, w, 3); returns `summarise` of the results."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = to_uint8(images)
    records = list(records)
    if len(records) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(records)} records; pass one record per image")
    return summarise(judge(image, record) for image, record in zip(images, records))
