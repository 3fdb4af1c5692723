"""Attention-free f16c64 (the VAE-2.0 report: "no significant performance degradation when removing attention
modules"; the whole 2.0 series is attention-free). Same recipe as vae_train_f16c64.py, mid attention off.

    qwenimage-jax train-vae --config configs/vae_train_f16c64_noattn.py --workdir gs://BUCKET/vae_f16c64_noattn \
        --config.losses.align.path=/data/dinov2-large
"""
import importlib.util
import os


def get_config(arg=None):
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "vae_train_f16c64.py")
    spec = importlib.util.spec_from_file_location("_vae_train_f16c64", path)
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(arg)
    c.vae.mid_attention = False
    return c
