"""Peak memory of one sampling call, estimated from the shapes alone, and the check that refuses a size or batch that
cannot fit before anything is compiled or allocated (docs/reliability.md, "Sampling").

    estimate(dit_config, vae_config, batch=, height=, width=, cfg=, ...) -> MemoryEstimate (bytes per term)
    available_bytes(device) -> (bytes or None, what was read)
    check(dit_config, vae_config, batch=, height=, width=, ..., device=)   raises MemoryBudgetError (exit 4)
    largest_square(...), largest_batch(...)                               what does fit, for the message

The pipeline calls `check` once the size and batch are known and before the text encoder, the noise or the
sampler run; `memory_check=False` (`qwenimage-jax sample --no-memory-check`) skips it.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Sequence

import numpy as np

from qwenimage_jax.errors import InputValueError
from qwenimage_jax.sampling.latents import MAX_SIDE, SIZE_MULTIPLE, VAE_SCALE_FACTOR

# DiT attention backends that materialise the (batch, heads, queries, keys) scores; the others ("cudnn", "splash")
# are flash kernels whose working set is a tile per head.
MATERIALISING_BACKENDS = ("xla", "dot_product_attention", "cudnn_emulated")
# Bytes per attention score: the float32 logits, the float32 exponentials of the softmax, and the probabilities in
# the compute dtype (added per call). XLA's CPU buffer assignment for the tiny world's sampler holds ~11 bytes per
# score in float32.
SCORE_FLOAT32_BUFFERS = 2
# Full-resolution VAE decoder activations alive at once: a residual block's input, its conv output and the shortcut
# (or the upsampled input, its conv and the DupUp shortcut). XLA's buffer assignment for the tiny world's decoder
# measured 2.0 to 2.5 of them.
VAE_LIVE_ACTIVATIONS = 3


class MemoryBudgetError(InputValueError):
    """A sampling request (size x batch) whose estimated peak memory exceeds what the device has free."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per term (see `estimate`); `denoise` and `decode` are the two phases, `total` the larger."""
    dit_tokens: int
    dit_attention: int
    kv_cache: int
    latents: int
    vae_decode: int
    vae_attention: int
    vae_encode: int

    @property
    def denoise(self) -> int:
        return self.dit_tokens + self.dit_attention + self.kv_cache + self.latents

    @property
    def decode(self) -> int:
        return self.vae_decode + self.vae_attention + self.latents

    @property
    def total(self) -> int:
        return max(self.denoise, self.decode, self.vae_encode)

    def summary(self) -> str:
        """The phase that sets the peak and its largest terms, in GiB."""
        if self.total == self.denoise:
            parts = (("DiT attention scores", self.dit_attention), ("DiT activations", self.dit_tokens),
                     ("prefix K/V cache", self.kv_cache))
            phase = "denoising"
        elif self.total == self.decode:
            parts = (("VAE decoder activations", self.vae_decode), ("VAE attention", self.vae_attention))
            phase = "VAE decode"
        else:
            parts, phase = (("VAE encoder", self.vae_encode),), "condition-image encode"
        return f"{phase}: " + ", ".join(f"{name} {gib(b)}" for name, b in parts if b)


def gib(n: int) -> str:
    """Bytes as MiB below 1 GiB, else GiB with thousands separators."""
    return f"{n / 2 ** 20:.0f} MiB" if n < 2 ** 30 else f"{n / 2 ** 30:,.1f} GiB"


def _float_bytes(dtype, platform: str) -> int:
    itemsize = int(np.dtype(dtype).itemsize)
    # XLA's CPU backend computes bfloat16/float16 elementwise work in float32 (the tiny world's bf16 and f32 samplers
    # need the same temporary memory there), so activations count 4 bytes on CPU
    return max(itemsize, 4) if platform == "cpu" else itemsize


