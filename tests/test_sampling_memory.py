"""The sampler's peak-memory estimate (`sampling/memory.py`): how its terms scale with size, batch, CFG and the
attention backend, that it stays above XLA's own buffer assignment for the shipped tiny world, and where the free
memory figure comes from."""
import dataclasses
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest

from qwenimage_jax.models.dit import DiTConfig
from qwenimage_jax.models.vae import VAEConfig
from qwenimage_jax.sampling import memory

TINY_WORLD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "qwenimage_jax", "assets",
                          "tiny_world")

DIT = DiTConfig(num_layers=2, attention_head_dim=32, num_attention_heads=4, context_in_dim=64,
                axes_dims_rope=(8, 12, 12), dtype=jnp.float32, attention="xla")
VAE = VAEConfig(base_dim=8, decoder_base_dim=16)     # dim_mult (1, 2, 4, 8, 8): 16x, mid-block attention on


def _estimate(**kwargs):
    kwargs = {"batch": 1, "height": 256, "width": 256, "platform": "gpu", **kwargs}
    return memory.estimate(kwargs.pop("dit", DIT), kwargs.pop("vae", VAE), **kwargs)


def test_doubling_the_side_quadruples_the_linear_terms_and_multiplies_attention_by_16():
    small, big = _estimate(), _estimate(height=512, width=512)
    for term in ("dit_tokens", "latents", "vae_decode"):
        assert getattr(big, term) == 4 * getattr(small, term), term
    for term in ("dit_attention", "vae_attention"):
        assert getattr(big, term) == 16 * getattr(small, term), term
    assert small.kv_cache == big.kv_cache == 0, "no text, no condition image: no prefix to cache"
    # the XLA path's scores by hand: 256 px = 16 x 16 tokens, 4 heads, float32 logits + exponentials + fp32 probs
    assert small.dit_attention == 1 * 4 * 256 * 256 * (4 + 4 + 4)
    # the decoder's full-resolution width is 16 x dim_mult[1] = 32 channels, three alive, plus the 4-channel output
    assert small.vae_decode == 256 * 256 * (3 * 32 * 4 + 4 * 4)


def test_batch_cfg_text_and_backend():
    one, two = _estimate(), _estimate(batch=2)
    assert all(getattr(two, t) == 2 * getattr(one, t) for t in ("dit_tokens", "dit_attention", "latents",
                                                                    "vae_decode", "vae_attention"))
    cfg = _estimate(cfg=True)
    assert cfg.dit_attention == two.dit_attention and cfg.dit_tokens == two.dit_tokens
    assert cfg.vae_decode == one.vae_decode, "the decoder runs on the undoubled batch"
    text = _estimate(text_tokens=64)
    assert text.dit_attention == 4 * 320 * 320 * 12 and text.kv_cache == 2 * 2 * 64 * DIT.inner_dim * 4
    flash = _estimate(dit=dataclasses.replace(DIT, attention="cudnn"))
    assert flash.dit_attention == 0 and flash.dit_tokens == one.dit_tokens
    # a mesh splits the batch: 4 images over 2 data-parallel devices cost each what 2 images cost one
    assert _estimate(batch=4, batch_shards=2) == _estimate(batch=2)
    # bfloat16 halves the activations on an accelerator; XLA's CPU backend computes them in float32
    bf16 = dataclasses.replace(DIT, dtype=jnp.bfloat16)
    assert _estimate(dit=bf16).dit_attention == 4 * 256 * 256 * (4 + 4 + 2)
    assert _estimate(dit=bf16, platform="cpu").dit_attention == one.dit_attention
    # editing: each condition image's tokens join the sequence and the encoder runs on it
    edit = _estimate(condition_sizes=[(256, 256)])
    assert edit.dit_attention == 4 * 512 * 512 * 12 and edit.vae_encode > 0


