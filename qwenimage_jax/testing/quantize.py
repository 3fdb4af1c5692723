"""The seeded tiny DiT that tests/test_quantize.py and bench/quantize_quality.py measure quantization on: the
release's head width (128, so int4 takes its 128-wide groups) at 2 heads and 2 layers, every parameter (norm
scales too) moved off its init, and the PSNR both report."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.models.dit import DiTConfig, init_transformer

# the tests' seeded DiT; bench/quantize_quality.py widens its in/out channels to the shipped VAE's z_dim
DIT = DiTConfig(in_channels=16, out_channels=16, num_layers=2, attention_head_dim=128, num_attention_heads=2,
                context_in_dim=64, mlp_ratio=3, axes_dims_rope=(32, 48, 48))
SHAPES, MASK = ((1, 6, 8),), (False,) * 9 + (True,) * 12   # a 6x8 target after 9 text tokens


def psnr(reference, x) -> float:
    """dB of the mean squared error against the reference's peak magnitude."""
    reference, x = np.asarray(reference, np.float64), np.asarray(x, np.float64)
    return float(10 * np.log10(np.max(np.abs(reference)) ** 2 / np.mean((reference - x) ** 2)))


def seeded_dit(mesh=None, config: DiTConfig = DIT):
    """`models.dit.Transformer` with seeded random weights (init, then + 0.05 N(0, 1) on every leaf)."""
    transformer = init_transformer(config, jax.random.key(0), mesh=mesh)
    leaves, tree = jax.tree.flatten(transformer.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    transformer.params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape, x.dtype)
                                                   for x, k in zip(leaves, keys)])
    return transformer


def dit_inputs(config: DiTConfig = DIT):
    """(hidden (2, 48, C), text (2, 9, D), timestep (2,)) for SHAPES / MASK."""
    k = jax.random.split(jax.random.key(2), 2)
    return (jax.random.normal(k[0], (2, 48, config.in_channels)),
            jax.random.normal(k[1], (2, 9, config.context_in_dim)), jnp.array([0.9, 0.4]))
