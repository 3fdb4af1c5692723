"""Numpy Qwen3-VL image preprocessing vs transformers' image processor (the class `AutoImageProcessor` loads for a
Qwen3-VL processor directory) on bundled photos and generated images of awkward sizes, and `get_rope_index` vs
`Qwen3VLModel.get_rope_index` on left-padded batches with one and two images."""
import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from qwenimage_jax.assets import photo_paths
from qwenimage_jax.text.processor import (ImageProcessor, ImageProcessorConfig, get_rope_index,
                                                     preprocess_images, rgba_over_white, smart_resize)

# (name, preprocessor_config.json): the released Qwen3-VL values, and a small-pixel budget that forces the
# max_pixels (downscale) and min_pixels (upscale) branches of smart_resize on the same images.
CONFIGS = {
    "qwen3_vl": {"image_processor_type": "Qwen2VLImageProcessorFast", "processor_class": "Qwen3VLProcessor",
                 "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "image_mean": [0.5, 0.5, 0.5],
                 "image_std": [0.5, 0.5, 0.5], "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "do_convert_rgb": True, "do_resize": True,
                 "size": {"longest_edge": 16777216, "shortest_edge": 65536}},
    "tight_budget": {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 4, "temporal_patch_size": 2,
                     "merge_size": 2, "image_mean": [0.48145466, 0.4578275, 0.40821073],
                     "image_std": [0.26862954, 0.26130258, 0.27577711],
                     "size": {"longest_edge": 96 * 96, "shortest_edge": 40 * 40}},
}


def _images():
    paths = photo_paths()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:45, 0:77]
    gradient = np.stack([xx * 3, yy * 5, (xx + yy) * 2], axis=-1).astype(np.uint8)
    rgba = np.concatenate([rng.integers(0, 256, (33, 50, 3)), np.tile(np.linspace(0, 255, 50), (33, 1))[..., None]],
                          axis=-1).astype(np.uint8)
    return {
        "astronaut_crop": Image.open(paths["astronaut"]).convert("RGB").crop((7, 3, 7 + 301, 3 + 217)),
        "coffee": Image.open(paths["coffee"]).convert("RGB"),            # 480x320
        "camera_gray": Image.open(paths["camera"]),                       # mode L
        "gradient_45x77": Image.fromarray(gradient),
        "noise_rgba": Image.fromarray(rgba, mode="RGBA"),
    }


@pytest.fixture(scope="module")
def images():
    return _images()


def _reference_processor(tmp_path, config):
    from transformers import AutoImageProcessor
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    return AutoImageProcessor.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("config_name", sorted(CONFIGS))
def test_preprocess_matches_transformers_image_processor(tmp_path, images, config_name):
    ref_proc = _reference_processor(tmp_path, CONFIGS[config_name])
    ours_proc = ImageProcessor.from_pretrained(str(tmp_path))
    assert ours_proc.merge_size == ref_proc.merge_size
    grids = set()
    for name, image in images.items():
        ref = ref_proc(images=[image], return_tensors="np")
        ours = ours_proc(images=[image], return_tensors="np")
        np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"], err_msg=name)
        assert ours["pixel_values"].dtype == np.float32 and ours["image_grid_thw"].dtype == np.int64
        assert ours["pixel_values"].shape == ref["pixel_values"].shape, name
        np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-5, err_msg=name)
        grids.add(tuple(ours["image_grid_thw"][0]))
    assert len(grids) >= 4  # the images land on different grids (rounding, up- and downscaling)
    # a batch of images of different sizes: concatenated patches, one grid row each
    batch = list(images.values())[:3]
    ref = ref_proc(images=batch, return_tensors="np")
    pixel_values, grid = preprocess_images(batch, ours_proc.config)
    np.testing.assert_array_equal(grid, ref["image_grid_thw"])
    np.testing.assert_allclose(pixel_values, ref["pixel_values"], rtol=0, atol=1e-5)


def test_smart_resize_matches_reference_on_many_sizes():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as ref_smart_resize

    rng = np.random.default_rng(1)
    for h, w in [(16, 16), (48, 80), (47, 81), (1000, 7), (3000, 4000), (4000, 40)] + [
            tuple(s) for s in rng.integers(5, 5000, size=(200, 2))]:
        for limits in [dict(min_pixels=65536, max_pixels=16777216), dict(min_pixels=40 * 40, max_pixels=96 * 96)]:
            assert smart_resize(int(h), int(w), 32, **limits) == ref_smart_resize(int(h), int(w), 32, **limits)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 3000)


