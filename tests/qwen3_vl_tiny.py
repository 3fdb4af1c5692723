"""Tiny seeded `Qwen3VLForConditionalGeneration` references for the Qwen3-VL tests (text and generation)."""
from __future__ import annotations

import os

# Two configs: tied embeddings + GQA 2, and untied + GQA 3 with a different (unequal) MRoPE section.
TEXT_CONFIGS = {
    "tied_gqa2": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, mrope_section=[4, 2, 2], tie=True),
    "untied_gqa3": dict(hidden_size=96, intermediate_size=128, num_hidden_layers=2, num_attention_heads=6,
                        num_key_value_heads=2, head_dim=24, mrope_section=[6, 4, 2], tie=False),
}


def build_reference(directory: str, name: str, token_ids: dict, seed: int = 0, noise: float = 0.1):
    """Builds, perturbs (so norms are not all ones) and saves a tiny model; returns (torch model, path)."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    spec = dict(TEXT_CONFIGS[name])
    section, tie = spec.pop("mrope_section"), spec.pop("tie")
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=token_ids["vocab_size"], rms_norm_eps=1e-6, **spec,
                         rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                          "mrope_interleaved": True, "mrope_section": section}),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           temporal_patch_size=2, spatial_merge_size=2, out_hidden_size=spec["hidden_size"],
                           num_position_embeddings=16, deepstack_visual_indexes=[0, 1]),
        image_token_id=token_ids["<|image_pad|>"], video_token_id=token_ids["<|video_pad|>"],
        vision_start_token_id=token_ids["<|vision_start|>"], vision_end_token_id=token_ids["<|vision_end|>"],
        tie_word_embeddings=tie)
    torch.manual_seed(seed)
    model = Qwen3VLForConditionalGeneration(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * noise)
    path = os.path.join(directory, name)
    model.save_pretrained(path)
    return model, path


def pre_norm_hidden(model, **inputs):
    """Last decoder layer output before the final norm, the way diffusers gets it (norm hooked to identity)."""
    import torch

    handle = model.model.language_model.norm.register_forward_hook(lambda module, args, output: args[0])
    try:
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
    finally:
        handle.remove()
    return out.hidden_states[-1]
