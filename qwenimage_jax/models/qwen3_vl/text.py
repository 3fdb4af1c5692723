"""Qwen3-VL text decoder in Flax Linen: embeddings, GQA attention with per-head q/k RMSNorm, rotate-half RoPE
with interleaved MRoPE, SwiGLU MLP, DeepStack additions after the first layers, final norm, lm_head; layers under
`nn.scan` (params carry a leading `layers` axis) with an optional preallocated KV cache for generation."""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.models.kv_cache import KVCache
from qwenimage_jax.models.layers import rms_normalize, rotate_half
from qwenimage_jax.models.qwen3_vl.config import TextConfig

Dtype = Any

_INIT = nn.initializers.normal(stddev=0.02)


def init_kv_cache(config: TextConfig, batch: int, max_length: int, dtype: Dtype = jnp.float32) -> KVCache:
    """Zero KV cache for `batch` sequences of up to `max_length` tokens."""
    shape = (config.num_hidden_layers, batch, max_length, config.num_key_value_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def mrope_axis_of_frequency(head_dim: int, mrope_section) -> np.ndarray:
    """Which position axis (0=t, 1=h, 2=w) drives each of the head_dim/2 frequencies (interleaved MRoPE).

    Frequency j belongs to h if j % 3 == 1 and j < 3*section[1], to w if j % 3 == 2 and j < 3*section[2], else to t.
    """
    j = np.arange(head_dim // 2)
    axis = np.zeros_like(j)
    axis[(j % 3 == 1) & (j < 3 * mrope_section[1])] = 1
    axis[(j % 3 == 2) & (j < 3 * mrope_section[2])] = 2
    return axis


def mrope_cos_sin(position_ids: jax.Array, config: TextConfig) -> tuple[jax.Array, jax.Array]:
    """position_ids (3, batch, tokens) -> cos, sin (batch, tokens, head_dim) in fp32 (rotate-half layout)."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))  # (dim/2,)
    freqs = position_ids.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq, jnp.float32)  # (3, B, S, dim/2)
    onehot = np.eye(3, dtype=np.float32)[mrope_axis_of_frequency(dim, config.mrope_section)].T  # (3, dim/2)
    freqs = jnp.sum(freqs * jnp.asarray(onehot)[:, None, None, :], axis=0)  # exactly one non-zero term each
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x (batch, tokens, heads, head_dim); cos/sin (batch, tokens, head_dim): x*cos + rotate_half(x)*sin."""
    dtype = x.dtype
    x = x.astype(jnp.float32)
    out = x * cos[:, :, None, :] + rotate_half(x) * sin[:, :, None, :]
    return out.astype(dtype)


class RMSNorm(nn.Module):
    """Qwen RMSNorm: fp32 x*rsqrt(mean(x^2)+eps), cast back to the input dtype, then times weight."""
    dim: int
    eps: float = 1e-6
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = self.param("weight", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                            (self.dim,), self.param_dtype)
        dtype = x.dtype
        x32 = x.astype(jnp.float32)
        normed = rms_normalize(x32, self.eps)
        return weight.astype(dtype) * normed.astype(dtype)


class Projection(nn.Module):
    """Bias-optional linear map whose kernel has the full (in_axes..., out_axes...) shape and logical names.

    (flax's DenseGeneral initialises a flattened kernel, which breaks rank-3 logical names under a mesh.)
    """
    features: tuple[int, ...]
    num_in_axes: int
    names: tuple[str, ...]
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        n_in = self.num_in_axes
        shape = tuple(x.shape[-n_in:]) + tuple(self.features)
        kernel = self.param("kernel", nn.with_logical_partitioning(_INIT, self.names), shape, self.param_dtype)
        contract = tuple(range(x.ndim - n_in, x.ndim))
        # promote_dtype, not .astype: a quantized kernel (checkpoints/quantize.py) passes through it untouched
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(n_in))), ((), ())))
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, self.names[n_in:]),
                              tuple(self.features), self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


def _dense(features, axis, names, dtype, param_dtype, name, use_bias=False):
    features = features if isinstance(features, tuple) else (features,)
    num_in = len(axis) if isinstance(axis, tuple) else 1
    return Projection(features, num_in, names, use_bias, dtype, param_dtype, name=name)


