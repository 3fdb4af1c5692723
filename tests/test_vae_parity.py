"""Parity of the Flax Qwen-Image-2 VAE with diffusers `AutoencoderKLQwenImage21` on tiny seeded random models.

Each torch model is saved with `save_pretrained` and loaded through `load_vae`; encode (posterior mean, logvar),
the unclamped decoder output and the clamped decode are compared in fp32. Unit tests pin the shortcut reshapes
(AvgDown3D / DupUp3D) and the Wan RMS norm against the torch modules.
"""
import functools
import json
import os

import numpy as np
import pytest

try:
    import torch
    from diffusers import AutoencoderKLQwenImage21
    from diffusers.models.autoencoders import autoencoder_kl_qwenimage21 as ref
except ImportError as e:  # pragma: no cover
    raise ImportError(f"VAE parity tests need torch + diffusers (pip install -e .[test]): {e}") from e

import jax
import jax.numpy as jnp

from qwenimage_jax.checkpoints import load_vae
from qwenimage_jax.models.vae_blocks import RMSNorm, avg_down_3d, dup_up_3d
from tests.conftest import max_rel_err

TOL = 1e-4

# name -> (diffusers config, attention-free?, input sizes)
CONFIGS = {
    # released layout (RGBA, asymmetric widths 8/12, f16, temporal stages 1-3), widths kept tiny
    "rgba_asym_f16": (dict(base_dim=8, decoder_base_dim=12, z_dim=8, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=1,
                           attn_scales=[], temperal_downsample=[False, True, True, True], is_residual=True,
                           in_channels=4, out_channels=4), False, [(48, 80), (64, 96)]),
    # RGB, symmetric, temporal factor on the first stage, two resnets per stage, f4
    "rgb_sym_f4": (dict(base_dim=16, decoder_base_dim=None, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=2,
                        attn_scales=[], temperal_downsample=[True, False], is_residual=True, in_channels=3,
                        out_channels=3, scale_factor_spatial=4), False, [(64, 96)]),
    # plain (non-residual) layout: flat encoder list, halving upsamplers
    "plain_f4": (dict(base_dim=8, decoder_base_dim=16, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                      attn_scales=[], temperal_downsample=[False, True], is_residual=False, in_channels=3,
                      out_channels=3, scale_factor_spatial=4), False, [(48, 80)]),
    # attention-free mid blocks (VAE-2.0 variant): torch reference with the mid attentions replaced by identity
    "rgba_noattn_f16": (dict(base_dim=8, decoder_base_dim=12, z_dim=8, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=1,
                             attn_scales=[], temperal_downsample=[False, True, True, True], is_residual=True,
                             in_channels=4, out_channels=4), True, [(48, 80)]),
}

