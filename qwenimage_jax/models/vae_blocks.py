"""Building blocks of the Qwen-Image-2 VAE (diffusers `AutoencoderKLQwenImage21`) as channels-last Flax Linen modules.

Images are single frames, so every "causal 3D" convolution of the reference is a plain 2D convolution (the
reference class already stores 2D kernels). The two non-parametric shortcuts, `avg_down_3d` and `dup_up_3d`, keep
an explicit time axis and reproduce the reference reshapes exactly, including the zero frame that temporal stages
prepend to a single image. Submodule names mirror the torch state-dict keys (`down_blocks.0` -> `down_blocks_0`,
`resample.1` -> `resample`) so the converter in `convert/vae.py` is a renaming plus layout transposes.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")
IMAGE_AXES = ("activation_batch", "activation_height", "activation_width", "activation_channels")
RMS_EPS = 1e-12  # clamp on the L2 norm (torch F.normalize)

# torch's default Conv2d init (kaiming_uniform with a=sqrt(5)) == uniform variance 1/(3 fan_in).
_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _constrain(x: jax.Array) -> jax.Array:
    return nn.with_logical_constraint(x, IMAGE_AXES)


class Conv2d(nn.Module):
    """2D convolution with explicit padding; kernel (kh, kw, in, out), bias (out,)."""
    features: int
    kernel_size: int = 3
    stride: int = 1
    padding: Sequence[tuple[int, int]] = ((1, 1), (1, 1))  # ((top, bottom), (left, right))
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # (B, H, W, C_in) -> (B, H', W', features)
        k = self.kernel_size
        kernel = self.param("kernel", nn.with_logical_partitioning(_KERNEL_INIT, CONV_AXES),
                            (k, k, x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                          (self.features,), self.param_dtype)
        x = x.astype(self.dtype)
        kernel = kernel.astype(self.dtype)
        if k == 1 and self.stride == 1 and all(p == (0, 0) for p in self.padding):
            y = jnp.einsum("bhwi,io->bhwo", x, kernel[0, 0])
        else:
            y = lax.conv_general_dilated(x, kernel, (self.stride, self.stride), tuple(self.padding),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + bias.astype(self.dtype)


class RMSNorm(nn.Module):
    """Wan RMS norm: x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma, computed in fp32."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # (..., C) -> (..., C)
        channels = x.shape[-1]
        gamma = self.param("gamma", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (channels,), self.param_dtype)
        x32 = x.astype(jnp.float32)
        sum_sq = jnp.sum(x32 * x32, axis=-1, keepdims=True)
        # sqrt(max(s, eps^2)) == max(sqrt(s), eps) and keeps the gradient finite at s == 0.
        norm = jnp.sqrt(jnp.maximum(sum_sq, RMS_EPS * RMS_EPS))
        y = x32 / norm * math.sqrt(channels) * gamma.astype(jnp.float32)
        return y.astype(self.dtype)


class ResidualBlock(nn.Module):
    """norm1 -> SiLU -> conv1 -> norm2 -> SiLU -> dropout -> conv2, plus a 1x1 conv shortcut when widths differ."""
    out_dim: int
    dropout: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        # (B, H, W, C_in) -> (B, H, W, out_dim)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if x.shape[-1] != self.out_dim:
            shortcut = Conv2d(self.out_dim, 1, padding=((0, 0), (0, 0)), name="conv_shortcut", **kw)(x)
        else:
            shortcut = x.astype(self.dtype)
        h = nn.silu(RMSNorm(name="norm1", **kw)(x))
        h = Conv2d(self.out_dim, name="conv1", **kw)(h)
        h = nn.silu(RMSNorm(name="norm2", **kw)(h))
        h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
        h = Conv2d(self.out_dim, name="conv2", **kw)(h)
        return _constrain(h + shortcut)


