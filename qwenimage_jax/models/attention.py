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
    "cudnn"                  cuDNN flash attention (`jax.nn.dot_product_attention(implementation="cudnn")`); NVIDIA
                             GPUs, bf16/fp16 only. Given the layout (`image_ids`) it uses no mask tensor at all (see
                             `segmented_attention`), so flash attention is used and the cached-sampling call works.
    "cudnn_emulated"         for tests: the "cudnn" code path (`segmented_attention`) run by XLA
                             (`implementation=None`), so CPU tests cover the segmentation that runs on the GPU.
    "splash"                 Pallas splash attention (TPU); sequence padded to 128-token blocks, key padding as
                             segment ids; `interpret=True` runs it on CPU for testing.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

BACKENDS = ("xla", "dot_product_attention", "cudnn", "splash", "cudnn_emulated")


def platform_default(platform: str | None = None) -> str:
    """The backend used where none is named ("auto"): cuDNN's fused flash kernel on GPU, splash on TPU (neither
    materialises the (heads, seq, seq) logits), the einsum path on CPU."""
    return {"gpu": "cudnn", "cuda": "cudnn", "tpu": "splash"}.get(platform or jax.default_backend(), "xla")


def check_platform(backend: str, platform: str | None = None, splash_interpret: bool = False) -> None:
    """A ValueError naming the fix when `backend` cannot run on this machine's platform (cuDNN needs a GPU, splash a
    TPU unless emulated with `splash_interpret`); compiling for another platform ahead of time (`aot`) does not call
    this."""
    platform = platform or jax.default_backend()
    need = {"cudnn": ("gpu", "cuda"), "splash": () if splash_interpret else ("tpu",)}.get(backend)
    if need == ():
        return
    if need is not None and platform not in need:
        raise ValueError(f"attention={backend!r} runs only on {need[0].upper()}, and this machine runs on {platform}; "
                         f"use attention='auto' (here: {platform_default(platform)!r}) or 'xla'")


def platform_dtype(platform: str | None = None):
    """The compute dtype used where none is named: bfloat16 on GPU and TPU (their matmul units' native type, half
    the memory), float32 on CPU (where bfloat16 is emulated and slower)."""
    return jnp.bfloat16 if (platform or jax.default_backend()) in ("gpu", "cuda", "tpu") else jnp.float32

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