def test_rgba_composite_matches_pipeline_and_processor_rule(images):
    image = images["noise_rgba"]
    ours = np.asarray(rgba_over_white(image))
    white = Image.new("RGB", image.size, (255, 255, 255))
    white.paste(image, mask=image.getchannel("A"))  # what QwenImage21Pipeline does before the processor
    np.testing.assert_array_equal(ours, np.asarray(white))
    assert rgba_over_white(images["coffee"]) is images["coffee"]


def test_processor_config_defaults_and_errors(tmp_path):
    cfg = ImageProcessorConfig.from_hf_dict(CONFIGS["qwen3_vl"])
    assert (cfg.factor, cfg.min_pixels, cfg.max_pixels) == (32, 65536, 16777216)
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json"):
        ImageProcessorConfig.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="must be uint8"):
        preprocess_images([np.zeros((32, 32, 3), np.float32)], cfg)


# ------------------------------------------------------------------------------------------------ rope index
IMG, START, END, PAD = 290, 292, 293, 0


def _reference_rope_index(input_ids, attention_mask, grid, mm_types, merge=2):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    this = types.SimpleNamespace(config=types.SimpleNamespace(vision_config=types.SimpleNamespace(
        spatial_merge_size=merge)))
    this.get_vision_position_ids = lambda *a, **k: Qwen3VLModel.get_vision_position_ids(this, *a, **k)
    return Qwen3VLModel.get_rope_index(this, torch.from_numpy(input_ids), mm_token_type_ids=torch.from_numpy(mm_types),
                                       image_grid_thw=torch.from_numpy(grid), attention_mask=torch.from_numpy(
                                           attention_mask))


def _row(text_before, grids, text_after, merge=2):
    row = list(range(10, 10 + text_before))
    for t, h, w in grids:
        row += [START] + [IMG] * (t * h * w // merge ** 2) + [END] + [40, 41]
    return row + list(range(60, 60 + text_after))


def _left_pad(rows):
    length = max(len(r) for r in rows)
    ids = np.array([[PAD] * (length - len(r)) + r for r in rows], np.int64)
    mask = np.array([[0] * (length - len(r)) + [1] * len(r) for r in rows], np.int64)
    return ids, mask


@pytest.mark.parametrize("layout", ["one_image_each", "two_images_and_text_only"])
def test_rope_index_matches_reference_on_left_padded_batch(layout):
    if layout == "one_image_each":
        grids = [[1, 4, 6], [1, 8, 4]]
        rows = [_row(3, grids[:1], 4), _row(9, grids[1:], 2)]
    else:
        grids = [[1, 4, 6], [1, 6, 8]]
        rows = [_row(2, grids, 3), list(range(100, 107))]
    ids, mask = _left_pad(rows)
    grid = np.array(grids, np.int64)
    mm_types = (ids == IMG).astype(np.int64)
    ref_pos, ref_delta = _reference_rope_index(ids, mask, grid, mm_types)
    pos, delta = get_rope_index(ids, mask, grid, image_token_id=IMG, vision_start_token_id=START,
                                spatial_merge_size=2)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())
    pos2, delta2 = get_rope_index(ids, mask, grid, image_token_id=IMG, spatial_merge_size=2,
                                  mm_token_type_ids=mm_types)  # explicit token types give the same
    np.testing.assert_array_equal(pos2, pos)
    np.testing.assert_array_equal(delta2, delta)
    assert (pos[0] != pos[1]).any() and (pos[1] != pos[2]).any()  # the image rows really are 3D


def test_rope_index_known_values_and_errors():
    ids = np.array([[1, 2, 3, START] + [IMG] * 6 + [END, 4]])
    pos, delta = get_rope_index(ids, None, np.array([[1, 4, 6]]), image_token_id=IMG, spatial_merge_size=2)
    np.testing.assert_array_equal(pos[:, 0], [[0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 7, 8],
                                              [0, 1, 2, 3, 4, 4, 4, 5, 5, 5, 7, 8],
                                              [0, 1, 2, 3, 4, 5, 6, 4, 5, 6, 7, 8]])
    assert delta.tolist() == [[-3]]
    with pytest.raises(ValueError, match="does not match grid"):
        get_rope_index(ids, None, np.array([[1, 4, 4]]), image_token_id=IMG, spatial_merge_size=2)
    with pytest.raises(ValueError, match="more image-token runs"):
        get_rope_index(ids, None, np.zeros((0, 3)), image_token_id=IMG, spatial_merge_size=2)