def _build_torch_vae(config: dict, seed: int, attention_free: bool):
    torch.manual_seed(seed)
    z_dim = config["z_dim"]
    config = dict(config, latents_mean=torch.randn(z_dim).tolist(), latents_std=(torch.rand(z_dim) + 0.5).tolist())
    model = AutoencoderKLQwenImage21(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            # non-trivial norms and biases; conv weights keep their torch init scale
            p.add_(0.1 * torch.randn_like(p) if ("gamma" in name or name.endswith("bias")) else 0.02 * torch.randn_like(p))
    if attention_free:
        model.encoder.mid_block.attentions[0] = torch.nn.Identity()
        model.decoder.mid_block.attentions[0] = torch.nn.Identity()
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    name = request.param
    config, attention_free, sizes = CONFIGS[name]
    model = _build_torch_vae(config, seed=sorted(CONFIGS).index(name), attention_free=attention_free)
    path = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(path, safe_serialization=True)
    if attention_free:
        cfg_file = os.path.join(path, "config.json")
        with open(cfg_file) as f:
            raw = json.load(f)
        raw["mid_attention"] = False
        with open(cfg_file, "w") as f:
            json.dump(raw, f)
    return name, model, load_vae(path), sizes


def _nchw_to_nhwc(t) -> np.ndarray:
    # (B, C, 1, H, W) torch -> (B, H, W, C) numpy
    return t[:, :, 0].detach().permute(0, 2, 3, 1).numpy()


@functools.partial(jax.jit, static_argnums=0)
def _flax_outputs(module, params, images, latents):
    """One compiled call: posterior (mean, logvar), unclamped decoder output and clamped decode."""
    variables = {"params": params}
    mean, logvar = module.apply(variables, images, method="encode")
    raw = module.apply(variables, latents, method=lambda m, z: m.decoder(m.post_quant_conv(z)))
    image = module.apply(variables, latents, method="decode")
    return mean, logvar, raw, image


def test_encode_decode_match_diffusers(pair):
    name, model, vae, sizes = pair
    cfg = vae.vae_config
    for height, width in sizes:
        gen = torch.Generator().manual_seed(height * 1000 + width)
        images = torch.rand(2, cfg.in_channels, 1, height, width, generator=gen) * 2 - 1
        with torch.no_grad():
            posterior = model.encode(images).latent_dist
            ref_mean, ref_logvar = posterior.mean, posterior.logvar
            ref_raw = model.decoder(model.post_quant_conv(ref_mean), first_chunk=True)
            ref_image = model.decode(ref_mean).sample
        images_nhwc = _nchw_to_nhwc(images)
        latents = _nchw_to_nhwc(ref_mean)  # decode the reference's latents to isolate decoder error
        mean, logvar, raw, image = _flax_outputs(vae.module, vae.params, images_nhwc, latents)
        errs = {
            "mean": max_rel_err(mean, _nchw_to_nhwc(ref_mean)),
            "logvar": max_rel_err(logvar, _nchw_to_nhwc(ref_logvar)),
            "decoder_raw": max_rel_err(raw, _nchw_to_nhwc(ref_raw)),
            "decode": max_rel_err(image, _nchw_to_nhwc(ref_image)),
        }
        assert mean.shape == (2, height // vae.spatial_compression, width // vae.spatial_compression, cfg.z_dim)
        assert image.shape == (2, height, width, cfg.out_channels)
        print(f"\n{name} {height}x{width}: " + ", ".join(f"{k} {v:.2e}" for k, v in errs.items()))
        assert max(errs.values()) <= TOL, errs


def test_decode_clamps_to_unit_range_like_diffusers(pair):
    _, model, vae, sizes = pair
    height, width = sizes[0]
    r = vae.spatial_compression
    # large latents saturate the output; same shapes as above, so no new compile
    latents = 50.0 * np.random.default_rng(0).standard_normal((2, height // r, width // r, vae.vae_config.z_dim))
    latents = latents.astype(np.float32)
    images = np.zeros((2, height, width, vae.vae_config.in_channels), np.float32)
    image = np.asarray(_flax_outputs(vae.module, vae.params, images, latents)[3])
    with torch.no_grad():
        ref_image = model.decode(torch.from_numpy(latents).permute(0, 3, 1, 2)[:, :, None]).sample
    assert image.min() >= -1.0 and image.max() <= 1.0
    assert np.mean(np.abs(image) == 1.0) > 0.01  # the clamp is active on these latents
    assert max_rel_err(image, _nchw_to_nhwc(ref_image)) <= TOL


# ------------------------------------------------------------------------------------------------- unit parity
def _torch_5d_to_jax(t) -> np.ndarray:
    # (B, C, T, H, W) -> (B, T, H, W, C)
    return t.detach().permute(0, 2, 3, 4, 1).numpy()


FACTORS = [(1, 1), (1, 2), (2, 1), (2, 2)]  # (factor_t, factor_s)
# (c_in, c_out) pairs valid for each op: AvgDown needs c_in*f % c_out == 0, DupUp needs c_out*f % c_in == 0
AVG_CASES = [(ft, fs, ci, co) for ft, fs in FACTORS for ci, co in [(4, 8), (8, 8), (8, 4), (2, 8)]
             if ci * ft * fs * fs % co == 0]
DUP_CASES = [(ft, fs, ci, co) for ft, fs in FACTORS for ci, co in [(8, 8), (8, 4), (4, 8), (8, 2)]
             if co * ft * fs * fs % ci == 0]


@pytest.mark.parametrize("factor_t,factor_s,c_in,c_out", AVG_CASES)
@pytest.mark.parametrize("frames", [1, 2, 3])
def test_avg_down_3d_matches_torch(factor_t, factor_s, c_in, c_out, frames):
    x = torch.randn(2, c_in, frames, 8, 12, generator=torch.Generator().manual_seed(frames))
    want = ref.QwenImage21AvgDown3D(c_in, c_out, factor_t, factor_s)(x)
    got = avg_down_3d(jnp.asarray(_torch_5d_to_jax(x)), c_out, factor_t, factor_s)
    assert got.shape == _torch_5d_to_jax(want).shape
    np.testing.assert_allclose(got, _torch_5d_to_jax(want), rtol=0, atol=1e-6)


def test_avg_down_single_image_temporal_stage_has_zero_even_channels():
    # T=1, f_t=2, C_out = 2 C_in: the prepended zero frame fills the first half of every group of 4
    x = torch.randn(1, 4, 1, 8, 8)
    want = ref.QwenImage21AvgDown3D(4, 8, 2, 2)(x)
    got = np.asarray(avg_down_3d(jnp.asarray(_torch_5d_to_jax(x)), 8, 2, 2))
    np.testing.assert_allclose(got, _torch_5d_to_jax(want), rtol=0, atol=1e-6)
    assert np.all(got[..., 0::2] == 0.0)


@pytest.mark.parametrize("factor_t,factor_s,c_in,c_out", DUP_CASES)
@pytest.mark.parametrize("frames", [1, 2])
@pytest.mark.parametrize("first_chunk", [True, False])
def test_dup_up_3d_matches_torch(factor_t, factor_s, c_in, c_out, frames, first_chunk):
    x = torch.randn(2, c_in, frames, 3, 5, generator=torch.Generator().manual_seed(7))
    want = ref.QwenImage21DupUp3D(c_in, c_out, factor_t, factor_s)(x, first_chunk=first_chunk)
    got = dup_up_3d(jnp.asarray(_torch_5d_to_jax(x)), c_out, factor_t, factor_s, first_chunk)
    assert got.shape == _torch_5d_to_jax(want).shape
    np.testing.assert_allclose(got, _torch_5d_to_jax(want), rtol=0, atol=1e-6)


def test_rms_norm_matches_torch():
    torch.manual_seed(0)
    norm = ref.QwenImage21RMS_norm(12, images=False)
    with torch.no_grad():
        norm.gamma.copy_(torch.randn(12, 1, 1, 1))
    x = torch.randn(2, 12, 1, 5, 7)
    x[0, :, 0, 2, 3] = 0.0  # an all-zero pixel exercises the 1e-12 clamp
    want = _torch_5d_to_jax(norm(x))[:, 0]
    gamma = norm.gamma.detach().reshape(-1).numpy()
    got = RMSNorm().apply({"params": {"gamma": gamma}}, _torch_5d_to_jax(x)[:, 0])
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
    assert np.all(np.asarray(got)[0, 2, 3] == 0.0)