def _runs(ids: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of equal ids: a text run (-1) or one image block."""
    edges = [0, *(np.flatnonzero(np.diff(ids)) + 1).tolist(), ids.shape[0]]
    return list(zip(edges[:-1], edges[1:]))


def _padding_lengths(key_valid, pad_run: tuple[int, int]):
    """key_valid (batch, kv_len) -> (valid tokens of `pad_run` per row (int32), per-row flag that every other key
    is valid and the run's invalid keys are its tail). Raises ValueError when key_valid is concrete and a row breaks
    the pattern; under jit the caller poisons such rows with NaN instead (an error cannot be raised there)."""
    start, end = pad_run
    valid = key_valid.astype(bool)
    n_valid = valid[:, start:end].sum(axis=-1, dtype=jnp.int32)
    pos = jnp.arange(valid.shape[1])
    expected = (pos < start) | (pos >= end) | (pos - start < n_valid[:, None])
    ok = jnp.all(valid == expected, axis=-1)
    if not isinstance(ok, jax.core.Tracer) and not bool(ok.all()):
        where = f"keys {start}..{end - 1}" if end > start else "there is no text run: every key must be valid"
        raise ValueError(
            f"the cuDNN attention path supports key padding only at the end of the last text run ({where}; "
            f"text right-padded, every image token valid); batch rows "
            f"{np.flatnonzero(~np.asarray(ok)).tolist()} of key_valid mask other keys. Use backend 'xla' or "
            "'dot_product_attention' for other masks")
    return n_valid, ok


def segmented_attention(query, key, value, image_ids: np.ndarray, key_valid=None, *, implementation=None):
    """Block-causal attention with no mask tensor, as static slices of q/k/v, each one call of
    `jax.nn.dot_product_attention` using only `is_causal` and `key_value_seq_lengths`: what cuDNN flash attention
    supports (a dense mask defeats flash, and a (B, 1, 1, S) key mask is refused by cuDNN). `implementation=None`
    runs the same calls in XLA (backend "cudnn_emulated", the CPU tests).

    image_ids: static (kv_len,) ids of the keys (-1 text); the queries are the last q_len key positions, so the
    mask is block_causal_mask(image_ids)[-q_len:] (prefix pass: q_len = kv_len; target/cached pass: the target
    block over every key). key_valid (batch, kv_len) or None may only mark a tail of the LAST text run invalid
    (right-padded prompts); anything else raises ValueError (concrete key_valid) or gives NaN rows (under jit).

    Keys are reordered freely (attention is invariant to key order; RoPE is already applied) so that in every call
    the padding is the tail of the keys and `key_value_seq_lengths` = static valid count + valid text per row:
      text queries   one causal call, queries and keys = positions [0, end of the last text run): a text token sees
                     exactly the keys at or before it. Image rows of this call are discarded (recomputed below), a
                     waste of ~N_cond^2/2 only when text follows a condition image (edit prompts).
      image block    one non-causal call, its queries over keys [0, block end) with the padded text run moved last.
    Padded text query rows get what the "xla" backend gives (the average over the valid keys at or before them);
    only a row with no valid key at all (a fully padded prompt with no tokens before it) differs, where XLA
    averages all keys and here it sees key 0. Such rows never matter: padded keys are masked for every query in
    every layer, and text outputs are discarded (the loss and sampling read the target tokens only).
    """
    ids = np.asarray(image_ids)
    batch, q_len = query.shape[:2]
    kv_len = key.shape[1]
    if ids.shape != (kv_len,) or q_len > kv_len:
        raise ValueError(f"image_ids has shape {ids.shape} but keys have length {kv_len} (queries {q_len})")
    q0 = kv_len - q_len                                   # position of the first query
    runs = _runs(ids)
    text_runs = [r for r in runs if ids[r[0]] < 0]
    pad_run = text_runs[-1] if text_runs else (kv_len, kv_len)
    n_valid, ok = (None, None) if key_valid is None else _padding_lengths(key_valid, pad_run)

    def keys_before(end):
        """k, v over positions [0, end) with the padded run (if inside) moved last, and the kv lengths."""
        start, stop = pad_run
        if n_valid is None or stop > end:
            return key[:, :end], value[:, :end], None
        order = lambda t: (t[:, :end] if stop == end else  # already last
                           jnp.concatenate([t[:, :start], t[:, stop:end], t[:, start:stop]], axis=1))
        # >= 1: a row that sees no key is undefined in cuDNN (see the docstring for why it does not matter)
        return order(key), order(value), jnp.maximum(end - (stop - start) + n_valid, 1)

    def call(q, end, causal):
        k, v, lengths = keys_before(end)
        t, s = q.shape[1], k.shape[1]
        # jax's cuDNN wrapper refuses odd sequence lengths when differentiated: append one query row (dropped)
        # and one key that the kv lengths hide (a causal row never reaches it either).
        if s % 2:
            k, v = (jnp.pad(x, ((0, 0), (0, 1), (0, 0), (0, 0))) for x in (k, v))
            lengths = jnp.full((batch,), s, jnp.int32) if lengths is None else lengths
        if t % 2:
            q = jnp.pad(q, ((0, 0), (0, 1), (0, 0), (0, 0)))
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, key_value_seq_lengths=lengths,
                                            implementation=implementation)[:, :t]

    text_end = pad_run[1] if text_runs else 0
    if text_end > q0:  # causal is aligned top-left: query rows must start at key 0 (zero rows before q0, dropped)
        causal_out = call(jnp.pad(query[:, :text_end - q0], ((0, 0), (q0, 0), (0, 0), (0, 0))), text_end, True)
    pieces = []
    for start, end in runs:
        if end <= q0:
            continue
        start = max(start, q0)
        if ids[start] < 0:
            pieces.append(causal_out[:, start:end])
        else:
            pieces.append(call(query[:, start - q0:end - q0], end, False))
    out = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=1)
    if ok is not None and isinstance(ok, jax.core.Tracer):
        out = jnp.where(ok[:, None, None, None], out, jnp.nan)  # a key_valid this path cannot express
    return out


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


def _check_layout_mask(mask, image_ids: np.ndarray, q_len: int):
    """The cuDNN path computes the mask from image_ids; refuse a `mask` that says something else."""
    ids = np.asarray(image_ids)
    q = np.arange(ids.shape[0] - q_len, ids.shape[0])[:, None]
    k = np.arange(ids.shape[0])[None, :]
    expected = (q >= k) | ((ids[q] == ids[k]) & (ids[q] >= 0))
    given = np.ones_like(expected) if mask is None else np.asarray(mask, dtype=bool)
    if given.shape != expected.shape or not (given == expected).all():
        raise ValueError("mask is not block_causal_mask(image_ids)[-q_len:] (None meaning all allowed); the cudnn "
                         "backends compute the mask from image_ids")


def attention(query, key, value, *, mask: np.ndarray | None = None, key_valid=None, backend: str = "xla",
              image_ids: np.ndarray | None = None, splash_interpret: bool = False):
    """Masked multi-head attention.

    query: (batch, q_len, heads, head_dim); key, value: (batch, kv_len, heads, head_dim).
    mask: static (q_len, kv_len) numpy bool or None (= all allowed); key_valid: (batch, kv_len) bool or None.
    image_ids: static (kv_len,) image ids of the keys (-1 text) with mask == block_causal_mask(image_ids)[-q_len:]
        (queries = the last q_len keys); the cudnn backends use it instead of the mask (`segmented_attention`),
        the others ignore it. Without it (and with a mask), "cudnn" hands cuDNN the dense mask tensor as before
        (accepted only when it is a full (q_len, kv_len) mask).
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
    if backend in ("cudnn", "cudnn_emulated"):
        implementation = None
        if backend == "cudnn":
            _check_gpu(backend)
            if query.dtype not in (jnp.bfloat16, jnp.float16):
                raise ValueError(f"cuDNN attention needs bf16/fp16 activations, got {query.dtype}; set "
                                 "dtype=bfloat16 or use backend 'dot_product_attention'")
            implementation = "cudnn"
        if image_ids is None and mask is None:
            image_ids = np.zeros((kv_len,), np.int64)  # no static mask: one bidirectional block
        if image_ids is None:
            return jax.nn.dot_product_attention(query, key, value,
                                                mask=_combined_mask(mask, key_valid, batch, q_len, kv_len),
                                                implementation=implementation)
        _check_layout_mask(mask, image_ids, q_len)
        return segmented_attention(query, key, value, image_ids, key_valid, implementation=implementation)
    if backend == "splash":
        _check_tpu_or_interpret(splash_interpret)
        if mask is not None and tuple(mask.shape) != (q_len, kv_len):
            raise ValueError(f"attention mask has shape {tuple(mask.shape)}, expected ({q_len}, {kv_len})")
        return _splash_sharded(query, key, value, mask, key_valid, splash_interpret)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
