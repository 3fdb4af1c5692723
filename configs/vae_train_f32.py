"""f32c128 (REFERENCE.md §5.2: 6 stages, encoder 96 / decoder 144): one more down/up stage than f16, a 32x
spatial compression; at 256 px the latent grid is 8x8, so DINOv2 is fed 112 px (8x8 patches of 14).

    qwenimage-jax train-vae --config configs/vae_train_f32.py --workdir gs://BUCKET/vae_f32c128 \
        --config.losses.align.path=/data/dinov2-large
    # f32c192: add --config.vae.z_dim=192
"""
import importlib.util
import os


def get_config(arg=None):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vae_train_f16c64.py")
    spec = importlib.util.spec_from_file_location("_vae_train_f16c64", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(arg)
    c.vae.z_dim = 128
    c.vae.dim_mult = (1, 1, 2, 4, 8, 8)   # widths are not public; this matches the reported 77M / 250M
    c.vae.temperal_downsample = (False, True, True, True, True)   # images only: no effect on 2D shapes
    c.vae.mid_attention = False
    return c
