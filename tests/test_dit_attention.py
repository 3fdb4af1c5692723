"""Attention backends of the DiT against the reference einsum ("xla") on CPU, and their platform checks.

"dot_product_attention" (jax.nn, XLA) and "splash" (Pallas, in interpret mode on CPU) must give the einsum's answer
for the block-causal mask with key padding, alone and inside the whole DiT (also with the splash kernel in
shard_map under a data x tensor mesh). "cudnn" and non-interpreted "splash" must refuse CPU with a clear message.
The cuDNN path (`segmented_attention`: static slices with only `is_causal` / `key_value_seq_lengths`, no mask
tensor) runs here through XLA (`implementation=None`, backend "cudnn_emulated") and must equal the einsum, padded
text rows included, for the prefix pass, the target/cached pass and gradients.
Also the runtime options of the module: remat leaves gradients unchanged, bf16 compute stays close to fp32.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenimage_jax.models.attention import attention, block_causal_mask, segmented_attention
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


# text 5 | condition 9 | target 12, and an edit prompt: text 4 | condition 6 | text 5 | condition 8 | target 12
# (text after a condition image, as in "Picture 1: <image> instruction"); padding is the tail of the last text run.
SEGMENT_LAYOUTS = [np.array([-1] * 5 + [0] * 9 + [1] * 12),
                   np.array([-1] * 4 + [0] * 6 + [-1] * 5 + [1] * 8 + [2] * 12)]


def _padded_text(image_ids, valid_in_last_run, batch=3):
    """(batch, S) key_valid: the last text run keeps `valid_in_last_run[b]` tokens, the rest is padding."""
    end = np.flatnonzero(image_ids < 0)[-1] + 1
    start = end - 1
    while start > 0 and image_ids[start - 1] < 0:
        start -= 1
    valid = np.ones((batch, image_ids.shape[0]), bool)
    for row, n in enumerate(valid_in_last_run):
        valid[row, start + n:end] = False
    return jnp.asarray(valid)


@pytest.mark.parametrize("layout", range(len(SEGMENT_LAYOUTS)))
def test_segmented_attention_matches_einsum_on_the_prefix_pass(layout):
    ids = SEGMENT_LAYOUTS[layout]
    q, k, v = _qkv(3, ids.size, ids.size, seed=3)
    key_valid = _padded_text(ids, (5, 2, 1))       # rows 1, 2 padded, every padded row still sees a valid key
    ref = attention(q, k, v, mask=block_causal_mask(ids), key_valid=key_valid, backend="xla")
    out = segmented_attention(q, k, v, ids, key_valid, implementation=None)
    assert max_rel_err(out, ref) <= 1e-5          # padded text rows included: they average the valid keys
    out = attention(q, k, v, mask=block_causal_mask(ids), key_valid=key_valid, image_ids=ids,
                    backend="cudnn_emulated")
    assert max_rel_err(out, ref) <= 1e-5
    # the DiT's prefix pass: prefix queries over prefix keys only (no padding info beyond the prefix)
    prefix = ids.size - 12
    ref = attention(q[:, :prefix], k[:, :prefix], v[:, :prefix], mask=block_causal_mask(ids[:prefix]),
                    key_valid=key_valid[:, :prefix], backend="xla")
    out = segmented_attention(q[:, :prefix], k[:, :prefix], v[:, :prefix], ids[:prefix], key_valid[:, :prefix])
    assert max_rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("layout", range(len(SEGMENT_LAYOUTS)))
def test_segmented_attention_matches_einsum_for_target_queries_over_cached_prefix(layout):
    ids = SEGMENT_LAYOUTS[layout]
    q, k, v = _qkv(3, 12, ids.size, seed=4)        # target queries; keys = cached prefix + target
    key_valid = _padded_text(ids, (3, 5, 1))
    ref = attention(q, k, v, key_valid=key_valid, backend="xla")
    out = attention(q, k, v, key_valid=key_valid, image_ids=ids, backend="cudnn_emulated")
    assert max_rel_err(out, ref) <= 1e-5
    no_padding = segmented_attention(q, k, v, ids, None)
    assert max_rel_err(no_padding, attention(q, k, v, backend="xla")) <= 1e-5


def test_segmented_attention_gradients_match_einsum_with_padded_text():
    ids = SEGMENT_LAYOUTS[1]
    q, k, v = _qkv(3, ids.size, ids.size, seed=5)
    key_valid = _padded_text(ids, (4, 1, 2))
    weights = jax.random.normal(jax.random.key(6), q.shape)

    def loss(fn):
        return jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * weights), argnums=(0, 1, 2)))(q, k, v)

    ref = loss(lambda q, k, v: attention(q, k, v, mask=block_causal_mask(ids), key_valid=key_valid, backend="xla"))
    out = loss(lambda q, k, v: segmented_attention(q, k, v, ids, key_valid))
    for a, b in zip(out, ref):
        assert max_rel_err(a, b) <= 1e-5


def test_segmented_attention_refuses_key_padding_it_cannot_express():
    ids = SEGMENT_LAYOUTS[1]
    q, k, v = _qkv(2, ids.size, ids.size, seed=7)
    good = _padded_text(ids, (5, 3), batch=2)
    for bad in (good.at[1, 0].set(False),           # padding in the first text run
                good.at[1, 16].set(False),          # an image token
                good.at[0, 12].set(False)):         # a hole inside the last text run, not its tail
        with pytest.raises(ValueError, match="only at the end of the last text run"):
            segmented_attention(q, k, v, ids, bad)
    # under jit the values are unknown at trace time: the offending row comes out NaN, the others exact
    out = jax.jit(lambda kv: segmented_attention(q, k, v, ids, kv))(good.at[1, 16].set(False))
    assert np.isnan(np.asarray(out[1])).all() and not np.isnan(np.asarray(out[0])).any()
    with pytest.raises(ValueError, match="block_causal_mask"):
        attention(q, k, v, mask=np.ones((ids.size, ids.size), bool), image_ids=ids, backend="cudnn_emulated")


def test_dit_extract_and_cached_with_cudnn_path_match_einsum(tiny_model):
    model, inputs, _ = tiny_model
    latents, text, timestep, shapes, img_mask, text_mask = inputs
    emulated = dataclasses.replace(TINY, attention="cudnn_emulated")

    def run(cfg):
        def f(params):
            out, cache = DiT(cfg).apply({"params": params}, latents, text, timestep, shapes, img_mask, text_mask,
                                        kv_cache_mode="extract")
            cached = DiT(cfg).apply({"params": params}, latents[:, 4:], None, timestep, shapes, img_mask,
                                    kv_cache_mode="cached", kv_cache=cache)
            return out, cached
        return jax.jit(f)(model.params)

    for a, b in zip(run(emulated), run(TINY)):
        assert max_rel_err(a, b) <= 1e-5


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


@pytest.mark.parametrize("backend", ["dot_product_attention", "splash", "cudnn_emulated"])
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


def test_cudnn_segments_lower_for_cuda_with_gradients(monkeypatch):
    """The real cuDNN calls (shapes, seq lengths, even-length rule of the backward) lower for CUDA from a CPU host;
    jax's cuDNN version and compute-capability probes are stubbed since there is no GPU here."""
    from jax._src.cudnn import fused_attention_stablehlo as fused

    for name, value in (("check_cudnn_version", lambda: 91000), ("check_compute_capability", lambda c: True),
                        ("is_cuda_compute_capability_equal", lambda c: False)):
        assert hasattr(fused, name), f"jax internals changed: no {name}; update this test's stubs"
        monkeypatch.setattr(fused, name, value)
    ids = np.array([-1] * 5 + [0] * 9 + [-1] * 3 + [1] * 15)      # odd lengths everywhere
    q = jnp.zeros((2, ids.size, 2, 64), jnp.bfloat16)
    key_valid = jnp.ones((2, ids.size), bool)

    def loss(q, k, v):
        full = segmented_attention(q, k, v, ids, key_valid, implementation="cudnn")
        cached = segmented_attention(q[:, -15:], k, v, ids, key_valid, implementation="cudnn")
        return jnp.sum(full.astype(jnp.float32)) + jnp.sum(cached.astype(jnp.float32))

    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, q, q).lower(lowering_platforms=("cuda",)).as_text()
    assert "cudnn" in text


