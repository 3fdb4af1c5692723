"""Block-causal attention for the Qwen-Image-2 DiT: the static mask and interchangeable attention backends.

The mask (diffusers `build_qwenimage21_block_causal_mask`) is
    allowed(q, k) = ((q >= k) or (image_ids[q] == image_ids[k] >= 0)) and key_valid[b, k]
with `image_ids = -1` on text tokens: text is causal, each image block is bidirectional within itself and sees
everything before it, the target image (last block) sees the whole prefix. The first factor depends only on the
token layout, so it is a numpy array built once per layout at trace time; `key_valid` (text padding) is the only
traced part.

Backends (`attention(..., backend=...)`), all computing softmax(q k^T / sqrt(head_dim)) v with the mask:
    "xla"                    plain einsum + fp32 softmax; the reference for the others; runs everywhere.
    "dot_product_attention"  `jax.nn.dot_product_attention(implementation=None)` (XLA); runs everywhere.
    "cudnn"                  `jax.nn.dot_product_attention(implementation="cudnn")`; NVIDIA GPUs, bf16/fp16 only.
    "splash"                 Pallas splash attention (TPU); sequence padded to 128-token blocks, key padding as
                             segment ids; `interpret=True` runs it on CPU for testing.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("xla", "dot_product_attention", "cudnn", "splash")

_SPLASH_BLOCK = 128


def block_causal_mask(image_ids: np.ndarray) -> np.ndarray:
    """(seq,) int image ids (-1 = text) -> (seq, seq) bool, True where query row may attend key column."""
    ids = np.asarray(image_ids)
    index = np.arange(ids.shape[0])
    causal = index[:, None] >= index[None, :]
    same_block = (ids[:, None] == ids[None, :]) & (ids[:, None] >= 0)
    return causal | same_block


def _combined_mask(mask: np.ndarray | None, key_valid, batch: int, q_len: int, kv_len: int):
    """Static (q, kv) mask and traced (batch, kv) key validity -> (batch or 1, 1, q, kv) bool, or None."""
    out = None
    if mask is not None:
        if tuple(mask.shape) != (q_len, kv_len):
            raise ValueError(f"attention mask has shape {tuple(mask.shape)}, expected ({q_len}, {kv_len})")
        out = jnp.asarray(mask)[None, None]
    if key_valid is not None:
        kv = key_valid.astype(bool)[:, None, None, :]
        out = kv if out is None else jnp.logical_and(out, kv)
    return out


def _xla_attention(query, key, value, mask):
    scale = 1.0 / math.sqrt(query.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", weights, value)


def _check_gpu(backend: str):
    if jax.default_backend() != "gpu":
        raise RuntimeError(f"attention backend {backend!r} needs an NVIDIA GPU but JAX runs on "
                           f"{jax.default_backend()!r}; use backend 'xla' or 'dot_product_attention' here")


def _target_platform() -> str:
    """The platform the program is being built for: the ambient mesh's devices when a mesh is set (which may be
    compile-only TPU devices from `jax.experimental.topologies` on a CPU host), else JAX's default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    platform = getattr(device, "platform", None)
    return platform or jax.default_backend()


def _check_tpu_or_interpret(interpret: bool):
    platform = _target_platform()
    if not interpret and platform != "tpu":
        raise RuntimeError(f"attention backend 'splash' is a TPU Pallas kernel but the program targets "
                           f"{platform!r}; use 'xla'/'dot_product_attention' (or 'cudnn' on GPU), "
                           "or pass splash_interpret=True to emulate it (slow, for tests)")


