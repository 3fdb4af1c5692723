"""DINOv2 ViT (transformers `Dinov2Model`) in Flax: a frozen semantic feature extractor for VAE alignment.

Semantics follow transformers 5.x `Dinov2Model` in eval mode: patch-conv embeddings, CLS token, learned position
embeddings bicubically interpolated (torch `interpolate(mode="bicubic", align_corners=False)`, A = -0.75) to the
input's patch grid, pre-norm blocks with layer scale (MLP with GELU, or SwiGLU when `use_swiglu_ffn`), final
LayerNorm. Layers run under `nn.scan` (params carry a leading `layers` axis). No mask token, no dropout.

    dino = checkpoints.load("dinov2", path)          # transformers dir (config.json + model.safetensors) or Orbax dir
    out = dino(pixel_values)                         # NHWC, ImageNet-normalised -> last_hidden_state, hidden_states
    grid = dino.features(images, layer=12)           # NHWC in [-1, 1] -> (B, H/p, W/p, hidden) patch features

`hidden_states[k]` is the input to block k (k = 0: embeddings; k = L: last block, before the final LayerNorm),
exactly as transformers returns them with `output_hidden_states=True`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.models.component import Component

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_ACTIVATIONS = {
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class Dinov2Config:
    """The `Dinov2Config` fields that matter for inference, plus runtime dtypes."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    mlp_ratio: float = 4
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-6
    image_size: int = 224
    patch_size: int = 14
    num_channels: int = 3
    qkv_bias: bool = True
    layerscale_value: float = 1.0
    use_swiglu_ffn: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @classmethod
    def from_transformers(cls, raw: dict, **runtime) -> "Dinov2Config":
        if raw.get("model_type", "dinov2") != "dinov2":
            raise ValueError(f"config model_type is {raw.get('model_type')!r}, expected 'dinov2'")
        fields = {f.name for f in dataclasses.fields(cls)} - {"dtype", "param_dtype"}
        kwargs = {k: raw[k] for k in fields if k in raw}
        for key in ("image_size", "patch_size"):
            value = kwargs.get(key)
            if isinstance(value, (list, tuple)):
                if value[0] != value[1]:
                    raise ValueError(f"non-square {key} {value} is not supported")
                kwargs[key] = int(value[0])
        if kwargs.get("hidden_act", "gelu") not in _ACTIVATIONS:
            raise ValueError(f"hidden_act {kwargs['hidden_act']!r} unsupported; choose from {sorted(_ACTIVATIONS)}")
        return cls(**kwargs, **runtime)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def mlp_hidden(self) -> int:
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.use_swiglu_ffn:  # transformers' rounding of the SwiGLU width
            hidden = (int(hidden * 2 / 3) + 7) // 8 * 8
        return hidden

    @property
    def num_positions(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def _dense(features: int, axes: tuple[str, str], cfg: Dinov2Config, name: str, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                    bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[1],)))


def _layer_norm(cfg: Dinov2Config, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=jnp.float32, param_dtype=cfg.param_dtype, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("norm",)))


def bicubic_matrix(in_size: int, out_size: int) -> np.ndarray:
    """(out, in) matrix of torch's bicubic resize (align_corners=False, A=-0.75, edge-clamped taps)."""
    a = -0.75

    def weights(t: float) -> list[float]:
        def near(x):  # |x| <= 1
            return ((a + 2) * x - (a + 3)) * x * x + 1

        def far(x):  # 1 < |x| < 2
            return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

        return [far(t + 1), near(t), near(1 - t), far(2 - t)]

    matrix = np.zeros((out_size, in_size), np.float64)
    scale = in_size / out_size
    for i in range(out_size):
        source = (i + 0.5) * scale - 0.5
        base = int(np.floor(source))
        for offset, w in zip(range(-1, 3), weights(source - base)):
            matrix[i, min(max(base + offset, 0), in_size - 1)] += w
    return matrix


