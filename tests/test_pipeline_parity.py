"""End-to-end parity with diffusers' QwenImage21Pipeline (fp32): tiny random VAE + DiT (+ Qwen3-VL) saved as a
diffusers-format directory, loaded by `QwenImagePipeline.from_pretrained`, both pipelines fed the same prompt
embeddings (or raw prompts) and the same initial noise drawn by the reference."""
import functools
import os

import numpy as np
import pytest
import torch

from tests.conftest import max_rel_err
from qwenimage_jax.testing.pipeline import TEXT_HIDDEN, build_reference_pipeline, reference_noise

HEIGHT, WIDTH = 64, 96   # 4 x 6 latent tokens
CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    ref, path, _ = build_reference_pipeline(str(tmp_path_factory.mktemp("qwenimage21")), with_text_encoder=True)
    return ref, path


@pytest.fixture(scope="module")
def pipes(built):
    import jax.numpy as jnp

    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    ref, path = built
    return ref, QwenImagePipeline.from_pretrained(path, dtype=jnp.float32)


def _embeds(batch, length, valid, seed):
    gen = torch.Generator().manual_seed(seed)
    embeds = torch.randn((batch, length, TEXT_HIDDEN), generator=gen)
    mask = torch.zeros((batch, length), dtype=torch.long)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
        embeds[b, n:] = 0
    return embeds, mask


def _run_both(ref, ours, steps, reference_kwargs, ours_kwargs=None, batch=1, height=HEIGHT, width=WIDTH,
              ref_encode_prompt=None, pass_size=True):
    """Final images (np) of both pipelines; also checks the denoised latents (output_type="latent") directly,
    since decoded pixels can sit on the VAE's clamp. pass_size=False: both derive the size from the condition
    image; (height, width) then only shape the noise."""
    latents = reference_noise(batch, height, width, seed=steps)
    common = dict(num_inference_steps=steps)
    if pass_size:
        common.update(height=height, width=width)
    ours_kwargs = ours_kwargs or reference_kwargs
    if ref_encode_prompt is not None:
        original = ref.encode_prompt
        ref.encode_prompt = ref_encode_prompt
    try:
        with torch.no_grad():
            expected = ref(latents=latents.clone(), output_type="np", **common, **reference_kwargs).images
            expected_latents = ref(latents=latents.clone(), output_type="latent", **common,
                                   **reference_kwargs).images.numpy()
    finally:
        if ref_encode_prompt is not None:
            ref.encode_prompt = original
    got = ours(latents=latents.numpy(), progress=False, output_type="np", **common, **ours_kwargs).images
    got_latents = ours(latents=latents.numpy(), progress=False, output_type="latent", **common, **ours_kwargs).images
    assert max_rel_err(got_latents, expected_latents) <= 1e-4
    assert max_rel_err(got_latents, latents.numpy()) > 1e-2  # the loop moved the latents
    clamped = float(np.mean((expected <= 0) | (expected >= 1)))
    assert clamped < 0.5, f"{clamped:.0%} of the reference pixels are clamped; the comparison would be weak"
    return np.asarray(got), np.asarray(expected)


@pytest.mark.parametrize("steps", [3, 4])
def test_prompt_embeds_without_cfg(pipes, steps):
    ref, ours = pipes
    embeds, mask = _embeds(2, 7, [7, 5], seed=10)
    kwargs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask)
    got, expected = _run_both(ref, ours, steps, kwargs, batch=2)
    assert got.shape == (2, HEIGHT, WIDTH, 4)
    assert got.min() >= 0 and got.max() <= 1
    assert max_rel_err(got, expected) <= 1e-4


@pytest.mark.parametrize("steps,neg_length", [(3, 7), (4, 5)])
def test_prompt_embeds_with_cfg(pipes, steps, neg_length):
    # neg_length 7 = the prompt's length: one doubled batch; 5: different layouts, two calls per step.
    ref, ours = pipes
    embeds, mask = _embeds(1, 7, [6], seed=11)
    neg, neg_mask = _embeds(1, neg_length, [neg_length], seed=12)
    kwargs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
                  negative_prompt_embeds_mask=neg_mask, true_cfg_scale=4.0)
    got, expected = _run_both(ref, ours, steps, kwargs)
    assert max_rel_err(got, expected) <= 1e-4