def test_auto_picks_the_platforms_flash_backend_and_dtype_and_a_backend_off_its_platform_is_refused_early(
        monkeypatch):
    """auto -> cuDNN on GPU, splash on TPU, einsum on CPU (bf16 on accelerators, fp32 on CPU); the pipeline
    resolves it when loading, and refuses cuDNN or splash on CPU before reading a weight."""
    import os

    from qwenimage_jax.evals import t2i
    from qwenimage_jax.models import attention as attn
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    assert [attn.platform_default(p) for p in ("gpu", "tpu", "cpu")] == ["cudnn", "splash", "xla"]
    assert [attn.platform_dtype(p) for p in ("gpu", "tpu", "cpu")] == [jnp.bfloat16, jnp.bfloat16, jnp.float32]
    model = os.path.join(os.path.dirname(t2i.__file__), "..", "assets", "tiny_world")
    pipe = QwenImagePipeline.from_pretrained(model, load_text_encoder=False)
    assert pipe.transformer.dit_config.attention == "xla" and pipe.dtype == jnp.float32  # this CPU
    for backend, platform in (("cudnn", "GPU"), ("splash", "TPU")):
        with pytest.raises(ValueError, match=f"runs only on {platform}.*use attention='auto'"):
            QwenImagePipeline.from_pretrained(model, load_text_encoder=False, attention=backend)
    attn.check_platform("splash", "cpu", splash_interpret=True)  # the tests' emulation is allowed
    monkeypatch.setattr(attn.jax, "default_backend", lambda: "gpu")  # what a GPU host resolves "auto" to
    assert attn.platform_default() == "cudnn" and attn.platform_dtype() == jnp.bfloat16
    attn.check_platform("cudnn")