def _splash_kernel(mask_bytes: bytes, q_len: int, kv_len: int, heads: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

    mask = np.frombuffer(mask_bytes, dtype=bool).reshape(q_len, kv_len)
    multi = splash_mask.MultiHeadMask([splash_mask.NumpyMask(mask) for _ in range(heads)])
    block = min(_SPLASH_BLOCK, q_len, kv_len)
    # Forward and backward tiles (the fused dK/dV/dQ kernel): without backward blocks the gradient raises
    # "Need to specify backward blocks", so a training config could not differentiate through splash.
    sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, use_fused_bwd_kernel=True)
    # Built per trace (not cached): its mask metadata arrays belong to the trace that creates them.
    return splash.make_splash_mha(multi, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_attention(query, key, value, mask: np.ndarray | None, key_valid, interpret: bool):
    """Pads to 128-token blocks, runs one splash kernel per sample (vmap) with key padding as segment ids."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    batch, q_len, heads, head_dim = query.shape
    kv_len = key.shape[1]
    q_pad = -q_len % _SPLASH_BLOCK
    kv_pad = -kv_len % _SPLASH_BLOCK
    full = np.ones((q_len, kv_len), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    padded = np.zeros((q_len + q_pad, kv_len + kv_pad), dtype=bool)
    padded[:q_len, :kv_len] = full
    padded[q_len:, 0] = True  # padding query rows attend one key so no softmax row is empty; they are dropped
    kernel = _splash_kernel(padded.tobytes(), q_len + q_pad, kv_len + kv_pad, heads, interpret)

    scale = 1.0 / math.sqrt(head_dim)
    q = jnp.pad(query * jnp.asarray(scale, query.dtype), ((0, 0), (0, q_pad), (0, 0), (0, 0)))
    k = jnp.pad(key, ((0, 0), (0, kv_pad), (0, 0), (0, 0)))
    v = jnp.pad(value, ((0, 0), (0, kv_pad), (0, 0), (0, 0)))
    if key_valid is None:
        key_valid = jnp.ones((batch, kv_len), dtype=bool)
    kv_segments = jnp.pad(key_valid.astype(jnp.int32), ((0, 0), (0, kv_pad)))
    q_segments = jnp.ones((batch, q_len + q_pad), dtype=jnp.int32)

    def one(q1, k1, v1, qs, ks):  # (heads, len, head_dim) each
        return kernel(q1, k1, v1, segment_ids=splash.SegmentIds(q=qs, kv=ks))

    out = jax.vmap(one)(q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3),
                        q_segments, kv_segments)
    return out.transpose(0, 2, 1, 3)[:, :q_len].astype(query.dtype)


def _splash_sharded(query, key, value, mask, key_valid, interpret: bool):
    """Splash is a per-device kernel: under a mesh, run it in shard_map with batch over (data, fsdp) and heads over
    tensor (the sequence stays whole on each device)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return _splash_attention(query, key, value, mask, key_valid, interpret)
    from jax.sharding import PartitionSpec as P

    names = set(mesh.axis_names)
    batch_axes = tuple(a for a in ("data", "fsdp") if a in names) or None
    head_axis = "tensor" if "tensor" in names else None
    qkv_spec = P(batch_axes, None, head_axis, None)
    if key_valid is None:
        key_valid = jnp.ones(key.shape[:2], dtype=bool)

    def local(q, k, v, kv):
        return _splash_attention(q, k, v, mask, kv, interpret)

    return jax.shard_map(local, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec, P(batch_axes, None)),
                         out_specs=qkv_spec, check_vma=False)(query, key, value, key_valid)


def attention(query, key, value, *, mask: np.ndarray | None = None, key_valid=None, backend: str = "xla",
              splash_interpret: bool = False):
    """Masked multi-head attention.

    query: (batch, q_len, heads, head_dim); key, value: (batch, kv_len, heads, head_dim).
    mask: static (q_len, kv_len) numpy bool or None (= all allowed); key_valid: (batch, kv_len) bool or None.
    Returns (batch, q_len, heads, head_dim) in query's dtype.
    """
    batch, q_len = query.shape[:2]
    kv_len = key.shape[1]
    if backend == "xla":
        return _xla_attention(query, key, value, _combined_mask(mask, key_valid, batch, q_len, kv_len))
    if backend == "dot_product_attention":
        return jax.nn.dot_product_attention(query, key, value,
                                            mask=_combined_mask(mask, key_valid, batch, q_len, kv_len),
                                            implementation=None)
    if backend == "cudnn":
        _check_gpu(backend)
        if query.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"cuDNN attention needs bf16/fp16 activations, got {query.dtype}; set dtype=bfloat16 "
                             "or use backend 'dot_product_attention'")
        return jax.nn.dot_product_attention(query, key, value,
                                            mask=_combined_mask(mask, key_valid, batch, q_len, kv_len),
                                            implementation="cudnn")
    if backend == "splash":
        _check_tpu_or_interpret(splash_interpret)
        if mask is not None and tuple(mask.shape) != (q_len, kv_len):
            raise ValueError(f"attention mask has shape {tuple(mask.shape)}, expected ({q_len}, {kv_len})")
        return _splash_sharded(query, key, value, mask, key_valid, splash_interpret)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
