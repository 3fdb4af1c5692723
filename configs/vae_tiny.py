"""A tiny f16c16 VAE with the released layout (residual shortcuts, asymmetric widths 16/24, mid attention), RGB
like the bundled training photos; 0.7M params. On CPU a train step takes seconds after a one-off compile
(checked: 2 steps with `--config.total_steps=2`, then `load_vae(WORKDIR/vae_export)` reads the export).

    qwenimage-jax train-vae --config configs/vae_tiny.py --workdir /tmp/vae

`model` (and its alias `vae`, the name the VAE trainer reads) holds diffusers config.json field names:
`VAEConfig.from_diffusers(dict(config.model))`, or save it as config.json for `AutoencoderKLQwenImage21`.
Latent statistics are 0 / 1 (a from-scratch model has none yet).
"""
import importlib.util

import ml_collections


def model_fields() -> dict:
    z_dim = 16
    return dict(base_dim=16, decoder_base_dim=24, z_dim=z_dim, dim_mult=[1, 2, 2, 2, 2], num_res_blocks=1,
                attn_scales=[], temperal_downsample=[False, True, True, True], dropout=0.0, is_residual=True,
                in_channels=3, out_channels=3, patch_size=None, scale_factor_temporal=8, scale_factor_spatial=16,
                latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim)


def get_config(arg=None):
    if importlib.util.find_spec("qwenimage_jax.training.vae") is not None:
        from qwenimage_jax.training.vae import default_config  # optimizer, losses, data defaults
        config = default_config()
    else:
        config = ml_collections.ConfigDict()
    config.model = model_fields()
    config.vae = model_fields()
    config.batch_size = 4
    config.compute_dtype = "float32"  # bf16 is slower than fp32 on CPU
    if "data" in config:  # trainer fields: small crops, no pretrained perceptual / alignment networks
        config.total_steps = 50
        config.data.resolution = 64
        config.eval.resolution = 64
        config.losses.lpips = 0.0
        config.losses.align.aligner = "none"
    return config
