"""Autoregressive generation for decoder-only LMs: prefill + decode with a preallocated KV cache, all inside
`jax.jit` (`lax.while_loop`), greedy or temperature / top-p sampling, stop tokens, left-padded batches.

Any decoder plugs in through `Decoder` (two pure functions), so the loop is shared by Qwen3-VL and later models:

    decoder = Decoder(init_cache=lambda batch, length: ..., forward=lambda params, ids, positions, kv_mask, cache,
                      cache_index, extra: (logits, cache))
    new_ids = generate(decoder, params, input_ids, attention_mask, max_new_tokens=64)          # (B, 64)
    for chunk in stream(decoder, params, input_ids, attention_mask, max_new_tokens=64): ...    # (B, <=chunk) arrays

A `constrain` function may replace each chosen token before it is emitted (constrained decoding, e.g.
`text.expand.attribute_constraint`): constrain(data, tokens (B, max_new_tokens) emitted so far (pads from `step` on),
step () int32, logits (B, vocab) float32, token (B,) int32) -> token (B,) int32, jitted inside the loop with
`constrain_data` (a pytree of arrays, traced).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Decoder:
    """What the loop needs from a model.

    init_cache(batch, max_length) -> cache pytree (zeros).
    forward(params, token_ids (B, T) int32, positions (B, T) int32, kv_mask (B, max_length) bool, cache,
            cache_index () int32, extra) -> (logits (B, T, vocab) float, cache).
      The T tokens occupy cache slots [cache_index, cache_index + T) and attend causally to every slot where kv_mask
      is true. `extra` is the pytree given as `prefill_extra` during prefill (e.g. image embeddings, 3D positions)
      and None during decode steps.
    """
    init_cache: Callable[[int, int], Any]
    forward: Callable[..., tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 = greedy; top_p < 1 keeps the smallest set of tokens whose probability mass reaches top_p."""
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop_token_ids: tuple[int, ...] = ()
    pad_token_id: int = 0
    constrain: Optional[Callable] = None  # see the module docstring; None = emit the sampled token

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")


