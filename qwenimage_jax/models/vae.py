"""The Qwen-Image-2 VAE (diffusers `AutoencoderKLQwenImage21`, f16c64, RGBA) in Flax Linen, plus the loaded object.

Conventions:
  * Channels-last. Images are (batch, height, width, channels) in [-1, 1] (4 channels, RGBA, for the released
    model); latents are (batch, height / r, width / r, z_dim) with r = 2**(len(dim_mult) - 1) (16 when released).
    Height and width must be multiples of r.
  * `QwenImageVAE.encode(x) -> (mean, logvar)` (fp32; logvar clamped to [-30, 20]) and
    `QwenImageVAE.decode(z) -> x` (fp32, clamped to [-1, 1]) are for `module.apply({"params": p}, x,
    method="encode")`; `__call__(x, sample_key=None)` returns (reconstruction, mean, logvar) for training.
  * Raw latents are what the encoder emits; "normalized" latents are (z - latents_mean) / latents_std per
    channel, the space the DiT works in. `VAE.encode(..., normalize=True)` and `VAE.decode(..., normalized=True)`
    convert.
  * Randomness only through explicit keys: posterior sampling `mean + exp(logvar / 2) * N(0, 1)` with `key`.
  * `VAEConfig.dtype` is the compute dtype, `param_dtype` the parameter dtype; norms and softmax run in fp32.
  * Params carry logical axis names (`conv_height, conv_width, conv_in, conv_out`, `norm`); `param_shardings`
    maps them to a mesh with `parallel/rules.py`.
  * `checkpoints.load("vae", path)` reads a diffusers component dir (config.json + safetensors) or our Orbax dir and returns a
    `VAE` holding `.module`, `.params`, `.config` (the raw diffusers config dict) and jitted encode/decode.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.errors import ConfigError, WeightsError
from qwenimage_jax.models.component import Component
from qwenimage_jax.models.vae_blocks import Conv2d, Decoder, Encoder

DIFFUSERS_CLASS = "AutoencoderKLQwenImage21"


class VAEConfigError(ConfigError, ValueError):
    """A VAE config (a trainer config's `vae` fields or a config.json) this port cannot build; still a ValueError."""


class VAEComponentError(WeightsError, ValueError):
    """A config.json of another component (a transformer, a text encoder) handed to the VAE."""

# Class defaults of `AutoencoderKLQwenImage21` (the released per-channel latent statistics).
DEFAULT_LATENTS_MEAN = (
    0.5126, 0.7721, -0.0631, 1.3506, -0.7855, -2.1025, -0.3458, 1.3722, 1.8873, -1.7177, -0.6510, 0.2732,
    0.7562, -0.6163, -1.0277, 3.8363, 2.0210, 0.0472, 0.9320, 2.0087, 2.4954, -0.1391, -1.4249, 1.8464,
    -0.5236, 1.2826, 3.7046, -1.3035, 2.7286, -1.4518, -1.9036, -1.9955, -0.0342, -1.0265, -0.7636, 3.0555,
    0.0746, -3.0751, -0.1076, 1.7376, -1.0914, -1.9435, -0.2784, -1.3680, 0.4809, -0.4433, 0.3764, 0.5729,
    -2.0595, 1.0960, -1.3260, -2.0211, -5.0179, 0.5275, 4.0162, 1.8505, 0.3026, 1.9373, 1.4937, 0.2632,
    0.5547, -1.7121, -0.1562, 0.0304,
)
DEFAULT_LATENTS_STD = (
    3.2001, 3.2936, 3.4321, 3.0091, 3.1061, 4.0379, 4.0705, 3.7910, 3.0785, 3.6500, 3.9308, 3.0904,
    2.8778, 3.7675, 3.7320, 5.0756, 3.2864, 4.0397, 3.1317, 4.0443, 2.9249, 3.7446, 3.0930, 3.5620,
    3.1165, 3.8154, 3.2010, 2.6713, 2.8938, 4.3043, 3.7126, 2.9823, 4.0047, 3.6624, 3.4126, 3.0153,
    3.1567, 2.9683, 3.6019, 2.8791, 3.1520, 3.1225, 3.3627, 2.8659, 3.1513, 4.0000, 3.6617, 3.1946,
    3.0709, 3.1713, 3.0373, 3.2186, 2.9226, 3.1689, 3.1566, 2.8987, 3.2062, 3.2116, 3.0218, 2.9888,
    3.1620, 3.6307, 3.3037, 3.0513,
)

# Fields of the diffusers config.json we read (names as diffusers spells them).
_DIFFUSERS_FIELDS = (
    "base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
    "dropout", "latents_mean", "latents_std", "is_residual", "in_channels", "out_channels", "patch_size",
    "scale_factor_temporal", "scale_factor_spatial",
)
# Our extensions, stored in config.json only when they differ from the default.
_EXTENSION_FIELDS = ("mid_attention",)
# Runtime options, never stored.
_RUNTIME_FIELDS = ("dtype", "param_dtype", "remat")


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Structure of the VAE, in diffusers field names (`temperal_downsample` is their spelling), plus runtime options.

    `mid_attention=False` drops the mid-block attentions (the attention-free VAE-2.0 variant). As in diffusers,
    the residual layout ignores `attn_scales`; the plain layout (`is_residual=False`) requires it empty.
    The spatial compression is 2**(len(dim_mult) - 1); `scale_factor_spatial` is kept only as metadata.
    """
    base_dim: int = 96
    decoder_base_dim: int | None = 144
    z_dim: int = 64
    dim_mult: tuple[int, ...] = (1, 2, 4, 8, 8)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True, True)
    dropout: float = 0.0
    latents_mean: tuple[float, ...] = DEFAULT_LATENTS_MEAN
    latents_std: tuple[float, ...] = DEFAULT_LATENTS_STD
    is_residual: bool = True
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int | None = None
    scale_factor_temporal: int | None = 8
    scale_factor_spatial: int | None = 16
    mid_attention: bool = True
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value))
        self._validate()

    # ---------------------------------------------------------------------------------------------- validation
    def _validate(self):
        def fail(msg):
            raise VAEConfigError(f"unsupported VAE config: {msg}")

        if self.attn_scales and not self.is_residual:
            fail(f"attn_scales={list(self.attn_scales)} with is_residual=False: the reference encoder cannot run "
                 "down-path attention (its forward passes a feature cache the attention block does not accept); "
                 "use attn_scales=[]")
        if self.patch_size not in (None, 1):
            fail(f"patch_size={self.patch_size!r}; only patch_size=None (no pixel patchify) is implemented")
        if not self.dim_mult or any(int(m) <= 0 for m in self.dim_mult):
            fail(f"dim_mult={list(self.dim_mult)} must be a non-empty list of positive ints")
        for name in ("base_dim", "z_dim", "num_res_blocks", "in_channels", "out_channels"):
            if int(getattr(self, name)) <= 0:
                fail(f"{name}={getattr(self, name)!r} must be positive")
        if self.decoder_base_dim is not None and int(self.decoder_base_dim) <= 0:
            fail(f"decoder_base_dim={self.decoder_base_dim!r} must be positive or None")
        if len(self.temperal_downsample) < len(self.dim_mult) - 1:
            fail(f"temperal_downsample has {len(self.temperal_downsample)} entries; dim_mult={list(self.dim_mult)} "
                 f"needs {len(self.dim_mult) - 1}")
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                fail(f"{name} has {len(getattr(self, name))} values but z_dim={self.z_dim}")
        if any(float(s) == 0.0 for s in self.latents_std):
            fail("latents_std contains 0")
        if not 0.0 <= float(self.dropout) < 1.0:
            fail(f"dropout={self.dropout} must be in [0, 1)")
        if self.is_residual:
            last = len(self.dim_mult) - 1
            enc = [self.base_dim * m for m in (1, *self.dim_mult)]
            dec_dims = [self.decoder_width * m for m in (self.dim_mult[-1], *self.dim_mult[::-1])]
            up_t = tuple(self.temperal_downsample)[::-1]
            for i in range(len(self.dim_mult)):
                f_t = 2 if (i != last and self.temperal_downsample[i]) else 1
                f_s = 2 if i != last else 1
                if enc[i] * f_t * f_s * f_s % enc[i + 1]:
                    fail(f"encoder stage {i}: {enc[i]} channels x {f_t * f_s * f_s} is not divisible by "
                         f"{enc[i + 1]} (AvgDown3D shortcut)")
                if i != last and dec_dims[i + 1] * (2 if up_t[i] else 1) * 4 % dec_dims[i]:
                    fail(f"decoder stage {i}: {dec_dims[i + 1]} channels x factor is not divisible by "
                         f"{dec_dims[i]} (DupUp3D shortcut)")

    # ------------------------------------------------------------------------------------------------- derived
    @property
    def decoder_width(self) -> int:
        return int(self.decoder_base_dim if self.decoder_base_dim is not None else self.base_dim)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    # -------------------------------------------------------------------------------------------- diffusers io
    @classmethod
    def from_diffusers(cls, raw: Mapping[str, Any], **overrides) -> "VAEConfig":
        """Reads a diffusers `config.json` dict; `overrides` set runtime options (dtype, param_dtype, remat, ...).

        Keys starting with "_" (`_class_name`, `_diffusers_version`, ...) are metadata; any other unknown key is an
        error, so a config this port does not understand never loads silently.
        """
        raw = dict(raw)
        class_name = raw.get("_class_name")
        if class_name is not None and class_name != DIFFUSERS_CLASS:
            raise VAEComponentError(f"config is for {class_name!r}, not {DIFFUSERS_CLASS!r}; this loader only "
                                    "handles the Qwen-Image-2 VAE: point at the model's vae/ directory")
        known = set(_DIFFUSERS_FIELDS) | set(_EXTENSION_FIELDS)
        unknown = sorted(k for k in raw if not k.startswith("_") and k not in known)
        if unknown:
            raise VAEConfigError(f"unknown VAE config field(s) {unknown}; supported fields: {sorted(known)}")
        kwargs = {k: raw[k] for k in known if k in raw}
        bad = sorted(set(overrides) - set(_RUNTIME_FIELDS) - known)
        if bad:
            raise TypeError(f"unknown VAEConfig override(s) {bad}")
        kwargs.update(overrides)
        return cls(**kwargs)

    def to_diffusers(self) -> dict:
        """The diffusers `config.json` dict (plus `mid_attention` when it is off)."""
        out = {"_class_name": DIFFUSERS_CLASS}
        for name in _DIFFUSERS_FIELDS:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        if not self.mid_attention:
            out["mid_attention"] = False
        return out


def check_image_shape(shape: tuple[int, ...], config: VAEConfig) -> None:
    """Raises a ValueError naming the problem unless `shape` is (B, H, W, in_channels) with H, W multiples of r."""
    if len(shape) != 4:
        raise ValueError(f"images must be (batch, height, width, channels); got shape {tuple(shape)}")
    _, height, width, channels = shape
    if channels != config.in_channels:
        hint = " (RGBA: append an alpha channel of 1.0)" if config.in_channels == 4 and channels == 3 else ""
        raise ValueError(f"images have {channels} channels but this VAE takes {config.in_channels}{hint}")
    r = config.spatial_compression
    for name, size in (("height", height), ("width", width)):
        if size % r or size == 0:
            lower, upper = (size // r) * r, (size // r + 1) * r
            options = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            raise ValueError(f"image {name} {size} is not a multiple of {r} (the VAE's spatial compression); "
                             f"resize or crop to {options}")


def check_latent_shape(shape: tuple[int, ...], config: VAEConfig) -> None:
    if len(shape) != 4:
        raise ValueError(f"latents must be (batch, height, width, z_dim); got shape {tuple(shape)}")
    if shape[-1] != config.z_dim:
        raise ValueError(f"latents have {shape[-1]} channels but this VAE's z_dim is {config.z_dim}")


class QwenImageVAE(nn.Module):
    """Encoder + quant_conv -> diagonal Gaussian posterior; post_quant_conv + decoder -> image in [-1, 1]."""
    config: VAEConfig

    def setup(self):
        cfg = self.config
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        no_pad = ((0, 0), (0, 0))
        self.encoder = Encoder(cfg)
        self.quant_conv = Conv2d(2 * cfg.z_dim, 1, padding=no_pad, **kw)
        self.post_quant_conv = Conv2d(cfg.z_dim, 1, padding=no_pad, **kw)
        self.decoder = Decoder(cfg)

    def encode(self, x: jax.Array, deterministic: bool = True) -> tuple[jax.Array, jax.Array]:
        # (B, H, W, in_channels) in [-1, 1] -> mean, logvar: (B, H/r, W/r, z_dim) fp32
        check_image_shape(x.shape, self.config)
        moments = self.quant_conv(self.encoder(x, deterministic)).astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z: jax.Array, deterministic: bool = True) -> jax.Array:
        # (B, h, w, z_dim) raw latents -> (B, h*r, w*r, out_channels) fp32 in [-1, 1]
        check_latent_shape(z.shape, self.config)
        x = self.decoder(self.post_quant_conv(z), deterministic)
        return jnp.clip(x.astype(jnp.float32), -1.0, 1.0)

    def __call__(self, x: jax.Array, sample_key: jax.Array | None = None, deterministic: bool = True):
        # (B, H, W, C) -> reconstruction (B, H, W, out_channels), mean, logvar (B, H/r, W/r, z_dim)
        mean, logvar = self.encode(x, deterministic)
        z = mean if sample_key is None else sample_posterior(mean, logvar, sample_key)
        return self.decode(z, deterministic), mean, logvar


def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
    """mean + exp(logvar / 2) * eps, eps ~ N(0, 1) drawn from `key`."""
    eps = jax.random.normal(key, mean.shape, jnp.float32)
    return mean + jnp.exp(0.5 * logvar) * eps


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all but the batch axis -> (B,)."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


# ------------------------------------------------------------------------------------------------- loader object
def _encode_apply(module, params, images, key, normalize, mean, std):
    latent_mean, logvar = module.apply({"params": params}, images, method="encode")
    z = latent_mean if key is None else sample_posterior(latent_mean, logvar, key)
    return (z - mean) / std if normalize else z


def _decode_apply(module, params, latents, normalized, mean, std):
    z = latents.astype(jnp.float32) * std + mean if normalized else latents
    return module.apply({"params": params}, z, method="decode")


class VAE(Component):
    """A loaded VAE: `.module` (QwenImageVAE), `.params`, `.config` (raw diffusers dict), `.vae_config`,
    `.latents_mean` / `.latents_std` (z_dim,), and jitted `encode` / `decode`."""

    def __init__(self, module: QwenImageVAE, params: Any, config: Mapping[str, Any]):
        self.module = module
        self.params = params
        self.config = dict(config)
        self.vae_config = module.config
        self.latents_mean = jnp.asarray(self.vae_config.latents_mean, jnp.float32)
        self.latents_std = jnp.asarray(self.vae_config.latents_std, jnp.float32)
        self._encode = jax.jit(functools.partial(_encode_apply, module), static_argnames=("normalize",))
        self._decode = jax.jit(functools.partial(_decode_apply, module), static_argnames=("normalized",))

    @property
    def spatial_compression(self) -> int:
        return self.vae_config.spatial_compression

    def encode(self, images, *, key: jax.Array | None = None, normalize: bool = False) -> jax.Array:
        """images (B, H, W, C) in [-1, 1] -> latents (B, H/r, W/r, z_dim): posterior mean, or a sample if `key`;
        normalised (z - latents_mean) / latents_std if `normalize`."""
        check_image_shape(np.shape(images), self.vae_config)
        return self._encode(self.params, images, key, normalize=normalize, mean=self.latents_mean,
                            std=self.latents_std)

    def decode(self, latents, *, normalized: bool = False) -> jax.Array:
        """latents (B, h, w, z_dim) (normalised ones if `normalized`) -> images (B, h*r, w*r, C) in [-1, 1]."""
        check_latent_shape(np.shape(latents), self.vae_config)
        return self._decode(self.params, latents, normalized=normalized, mean=self.latents_mean,
                            std=self.latents_std)

    def normalize_latents(self, latents: jax.Array) -> jax.Array:
        return (latents - self.latents_mean) / self.latents_std

    def denormalize_latents(self, latents: jax.Array) -> jax.Array:
        return latents * self.latents_std + self.latents_mean


# ------------------------------------------------------------------------------------------ init / abstract / load
def _as_config(config: VAEConfig | Mapping[str, Any], **overrides) -> VAEConfig:
    if isinstance(config, VAEConfig):
        return dataclasses.replace(config, **overrides) if overrides else config
    return VAEConfig.from_diffusers(config, **overrides)


def _dummy_images(cfg: VAEConfig) -> jax.ShapeDtypeStruct:
    r = cfg.spatial_compression
    return jax.ShapeDtypeStruct((1, r, r, cfg.in_channels), jnp.float32)


def abstract_params(config: VAEConfig) -> Any:
    """Params tree of ShapeDtypeStructs, boxed with logical axis names (no memory allocated)."""
    module = QwenImageVAE(config)
    return jax.eval_shape(module.init, jax.random.key(0), _dummy_images(config))["params"]


def param_shardings(config: VAEConfig, mesh: jax.sharding.Mesh) -> Any:
    """NamedShardings (unboxed params structure) from the logical axis names and `parallel/rules.py`."""
    from qwenimage_jax.parallel.rules import logical_shardings

    return logical_shardings(abstract_params(config), mesh)


def init_vae(config: VAEConfig | Mapping[str, Any], key: jax.Array, *, shardings: Any = None, **overrides) -> VAE:
    """Fresh random VAE (for training from scratch); init runs under jit, onto `shardings` when given."""
    cfg = _as_config(config, **overrides)
    module = QwenImageVAE(cfg)
    dummy = jnp.zeros(_dummy_images(cfg).shape, jnp.float32)

    def init(rng):
        return nn.meta.unbox(module.init(rng, dummy)["params"])

    params = jax.jit(init, out_shardings=shardings)(key)
    return VAE(module, params, cfg.to_diffusers())
