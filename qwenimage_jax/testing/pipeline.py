"""Tiny seeded Qwen-Image-2 pipelines for the pipeline tests and the CPU benchmark: diffusers' QwenImage21Pipeline
with a random tiny VAE, DiT and (optionally) Qwen3-VL, plus the diffusers-format directory it saves."""
from __future__ import annotations

import os

from qwenimage_jax.sampling.scheduler import QWEN_IMAGE_SCHEDULER_CONFIG

LATENT_CHANNELS = 8
TEXT_HIDDEN = 64
VISION_PATCH = 16

VAE_CONFIG = dict(base_dim=8, decoder_base_dim=12, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 8, 8], num_res_blocks=1,
                  attn_scales=[], temperal_downsample=[False, True, True, True], is_residual=True, in_channels=4,
                  out_channels=4, patch_size=None)
DIT_CONFIG = dict(patch_size=1, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, num_layers=2,
                  attention_head_dim=16, num_attention_heads=2, context_in_dim=TEXT_HIDDEN, mlp_ratio=3,
                  axes_dims_rope=(4, 6, 6), eps=1e-6, causal_condition=True)


def build_text_encoder(token_ids: dict, seed: int = 0):
    """Tiny random Qwen3VLForConditionalGeneration whose vision patches match the pipeline (16 px, merge 2)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    config = Qwen3VLConfig(
        text_config=dict(vocab_size=token_ids["vocab_size"], hidden_size=TEXT_HIDDEN, intermediate_size=96,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                                            "mrope_interleaved": True, "mrope_section": [4, 2, 2]}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=VISION_PATCH,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=TEXT_HIDDEN,
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    return _perturb(Qwen3VLForConditionalGeneration(config), seed, 0.1)


def _perturb(model, seed: int, noise: float):
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=gen) * noise)
    return model.eval()


def build_reference_pipeline(directory: str, with_text_encoder: bool = True, seed: int = 0,
                             vae_config: dict | None = None, dit_config: dict | None = None):
    """Builds diffusers' QwenImage21Pipeline from tiny random components and saves it under `directory/pipe`.

    Returns (reference pipeline, pipeline directory, tokenizer/processor directory).
    """
    import torch
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)

    from qwenimage_jax.testing.tokenizer import build_tiny_processor, load_processor_without_torchvision, special_token_ids

    # One VLM image slot must cover 2x2 latent tokens = 32x32 px, as in the released model: patch 16, merge 2.
    proc_dir = build_tiny_processor(os.path.join(directory, "processor_src"), patch_size=VISION_PATCH, merge_size=2,
                                    min_pixels=32 * 32, max_pixels=512 * 512)
    processor = load_processor_without_torchvision(proc_dir)
    vae_config = dict(VAE_CONFIG if vae_config is None else vae_config)
    z_dim = vae_config["z_dim"]
    gen = torch.Generator().manual_seed(seed + 1)
    vae_config["latents_mean"] = (torch.randn(z_dim, generator=gen) * 0.5).tolist()
    vae_config["latents_std"] = (torch.rand(z_dim, generator=gen) + 0.5).tolist()
    torch.manual_seed(seed)
    vae = _perturb(AutoencoderKLQwenImage21(**vae_config), seed + 2, 0.02)
    transformer = _perturb(QwenImage21Transformer2DModel(**(dit_config or DIT_CONFIG)), seed + 3, 0.05)
    text_encoder = None
    if with_text_encoder:
        text_encoder = build_text_encoder(special_token_ids(proc_dir), seed=seed + 4)
    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    pipe = QwenImage21Pipeline(scheduler=scheduler, vae=vae, text_encoder=text_encoder, processor=processor,
                               transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    path = os.path.join(directory, "pipe")
    save_pipeline_directory(pipe, path, proc_dir)
    return pipe, path, proc_dir


def save_pipeline_directory(pipe, path: str, proc_dir: str) -> None:
    """What `QwenImage21Pipeline.save_pretrained` writes (model_index.json + one folder per component). Done by hand
    because the test processor has no video processor, which transformers' processor saving insists on."""
    import json
    import shutil

    os.makedirs(path, exist_ok=True)
    for name in ("transformer", "vae", "text_encoder", "scheduler"):
        component = getattr(pipe, name)
        if component is not None:
            component.save_pretrained(os.path.join(path, name))
    shutil.copytree(proc_dir, os.path.join(path, "processor"), dirs_exist_ok=True)
    index = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(pipe.config).items()}
    index["processor"] = ["transformers", "Qwen3VLProcessor"]
    index["_class_name"] = type(pipe).__name__
    with open(os.path.join(path, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)


def reference_noise(batch: int, height: int, width: int, channels: int = LATENT_CHANNELS, seed: int = 0):
    """Packed (B, (H/16)(W/16), C) noise drawn the way QwenImage21Pipeline.prepare_latents draws it."""
    import torch
    from diffusers import QwenImage21Pipeline

    h, w = height // 16, width // 16
    noise = torch.randn((batch, 1, channels, h, w), generator=torch.Generator().manual_seed(seed))
    return QwenImage21Pipeline._pack_latents(noise, batch, channels, h, w)
