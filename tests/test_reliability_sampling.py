"""Reliability matrix, sampling rows (docs/reliability.md): hostile pipeline and CLI inputs are one clear error or a
documented conversion, decided before any noise is drawn; two processes sampling into one folder keep both files."""
import json
import os
import subprocess
import sys
import threading
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from qwenimage_jax import cli
from qwenimage_jax.sampling import images as image_utils
from qwenimage_jax.sampling.pipeline import QwenImagePipeline

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
TINY_WORLD = os.path.join(REPO, "qwenimage_jax", "assets", "tiny_world")
SIZE = dict(height=32, width=32)


@pytest.fixture(scope="module")
def pipe():
    """The shipped distilled tiny model (model_index.json sample_sigmas: a 4-step grid), no text encoder."""
    return QwenImagePipeline.from_pretrained(TINY_WORLD, dtype=jnp.float32, load_text_encoder=False)


def _embeds(pipe, batch=1, length=4, seed=0):
    width = pipe.transformer.dit_config.context_in_dim
    return np.random.default_rng(seed).standard_normal((batch, length, width)).astype(np.float32)


def _latent(pipe, **kwargs):
    kwargs.setdefault("prompt_embeds", _embeds(pipe))
    return np.asarray(pipe(output_type="latent", progress=False, seed=0, **SIZE, **kwargs).images)


def test_steps_zero_negative_absurd_or_fractional_are_errors(pipe):
    for steps in (0, -3, 10**9, 2.5, True):
        with pytest.raises(ValueError, match="num_inference_steps"):
            _latent(pipe, num_inference_steps=steps)


def test_distilled_grid_by_default_explicit_steps_win_with_a_warning(pipe):
    grid = json.load(open(os.path.join(TINY_WORLD, "model_index.json")))["sample_sigmas"]
    assert pipe.sample_sigmas == grid and grid[0] == 1.0
    default = _latent(pipe)
    np.testing.assert_array_equal(default, _latent(pipe, sigmas=pipe.sample_sigmas))
    np.testing.assert_array_equal(default, _latent(pipe, num_inference_steps=len(grid)))
    with pytest.warns(UserWarning, match=f"own {len(grid)}-step grid"):
        three = _latent(pipe, num_inference_steps=3)
    generic = QwenImagePipeline(pipe.transformer, pipe.vae)          # same weights, no model grid
    np.testing.assert_array_equal(three, _latent(generic, num_inference_steps=3))


def test_custom_sigmas_must_decrease_inside_0_1(pipe):
    for sigmas, pattern in (([0.5, 0.8, 0.2], "strictly decreasing"), ([1.0, 1.0], "strictly decreasing"),
                            ([1.5, 0.5], r"\(0, 1\]"), ([1.0, 0.0], r"\(0, 1\]"), ([1.0, float("nan")], r"\(0, 1\]"),
                            ([], "empty")):
        with pytest.raises(ValueError, match=pattern):
            _latent(pipe, sigmas=sigmas)
    with pytest.raises(ValueError, match="sigmas has 2 entries"):
        _latent(pipe, sigmas=[1.0, 0.5], num_inference_steps=3)


def test_cfg_below_one_with_a_negative_prompt_warns_and_runs_unguided(pipe):
    with pytest.warns(UserWarning, match="true_cfg_scale <= 1"):
        out = _latent(pipe, negative_prompt_embeds=_embeds(pipe, seed=1), true_cfg_scale=0.5)
    np.testing.assert_array_equal(out, _latent(pipe))
    with pytest.raises(ValueError, match="true_cfg_scale"):
        _latent(pipe, true_cfg_scale=float("nan"))


def test_sizes_zero_not_multiples_or_beyond_rope_range(pipe):
    embeds = _embeds(pipe)
    for kwargs, pattern in ((dict(height=0, width=32), "height 0 is not a positive multiple of 32"),
                            (dict(height=32, width=0), "width 0 is not a positive multiple"),
                            (dict(height=48, width=32), "height 48 .* use 32 or 64"),
                            (dict(height=-32, width=32), "height -32"),
                            (dict(height=32, width=32800), "width 32800 is beyond the DiT's RoPE range")):
        with pytest.raises(ValueError, match=pattern):
            pipe(prompt_embeds=embeds, output_type="latent", progress=False, **kwargs)


