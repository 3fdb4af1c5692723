"""Qwen3-VL vision tower parity against transformers' `Qwen3VLVisionModel` (tiny seeded `Qwen3VLForConditionalGeneration`
saved with save_pretrained, vision weights read through SafetensorsReader + our plan + assemble_params):
interpolated position embeddings, 2D rotary tables, merged image features and every DeepStack feature for one image,
two images of different grids and a 2-frame input; sharded forward; clear errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwenimage_jax.checkpoints.params import WeightKeyError, assemble_params
from qwenimage_jax.checkpoints.qwen3_vl_vision import vision_plan
from qwenimage_jax.checkpoints.safetensors_io import SafetensorsReader, load_json_config
from qwenimage_jax.models.qwen3_vl.vision import (Qwen3VLVisionModel, VisionConfig, position_interpolation,
                                                  rotary_cos_sin)
from qwenimage_jax.parallel.mesh import make_mesh
from qwenimage_jax.parallel.rules import LOGICAL_RULES, logical_shardings
from tests.conftest import max_rel_err
from tests.qwen3_vl_tiny import build_reference

# ids of the tiny reference (only the vocabulary size matters to the vision tower)
TOKEN_IDS = {"vocab_size": 300, "<|image_pad|>": 290, "<|video_pad|>": 291, "<|vision_start|>": 292,
             "<|vision_end|>": 293}
GRIDS = {"one_image": ((1, 4, 6),), "two_images": ((1, 4, 6), (1, 6, 8)), "two_frames": ((2, 4, 4),)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model, path = build_reference(str(tmp_path_factory.mktemp("qwen3_vl_vision")), "tied_gqa2", TOKEN_IDS, seed=3)
    config = VisionConfig.from_hf_dict(load_json_config(path)["vision_config"])
    module = Qwen3VLVisionModel(config)
    abstract = _abstract(module, config)
    params = assemble_params(SafetensorsReader(path), vision_plan(config), abstract,
                             ignore=["model.language_model.*", "lm_head.*"], source="tiny Qwen3-VL")
    return {"torch": model.model.visual, "path": path, "config": config, "module": module, "params": params,
            "abstract": abstract}


def _abstract(module, config):
    grid = ((1, 2 * config.spatial_merge_size, 2 * config.spatial_merge_size),)
    pixels = jnp.zeros((4 * config.spatial_merge_size ** 2, config.patch_dim), jnp.float32)
    with nn_rules():
        return jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), pixels, grid))["params"]


def nn_rules():
    import flax.linen as nn
    return nn.logical_axis_rules(LOGICAL_RULES)


def _pixels(grid, config, seed):
    n = sum(t * h * w for t, h, w in grid)
    return np.random.default_rng(seed).normal(size=(n, config.patch_dim)).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _jitted(module, grid):
    def run(params, pixels):
        with nn_rules():
            return module.apply({"params": params}, pixels, grid)
    return jax.jit(run)


def test_config_reads_the_saved_vision_config(reference):
    cfg = reference["config"]
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size, cfg.temporal_patch_size) == (2, 32, 2, 4, 2)
    assert cfg.deepstack_visual_indexes == (0, 1) and cfg.out_hidden_size == 64 and cfg.rope_theta == 10000.0
    assert cfg.patch_dim == 96 and cfg.hidden_act == "gelu_pytorch_tanh"


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_position_embedding_interpolation_matches_reference(reference, name):
    from transformers.vision_utils import get_vision_interpolation_indices_and_weights

    visual, cfg = reference["torch"], reference["config"]
    grid = GRIDS[name]
    ref_idx, ref_w = get_vision_interpolation_indices_and_weights(
        torch.tensor(grid), num_grid_per_side=visual.num_grid_per_side, mode=visual.interpolation_mode,
        align_corners=visual.interpolation_align_corners, spatial_merge_size=cfg.spatial_merge_size)
    idx, w = position_interpolation(grid, 4, cfg.spatial_merge_size)
    np.testing.assert_array_equal(idx, ref_idx.numpy())
    np.testing.assert_allclose(w, ref_w.numpy(), rtol=0, atol=1e-7)
    with torch.no_grad():
        ref_pos = (visual.pos_embed(ref_idx) * ref_w[:, :, None]).sum(1).numpy()
    table = np.asarray(reference["params"]["pos_embed"])
    ours = np.einsum("nkd,nk->nd", table[idx], w)
    assert max_rel_err(ours, ref_pos) <= 1e-6


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_rotary_tables_match_reference(reference, name):
    from transformers.vision_utils import get_vision_position_ids

    visual, cfg = reference["torch"], reference["config"]
    grid = GRIDS[name]
    position_ids = get_vision_position_ids(torch.tensor(grid), cfg.spatial_merge_size)
    n = position_ids.shape[0]
    with torch.no_grad():
        ref_cos, ref_sin = visual.rotary_pos_emb(torch.zeros(n, cfg.hidden_size), position_ids)
    cos, sin = rotary_cos_sin(grid, cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size)
    assert cos.shape == (n, cfg.head_dim)
    np.testing.assert_allclose(cos, ref_cos.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(sin, ref_sin.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_image_embeds_and_deepstack_match_reference(reference, name):
    visual, cfg = reference["torch"], reference["config"]
    grid = GRIDS[name]
    pixels = _pixels(grid, cfg, seed=len(grid) + 10 * grid[0][0])
    with torch.no_grad():
        ref = visual(torch.from_numpy(pixels), grid_thw=torch.tensor(grid))
    embeds, deepstack = _jitted(reference["module"], grid)(reference["params"], jnp.asarray(pixels))
    n_tokens = sum(t * h * w for t, h, w in grid) // 4
    assert embeds.shape == (n_tokens, cfg.out_hidden_size)
    err = max_rel_err(embeds, ref.pooler_output.numpy())
    print(f"{name}: image_embeds rel err {err:.2e}, deepstack", [f"{max_rel_err(o, t.numpy()):.2e}" for o, t in
                                                                  zip(deepstack, ref.deepstack_features)])
    assert err <= 1e-4
    assert len(deepstack) == len(ref.deepstack_features) == len(cfg.deepstack_visual_indexes)
    for ours, theirs in zip(deepstack, ref.deepstack_features):
        assert max_rel_err(ours, theirs.numpy()) <= 1e-4
    # the two taps differ, so a wrong tap layer cannot pass by accident
    assert max_rel_err(deepstack[0], deepstack[1]) > 1e-2


def test_images_do_not_attend_to_each_other(reference):
    """Two images encoded together equal each image encoded alone (block-diagonal attention)."""
    cfg, module, params = reference["config"], reference["module"], reference["params"]
    grid = GRIDS["two_images"]
    pixels = _pixels(grid, cfg, seed=5)
    both, ds_both = _jitted(module, grid)(params, jnp.asarray(pixels))
    split = grid[0][1] * grid[0][2]
    first, ds_first = _jitted(module, grid[:1])(params, jnp.asarray(pixels[:split]))
    second, _ = _jitted(module, grid[1:])(params, jnp.asarray(pixels[split:]))
    assert max_rel_err(np.concatenate([first, second]), both) <= 1e-5
    assert max_rel_err(ds_first[1], ds_both[1][:split // 4]) <= 1e-5


def test_sharded_forward_matches_single_device(reference):
    cfg, module = reference["config"], reference["module"]
    grid = GRIDS["two_images"]
    pixels = jnp.asarray(_pixels(grid, cfg, seed=7))
    single = _jitted(module, grid)(reference["params"], pixels)
    mesh = make_mesh(fsdp=4, tensor=2)
    shardings = logical_shardings(reference["abstract"], mesh)
    params = jax.tree.map(jax.device_put, reference["params"], shardings)
    assert params["blocks"]["qkv"]["kernel"].sharding.spec != jax.sharding.PartitionSpec()
    with jax.set_mesh(mesh):
        sharded = _jitted(module, grid)(params, pixels)
    for a, b in zip(jax.tree.leaves(single), jax.tree.leaves(sharded)):
        assert max_rel_err(b, a) <= 1e-5


def test_bad_inputs_give_clear_errors(reference):
    cfg, module, params = reference["config"], reference["module"], reference["params"]
    with pytest.raises(ValueError, match=r"needs \(24, 96\)"):
        module.apply({"params": params}, jnp.zeros((20, 96)), ((1, 4, 6),))
    with pytest.raises(ValueError, match="not divisible by spatial_merge_size"):
        module.apply({"params": params}, jnp.zeros((15, 96)), ((1, 3, 5),))
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        VisionConfig(depth=2, deepstack_visual_indexes=(0, 5))
    plan = vision_plan(VisionConfig.from_hf_dict({**load_json_config(reference["path"])["vision_config"],
                                                  "depth": 3, "deepstack_visual_indexes": [0, 1]}))
    with pytest.raises(WeightKeyError, match="blocks.2"):
        assemble_params(SafetensorsReader(reference["path"]), plan, _abstract(
            Qwen3VLVisionModel(VisionConfig.from_hf_dict({**load_json_config(reference["path"])["vision_config"],
                                                          "depth": 3})), cfg),
            ignore=["model.language_model.*", "lm_head.*"])


def test_bf16_forward_stays_close_to_fp32(reference):
    """bf16 params and compute (norms, softmax and RoPE in fp32): same features as fp32 to bf16 accuracy."""
    cfg = reference["config"]
    grid = GRIDS["two_images"]
    pixels = jnp.asarray(_pixels(grid, cfg, seed=9))
    module = Qwen3VLVisionModel(cfg, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    params = assemble_params(SafetensorsReader(reference["path"]), vision_plan(cfg), reference["abstract"],
                             dtype=jnp.bfloat16, ignore=["model.language_model.*", "lm_head.*"])
    assert params["blocks"]["qkv"]["kernel"].dtype == jnp.bfloat16
    low = _jitted(module, grid)(params, pixels)
    high = _jitted(reference["module"], grid)(reference["params"], pixels)
    assert low[0].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(low), jax.tree.leaves(high)):
        assert max_rel_err(np.asarray(a, np.float32), b) <= 3e-2
