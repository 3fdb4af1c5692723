"""Synthetic cached-latent datasets and a tiny trainer config shared by the DiT-training tests.

The data has learnable structure: each of 4 "captions" has its own text embedding and its own latent pattern,
so a working trainer drives the flow-matching loss down within a few dozen steps.
"""
import numpy as np

from qwenimage_jax.data import latent_records

CHANNELS, CONTEXT = 16, 32


def make_examples(n: int, seed: int = 0, edit: bool = False):
    rng = np.random.default_rng(seed)
    class_embeds = rng.normal(size=(4, 9, CONTEXT)).astype(np.float32)
    class_latents = rng.normal(size=(4, 4, 4, CHANNELS)).astype(np.float32)
    for i in range(n):
        c = i % 4
        length = 5 + (i % 5)
        example = {"latents": class_latents[c] + 0.05 * rng.normal(size=(4, 4, CHANNELS)),
                   "text_embeds": class_embeds[c, :length],
                   "image_pad_mask": np.zeros(length, bool), "caption": f"class {c}"}
        if edit:
            length = 9
            pad = np.zeros(length, bool)
            pad[3] = True                                   # one VLM slot = the 2x2 condition latent grid
            example.update(text_embeds=class_embeds[c, :length], image_pad_mask=pad,
                           cond_latents=class_latents[c, :2, :2])
        yield example


def write(tmp_dir, n=64, edit_n=0, seed=0):
    examples = list(make_examples(n, seed))
    if edit_n:
        examples += list(make_examples(edit_n, seed + 1, edit=True))
    null = np.zeros((2, CONTEXT), np.float32)
    latent_records.write_dataset(examples, str(tmp_dir), num_shards=2, null_text_embeds=null)
    return str(tmp_dir)


def tiny_config(data_path: str, **overrides):
    import importlib.util
    import os

    path = os.path.join(os.path.dirname(__file__), "..", "configs", "dit_train_tiny.py")
    spec = importlib.util.spec_from_file_location("dit_train_tiny", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.path = data_path
    config.data.max_text_tokens = 12
    config.log_every = 1
    config.progress = False
    config.checkpoint.every = 10
    config.optimizer.learning_rate = dict(name="warmup_constant", peak_value=1e-3, warmup_steps=5)
    return apply_overrides(config, overrides)


def apply_overrides(config, overrides: dict):
    """Sets dotted keys ("optimizer.learning_rate.peak_value") of a ConfigDict in place; returns it."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