def test_a_size_over_the_free_memory_is_refused_before_anything_compiles(pipe, monkeypatch):
    from qwenimage_jax.errors import InputError
    from qwenimage_jax.sampling import latents as latent_utils
    from qwenimage_jax.sampling import memory

    # what the device has free: exactly what 2 images of 256x256 with CFG need (64 text tokens: the first bucket)
    budget = memory.estimate(pipe.transformer.dit_config, pipe.vae.vae_config, batch=2, height=256, width=256,
                             cfg=True, text_tokens=64, platform="cpu").total
    monkeypatch.setattr(memory, "available_bytes", lambda device: (budget, "a test budget"))

    def must_not_run(*args, **kwargs):
        raise AssertionError("the pipeline compiled or allocated before refusing the size")

    traces = pipe.num_traces
    for owner, name in ((pipe, "_denoise_jit"), (pipe, "_decode_jit"), (pipe, "encode_prompt"),
                        (latent_utils, "initial_noise")):
        monkeypatch.setattr(owner, name, must_not_run)
    cfg = dict(negative_prompt_embeds=_embeds(pipe, seed=1), true_cfg_scale=4.0)
    with pytest.raises(memory.MemoryBudgetError) as info:
        pipe(prompt_embeds=_embeds(pipe), height=256, width=256, num_images_per_prompt=3, output_type="latent",
             progress=False, **cfg)
    message = str(info.value)
    assert isinstance(info.value, InputError) and isinstance(info.value, ValueError) and "\n" not in message
    for part in ("3 image(s) of 256x256 with CFG", "at 256x256 at most 2 image(s) fit", "--no-memory-check",
                 "the largest square size that fits 3 image(s) is "):
        assert part in message, message
    side = int(message.split("fits 3 image(s) is ")[1].split("x")[0])
    assert side % 32 == 0 and 32 <= side < 256
    assert pipe.num_traces == traces
    # two images fit; memory_check=False skips the estimate (here: straight into the patched-out encoder)
    with pytest.raises(AssertionError, match="compiled or allocated"):
        pipe(prompt_embeds=_embeds(pipe), height=256, width=256, num_images_per_prompt=2, output_type="latent",
             progress=False, **cfg)
    monkeypatch.setattr(memory, "available_bytes", lambda device: (1, "a test budget"))
    with pytest.raises(AssertionError, match="compiled or allocated"):
        pipe(prompt_embeds=_embeds(pipe), height=256, width=256, output_type="latent", progress=False,
             memory_check=False)


def test_batch_zero_empty_or_mixed_prompt_lists(pipe):
    with pytest.raises(ValueError, match="num_images_per_prompt=0"):
        _latent(pipe, num_images_per_prompt=0)
    with pytest.raises(ValueError, match="none of them 0"):
        _latent(pipe, prompt_embeds=np.zeros((0, 4, 64), np.float32))
    for prompt, pattern in (([], "empty list"), (["a cat", None], r"`prompt`\[1\] is None"), (7, "string")):
        with pytest.raises(ValueError, match=pattern):
            pipe(prompt=prompt, output_type="latent", progress=False, **SIZE)
    with pytest.raises(ValueError, match=r"`negative_prompt`\[0\] is None"):
        pipe(prompt="a cat", negative_prompt=[None], true_cfg_scale=4.0, progress=False, **SIZE)


def test_nan_or_inf_latents_and_embeddings(pipe):
    bad = _embeds(pipe)
    bad[0, 2, 5] = np.nan
    with pytest.raises(ValueError, match=r"`prompt_embeds` holds 1 NaN/Inf value\(s\) \(first at index \(0, 2, 5\)"):
        _latent(pipe, prompt_embeds=bad)
    with pytest.raises(ValueError, match="`negative_prompt_embeds` holds"):
        _latent(pipe, negative_prompt_embeds=bad, true_cfg_scale=4.0)
    latents = np.zeros((1, 4, 16), np.float32)
    latents[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="`latents` holds 1 NaN/Inf"):
        _latent(pipe, latents=latents)