class Attention(nn.Module):
    """GQA self-attention with per-head q/k RMSNorm and rotate-half MRoPE; optional KV-cache write."""
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, cos, sin, mask, layer_cache=None, cache_index=None):
        # x (B, T, D); cos/sin (B, T, Dh); mask (B, 1, T, S_kv) bool; layer_cache: one layer of a KVCache (B, S_max, KVH, Dh)
        cfg = self.config
        h, kvh, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        bias = cfg.attention_bias
        q = _dense((h, dh), -1, ("embed", "heads", "head_dim"), self.dtype, self.param_dtype, "q_proj", bias)(x)
        k = _dense((kvh, dh), -1, ("embed", "kv_heads", "head_dim"), self.dtype, self.param_dtype, "k_proj", bias)(x)
        v = _dense((kvh, dh), -1, ("embed", "kv_heads", "head_dim"), self.dtype, self.param_dtype, "v_proj", bias)(x)
        q = RMSNorm(dh, cfg.rms_norm_eps, self.param_dtype, name="q_norm")(q)
        k = RMSNorm(dh, cfg.rms_norm_eps, self.param_dtype, name="k_norm")(k)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        q = nn.with_logical_constraint(q, ("activation_batch", "activation_length", "activation_heads",
                                           "activation_head_dim"))
        new_cache = None
        if layer_cache is not None:
            k = jax.lax.dynamic_update_slice(layer_cache["k"], k.astype(layer_cache["k"].dtype),
                                             (0, cache_index, 0, 0))
            v = jax.lax.dynamic_update_slice(layer_cache["v"], v.astype(layer_cache["v"].dtype),
                                             (0, cache_index, 0, 0))
            new_cache = KVCache(k, v).constrained()
            k, v = k.astype(self.dtype), v.astype(self.dtype)
        b, t = q.shape[:2]
        q = q.reshape(b, t, kvh, cfg.num_kv_groups, dh)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) * (dh ** -0.5)
        scores = jnp.where(mask[:, :, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(b, t, h, dh)
        out = nn.with_logical_constraint(out, ("activation_batch", "activation_length", "activation_heads",
                                               "activation_head_dim"))
        out = _dense(cfg.hidden_size, (-2, -1), ("heads", "head_dim", "embed"), self.dtype, self.param_dtype,
                     "o_proj", bias)(out)
        return out, new_cache


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        gate = _dense(cfg.intermediate_size, -1, ("embed", "mlp"), self.dtype, self.param_dtype, "gate_proj")(x)
        up = _dense(cfg.intermediate_size, -1, ("embed", "mlp"), self.dtype, self.param_dtype, "up_proj")(x)
        hidden = nn.with_logical_constraint(jax.nn.silu(gate) * up,
                                            ("activation_batch", "activation_length", "activation_mlp"))
        return _dense(cfg.hidden_size, -1, ("mlp", "embed"), self.dtype, self.param_dtype, "down_proj")(hidden)


class DecoderLayer(nn.Module):
    """One pre-norm decoder layer, shaped as an `nn.scan` body.

    carry = (hidden (B, T, D), layer index ()); after the layer, DeepStack row `index` (dense (K, B, T, D), zeros off
    the visual positions) is added when index < K.
    """
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, carry, cos, sin, mask, deepstack, cache_index, layer_cache):
        hidden, index = carry
        cfg = self.config
        normed = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.param_dtype, name="input_layernorm")(hidden)
        attn, new_cache = Attention(cfg, self.dtype, self.param_dtype, name="self_attn")(
            normed, cos, sin, mask, layer_cache, cache_index)
        hidden = hidden + attn
        normed = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.param_dtype, name="post_attention_layernorm")(hidden)
        hidden = hidden + MLP(cfg, self.dtype, self.param_dtype, name="mlp")(normed)
        if deepstack is not None:
            k = deepstack.shape[0]
            row = jax.lax.dynamic_index_in_dim(deepstack, jnp.minimum(index, k - 1), axis=0, keepdims=False)
            hidden = hidden + jnp.where(index < k, row, jnp.zeros_like(row)).astype(hidden.dtype)
        hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_embed"))
        return (hidden, index + 1), new_cache