class AttentionBlock(nn.Module):
    """Single-head self-attention over all pixels (scale 1/sqrt(C)), 1x1 conv qkv and projection, residual."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # (B, H, W, C) -> (B, H, W, C)
        batch, height, width, channels = x.shape
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        no_pad = ((0, 0), (0, 0))
        h = RMSNorm(name="norm", **kw)(x)
        qkv = Conv2d(3 * channels, 1, padding=no_pad, name="to_qkv", **kw)(h)
        qkv = qkv.reshape(batch, height * width, 3 * channels)
        q, k, v = jnp.split(qkv, 3, axis=-1)  # each (B, HW, C): channels [0:C], [C:2C], [2C:3C]
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / math.sqrt(channels)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        h = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(batch, height, width, channels)
        h = Conv2d(channels, 1, padding=no_pad, name="proj", **kw)(h)
        return _constrain(h + x.astype(self.dtype))


class Resample(nn.Module):
    """`down`: zero-pad right/bottom by 1 then 3x3 stride-2 conv; `up`: nearest x2 then 3x3 conv to `out_dim`.

    The reference's `time_conv` (temporal down/up-sampling) is skipped on the first chunk, so single images never
    use it; those weights are ignored on import.
    """
    mode: str  # "down" | "up"
    out_dim: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # down: (B, H, W, C) -> (B, H/2, W/2, out_dim); up: (B, H, W, C) -> (B, 2H, 2W, out_dim)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.mode == "down":
            return Conv2d(self.out_dim, 3, stride=2, padding=((0, 1), (0, 1)), name="resample", **kw)(x)
        if self.mode == "up":
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-exact x2 == pixel repetition
            return Conv2d(self.out_dim, 3, name="resample", **kw)(x)
        raise ValueError(f"Resample mode must be 'down' or 'up', got {self.mode!r}")


def avg_down_3d(x: jax.Array, out_channels: int, factor_t: int, factor_s: int) -> jax.Array:
    """Space/time-to-channel fold followed by a group mean (reference `AvgDown3D`), channels-last.

    (B, T, H, W, C) -> (B, ceil(T/f_t), H/f_s, W/f_s, out_channels). Time is front-padded with zero frames to a
    multiple of f_t (a single image on a temporal stage gets one zero frame). Folded channel index is
    ((c*f_t + a)*f_s + dy)*f_s + dx, and output channel o averages folded channels [o*g, (o+1)*g).
    """
    batch, frames, height, width, channels = x.shape
    folded = channels * factor_t * factor_s * factor_s
    if folded % out_channels:
        raise ValueError(f"avg_down_3d: {channels} channels x factor {factor_t * factor_s ** 2} is not divisible "
                         f"by out_channels={out_channels}")
    if height % factor_s or width % factor_s:
        raise ValueError(f"avg_down_3d: spatial size {height}x{width} is not divisible by factor_s={factor_s}")
    pad_t = (factor_t - frames % factor_t) % factor_t
    x = jnp.pad(x, ((0, 0), (pad_t, 0), (0, 0), (0, 0), (0, 0)))
    t_out, h_out, w_out = (frames + pad_t) // factor_t, height // factor_s, width // factor_s
    x = x.reshape(batch, t_out, factor_t, h_out, factor_s, w_out, factor_s, channels)
    x = x.transpose(0, 1, 3, 5, 7, 2, 4, 6)  # (B, T', H', W', C, f_t, f_s, f_s)
    x = x.reshape(batch, t_out, h_out, w_out, out_channels, folded // out_channels)
    return jnp.mean(x.astype(jnp.float32), axis=-1).astype(x.dtype)


def dup_up_3d(x: jax.Array, out_channels: int, factor_t: int, factor_s: int, first_chunk: bool) -> jax.Array:
    """Channel repetition then channel-to-space/time unfold (reference `DupUp3D`), channels-last.

    (B, T, H, W, C_in) -> (B, T*f_t, H*f_s, W*f_s, out_channels); with `first_chunk` the first f_t - 1 frames are
    dropped (a single image on a temporal stage keeps only sub-frame 1). Output (o, a, dy, dx) reads input channel
    (((o*f_t + a)*f_s + dy)*f_s + dx) // r with r = out_channels*f_t*f_s^2 / C_in.
    """
    batch, frames, height, width, channels = x.shape
    factor = factor_t * factor_s * factor_s
    if (out_channels * factor) % channels:
        raise ValueError(f"dup_up_3d: out_channels={out_channels} x factor {factor} is not divisible by the "
                         f"{channels} input channels")
    x = jnp.repeat(x, out_channels * factor // channels, axis=-1)
    x = x.reshape(batch, frames, height, width, out_channels, factor_t, factor_s, factor_s)
    x = x.transpose(0, 1, 5, 2, 6, 3, 7, 4)  # (B, T, f_t, H, f_s, W, f_s, C_out)
    x = x.reshape(batch, frames * factor_t, height * factor_s, width * factor_s, out_channels)
    if first_chunk:
        x = x[:, factor_t - 1:]
    return x


class MidBlock(nn.Module):
    """resnets_0 -> attentions_0 (optional) -> resnets_1 at constant width."""
    attention: bool = True
    dropout: float = 0.0
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = _resblock_cls(self.remat)
        x = block(x.shape[-1], self.dropout, name="resnets_0", **kw)(x, deterministic)
        if self.attention:
            x = AttentionBlock(name="attentions_0", **kw)(x)
        return block(x.shape[-1], self.dropout, name="resnets_1", **kw)(x, deterministic)


def _resblock_cls(remat: bool):
    return nn.remat(ResidualBlock, static_argnums=(2,)) if remat else ResidualBlock


class Encoder(nn.Module):
    """Image (B, H, W, in_channels) -> moments (B, H/r, W/r, 2*z_dim), r = 2**(len(dim_mult) - 1)."""
    config: Any  # VAEConfig

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        block = _resblock_cls(cfg.remat)
        dims = [cfg.base_dim * m for m in (1, *cfg.dim_mult)]
        last = len(cfg.dim_mult) - 1
        x = _constrain(Conv2d(dims[0], name="conv_in", **kw)(x))
        flat_index = 0  # plain layout: one flat list of resnets and resamplers
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if cfg.is_residual:
                temporal = bool(cfg.temperal_downsample[i]) if i != last else False
                down = i != last
                shortcut = avg_down_3d(x[:, None], out_dim, 2 if temporal else 1, 2 if down else 1)[:, 0]
                h = _ResidualDownStage(out_dim, cfg.num_res_blocks, down, cfg.dropout, cfg.remat,
                                       name=f"down_blocks_{i}", **kw)(x, deterministic)
                x = _constrain(h + shortcut.astype(h.dtype))
            else:
                for _ in range(cfg.num_res_blocks):
                    x = block(out_dim, cfg.dropout, name=f"down_blocks_{flat_index}", **kw)(x, deterministic)
                    flat_index += 1
                if i != last:
                    x = Resample("down", out_dim, name=f"down_blocks_{flat_index}", **kw)(x)
                    flat_index += 1
        x = MidBlock(cfg.mid_attention, cfg.dropout, cfg.remat, name="mid_block", **kw)(x, deterministic)
        x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
        return Conv2d(2 * cfg.z_dim, name="conv_out", **kw)(x)


class _ResidualDownStage(nn.Module):
    """Main path of a residual down block: `num_res_blocks` resnets then an optional stride-2 downsampler."""
    out_dim: int
    num_res_blocks: int
    down: bool
    dropout: float = 0.0
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = _resblock_cls(self.remat)
        for j in range(self.num_res_blocks):
            x = block(self.out_dim, self.dropout, name=f"resnets_{j}", **kw)(x, deterministic)
        if self.down:
            x = Resample("down", self.out_dim, name="downsampler", **kw)(x)
        return x


class _UpStage(nn.Module):
    """Up block: `num_res_blocks + 1` resnets then an optional nearest-x2 upsampler (residual or plain layout)."""
    out_dim: int
    num_resnets: int
    upsample_dim: int | None  # None: no upsampler
    upsampler_name: str = "upsampler"
    dropout: float = 0.0
    remat: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block = _resblock_cls(self.remat)
        for j in range(self.num_resnets):
            x = block(self.out_dim, self.dropout, name=f"resnets_{j}", **kw)(x, deterministic)
        if self.upsample_dim is not None:
            x = Resample("up", self.upsample_dim, name=self.upsampler_name, **kw)(x)
        return x


class Decoder(nn.Module):
    """Latents (B, h, w, z_dim) -> image (B, h*r, w*r, out_channels), before the [-1, 1] clamp."""
    config: Any  # VAEConfig

    @nn.compact
    def __call__(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        base = cfg.decoder_width
        dims = [base * m for m in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_up = tuple(cfg.temperal_downsample)[::-1]
        last = len(cfg.dim_mult) - 1
        x = _constrain(Conv2d(dims[0], name="conv_in", **kw)(z))
        x = MidBlock(cfg.mid_attention, cfg.dropout, cfg.remat, name="mid_block", **kw)(x, deterministic)
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != last
            if cfg.is_residual:
                stage = _UpStage(out_dim, cfg.num_res_blocks + 1, out_dim if up else None, "upsampler",
                                 cfg.dropout, cfg.remat, name=f"up_blocks_{i}", **kw)
                h = stage(x, deterministic)
                if up:
                    temporal = bool(temporal_up[i])
                    shortcut = dup_up_3d(x[:, None], out_dim, 2 if temporal else 1, 2, first_chunk=True)[:, 0]
                    h = h + shortcut.astype(h.dtype)
                x = _constrain(h)
            else:
                stage = _UpStage(out_dim, cfg.num_res_blocks + 1, out_dim // 2 if up else None, "upsamplers_0",
                                 cfg.dropout, cfg.remat, name=f"up_blocks_{i}", **kw)
                x = _constrain(stage(x, deterministic))
        x = nn.silu(RMSNorm(name="norm_out", **kw)(x))
        return Conv2d(cfg.out_channels, name="conv_out", **kw)(x)
