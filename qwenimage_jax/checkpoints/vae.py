"""Torch-key -> Flax-path plan for the Qwen-Image-2 VAE (diffusers `AutoencoderKLQwenImage21`).

The plan is written from the config (it walks the same stage structure as the diffusers constructor), so a
module/plan disagreement shows up as a `WeightKeyError` in `assemble_params`. Layouts: Conv2d `(O, I, kh, kw)` ->
`(kh, kw, I, O)`; RMS `gamma (C, 1, 1[, 1])` -> `(C,)`; biases unchanged. The `time_conv` weights of the
resamplers are skipped for single frames by the reference and are ignored here (`VAE_IGNORE`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from qwenimage_jax.checkpoints.params import WeightSpec, conv2d_kernel, unchanged

if TYPE_CHECKING:
    from qwenimage_jax.models.vae import VAEConfig

# Checkpoint keys knowingly unused for images (temporal resampling convs).
VAE_IGNORE = ("*.time_conv.weight", "*.time_conv.bias")


def _flax_path(torch_prefix: str) -> tuple[str, ...]:
    """'encoder.down_blocks.0.resnets.1.conv1' -> ('encoder', 'down_blocks_0', 'resnets_1', 'conv1');
    a Resample's 'resample.1' conv -> 'resample'."""
    parts = torch_prefix.split(".")
    out: list[str] = []
    for part in parts:
        if part.isdigit():
            if out and out[-1] == "resample":
                continue
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


def _gamma(key: str) -> WeightSpec:
    return WeightSpec((key,), lambda a: np.reshape(a[0], (-1,)))


class _PlanBuilder:
    def __init__(self):
        self.plan: dict[tuple[str, ...], WeightSpec] = {}

    def conv(self, prefix: str):
        path = _flax_path(prefix)
        self.plan[path + ("kernel",)] = conv2d_kernel(f"{prefix}.weight")
        self.plan[path + ("bias",)] = unchanged(f"{prefix}.bias")

    def norm(self, prefix: str):
        self.plan[_flax_path(prefix) + ("gamma",)] = _gamma(f"{prefix}.gamma")

    def resblock(self, prefix: str, in_dim: int, out_dim: int):
        self.norm(f"{prefix}.norm1")
        self.conv(f"{prefix}.conv1")
        self.norm(f"{prefix}.norm2")
        self.conv(f"{prefix}.conv2")
        if in_dim != out_dim:
            self.conv(f"{prefix}.conv_shortcut")

    def attention(self, prefix: str):
        self.norm(f"{prefix}.norm")
        self.conv(f"{prefix}.to_qkv")
        self.conv(f"{prefix}.proj")

    def mid_block(self, prefix: str, dim: int, attention: bool):
        self.resblock(f"{prefix}.resnets.0", dim, dim)
        if attention:
            self.attention(f"{prefix}.attentions.0")
        self.resblock(f"{prefix}.resnets.1", dim, dim)


def vae_plan(config: "VAEConfig") -> dict[tuple[str, ...], WeightSpec]:
    """`{flax_path: WeightSpec}` for every parameter of `QwenImageVAE(config)`."""
    b = _PlanBuilder()
    last = len(config.dim_mult) - 1

    # encoder
    dims = [config.base_dim * m for m in (1, *config.dim_mult)]
    b.conv("encoder.conv_in")
    flat = 0
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if config.is_residual:
            for j in range(config.num_res_blocks):
                b.resblock(f"encoder.down_blocks.{i}.resnets.{j}", in_dim if j == 0 else out_dim, out_dim)
            if i != last:
                b.conv(f"encoder.down_blocks.{i}.downsampler.resample.1")
        else:
            for j in range(config.num_res_blocks):
                b.resblock(f"encoder.down_blocks.{flat}", in_dim if j == 0 else out_dim, out_dim)
                flat += 1
            if i != last:
                b.conv(f"encoder.down_blocks.{flat}.resample.1")
                flat += 1
    b.mid_block("encoder.mid_block", dims[-1], config.mid_attention)
    b.norm("encoder.norm_out")
    b.conv("encoder.conv_out")
    b.conv("quant_conv")
    b.conv("post_quant_conv")

    # decoder
    dims = [config.decoder_width * m for m in (config.dim_mult[-1], *config.dim_mult[::-1])]
    b.conv("decoder.conv_in")
    b.mid_block("decoder.mid_block", dims[0], config.mid_attention)
    for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0 and not config.is_residual:
            in_dim = in_dim // 2
        for j in range(config.num_res_blocks + 1):
            b.resblock(f"decoder.up_blocks.{i}.resnets.{j}", in_dim if j == 0 else out_dim, out_dim)
        if i != last:
            upsampler = "upsampler" if config.is_residual else "upsamplers.0"
            b.conv(f"decoder.up_blocks.{i}.{upsampler}.resample.1")
    b.norm("decoder.norm_out")
    b.conv("decoder.conv_out")
    return b.plan
