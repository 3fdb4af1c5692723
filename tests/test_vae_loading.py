"""Loading the Qwen-Image-2 VAE: key/shape validation, input checks, Orbax conversion via the CLI, latent
normalisation, posterior sampling, sharded loading and jitted init."""
import json
import os
import shutil

import numpy as np
import pytest

try:
    import torch
    from diffusers import AutoencoderKLQwenImage21
    from safetensors.numpy import load_file, save_file
except ImportError as e:  # pragma: no cover
    raise ImportError(f"VAE loading tests need torch + diffusers (pip install -e .[test]): {e}") from e

import jax
import jax.numpy as jnp

from qwenimage_jax.cli import main as cli_main
from qwenimage_jax.checkpoints.params import WeightKeyError
from qwenimage_jax.checkpoints import load_vae
from qwenimage_jax.models.vae import VAEConfig, init_vae, param_shardings
from qwenimage_jax.parallel.mesh import make_mesh

# f4 RGBA, residual layout, temporal stage (so the checkpoint carries ignored time_conv weights)
TINY = dict(base_dim=8, decoder_base_dim=12, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True], is_residual=True, in_channels=4, out_channels=4,
            scale_factor_spatial=4, latents_mean=[0.5, -1.0, 2.0, 0.0], latents_std=[2.0, 0.5, 1.5, 3.0])
WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    torch.manual_seed(0)
    model = AutoencoderKLQwenImage21(**TINY).eval()
    path = str(tmp_path_factory.mktemp("vae_src"))
    model.save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def vae(src):
    return load_vae(src)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(-1, 1, (2, 16, 24, 4)).astype(np.float32)


def _edited_copy(src, dst, edit):
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, WEIGHTS))
    edit(tensors)
    save_file(tensors, os.path.join(dst, WEIGHTS))
    return str(dst)


def test_checkpoint_has_ignored_time_conv_weights(src):
    keys = load_file(os.path.join(src, WEIGHTS)).keys()
    assert any("time_conv" in k for k in keys)  # present in the file, ignored by the importer


def test_missing_key_is_named(src, tmp_path):
    path = _edited_copy(src, tmp_path / "m", lambda t: t.pop("decoder.conv_out.bias"))
    with pytest.raises(WeightKeyError, match=r"missing.*decoder\.conv_out\.bias"):
        load_vae(path)


def test_extra_key_is_named(src, tmp_path):
    def add(t):
        t["decoder.extra_layer.weight"] = np.zeros((3, 3), np.float32)
    path = _edited_copy(src, tmp_path / "e", add)
    with pytest.raises(WeightKeyError, match=r"unexpected.*decoder\.extra_layer\.weight"):
        load_vae(path)


def test_misshaped_key_is_named(src, tmp_path):
    def reshape(t):
        t["encoder.conv_in.weight"] = np.zeros((8, 4, 5, 5), np.float32)
    path = _edited_copy(src, tmp_path / "s", reshape)
    with pytest.raises(WeightKeyError, match=r"encoder/conv_in/kernel \(from encoder\.conv_in\.weight\).*"
                                             r"\(5, 5, 4, 8\).*\(3, 3, 4, 8\)"):
        load_vae(path)