def test_editing_from_prompt_embeds(pipes):
    # A 64x64 RGBA condition image -> 4x4 latent tokens = 4 VLM image slots inside the prompt embeddings.
    from PIL import Image

    ref, ours = pipes
    rng = np.random.default_rng(0)
    condition = Image.fromarray(rng.integers(0, 256, (48, 48, 4), dtype=np.uint8), mode="RGBA")
    embeds, mask = _embeds(1, 9, [9], seed=13)
    pad = torch.zeros((1, 9), dtype=torch.bool)
    pad[0, 2:6] = True
    ref_encode = functools.partial(_encode_with_pad_mask, ref.encode_prompt, pad)
    common = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, image=condition, output_resolution=64)
    got, expected = _run_both(ref, ours, 3, common, dict(common, image_pad_mask=pad.numpy()), height=64, width=64,
                              ref_encode_prompt=ref_encode)
    assert max_rel_err(got, expected) <= 1e-4


def _encode_with_pad_mask(encode_prompt, pad_mask, *args, **kwargs):
    # diffusers reads the image-slot mask only from its own text encoder; hand it the one our embeddings carry.
    kwargs["image_pad_mask"] = pad_mask
    return encode_prompt(*args, **kwargs)


def test_raw_prompts_through_both_pipelines(pipes):
    ref, ours = pipes
    prompts = ["a cat sitting on a red sofa", "mountains, snow, blue sky, a lake reflecting the trees"]
    kwargs = dict(prompt=prompts, negative_prompt=" ", true_cfg_scale=3.0)
    got, expected = _run_both(ref, ours, 3, dict(kwargs, negative_prompt=[" ", " "]), kwargs, batch=2)
    assert max_rel_err(got, expected) <= 1e-4


def test_raw_prompt_editing_through_both_pipelines(pipes):
    # Two condition images (RGBA with transparent pixels, then RGB): the text encoder sees them (vision tower +
    # DeepStack), the DiT their VAE latents; the target takes the last image's aspect ratio.
    from PIL import Image

    ref, ours = pipes
    rng = np.random.default_rng(1)
    rgba = rng.integers(0, 256, (40, 56, 4), dtype=np.uint8)
    rgba[..., 3] = np.where(rng.random((40, 56)) < 0.3, 0, 255)
    images = [Image.fromarray(rgba, mode="RGBA"), Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8))]
    kwargs = dict(prompt="a dog running on the beach", image=images, output_resolution=64, negative_prompt=" ",
                  true_cfg_scale=2.5)
    # area 64^2: 56x40 -> 64x64 (4x4 latents); 64x32 -> 96x32 (6x2 latents), which is also the target size
    got, expected = _run_both(ref, ours, 3, kwargs, height=32, width=96, pass_size=False)
    assert got.shape == (1, 32, 96, 4)
    assert max_rel_err(got, expected) <= 1e-4


def test_images_per_prompt_and_pil_output(pipes):
    ref, ours = pipes
    embeds, mask = _embeds(1, 6, [6], seed=14)
    latents = reference_noise(2, HEIGHT, WIDTH, seed=1)
    common = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, num_images_per_prompt=2, num_inference_steps=3,
                  height=HEIGHT, width=WIDTH, output_type="pil")
    with torch.no_grad():
        expected = ref(latents=latents.clone(), **common).images
    got = ours(latents=latents.numpy(), progress=False, **common).images
    assert [im.mode for im in got] == [im.mode for im in expected] == ["RGBA", "RGBA"]
    diffs = [np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() for a, b in zip(got, expected)]
    assert max(diffs) <= 1, diffs


def test_cli_sample_writes_grid_with_metadata(built, pipes, tmp_path, capsys):
    from PIL import Image

    from qwenimage_jax import cli

    _, path = built
    _, ours = pipes
    out = tmp_path / "grid.png"
    prompts = ["a cat sitting on a red sofa", "a bowl of fruit"]
    argv = ["sample", "--model", path, "--config", f"{CONFIGS}/sampling.py:tiny", "--prompt", prompts[0], "--prompt",
            prompts[1], "--steps", "2", "--seed", "3", "--width", "96", "--out", str(out), "--save-individual"]
    assert cli.main(argv) == 0
    grid = Image.open(out)
    assert grid.size == (2 * 96, 64) and grid.mode == "RGBA"
    assert grid.text["prompt"] == " | ".join(prompts) and grid.text["seed"] == "3" and grid.text["steps"] == "2"
    expected = ours(prompt=prompts, num_inference_steps=2, seed=3, height=64, width=96, progress=False).images
    for i, image in enumerate(expected):
        single = Image.open(tmp_path / f"grid-{i}.png")
        np.testing.assert_array_equal(np.asarray(single), np.asarray(image))
        np.testing.assert_array_equal(np.asarray(grid)[:, 96 * i:96 * (i + 1)], np.asarray(image))
    assert "wrote" in capsys.readouterr().out