def sample_next(logits: jax.Array, rng: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """logits (B, V) -> token ids (B,) int32. temperature/top_p are static Python floats."""
    if temperature <= 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        kept = jnp.where(mass_before < top_p, sorted_logits, jnp.inf)  # the top token is always kept
        threshold = jnp.min(kept, axis=-1, keepdims=True)
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _check_left_padded(attention_mask: np.ndarray) -> None:
    mask = np.asarray(attention_mask)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be (batch, tokens), got shape {mask.shape}")
    if not mask[:, -1].all():
        raise ValueError("generation needs LEFT-padded prompts (the last column of attention_mask must be all 1); "
                         "tokenize with padding_side='left'")
    if np.any(np.diff(mask.astype(np.int32), axis=1) < 0):
        raise ValueError("attention_mask has holes or right padding; generation needs left-padded prompts")


def _prefill(decoder: Decoder, sampling: SamplingConfig, params, input_ids, attention_mask, seed, prefill_extra,
             position_offset, constrain_data=None):
    """Runs the prompt through the model; returns the loop state (a dict pytree)."""
    batch, prompt_len = input_ids.shape
    max_length = prompt_len + sampling.max_new_tokens
    valid = attention_mask.astype(bool)
    kv_mask = jnp.zeros((batch, max_length), bool).at[:, :prompt_len].set(valid)
    positions = jnp.where(valid, jnp.cumsum(valid, axis=1) - 1, 0).astype(jnp.int32)  # like transformers.generate
    cache = decoder.init_cache(batch, max_length)
    logits, cache = decoder.forward(params, input_ids.astype(jnp.int32), positions, kv_mask, cache, jnp.int32(0),
                                    prefill_extra)
    offset = jnp.zeros((batch,), jnp.int32) if position_offset is None else position_offset.astype(jnp.int32)
    return {
        "step": jnp.int32(0),
        "logits": logits[:, -1].astype(jnp.float32),  # left padding: the last column is every row's last token
        "tokens": jnp.full((batch, sampling.max_new_tokens), sampling.pad_token_id, jnp.int32),
        "cache": cache,
        "kv_mask": kv_mask,
        "next_position": jnp.sum(valid, axis=1).astype(jnp.int32) + offset,
        "done": jnp.zeros((batch,), bool),
        "rng": jax.random.PRNGKey(seed),
        "prompt_len": jnp.int32(prompt_len),
        "constrain_data": constrain_data,
    }


def _decode(decoder: Decoder, sampling: SamplingConfig, params, state, num_steps):
    """Emits up to `num_steps` more tokens (stops early when every row has hit a stop token)."""
    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
    end = jnp.minimum(state["step"] + num_steps, sampling.max_new_tokens)

    def cond(s):
        return (s["step"] < end) & ~jnp.all(s["done"])

    def body(s):
        rng, key = jax.random.split(s["rng"])
        token = sample_next(s["logits"], key, sampling.temperature, sampling.top_p)
        if sampling.constrain is not None:
            token = sampling.constrain(s["constrain_data"], s["tokens"], s["step"], s["logits"], token)
        token = jnp.where(s["done"], sampling.pad_token_id, token)
        tokens = jax.lax.dynamic_update_slice(s["tokens"], token[:, None], (0, s["step"]))
        done = s["done"] | jnp.isin(token, stop_ids)
        slot = s["prompt_len"] + s["step"]
        kv_mask = jax.lax.dynamic_update_slice(s["kv_mask"], jnp.ones((token.shape[0], 1), bool), (0, slot))
        positions = (s["next_position"] + s["step"])[:, None]
        logits, cache = decoder.forward(params, token[:, None], positions, kv_mask, s["cache"], slot, None)
        return dict(s, step=s["step"] + 1, logits=logits[:, -1].astype(jnp.float32), tokens=tokens, cache=cache,
                    kv_mask=kv_mask, done=done, rng=rng)

    return jax.lax.while_loop(cond, body, state)


def _sampling(max_new_tokens, temperature, top_p, stop_token_ids, pad_token_id, constrain=None) -> SamplingConfig:
    stops = tuple(int(t) for t in (stop_token_ids or ()))
    if pad_token_id is None:
        pad_token_id = stops[0] if stops else 0
    return SamplingConfig(int(max_new_tokens), float(temperature), float(top_p), stops, int(pad_token_id),
                          constrain)


def _constraint_arrays(constrain, constrain_data):
    if constrain is None:
        if constrain_data is not None:
            raise ValueError("constrain_data was given without a constrain function")
        return None
    return jax.tree_util.tree_map(jnp.asarray, constrain_data)


@functools.partial(jax.jit, static_argnames=("decoder", "sampling"))
def _generate_jit(decoder, sampling, params, input_ids, attention_mask, seed, prefill_extra, position_offset,
                  constrain_data):
    state = _prefill(decoder, sampling, params, input_ids, attention_mask, seed, prefill_extra, position_offset,
                     constrain_data)
    return _decode(decoder, sampling, params, state, sampling.max_new_tokens)["tokens"]


def generate(decoder: Decoder, params, input_ids, attention_mask, max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, seed: int = 0, stop_token_ids: Optional[Sequence[int]] = None,
             pad_token_id: Optional[int] = None, prefill_extra: Any = None,
             position_offset: Optional[jax.Array] = None, constrain: Optional[Callable] = None,
             constrain_data: Any = None) -> jax.Array:
    """New token ids (B, max_new_tokens) int32 for left-padded prompts input_ids/attention_mask (B, S).

    After a row emits a stop token, the rest of its row is `pad_token_id` (default: the first stop token, else 0).
    position_offset (B,): added to decode positions (Qwen3-VL's rope_deltas for prompts with images).
    constrain / constrain_data: constrained decoding (module docstring); the function must be hashable (a
    module-level function), it is part of the compiled program.
    One compiled program per (shapes, decoder, sampling settings); `seed` and `constrain_data` are traced.
    """
    _check_left_padded(attention_mask)
    sampling = _sampling(max_new_tokens, temperature, top_p, stop_token_ids, pad_token_id, constrain)
    return _generate_jit(decoder, sampling, params, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                         jnp.uint32(seed), prefill_extra, position_offset,
                         _constraint_arrays(constrain, constrain_data))


@functools.partial(jax.jit, static_argnames=("decoder", "sampling"))
def _prefill_jit(decoder, sampling, params, input_ids, attention_mask, seed, prefill_extra, position_offset,
                 constrain_data):
    return _prefill(decoder, sampling, params, input_ids, attention_mask, seed, prefill_extra, position_offset,
                    constrain_data)


@functools.partial(jax.jit, static_argnames=("decoder", "sampling", "chunk"), donate_argnames=("state",))
def _decode_jit(decoder, sampling, chunk, params, state):
    return _decode(decoder, sampling, params, state, chunk)


def stream(decoder: Decoder, params, input_ids, attention_mask, max_new_tokens: int, temperature: float = 0.0,
           top_p: float = 1.0, seed: int = 0, stop_token_ids: Optional[Sequence[int]] = None,
           pad_token_id: Optional[int] = None, chunk: int = 8, prefill_extra: Any = None,
           position_offset: Optional[jax.Array] = None, constrain: Optional[Callable] = None,
           constrain_data: Any = None) -> Iterator[np.ndarray]:
    """Same tokens as `generate`, yielded as they come: numpy (B, n) blocks of n <= chunk new ids (pads included)."""
    _check_left_padded(attention_mask)
    sampling = _sampling(max_new_tokens, temperature, top_p, stop_token_ids, pad_token_id, constrain)
    state = _prefill_jit(decoder, sampling, params, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                         jnp.uint32(seed), prefill_extra, position_offset,
                         _constraint_arrays(constrain, constrain_data))
    emitted = 0
    while emitted < sampling.max_new_tokens:
        state = _decode_jit(decoder, sampling, chunk, params, state)
        step = int(state["step"])
        if step > emitted:
            yield np.asarray(state["tokens"][:, emitted:step])
        if step == emitted or bool(jnp.all(state["done"])):
            break
        emitted = step
