"""Qwen3-VL text decoder parity against transformers (tiny seeded models saved with save_pretrained and loaded
through our importer), interleaved MRoPE, Qwen-Image-2 prompt encoding against diffusers, sharding, bad inputs."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwenimage_jax.checkpoints.params import WeightKeyError
from qwenimage_jax.checkpoints import load_text_encoder
from qwenimage_jax.models.qwen3_vl.text import mrope_axis_of_frequency
from qwenimage_jax.parallel.mesh import make_mesh
from tests.conftest import max_rel_err
from qwenimage_jax.testing.tokenizer import build_tiny_tokenizer, load_processor_without_torchvision, special_token_ids
from tests.qwen3_vl_tiny import TEXT_CONFIGS, build_reference, pre_norm_hidden

NAMES = sorted(TEXT_CONFIGS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("qwen3_vl_text"))
    tok = build_tiny_tokenizer(os.path.join(root, "tokenizer"))
    ids = special_token_ids(tok)
    models = {name: build_reference(root, name, ids, seed=i) for i, name in enumerate(NAMES)}
    return {"root": root, "tokenizer": tok, "ids": ids, "models": models}


@pytest.fixture(scope="module")
def encoders(workdir):
    return {name: load_text_encoder(path, tokenizer_path=workdir["tokenizer"])
            for name, (_, path) in workdir["models"].items()}


def _left_padded_batch(pad_id):
    ids = np.array([[pad_id] * 4 + [5, 17, 42, 99, 7, 3, 250, 11],
                    [12, 40, 33, 8, 101, 202, 303, 19, 77, 1, 2, 3]], np.int64)
    mask = np.array([[0] * 4 + [1] * 8, [1] * 12], np.int64)
    return ids, mask


@pytest.mark.parametrize("name", NAMES)
def test_pre_norm_states_and_logits_match_reference_on_left_padded_batch(workdir, encoders, name):
    model, _ = workdir["models"][name]
    ids, mask = _left_padded_batch(workdir["ids"]["<|endoftext|>"])
    inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    ref_pre = pre_norm_hidden(model, **inputs).numpy()
    with torch.no_grad():
        ref_logits = model(**inputs).logits.numpy()
    enc = encoders[name]
    ours_pre = np.asarray(enc.encode(ids, mask))
    ours_logits = np.asarray(enc.logits(ids, mask))
    valid = mask.astype(bool)  # pad rows attend to nothing; their values are unspecified in both
    assert max_rel_err(ours_pre[valid], ref_pre[valid]) <= 1e-4
    assert max_rel_err(ours_logits[valid], ref_logits[valid]) <= 1e-4
    assert np.isfinite(ours_pre).all() and np.isfinite(ours_logits).all()
    # text-only positions are arange(S) including the pad slots; RoPE only sees offsets within a row, so the valid
    # tokens of a left-padded row equal the same prompt alone (in both implementations)
    unpadded = np.asarray(enc.encode(ids[:1, 4:], mask[:1, 4:]))
    ref_unpadded = pre_norm_hidden(model, input_ids=torch.from_numpy(ids[:1, 4:])).numpy()
    assert max_rel_err(unpadded, ref_unpadded) <= 1e-4
    assert max_rel_err(unpadded[0], ours_pre[0, 4:]) <= 1e-4


@pytest.mark.parametrize("name", NAMES)
def test_distinct_thw_positions_match_reference_mrope(workdir, encoders, name):
    """Explicit (3, B, S) positions with different t/h/w rows exercise the interleaved frequency layout."""
    model, _ = workdir["models"][name]
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 300, size=(2, 10))
    positions = np.sort(rng.integers(0, 40, size=(3, 2, 10)), axis=-1)
    with torch.no_grad():
        ref = model(input_ids=torch.from_numpy(ids), position_ids=torch.from_numpy(positions)).logits.numpy()
    enc = encoders[name]
    ours = enc._forward(enc.params, jnp.asarray(ids, jnp.int32), jnp.ones((2, 10), jnp.int32),
                        jnp.asarray(positions, jnp.int32), None, None, True)["logits"]
    assert max_rel_err(ours, ref) <= 1e-4


def test_interleaved_mrope_layout_is_thwthwtt_for_section_422():
    assert "".join("THW"[a] for a in mrope_axis_of_frequency(16, (4, 2, 2))) == "THWTHWTT"


def test_tied_and_untied_heads_load(encoders):
    assert "lm_head" not in encoders["tied_gqa2"].params["language_model"]
    assert encoders["untied_gqa3"].params["language_model"]["lm_head"]["kernel"].shape == (96, 414)
    assert encoders["untied_gqa3"].config["tie_word_embeddings"] is False


@pytest.mark.parametrize("name", NAMES)
def test_encode_prompt_matches_diffusers_pipeline(workdir, encoders, name):
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline

    model, _ = workdir["models"][name]
    processor = load_processor_without_torchvision(workdir["tokenizer"])
    pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=model,
                               processor=processor, transformer=None)
    prompts = ["a cat sitting on a red sofa in a sunny living room", "", "a dog"]
    with torch.no_grad():
        ref_embeds, ref_mask, ref_pad = pipe.encode_prompt(prompts, device=torch.device("cpu"))
    embeds, mask, pad = encoders[name].encode_prompt(prompts)
    assert embeds.shape == tuple(ref_embeds.shape)
    assert max_rel_err(embeds, ref_embeds.numpy()) <= 1e-4
    np.testing.assert_array_equal(np.asarray(mask), ref_mask.numpy())
    np.testing.assert_array_equal(np.asarray(pad), ref_pad.numpy())
    # a single prompt has no padding: the pipeline returns no mask
    with torch.no_grad():
        one_ref = pipe.encode_prompt("a dog", device=torch.device("cpu"))
    one = encoders[name].encode_prompt("a dog")
    assert one[1] is None and one_ref[1] is None
    assert max_rel_err(one[0], one_ref[0].numpy()) <= 1e-4
    # bucketed (extra left padding) encoding: same shapes and masks, values within float rounding
    bucketed = encoders[name].encode_prompt(prompts, pad_to_multiple=32)
    assert max_rel_err(bucketed[0], ref_embeds.numpy()) <= 1e-4
    np.testing.assert_array_equal(np.asarray(bucketed[1]), ref_mask.numpy())


def test_sharded_forward_matches_single_device(workdir, encoders):
    name = "untied_gqa3"
    mesh = make_mesh(fsdp=4, tensor=2)
    sharded = load_text_encoder(workdir["models"][name][1], mesh=mesh)
    kernel = sharded.params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    ids, mask = _left_padded_batch(workdir["ids"]["<|endoftext|>"])
    single = encoders[name]
    assert max_rel_err(sharded.encode(ids, mask), single.encode(ids, mask)) <= 1e-5
    assert max_rel_err(sharded.logits(ids, mask), single.logits(ids, mask)) <= 1e-5


def test_checkpoint_that_disagrees_with_config_names_missing_keys(workdir, tmp_path):
    src = workdir["models"]["tied_gqa2"][1]
    dst = str(tmp_path / "bad")
    shutil.copytree(src, dst)
    with open(os.path.join(dst, "config.json")) as f:
        config = json.load(f)
    config["text_config"]["num_hidden_layers"] = 4
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(WeightKeyError, match="layers.3"):
        load_text_encoder(dst)


def test_bad_inputs_give_clear_errors(encoders):
    enc = encoders["tied_gqa2"]
    with pytest.raises(ValueError, match="attention_mask shape"):
        enc.encode(np.zeros((2, 5), np.int32), np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match="input_ids must be"):
        enc.encode(np.zeros((5,), np.int32))
    with pytest.raises(ValueError, match="pixel_values given without image_grid_thw"):
        enc.encode(np.zeros((1, 5), np.int32), None, pixel_values=np.zeros((4, 96), np.float32))


@pytest.mark.parametrize("name", NAMES)
def test_deepstack_additions_and_image_scatter_match_reference_text_model(workdir, encoders, name):
    """DeepStack rows are added at the visual positions after decoder layers 0..K-1 (K=2 here; for the 2-layer
    config that includes the last layer, whose pre-norm output must contain it)."""
    from qwenimage_jax.models.qwen3_vl.model import Qwen3VL, scatter_image_tokens

    model, _ = workdir["models"][name]
    dim = model.config.text_config.hidden_size
    rng = np.random.default_rng(1)
    mask = np.array([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 10], np.int64)
    visual = np.zeros((2, 10), bool)
    visual[0, 4:7] = True
    visual[1, 2:8] = True
    n_visual = int(visual.sum())
    text_embeds = rng.normal(size=(2, 10, dim)).astype(np.float32)
    image_embeds = rng.normal(size=(n_visual, dim)).astype(np.float32)
    deepstack = [rng.normal(size=(n_visual, dim)).astype(np.float32) for _ in range(2)]
    positions = np.sort(rng.integers(0, 12, size=(3, 2, 10)), axis=-1)
    ref_embeds = torch.from_numpy(text_embeds).masked_scatter(torch.from_numpy(visual)[..., None],
                                                              torch.from_numpy(image_embeds))
    lm = model.model.language_model
    handle = lm.norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        with torch.no_grad():
            ref = lm(inputs_embeds=ref_embeds, attention_mask=torch.from_numpy(mask),
                     position_ids=torch.from_numpy(positions), visual_pos_masks=torch.from_numpy(visual),
                     deepstack_visual_embeds=[torch.from_numpy(d) for d in deepstack]).last_hidden_state.numpy()
    finally:
        handle.remove()
    embeds = scatter_image_tokens(jnp.asarray(text_embeds), jnp.asarray(visual), jnp.asarray(image_embeds))
    assert max_rel_err(embeds, ref_embeds.numpy()) == 0.0
    dense = jnp.stack([scatter_image_tokens(jnp.zeros_like(embeds), jnp.asarray(visual), jnp.asarray(d))
                       for d in deepstack])
    enc = encoders[name]

    def run(module, *args):
        return module.language_model(*args, compute_logits=False)["pre_norm"]

    ours = enc.module.apply({"params": enc.params}, embeds, jnp.asarray(positions), jnp.asarray(mask), dense,
                            method=run)
    valid = mask.astype(bool)
    assert max_rel_err(np.asarray(ours)[valid], ref[valid]) <= 1e-4
    without = enc.module.apply({"params": enc.params}, embeds, jnp.asarray(positions), jnp.asarray(mask), None,
                               method=run)
    assert max_rel_err(np.asarray(without)[valid], ref[valid]) > 1e-2  # the additions matter
    assert isinstance(enc.module, Qwen3VL)


def test_orbax_conversion_round_trip(workdir, encoders, tmp_path):
    from qwenimage_jax.checkpoints.orbax_io import save_component

    enc = encoders["untied_gqa3"]
    dst = save_component(str(tmp_path / "orbax"), enc.params, dict(enc.config), "text_encoder")
    again = load_text_encoder(dst)
    ids, mask = _left_padded_batch(workdir["ids"]["<|endoftext|>"])
    assert max_rel_err(again.logits(ids, mask), enc.logits(ids, mask)) == 0.0


def test_prepare_inputs_with_images_matches_transformers_processor(workdir, tmp_path):
    """Template + image-pad expansion + left padding equal Qwen3VLProcessor's output for two images of different
    sizes (the tokens the vision tower's embeddings will fill)."""
    from PIL import Image

    from qwenimage_jax.text.templates import build_prompt
    from qwenimage_jax.testing.tokenizer import build_tiny_processor

    proc_dir = build_tiny_processor(str(tmp_path / "processor"), patch_size=4)
    enc = load_text_encoder(workdir["models"]["tied_gqa2"][1], tokenizer_path=proc_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, size=(20, 28, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, size=(36, 16, 3), dtype=np.uint8))]
    texts = [build_prompt("a cat", 2), build_prompt("two images, a much longer prompt here", 2)]
    ref = load_processor_without_torchvision(proc_dir)(text=texts, images=images * 2, padding=True,
                                                       padding_side="left", return_tensors="np")
    ours = enc.prepare_inputs(texts, images * 2)
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        np.testing.assert_array_equal(ours[key], ref[key])
    np.testing.assert_allclose(ours["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
    assert len({tuple(g) for g in ours["image_grid_thw"]}) == 2
    with pytest.raises(ValueError, match="placeholder"):
        enc.prepare_inputs([build_prompt("x", 1)], images)
