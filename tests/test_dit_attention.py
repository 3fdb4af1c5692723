"""Attention backends of the DiT against the reference einsum ("xla") on CPU, and their platform checks.

"dot_product_attention" (jax.nn, XLA) and "splash" (Pallas, in interpret mode on CPU) must give the einsum's answer
for the block-causal mask with key padding, alone and inside the whole DiT (also with the splash kernel in
shard_map under a data x tensor mesh). "cudnn" and non-interpreted "splash" must refuse CPU with a clear message.
Also the runtime options of the module: remat leaves gradients unchanged, bf16 compute stays close to fp32.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenimage_jax.models.attention import attention, block_causal_mask
from qwenimage_jax.models.dit import DiT, DiTConfig, init_transformer, joint_layout, layout_key
from qwenimage_jax.parallel.mesh import make_mesh
from tests.conftest import max_rel_err

TINY = DiTConfig(in_channels=8, out_channels=8, num_layers=2, attention_head_dim=8, num_attention_heads=4,
                 context_in_dim=16, mlp_ratio=3, axes_dims_rope=(2, 2, 4))
# text 3 | condition image 2x2 (1 slot) | text 2 | target 2x4 (2 slots)
SHAPES = ((1, 2, 2), (1, 2, 4))
IMG_MASK = (False,) * 3 + (True,) + (False,) * 2 + (True,) * 2


def _qkv(batch, q_len, kv_len, heads=2, head_dim=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, q_len, heads, head_dim))
    k = jax.random.normal(keys[1], (batch, kv_len, heads, head_dim))
    v = jax.random.normal(keys[2], (batch, kv_len, heads, head_dim))
    return q, k, v


@pytest.mark.parametrize("backend", ["dot_product_attention", "splash"])
def test_backend_matches_einsum_on_block_causal_mask_with_padding(backend):
    image_ids = np.array([-1] * 5 + [0] * 9 + [-1] * 3 + [1] * 12 + [2] * 15)   # 44 tokens, not a block multiple
    mask = block_causal_mask(image_ids)
    q, k, v = _qkv(2, 44, 44)
    key_valid = jnp.ones((2, 44), bool).at[1, 2:4].set(False)
    ref = attention(q, k, v, mask=mask, key_valid=key_valid, backend="xla")
    out = attention(q, k, v, mask=mask, key_valid=key_valid, backend=backend, splash_interpret=True)
    assert max_rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("backend", ["dot_product_attention", "splash"])
def test_backend_matches_einsum_for_target_queries_over_all_keys(backend):
    q, k, v = _qkv(2, 24, 37, seed=1)              # target queries over prefix + target keys, no static mask
    key_valid = jnp.ones((2, 37), bool).at[0, 5].set(False)
    ref = attention(q, k, v, key_valid=key_valid, backend="xla")
    out = attention(q, k, v, key_valid=key_valid, backend=backend, splash_interpret=True)
    assert max_rel_err(out, ref) <= 1e-5


def test_einsum_matches_explicit_softmax():
    q, k, v = _qkv(1, 6, 6, heads=1, head_dim=4, seed=2)
    mask = block_causal_mask(np.array([-1, -1, 0, 0, 0, -1]))
    logits = np.einsum("qd,kd->qk", np.asarray(q[0, :, 0]), np.asarray(k[0, :, 0])) / 2.0
    logits = np.where(mask, logits, -np.inf)
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)
    expected = weights @ np.asarray(v[0, :, 0])
    out = attention(q, k, v, mask=mask, backend="xla")
    np.testing.assert_allclose(np.asarray(out[0, :, 0]), expected, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def tiny_model():
    model = init_transformer(TINY, jax.random.key(0))
    keys = jax.random.split(jax.random.key(1), 3)
    latents = jax.random.normal(keys[0], (2, 12, 8))
    text = jax.random.normal(keys[1], (2, 6, 16))
    text_mask = jnp.ones((2, 6), bool).at[1, 5].set(False)
    inputs = (latents, text, jnp.array([0.3, 0.7]), SHAPES, IMG_MASK, text_mask)
    ref = jax.jit(lambda p, *a: DiT(TINY).apply({"params": p}, *a, *inputs[3:5], inputs[5]))(
        model.params, *inputs[:3])
    return model, inputs, ref


@pytest.mark.parametrize("backend", ["dot_product_attention", "splash"])
def test_dit_forward_with_backend_matches_einsum(tiny_model, backend):
    model, inputs, ref = tiny_model
    cfg = dataclasses.replace(TINY, attention=backend, splash_interpret=True)
    out = jax.jit(lambda p, *a: DiT(cfg).apply({"params": p}, *a, *inputs[3:5], inputs[5]))(
        model.params, *inputs[:3])
    assert max_rel_err(out, ref) <= 1e-5


def test_splash_in_shard_map_under_mesh_matches_einsum(tiny_model):
    model, inputs, ref = tiny_model
    cfg = dataclasses.replace(TINY, attention="splash", splash_interpret=True)
    mesh = make_mesh(data=2, fsdp=1, tensor=2, devices=jax.devices()[:4])
    with jax.set_mesh(mesh):
        out = jax.jit(lambda p, *a: DiT(cfg).apply({"params": p}, *a, *inputs[3:5], inputs[5]))(
            model.params, *inputs[:3])
    assert max_rel_err(out, ref) <= 1e-5


def test_gpu_and_tpu_backends_refuse_cpu_with_a_clear_message():
    q, k, v = _qkv(1, 8, 8)
    with pytest.raises(RuntimeError, match="needs an NVIDIA GPU"):
        attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), backend="cudnn")
    with pytest.raises(RuntimeError, match="TPU Pallas kernel"):
        attention(q, k, v, backend="splash")
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="flash")
    with pytest.raises(ValueError, match="not a backend"):
        DiTConfig(attention="flash")


def test_layout_and_mask_are_built_once_per_shape():
    first = joint_layout(*layout_key(SHAPES, IMG_MASK))
    again = joint_layout(*layout_key([list(SHAPES)] * 2, np.array([IMG_MASK] * 2)))
    assert first is again
    assert first.mask is again.mask
    assert first.mask.shape == (first.seq_len, first.seq_len) == (17, 17)


def test_remat_keeps_gradients_and_bf16_stays_close_to_fp32(tiny_model):
    model, inputs, _ = tiny_model
    latents, text = inputs[:2]
    timestep = jnp.array([0.5, 0.25])        # exact in bf16 (the reference rounds t to the compute dtype first)

    def loss(params, cfg):
        return jnp.mean(DiT(cfg).apply({"params": params}, latents, text, timestep, SHAPES, IMG_MASK) ** 2)

    plain = jax.jit(jax.grad(lambda p: loss(p, TINY)))(model.params)
    remat = jax.jit(jax.grad(lambda p: loss(p, dataclasses.replace(TINY, remat="full"))))(model.params)
    for a, b in zip(jax.tree.leaves(remat), jax.tree.leaves(plain)):
        assert max_rel_err(a, b) <= 1e-5

    fp32 = jax.jit(lambda p: DiT(TINY).apply({"params": p}, latents, text, timestep, SHAPES, IMG_MASK))(model.params)
    bf16_cfg = dataclasses.replace(TINY, dtype=jnp.bfloat16)
    bf16 = jax.jit(lambda p: DiT(bf16_cfg).apply({"params": p}, latents, text, timestep, SHAPES, IMG_MASK))(
        model.params)
    assert bf16.dtype == jnp.bfloat16
    assert max_rel_err(bf16.astype(jnp.float32), fp32) <= 3e-2
