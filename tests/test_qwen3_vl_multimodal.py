"""End to end with images: `load_text_encoder` on tiny seeded `Qwen3VLForConditionalGeneration` models (two configs)
with our numpy image processor vs transformers' model fed by its own `Qwen3VLProcessor` (pixel_values,
image_grid_thw, mm_token_type_ids): pre-norm last-layer states and logits for a prompt with one image, a prompt with
two images of different sizes, and a left-padded batch mixing one and two images; plus the rope positions and the
`encode_prompt` image-pad mask on the composed path."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from qwenimage_jax.assets import photo_paths
from qwenimage_jax.checkpoints import load_text_encoder
from qwenimage_jax.text.processor import ImageProcessor, get_rope_index
from qwenimage_jax.text.templates import build_prompt
from tests.conftest import max_rel_err
from qwenimage_jax.testing.tokenizer import build_tiny_processor, load_processor_without_torchvision, special_token_ids
from tests.qwen3_vl_tiny import TEXT_CONFIGS, build_reference, pre_norm_hidden

NAMES = sorted(TEXT_CONFIGS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("qwen3_vl_multimodal"))
    proc_dir = build_tiny_processor(os.path.join(root, "processor"), patch_size=4)
    ids = special_token_ids(proc_dir)
    models = {name: build_reference(root, name, ids, seed=20 + i) for i, name in enumerate(NAMES)}
    encoders = {}
    for name, (_, path) in models.items():
        enc = load_text_encoder(path, tokenizer_path=proc_dir)
        enc.image_processor = ImageProcessor.from_pretrained(proc_dir)  # ours, not transformers'
        encoders[name] = enc
    photo = Image.open(photo_paths()["chelsea"]).convert("RGB")  # 432x288 photo, downscaled by smart_resize
    yy, xx = np.mgrid[0:36, 0:21]
    gradient = Image.fromarray(np.stack([xx * 11, yy * 7, 255 - yy * 5], -1).astype(np.uint8))
    images = {"photo": photo, "gradient": gradient}
    return {"proc_dir": proc_dir, "ids": ids, "models": models, "encoders": encoders, "images": images,
            "processor": load_processor_without_torchvision(proc_dir)}


CASES = {
    "one_image": ([("a cat on a sofa", ["photo"])]),
    "two_images": ([("two images, describe them", ["photo", "gradient"])]),
    "padded_batch": ([("a dog", ["gradient"]), ("a much longer prompt with two images", ["gradient", "photo"])]),
}


def _inputs(workdir, case):
    texts = [build_prompt(prompt, len(names)) for prompt, names in CASES[case]]
    images = [workdir["images"][n] for _, names in CASES[case] for n in names]
    ref = workdir["processor"](text=texts, images=images, padding=True, padding_side="left", return_tensors="np")
    return texts, images, ref


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", NAMES)
def test_pre_norm_states_and_logits_with_images_match_reference(workdir, name, case):
    model, _ = workdir["models"][name]
    enc = workdir["encoders"][name]
    texts, images, ref = _inputs(workdir, case)
    ours_in = enc.prepare_inputs(texts, images)
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        np.testing.assert_array_equal(ours_in[key], ref[key])
    np.testing.assert_allclose(ours_in["pixel_values"], ref["pixel_values"], rtol=0, atol=1e-6)
    grids = {tuple(g) for g in ours_in["image_grid_thw"]}
    assert len(grids) == (1 if case == "one_image" else 2)

    torch_in = {k: torch.from_numpy(np.asarray(ref[k])) for k in
                ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")}
    ref_pre = pre_norm_hidden(model, **torch_in).numpy()
    with torch.no_grad():
        ref_logits = model(**torch_in).logits.numpy()
    args = (ours_in["input_ids"], ours_in["attention_mask"], ours_in["pixel_values"], ours_in["image_grid_thw"])
    ours_pre = np.asarray(enc.encode(*args))
    ours_logits = np.asarray(enc.logits(*args))
    valid = ours_in["attention_mask"].astype(bool)
    err_pre = max_rel_err(ours_pre[valid], ref_pre[valid])
    err_logits = max_rel_err(ours_logits[valid], ref_logits[valid])
    print(f"{name}/{case}: pre_norm rel err {err_pre:.2e}, logits rel err {err_logits:.2e}")
    assert err_pre <= 1e-4 and err_logits <= 1e-4
    assert np.isfinite(ours_pre).all() and np.isfinite(ours_logits).all()

    # the 3D rope positions (processor.get_rope_index, which the composition calls) equal transformers' on the
    # processor's token types
    ref_pos, ref_delta = model.model.get_rope_index(torch_in["input_ids"], torch_in["mm_token_type_ids"],
                                                    image_grid_thw=torch_in["image_grid_thw"],
                                                    attention_mask=torch_in["attention_mask"])
    ids = workdir["ids"]
    pos, delta = get_rope_index(ours_in["input_ids"], ours_in["attention_mask"], ours_in["image_grid_thw"],
                                image_token_id=ids["<|image_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
                                spatial_merge_size=2)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())


def test_images_change_the_output(workdir):
    """Guards against a silently dropped vision path: another image gives different states at the text tokens
    after it (DeepStack + attention), while the text before the first image is unchanged (causal)."""
    enc = workdir["encoders"][NAMES[0]]
    texts = [build_prompt("a cat", 1)]
    a = enc.prepare_inputs(texts, [workdir["images"]["photo"]])
    b = enc.prepare_inputs(texts, [workdir["images"]["photo"].transpose(Image.Transpose.FLIP_LEFT_RIGHT)])
    np.testing.assert_array_equal(a["input_ids"], b["input_ids"])
    ha = np.asarray(enc.encode(a["input_ids"], a["attention_mask"], a["pixel_values"], a["image_grid_thw"]))
    hb = np.asarray(enc.encode(b["input_ids"], b["attention_mask"], b["pixel_values"], b["image_grid_thw"]))
    first_image = int(np.argmax(a["input_ids"][0] == workdir["ids"]["<|image_pad|>"]))
    assert max_rel_err(ha[0, :first_image], hb[0, :first_image]) <= 1e-6
    assert max_rel_err(ha[0, -1], hb[0, -1]) > 1e-3


def test_encode_prompt_with_images_marks_image_pad_positions(workdir):
    enc = workdir["encoders"][NAMES[0]]
    images = [workdir["images"]["photo"], workdir["images"]["gradient"]]
    embeds, mask, pad_mask = enc.encode_prompt(["a cat", "a longer prompt about a cat"], images=images)
    per_prompt = sum(int(np.prod(g)) // 4 for g in enc.prepare_inputs([build_prompt("x", 2)], images)["image_grid_thw"])
    assert np.asarray(pad_mask).sum(axis=1).tolist() == [per_prompt, per_prompt]
    assert embeds.shape[0] == 2 and np.isfinite(np.asarray(embeds)).all()


def test_sharded_forward_with_images_matches_single_device(workdir):
    from qwenimage_jax.parallel.mesh import make_mesh

    name = NAMES[0]
    enc = workdir["encoders"][name]
    sharded = load_text_encoder(workdir["models"][name][1], tokenizer_path=workdir["proc_dir"],
                                mesh=make_mesh(fsdp=4, tensor=2))
    kernel = sharded.params["visual"]["blocks"]["qkv"]["kernel"]
    assert len(kernel.sharding.device_set) == 8
    texts, images, _ = _inputs(workdir, "padded_batch")
    batch = enc.prepare_inputs(texts, images)
    args = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch["image_grid_thw"])
    valid = batch["attention_mask"].astype(bool)
    assert max_rel_err(np.asarray(sharded.encode(*args))[valid], np.asarray(enc.encode(*args))[valid]) <= 1e-5
