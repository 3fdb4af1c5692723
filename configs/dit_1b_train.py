"""A ~1B Qwen-Image-2-style DiT (18 layers, width 2048, 16 heads) for single-host GPU or small TPU slices.

    qwenimage-jax train-dit --config configs/dit_1b_train.py --workdir /tmp/dit_1b --config.data.path=LATENTS

Same recipe as configs/dit_7b_train.py at a shape that fits one 80-141 GB GPU with fsdp over its devices.
Parameter count: 18 x 13 x 2048^2 + text/modulation projections = 1.03B.
"""
import ml_collections

import importlib.util
import os


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("dit_7b_train", os.path.join(os.path.dirname(__file__),
                                                                               "dit_7b_train.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.model.update(num_layers=18, num_attention_heads=16)
    c.attention = "cudnn"
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding_rules = "fsdp"        # parallel/rules.py presets: fsdp | replicated | tensor
    c.batch_size = 32
    c.peak_flops_per_device = 989e12
    assert isinstance(c, ml_collections.ConfigDict)
    return c