def test_wrong_image_size_and_channels_raise_clear_errors(vae):
    with pytest.raises(ValueError, match=r"image height 18 is not a multiple of 4.*16 or 20"):
        vae.encode(np.zeros((1, 18, 24, 4), np.float32))
    with pytest.raises(ValueError, match=r"image width 2 is not a multiple of 4.*4"):
        vae.encode(np.zeros((1, 16, 2, 4), np.float32))
    with pytest.raises(ValueError, match=r"3 channels but this VAE takes 4.*alpha"):
        vae.encode(np.zeros((1, 16, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"\(batch, height, width, channels\)"):
        vae.encode(np.zeros((16, 16, 4), np.float32))
    with pytest.raises(ValueError, match=r"latents have 8 channels but this VAE's z_dim is 4"):
        vae.decode(np.zeros((1, 4, 4, 8), np.float32))
    # the module itself checks too (pipeline / trainer path)
    with pytest.raises(ValueError, match=r"image height 18"):
        vae.module.apply({"params": vae.params}, jnp.zeros((1, 18, 24, 4)), method="encode")


def test_unsupported_configs_raise_clear_errors():
    with pytest.raises(ValueError, match="patch_size=2"):
        VAEConfig.from_diffusers(dict(TINY, patch_size=2))
    with pytest.raises(ValueError, match=r"unknown VAE config field\(s\) \['frobnicate'\]"):
        VAEConfig.from_diffusers(dict(TINY, frobnicate=1))
    with pytest.raises(ValueError, match="AutoencoderKLQwenImage'"):
        VAEConfig.from_diffusers(dict(TINY, _class_name="AutoencoderKLQwenImage"))
    with pytest.raises(ValueError, match="latents_mean has 3 values but z_dim=4"):
        VAEConfig.from_diffusers(dict(TINY, latents_mean=[0.0] * 3))
    with pytest.raises(ValueError, match="attn_scales"):
        VAEConfig.from_diffusers(dict(TINY, is_residual=False, attn_scales=[0.5]))


def test_cli_convert_round_trip_gives_identical_outputs(src, vae, images, tmp_path):
    dst = str(tmp_path / "orbax")
    assert cli_main(["convert", "--component", "vae", src, dst]) == 0
    converted = load_vae(dst)
    with open(os.path.join(src, "config.json")) as f:
        assert {k: v for k, v in converted.config.items()} == json.load(f)
    latents = vae.encode(images)
    np.testing.assert_array_equal(converted.encode(images), latents)
    np.testing.assert_array_equal(converted.decode(latents), vae.decode(latents))


def test_latent_normalisation_round_trip(vae, images):
    raw = np.asarray(vae.encode(images))
    normalized = np.asarray(vae.encode(images, normalize=True))
    mean, std = np.array(TINY["latents_mean"]), np.array(TINY["latents_std"])  # the config's own statistics
    np.testing.assert_allclose(normalized, (raw - mean) / std, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(vae.decode(normalized, normalized=True), vae.decode(raw), rtol=0, atol=1e-5)
    np.testing.assert_allclose(vae.denormalize_latents(vae.normalize_latents(raw)), raw, rtol=0, atol=1e-5)


def test_posterior_sampling_uses_the_key(vae, images):
    mean, logvar = vae.module.apply({"params": vae.params}, images, method="encode")
    a = np.asarray(vae.encode(images, key=jax.random.key(1)))
    b = np.asarray(vae.encode(images, key=jax.random.key(1)))
    c = np.asarray(vae.encode(images, key=jax.random.key(2)))
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    eps = (a - np.asarray(mean)) / np.exp(0.5 * np.asarray(logvar))  # standard normal draws
    assert abs(eps.mean()) < 0.2 and 0.8 < eps.std() < 1.2


def test_sharded_load_matches_unsharded(src, vae, images):
    mesh = make_mesh(data=4, tensor=2)
    shardings = param_shardings(vae.vae_config, mesh)
    sharded = load_vae(src, shardings=shardings)
    kernel = sharded.params["decoder"]["conv_in"]["kernel"]
    assert kernel.sharding == shardings["decoder"]["conv_in"]["kernel"]
    np.testing.assert_allclose(sharded.encode(images), vae.encode(images), rtol=0, atol=1e-5)


def test_init_vae_matches_checkpoint_structure(vae, images):
    fresh = init_vae(TINY, jax.random.key(0))
    assert jax.tree.map(lambda a: a.shape, fresh.params) == jax.tree.map(lambda a: a.shape, vae.params)
    recon, mean, _ = jax.eval_shape(lambda p, x: fresh.module.apply({"params": p}, x), fresh.params, images)
    assert recon.shape == images.shape and mean.shape == (2, 4, 6, 4)


def test_bf16_load_runs_and_stays_close(src, vae, images):
    half = load_vae(src, dtype=jnp.bfloat16)
    assert half.params["encoder"]["conv_in"]["kernel"].dtype == jnp.bfloat16
    ref = np.asarray(vae.encode(images))
    err = np.abs(np.asarray(half.encode(images), np.float32) - ref).max() / np.abs(ref).max()
    assert err < 5e-2


def test_pipeline_restores_an_orbax_vae_onto_the_mesh(vae, images, tmp_path):
    """`QwenImagePipeline.from_pretrained(..., mesh=...)` places an Orbax VAE by the logical rules, exactly as it
    places a diffusers-format one (it used to compute VAE shardings for the diffusers format only, so an Orbax VAE
    was restored with no target shardings)."""
    from qwenimage_jax.checkpoints import export
    from qwenimage_jax.checkpoints.pipeline_dir import write_pipeline_dir
    from qwenimage_jax.models.dit import init_transformer
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    orbax_vae = export("vae", vae.params, vae.config, str(tmp_path / "vae_orbax"), format="orbax")
    dit = init_transformer(dict(patch_size=1, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=16,
                                num_attention_heads=2, context_in_dim=32, mlp_ratio=3, axes_dims_rope=(4, 6, 6)),
                           jax.random.key(0))
    pipe_dir = write_pipeline_dir(str(tmp_path / "pipe"), dit.params, dit.dit_config,
                                  components={"vae": orbax_vae})
    mesh = make_mesh(data=4, tensor=2)
    pipe = QwenImagePipeline.from_pretrained(pipe_dir, mesh=mesh, load_text_encoder=False)
    want = param_shardings(vae.vae_config, mesh)
    got = jax.tree.map(lambda a: a.sharding, pipe.vae.params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
        assert a == b, f"{jax.tree_util.keystr(path)}: {a} != {b}"
    # conv_out is split over `tensor`: the kernels really are spread over the mesh, not on one device
    assert len(pipe.vae.params["decoder"]["conv_in"]["kernel"].sharding.device_set) == 8
    np.testing.assert_allclose(pipe.vae.encode(images), vae.encode(images), rtol=0, atol=1e-5)
