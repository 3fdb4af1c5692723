"""The released Qwen-Image-2 VAE structure (diffusers `AutoencoderKLQwenImage21` defaults): f16c64, RGBA,
encoder width 96, decoder width 144, dim_mult [1, 2, 4, 8, 8], mid-block attention; 78.7M + 259.0M params.

    qwenimage-jax train-vae --config configs/vae_f16c64.py --workdir /tmp/vae_f16c64

`model` (and its alias `vae`, the name the VAE trainer reads) holds diffusers config.json field names, so
`VAEConfig.from_diffusers(dict(config.model))` builds the network. The latent statistics are the released
ones; a model trained from scratch should re-estimate them.
"""
import importlib.util

import ml_collections

from qwenimage_jax.models.vae import DEFAULT_LATENTS_MEAN, DEFAULT_LATENTS_STD


def model_fields() -> dict:
    return dict(base_dim=96, decoder_base_dim=144, z_dim=64, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=2,
                attn_scales=[], temperal_downsample=[False, True, True, True], dropout=0.0, is_residual=True,
                in_channels=4, out_channels=4, patch_size=None, scale_factor_temporal=8, scale_factor_spatial=16,
                latents_mean=list(DEFAULT_LATENTS_MEAN), latents_std=list(DEFAULT_LATENTS_STD))


def get_config(arg=None):
    if importlib.util.find_spec("qwenimage_jax.training.vae") is not None:
        from qwenimage_jax.training.vae import default_config  # optimizer, losses, data defaults
        config = default_config()
    else:
        config = ml_collections.ConfigDict()
    config.model = model_fields()
    config.vae = model_fields()
    return config