class Dinov2Embeddings(nn.Module):
    cfg: Dinov2Config

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        # pixel_values: (B, H, W, C) -> (B, 1 + h*w, hidden)
        cfg = self.cfg
        batch, height, width, channels = pixel_values.shape
        if channels != cfg.num_channels:
            raise ValueError(f"pixel_values have {channels} channels, the model expects {cfg.num_channels}")
        patch = cfg.patch_size
        patches = nn.Conv(cfg.hidden_size, (patch, patch), strides=(patch, patch), padding="VALID",
                          dtype=cfg.dtype, param_dtype=cfg.param_dtype, name="patch_embeddings",
                          kernel_init=nn.with_logical_partitioning(
                              nn.initializers.lecun_normal(), ("conv_height", "conv_width", "conv_in", "embed")),
                          bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)))(
            pixel_values.astype(cfg.dtype))
        grid_h, grid_w = patches.shape[1], patches.shape[2]
        patches = patches.reshape(batch, grid_h * grid_w, cfg.hidden_size)
        cls_token = self.param("cls_token", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, None, "embed")), (1, 1, cfg.hidden_size), cfg.param_dtype)
        positions = self.param("position_embeddings", nn.with_logical_partitioning(
            nn.initializers.normal(0.02), (None, None, "embed")), (1, cfg.num_positions + 1, cfg.hidden_size),
            cfg.param_dtype)
        tokens = jnp.concatenate([jnp.broadcast_to(cls_token.astype(cfg.dtype), (batch, 1, cfg.hidden_size)),
                                  patches], axis=1)
        return tokens + self.interpolate_positions(positions, grid_h, grid_w).astype(cfg.dtype)

    def interpolate_positions(self, positions: jax.Array, grid_h: int, grid_w: int) -> jax.Array:
        """(1, 1 + N, hidden) learned table -> (1, 1 + grid_h*grid_w, hidden), bicubic in fp32."""
        side = int(round((positions.shape[1] - 1) ** 0.5))
        if grid_h == side and grid_w == side:
            return positions
        table = positions[:, 1:].astype(jnp.float32).reshape(side, side, -1)
        rows = jnp.asarray(bicubic_matrix(side, grid_h), jnp.float32)
        cols = jnp.asarray(bicubic_matrix(side, grid_w), jnp.float32)
        table = jnp.einsum("ys,xt,std->yxd", rows, cols, table, precision=jax.lax.Precision.HIGHEST)
        table = table.reshape(1, grid_h * grid_w, -1).astype(positions.dtype)
        return jnp.concatenate([positions[:, :1], table], axis=1)


class Dinov2Layer(nn.Module):
    """Pre-norm ViT block with layer scale. Scan body: (carry, _) -> (carry, carry_in) to record hidden states."""
    cfg: Dinov2Config

    @nn.compact
    def __call__(self, hidden: jax.Array, _=None):
        # hidden: (B, T, hidden)
        cfg = self.cfg
        layer_input = hidden
        hidden = nn.with_logical_constraint(hidden, ("activation_batch", "activation_length", "activation_embed"))
        normed = _layer_norm(cfg, "norm1")(hidden).astype(cfg.dtype)
        inner = cfg.num_attention_heads * cfg.head_dim
        split = lambda x: x.reshape(*x.shape[:2], cfg.num_attention_heads, cfg.head_dim)  # noqa: E731
        query = split(_dense(inner, ("embed", "heads"), cfg, "q_proj", cfg.qkv_bias)(normed))
        key = split(_dense(inner, ("embed", "heads"), cfg, "k_proj", cfg.qkv_bias)(normed))
        value = split(_dense(inner, ("embed", "heads"), cfg, "v_proj", cfg.qkv_bias)(normed))
        logits = jnp.einsum("bqhd,bkhd->bhqk", query, key).astype(jnp.float32) * cfg.head_dim ** -0.5
        probs = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)
        attended = jnp.einsum("bhqk,bkhd->bqhd", probs, value).reshape(*hidden.shape[:2], inner)
        attended = _dense(cfg.hidden_size, ("heads", "embed"), cfg, "o_proj")(attended)
        hidden = hidden + attended * self._scale("layer_scale1")

        normed = _layer_norm(cfg, "norm2")(hidden).astype(cfg.dtype)
        if cfg.use_swiglu_ffn:
            gate = _dense(cfg.mlp_hidden, ("embed", "mlp"), cfg, "gate_proj")(normed)
            up = _dense(cfg.mlp_hidden, ("embed", "mlp"), cfg, "up_proj")(normed)
            mlp = _dense(cfg.hidden_size, ("mlp", "embed"), cfg, "down_proj")(jax.nn.silu(gate) * up)
        else:
            mlp = _ACTIVATIONS[cfg.hidden_act](_dense(cfg.mlp_hidden, ("embed", "mlp"), cfg, "fc1")(normed))
            mlp = _dense(cfg.hidden_size, ("mlp", "embed"), cfg, "fc2")(mlp)
        hidden = hidden + mlp * self._scale("layer_scale2")
        return hidden, layer_input

    def _scale(self, name: str) -> jax.Array:
        cfg = self.cfg
        return self.param(name, nn.with_logical_partitioning(
            nn.initializers.constant(cfg.layerscale_value), ("norm",)), (cfg.hidden_size,), cfg.param_dtype
        ).astype(cfg.dtype)