def test_more_than_ten_condition_images(pipe):
    with pytest.raises(ValueError, match="11 condition images given; Qwen-Image-2 takes at most 10"):
        _latent(pipe, image=[Image.new("RGB", (32, 32))] * 11)


def _modes():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)
    grey16 = Image.fromarray((rng.integers(0, 65536, (40, 48))).astype(np.uint16))
    return {"L": Image.fromarray(rgb[..., 0]), "P": Image.fromarray(rgb).convert("P"),
            "CMYK": Image.fromarray(rgb).convert("CMYK"), "I;16": grey16, "1x1": Image.new("RGB", (1, 1), (9, 99, 199)),
            "LA": Image.fromarray(rgb[..., 0]).convert("LA"), "huge": Image.new("RGB", (6000, 4000), (255, 0, 0))}


def test_condition_image_modes_are_converted_as_documented():
    modes = _modes()
    for name, img in modes.items():
        cond = image_utils.prepare_condition_image(img, 64 * 64, vae_channels=4)
        assert cond.vae.shape[-1] == 4 and cond.vae.dtype == np.float32, name
        assert -1.0 <= cond.vae.min() and cond.vae.max() <= 1.0, name
        assert cond.vlm.mode == "RGB" and cond.size[0] % 32 == 0 and cond.size[1] % 32 == 0, name
    # 16-bit greyscale maps 0..65535 to 0..255 (not PIL's clip at 255)
    grey = image_utils.to_rgba(modes["I;16"])
    expected = np.round(np.asarray(modes["I;16"], np.float64) * 255 / 65535).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(grey)[..., 0], expected)
    # CMYK through RGB, 1x1 upsampled to the area, a huge image downsampled to it
    np.testing.assert_array_equal(np.asarray(image_utils.to_rgba(modes["CMYK"]))[..., :3],
                                  np.asarray(modes["CMYK"].convert("RGB")))
    assert image_utils.prepare_condition_image(modes["1x1"], 64 * 64).size == (64, 64)
    assert image_utils.prepare_condition_image(modes["huge"], 128 * 128).size == (160, 96)
    with pytest.raises(ValueError, match="aspect ratio .* too extreme"):
        image_utils.prepare_condition_image(Image.new("RGB", (4000, 1)), 64 * 64)
    with pytest.raises(ValueError, match="must be uint8"):
        image_utils.to_pil(np.zeros((8, 8), np.uint16))


def test_cli_rejects_steps_zero_before_loading(tmp_path, capsys):
    out = str(tmp_path / "x.png")
    for flags, pattern in ((["--steps", "0"], "--steps 0; use 1 to 1000"), (["--height", "0"], "--height 0")):
        # one line with the input error's exit code, and the absent model was never looked at
        assert cli.main(["sample", "--model", str(tmp_path / "absent"), "--prompt", "a", "--out", out, *flags]) == 4
        err = capsys.readouterr().err
        assert pattern in err and "absent" not in err


def test_output_names_are_claimed_atomically(tmp_path):
    from qwenimage_jax.commands.sample import claim_output_path

    target = str(tmp_path / "out.png")
    got, lock = [], threading.Lock()

    def claim():
        name = claim_output_path(target)
        with lock:
            got.append(name)

    threads = [threading.Thread(target=claim) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == sorted([target] + [str(tmp_path / f"out_{n}.png") for n in range(2, 9)])


def test_two_processes_sampling_into_one_folder_keep_both_files(tmp_path):
    out = tmp_path / "shared" / "img.png"
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    cmd = [sys.executable, "-m", "qwenimage_jax.cli", "sample", "--model", TINY_WORLD, "--prompt", "a red ball",
           "--config", os.path.join(REPO, "configs", "sampling.py:tiny"), "--resolution", "32", "--out", str(out),
           "--no-progress"]
    procs = [subprocess.Popen(cmd + ["--seed", str(seed)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for seed in (1, 2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    files = sorted(os.listdir(out.parent))
    assert files == ["img.png", "img_2.png"], (files, logs)
    seeds = sorted(Image.open(out.parent / f).text["seed"] for f in files)
    assert seeds == ["1", "2"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for f in files:
            Image.open(out.parent / f).load()