def estimate(dit_config, vae_config, *, batch: int, height: int, width: int, cfg: bool = False,
             text_tokens: int = 0, condition_sizes: Sequence[tuple[int, int]] = (), platform: str = "gpu",
             batch_shards: int = 1) -> MemoryEstimate:
    """Peak activation memory of one `QwenImagePipeline.__call__`, per device, beyond what is already resident.

    dit_config: `models.dit.DiTConfig`; vae_config: `models.vae.VAEConfig`; batch: images (prompts x images per
    prompt); cfg: true CFG (the denoiser runs a doubled batch); text_tokens: the padded prompt length (without the
    condition images' slots); condition_sizes: (height, width) of each resized condition image; platform: "cpu",
    "gpu" or "tpu"; batch_shards: devices the batch is split over (mesh data x fsdp; 1 on CPU, where every shard
    lives in the same host memory).

    What it counts (S = text + condition + target tokens, B = per-device batch, doubled for the denoiser with CFG):
      * dit_attention: with a materialising backend (`xla`, `dot_product_attention`, `cudnn_emulated`), B x heads
        x S x S scores, each as float32 logits, float32 exponentials and probabilities in the compute dtype; 0 for
        the flash backends (`cudnn`, `splash`).
      * dit_tokens: one block's live activations per token: the residual stream, q, k, v, the attention output and
        its projection (6 x width, compute dtype), the float32 layer-norm input and output (2 x width), the SwiGLU
        gate, up projection and product (3 x mlp width), and the RoPE tables (head_dim floats).
      * kv_cache: the prefix (text + condition) K/V of every layer, kept from step 0 through the loop.
      * latents: noise, latents, velocity and the next latents in float32 (B x target tokens x channels), plus the
        condition latents.
      * vae_decode: VAE_LIVE_ACTIVATIONS full-resolution activations of the decoder's widest full-resolution width
        (the nearest-x2 upsampled input of the last upsampler: decoder width x dim_mult[1]), plus the float32
        output image; vae_attention: the mid block's attention scores over latent pixels (hw x hw per image).
        The decoder runs on the undoubled batch.
      * vae_encode: the same for the encoder on each condition image (batch 1, one image at a time).
    The peak is the larger of the denoising phase (dit_* + kv_cache + latents), the decode phase (vae_* + latents)
    and the encode phase. On CPU, bfloat16 activations count 4 bytes (XLA computes them in float32 there).

    What it leaves out: the parameters (already loaded, so already missing from the available figure), the text
    encoder's activations (they depend on the prompt, not the image size, and run before the sampler), XLA's
    convolution workspaces and fusion temporaries beyond the buffers above, allocator fragmentation, and tensor
    parallelism (heads split over `tensor` would only lower the figure). Against XLA's own buffer assignment
    (`compiled.memory_analysis()` on CPU) for the tiny world at 512 and 768 px it is 8-17% above the sampler's
    temporaries and 1.4-1.6x above the decoder's (tests/test_sampling_memory.py checks the 512 px case).
    """
    for name, value in (("batch", batch), ("height", height), ("width", width)):
        if int(value) <= 0:
            raise ValueError(f"{name}={value!r} must be positive")
    shards = max(1, int(batch_shards))
    per_device = -(-int(batch) // shards)
    dit_batch = per_device * (2 if cfg else 1)
    act = _float_bytes(dit_config.dtype, platform)
    width_d, mlp = int(dit_config.inner_dim), int(dit_config.mlp_dim)
    heads, head_dim = int(dit_config.num_attention_heads), int(dit_config.attention_head_dim)
    channels = int(dit_config.in_channels)
    n_target = (height // VAE_SCALE_FACTOR) * (width // VAE_SCALE_FACTOR)
    n_cond = sum((h // VAE_SCALE_FACTOR) * (w // VAE_SCALE_FACTOR) for h, w in condition_sizes)
    prefix = int(text_tokens) + n_cond
    seq = prefix + n_target

    attention = 0
    if dit_config.attention in MATERIALISING_BACKENDS:
        attention = dit_batch * heads * seq * seq * (4 * SCORE_FLOAT32_BUFFERS + act)
    tokens = dit_batch * seq * ((6 * width_d + 3 * mlp) * act + 2 * width_d * 4 + head_dim * 4)
    kv_cache = int(dit_config.num_layers) * 2 * dit_batch * prefix * width_d * act
    latents = dit_batch * (4 * n_target + n_cond) * channels * 4

    vae_act = _float_bytes(vae_config.dtype, platform)
    mult = tuple(int(m) for m in vae_config.dim_mult)
    widest = int(vae_config.decoder_width) * max(mult[:2])
    scores = 4 * SCORE_FLOAT32_BUFFERS + vae_act
    vae_decode = per_device * height * width * (VAE_LIVE_ACTIVATIONS * widest * vae_act
                                                + int(vae_config.out_channels) * 4)
    vae_attention = per_device * n_target * n_target * scores if vae_config.mid_attention else 0
    vae_encode = 0
    enc_widest = int(vae_config.base_dim) * max(1, mult[0])
    for h, w in condition_sizes:
        pixels, latent_pixels = h * w, (h // VAE_SCALE_FACTOR) * (w // VAE_SCALE_FACTOR)
        vae_encode = max(vae_encode, pixels * VAE_LIVE_ACTIVATIONS * enc_widest * vae_act
                         + (latent_pixels * latent_pixels * scores if vae_config.mid_attention else 0))
    return MemoryEstimate(int(tokens), int(attention), int(kv_cache), int(latents), int(vae_decode),
                          int(vae_attention), int(vae_encode))


# --------------------------------------------------------------------------------------------- available memory
def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_available() -> int | None:
    """memory.max - memory.current of this process's cgroup (v2), when it has a limit."""
    try:
        with open("/sys/fs/cgroup/memory.max", encoding="ascii") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current", encoding="ascii") as f:
            current = int(f.read().strip())
        return max(0, int(limit) - current)
    except (OSError, ValueError):
        return None


def host_available_bytes() -> tuple[int | None, str]:
    """Free host memory: /proc/meminfo MemAvailable (or os.sysconf's available pages), capped by a cgroup limit."""
    free, source = _meminfo_available(), "MemAvailable in /proc/meminfo"
    if free is None:
        try:
            free, source = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "os.sysconf available pages"
        except (ValueError, OSError, AttributeError):
            return None, "no host memory figure"
    limit = _cgroup_available()
    if limit is not None and limit < free:
        free, source = limit, "the cgroup's memory.max - memory.current"
    return int(free), source


def available_bytes(device) -> tuple[int | None, str]:
    """(bytes free for new buffers on `device`, what was read); None when the device reports nothing."""
    if device.platform == "cpu":
        free, source = host_available_bytes()
        return free, f"host memory ({source})"
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 - some backends raise instead of returning None
        stats = None
    if not stats or "bytes_limit" not in stats:
        return None, f"{device.platform} device {device.id} reports no memory_stats"
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return free, f"{device.device_kind} {device.id} (memory_stats bytes_limit - bytes_in_use)"


# ------------------------------------------------------------------------------------------------------ the check
def _fits(budget: int, **kwargs) -> bool:
    return estimate(**kwargs).total <= budget


def largest_square(budget: int, **kwargs) -> int | None:
    """The largest side (a multiple of SIZE_MULTIPLE, at most MAX_SIDE) whose square image fits `budget` at the
    given batch, or None when not even SIZE_MULTIPLE does."""
    lo, hi = 0, MAX_SIDE // SIZE_MULTIPLE          # in units of SIZE_MULTIPLE; the estimate grows with the side
    while lo < hi:
        mid = (lo + hi + 1) // 2
        side = mid * SIZE_MULTIPLE
        if _fits(budget, **dict(kwargs, height=side, width=side)):
            lo = mid
        else:
            hi = mid - 1
    return lo * SIZE_MULTIPLE or None


def largest_batch(budget: int, limit: int, multiple: int = 1, **kwargs) -> int:
    """The largest batch (a multiple of `multiple`, below `limit`) that fits `budget`; 0 when none does."""
    lo, hi = 0, max(0, (int(limit) - 1) // multiple)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if _fits(budget, **dict(kwargs, batch=mid * multiple)):
            lo = mid
        else:
            hi = mid - 1
    return lo * multiple


def check(dit_config, vae_config, *, batch: int, height: int, width: int, device, cfg: bool = False,
          text_tokens: int = 0, condition_sizes: Sequence[tuple[int, int]] = (), batch_shards: int = 1) -> None:
    """Raises MemoryBudgetError when `estimate` exceeds what `device` has free, naming the request, the largest
    square size that fits at this batch and the largest batch that fits at this size. Silent when the device
    reports no free-memory figure."""
    platform = device.platform
    shards = 1 if platform == "cpu" else max(1, int(batch_shards))
    free, source = available_bytes(device)
    if free is None:
        return
    kwargs = dict(dit_config=dit_config, vae_config=vae_config, cfg=cfg, text_tokens=text_tokens,
                  condition_sizes=tuple(condition_sizes), platform=platform, batch_shards=shards)
    need = estimate(batch=batch, height=height, width=width, **kwargs)
    if need.total <= free:
        return
    side = largest_square(free, batch=batch, **kwargs)
    most = largest_batch(free, batch, multiple=shards, height=height, width=width, **kwargs)
    request = f"{batch} image(s) of {height}x{width}" + (" with CFG (a doubled denoising batch)" if cfg else "")
    square = (f"the largest square size that fits {batch} image(s) is {side}x{side}" if side else
              f"no size fits {batch} image(s)")
    at_size = (f"at {height}x{width} at most {most} image(s) fit" if most else
               f"not even {'one image' if shards == 1 else f'{shards} images'} of {height}x{width} fits"
               + ("" if shards == 1 else " (one per data-parallel device)"))
    raise MemoryBudgetError(
        f"sampling {request} needs about {gib(need.total)} ({need.summary()}) but {gib(max(free, 0))} is free in "
        f"{source}; {square}, and {at_size}. Sample smaller or fewer images at once, or pass --no-memory-check "
        "(memory_check=False) to try anyway")