class Dinov2Model(nn.Module):
    """Embeddings -> `num_hidden_layers` blocks (scanned) -> final LayerNorm.

    Returns {'last_hidden_state': (B, 1+h*w, hidden) after the final norm,
             'hidden_states': (L+1, B, 1+h*w, hidden) [embeddings, block 1, ..., block L (pre-norm)]}.
    """
    cfg: Dinov2Config
    final_norm: bool = True

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> dict[str, jax.Array]:
        cfg = self.cfg
        hidden = Dinov2Embeddings(cfg, name="embeddings")(pixel_values)
        blocks = nn.scan(Dinov2Layer, variable_axes={"params": 0}, split_rngs={"params": True},
                         length=cfg.num_hidden_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        hidden, inputs = blocks(cfg, name="encoder")(hidden, None)
        hidden_states = jnp.concatenate([inputs, hidden[None]], axis=0)
        outputs = {"hidden_states": hidden_states}
        if self.final_norm:
            outputs["last_hidden_state"] = _layer_norm(cfg, "layernorm")(hidden).astype(cfg.dtype)
        return outputs


def imagenet_normalize(images: jax.Array) -> jax.Array:
    """(B, H, W, 3) in [-1, 1] -> ImageNet mean/std normalised pixel values (DINOv2's preprocessing)."""
    unit = (images.astype(jnp.float32) + 1.0) * 0.5
    return (unit - jnp.asarray(IMAGENET_MEAN, jnp.float32)) / jnp.asarray(IMAGENET_STD, jnp.float32)


@dataclasses.dataclass
class Dinov2(Component):
    """A loaded DINOv2: `.module`, `.params`, `.config` (the transformers dict), `.cfg` (Dinov2Config)."""
    module: Dinov2Model
    params: dict
    config: dict
    cfg: Dinov2Config

    @property
    def model_config(self) -> Dinov2Config:
        return self.cfg

    def __call__(self, pixel_values) -> dict[str, jax.Array]:
        """pixel_values: (B, H, W, C) ImageNet-normalised, H and W multiples of the patch size."""
        return _apply_full(self.module, self.params, self._check(jnp.asarray(pixel_values)))

    def features(self, images, layer: int, normalize_input: bool = True) -> jax.Array:
        """Patch features after block `layer` (1..L; 0 = embeddings), without the final norm.

        images: (B, H, W, 3) in [-1, 1] (ImageNet-normalised here unless `normalize_input=False`).
        Returns (B, H / patch, W / patch, hidden). Blocks after `layer` are not computed.
        """
        if not 0 <= layer <= self.cfg.num_hidden_layers:
            raise ValueError(f"layer {layer} out of range; DINOv2 here has blocks 1..{self.cfg.num_hidden_layers}")
        images = self._check(jnp.asarray(images))
        pixel_values = imagenet_normalize(images) if normalize_input else images
        return _features(self.cfg, self.params, pixel_values, layer)

    def _check(self, images):
        patch = self.cfg.patch_size
        if images.ndim != 4 or images.shape[1] % patch or images.shape[2] % patch:
            raise ValueError(f"images must be (batch, H, W, C) with H and W multiples of the patch size {patch}, "
                             f"got {images.shape}; resize e.g. to 224x224")
        return images


@functools.partial(jax.jit, static_argnums=0)
def _apply_full(module, params, pixel_values):
    return module.apply({"params": params}, pixel_values)


@functools.partial(jax.jit, static_argnums=(0, 3))
def _features(cfg: Dinov2Config, params, pixel_values, layer: int):
    truncated = dataclasses.replace(cfg, num_hidden_layers=max(layer, 1))
    sub = {"embeddings": params["embeddings"],
           "encoder": jax.tree.map(lambda leaf: leaf[:max(layer, 1)], params["encoder"])}
    states = Dinov2Model(truncated, final_norm=False).apply({"params": sub}, pixel_values)["hidden_states"]
    tokens = states[layer][:, 1:]  # drop CLS: (B, h*w, hidden)
    batch, height, width = pixel_values.shape[:3]
    return tokens.reshape(batch, height // cfg.patch_size, width // cfg.patch_size, cfg.hidden_size)


def abstract_params(cfg: Dinov2Config):
    """Boxed abstract params (ShapeDtypeStructs with logical axis names)."""
    probe = jnp.zeros((1, cfg.patch_size, cfg.patch_size, cfg.num_channels), jnp.float32)
    return jax.eval_shape(lambda: Dinov2Model(cfg).init(jax.random.key(0), probe))["params"]