def test_the_estimate_is_above_what_xla_assigns_for_the_tiny_world():
    """The tiny world's sampler and decoder at 512 px, compiled (not run): XLA's temporary buffers stay under the
    estimate, and the estimate under twice them."""
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline, SamplerSpec, _layout_mask

    pipe = QwenImagePipeline.from_pretrained(TINY_WORLD, dtype=jnp.float32, load_text_encoder=False)
    side, text_len = 512, 64
    n = (side // 16) ** 2
    cfg = pipe.transformer.dit_config
    latents = jnp.zeros((1, n, cfg.in_channels), jnp.float32)
    text, mask = jnp.zeros((1, text_len, cfg.context_in_dim)), jnp.ones((1, text_len), jnp.int32)
    spec = SamplerSpec(((1, side // 16, side // 16),), _layout_mask(np.zeros((1, text_len), bool), n), None,
                       "none", False)
    denoise = pipe._denoise_jit.lower(pipe.transformer.variables, latents, None, text, mask, None, None,
                                      jnp.zeros(16), jnp.zeros(16), jnp.asarray(4, jnp.int32), jnp.asarray(1.0),
                                      spec=spec).compile().memory_analysis()
    decode = pipe._decode_jit.lower(pipe.vae.params, latents, pipe.vae.latents_mean, pipe.vae.latents_std,
                                    height=side, width=side).compile().memory_analysis()
    est = memory.estimate(cfg, pipe.vae.vae_config, batch=1, height=side, width=side, text_tokens=text_len,
                          platform="cpu")
    assert denoise.temp_size_in_bytes <= est.denoise <= 2 * denoise.temp_size_in_bytes, (denoise, est)
    assert decode.temp_size_in_bytes <= est.decode <= 2 * decode.temp_size_in_bytes, (decode, est)


def test_available_memory_from_the_device_or_the_host(monkeypatch):
    gpu = types.SimpleNamespace(platform="gpu", id=0, device_kind="H100",
                                memory_stats=lambda: {"bytes_limit": 80 << 30, "bytes_in_use": 30 << 30})
    assert memory.available_bytes(gpu)[0] == 50 << 30
    silent = types.SimpleNamespace(platform="tpu", id=0, device_kind="v5p", memory_stats=lambda: None)
    assert memory.available_bytes(silent)[0] is None
    memory.check(DIT, VAE, batch=64, height=8192, width=8192, device=silent)   # no figure: nothing to refuse
    with open("/proc/meminfo") as f:
        listed = int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024
    monkeypatch.setattr(memory, "_cgroup_available", lambda: None)
    free, source = memory.host_available_bytes()
    assert abs(free - listed) < listed // 4 and "MemAvailable" in source
    monkeypatch.setattr(memory, "_meminfo_available", lambda: None)
    free, source = memory.host_available_bytes()
    assert free == os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") and "sysconf" in source
    monkeypatch.setattr(memory, "_cgroup_available", lambda: 12345)
    assert memory.host_available_bytes() == (12345, "the cgroup's memory.max - memory.current")


def test_a_request_over_the_budget_names_the_largest_size_and_batch_that_fit(monkeypatch):
    cpu = types.SimpleNamespace(platform="cpu", id=0, device_kind="cpu")
    budget = _estimate(batch=2, height=512, width=512, platform="cpu").total
    monkeypatch.setattr(memory, "available_bytes", lambda device: (budget, "a test budget"))
    with pytest.raises(memory.MemoryBudgetError) as info:
        memory.check(DIT, VAE, batch=4, height=512, width=512, device=cpu)
    message = str(info.value)
    assert "\n" not in message and "4 image(s) of 512x512" in message and "at 512x512 at most 2 image(s) fit" in message
    side = int(message.split("the largest square size that fits 4 image(s) is ")[1].split("x")[0])
    assert side % 32 == 0 and side < 512
    assert _estimate(batch=4, height=side, width=side, platform="cpu").total <= budget
    assert _estimate(batch=4, height=side + 32, width=side + 32, platform="cpu").total > budget
    memory.check(DIT, VAE, batch=2, height=512, width=512, device=cpu)   # exactly the budget: fits
    monkeypatch.setattr(memory, "available_bytes", lambda device: (1, "a test budget"))
    with pytest.raises(memory.MemoryBudgetError, match="no size fits 1 image.*not even one image of 32x32 fits"):
        memory.check(DIT, VAE, batch=1, height=32, width=32, device=cpu)