def attention_mask_4d(query_slots: jax.Array, kv_valid: jax.Array) -> jax.Array:
    """Causal + key-padding mask: query_slots (T,) int, kv_valid (B, S_kv) bool -> (B, 1, T, S_kv) bool."""
    key_slots = jnp.arange(kv_valid.shape[1])
    causal = key_slots[None, :] <= query_slots[:, None]  # (T, S_kv)
    return causal[None, None] & kv_valid[:, None, None, :].astype(bool)


class TextDecoder(nn.Module):
    """`Qwen3VLTextModel` + `lm_head`. Params: embed_tokens, layers (scanned), norm, lm_head (absent when tied)."""
    config: TextConfig
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    remat_policy: str = "none"  # "none" or a name in jax.checkpoint_policies

    def setup(self):
        cfg = self.config
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                     embedding_init=nn.with_logical_partitioning(_INIT, ("vocab", "embed")))
        block = DecoderLayer
        if self.remat_policy != "none":
            block = nn.remat(block, policy=getattr(jax.checkpoint_policies, self.remat_policy), prevent_cse=False)
        self.layers = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                              in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                              length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})(
            cfg, self.dtype, self.param_dtype)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, self.param_dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = Projection((cfg.vocab_size,), 1, ("embed", "vocab"), False, self.dtype, self.param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        """(B, T) int -> (B, T, D)."""
        return self.embed_tokens(input_ids)

    def logits_from_hidden(self, hidden: jax.Array) -> jax.Array:
        """Final norm + lm_head: pre-norm hidden (B, T, D) -> logits (B, T, vocab) in fp32."""
        normed = self.norm(hidden)
        if self.config.tie_word_embeddings:
            logits = self.embed_tokens.attend(normed)
        else:
            logits = self.lm_head(normed)
        logits = nn.with_logical_constraint(logits, ("activation_batch", "activation_length", "activation_vocab"))
        return logits.astype(jnp.float32)

    def __call__(self, inputs_embeds: jax.Array, position_ids: jax.Array, attention_mask: Optional[jax.Array] = None,
                 deepstack: Optional[jax.Array] = None, cache: Optional[KVCache] = None,
                 cache_index: Any = 0, kv_mask: Optional[jax.Array] = None, compute_logits: bool = True):
        """Runs the decoder.

        inputs_embeds (B, T, D); position_ids (3, B, T) or (B, T); attention_mask (B, T) (1 = token, 0 = pad) when no
        cache; deepstack (K, B, T, D) dense additions (zeros off visual positions) or None.
        With a cache: the T new tokens are written at slots [cache_index, cache_index+T) and attend to every slot
        where kv_mask (B, S_max) is true and slot <= own slot.
        Returns dict(pre_norm (B, T, D) = last decoder layer output before the final norm, logits (B, T, V) fp32
        when compute_logits, cache).
        """
        b, t, _ = inputs_embeds.shape
        if position_ids.ndim == 2:
            position_ids = jnp.broadcast_to(position_ids[None], (3, b, t))
        cos, sin = mrope_cos_sin(position_ids, self.config)
        if cache is None:
            valid = jnp.ones((b, t), bool) if attention_mask is None else attention_mask.astype(bool)
            mask = attention_mask_4d(jnp.arange(t), valid)
        else:
            if kv_mask is None:
                raise ValueError("a KV cache needs kv_mask (batch, max_length) marking the filled slots")
            mask = attention_mask_4d(cache_index + jnp.arange(t), kv_mask)
        hidden = nn.with_logical_constraint(inputs_embeds.astype(self.dtype),
                                            ("activation_batch", "activation_length", "activation_embed"))
        (hidden, _), new_cache = self.layers((hidden, jnp.int32(0)), cos, sin, mask, deepstack, cache_index, cache)
        out = {"pre_norm": hidden, "cache": new_cache}
        if compute_logits:
            out["logits"] = self.logits_from_hidden(hidden)
        return out
