"""Gradients through the splash attention backend (Pallas interpret mode on CPU) equal the einsum's.

Splash needs backward block sizes of its own; without them `jax.grad` raised "Need to specify backward blocks" on
every platform, so a training config with attention="splash" could not train. Checked for the kernel alone (block-
causal mask, key padding, lengths that are not block multiples) and for a DiT loss whose splash kernels run in
shard_map under a data x tensor mesh.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.models.attention import attention, block_causal_mask
from qwenimage_jax.models.dit import DiTConfig, init_transformer
from qwenimage_jax.parallel.mesh import make_mesh
from tests.conftest import max_rel_err

TINY = DiTConfig(in_channels=8, out_channels=8, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                 context_in_dim=16, mlp_ratio=3, axes_dims_rope=(2, 2, 4))


def test_grad_through_splash_matches_einsum():
    image_ids = np.array([-1] * 5 + [0] * 9 + [-1] * 3 + [1] * 12)     # 29 tokens: padded to one 128 block
    mask = block_causal_mask(image_ids)
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (2, 29, 2, 16)) for kk in keys[:3])
    w = jax.random.normal(keys[3], (2, 29, 2, 16))
    key_valid = jnp.ones((2, 29), bool).at[1, 2:4].set(False)

    def loss(backend):
        def f(q, k, v):
            out = attention(q, k, v, mask=mask, key_valid=key_valid, backend=backend, splash_interpret=True)
            return jnp.sum(out * w)
        return jax.jit(jax.grad(f, argnums=(0, 1, 2)))(q, k, v)

    ref, got = loss("xla"), loss("splash")
    for name, r, g in zip("qkv", ref, got):
        assert max_rel_err(g, r) <= 1e-5, name


def test_dit_param_grads_with_splash_under_mesh_match_einsum():
    mesh = make_mesh(data=2, tensor=2, devices=jax.devices()[:4])
    shapes, img_mask = ((1, 2, 4),), (False,) * 3 + (True,) * 2
    keys = jax.random.split(jax.random.key(1), 3)
    hidden = jax.random.normal(keys[0], (2, 8, 8))
    text = jax.random.normal(keys[1], (2, 3, 16))
    t = jnp.array([0.3, 0.8])
    params = init_transformer(TINY, keys[2]).params

    def grads(backend):
        module = init_transformer(dataclasses.replace(TINY, attention=backend, splash_interpret=True),
                                  keys[2]).module

        def loss(p):
            return jnp.mean(module.apply({"params": p}, hidden, text, t, shapes, img_mask) ** 2)
        with jax.set_mesh(mesh):
            return jax.jit(jax.grad(loss))(params)

    ref, got = grads("xla"), grads("splash")
    errs = jax.tree.leaves(jax.tree.map(max_rel_err, got, ref))
    assert max(errs) <= 1e-4
