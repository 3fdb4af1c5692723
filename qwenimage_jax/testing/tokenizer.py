"""A tiny local Qwen-style tokenizer (and processor) for tests: byte-level BPE trained on a few sentences plus
Qwen's special tokens, saved as a transformers tokenizer directory so the real `from_pretrained` path runs offline.

    path = build_tiny_tokenizer(tmp_dir)          # -> tmp_dir (Qwen2Tokenizer files + chat template)
    ids = special_token_ids(path)                 # {"<|im_start|>": id, ..., "vocab_size": n}
    build_tiny_processor(tmp_dir, patch_size=4)   # + image processor config: a Qwen3VLProcessor directory
"""
from __future__ import annotations

import json
import os

_CORPUS = [
    "a cat sitting on a red sofa in a sunny living room",
    "a dog running on the beach at sunset, golden light, waves",
    "portrait of an old man with a white beard, studio lighting",
    "a bowl of fruit: apples, oranges and bananas on a wooden table",
    "Comprehend and analyze the provided prompt.",
    "A poster with the text 'HELLO WORLD' in bold letters.",
    "mountains, snow, blue sky, clouds, a lake reflecting the trees",
    "system user assistant image picture photo describe expand rewrite the prompt with more detail",
    "0 1 2 3 4 5 6 7 8 9 <image1> <image2> <image3>",
]

# Qwen's special tokens (in Qwen's order) and the compact Qwen3-VL chat template: one definition, in the library.
from qwenimage_jax.training.text_lm import CHAT_TEMPLATE, SPECIAL_TOKENS  # noqa: E402


def build_tiny_tokenizer(directory: str, vocab_size: int = 400) -> str:
    """Trains a byte-level BPE (<= `vocab_size` regular tokens) + Qwen specials with the library's own builder
    (`training.text_lm.build_tokenizer`) and saves a Qwen2 tokenizer dir; returns its path."""
    from qwenimage_jax.training.text_lm import build_tokenizer

    build_tokenizer(directory, _CORPUS * 4, vocab_size)
    return directory


def special_token_ids(directory: str) -> dict[str, int]:
    """Special-token ids of a tokenizer saved by `build_tiny_tokenizer`, plus `vocab_size` (len of the tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in SPECIAL_TOKENS}
    ids["vocab_size"] = len(tokenizer)
    return ids


def build_tiny_processor(directory: str, patch_size: int = 4, temporal_patch_size: int = 2, merge_size: int = 2,
                         min_pixels: int = 8 * 8, max_pixels: int = 64 * 64) -> str:
    """Tokenizer + Qwen2-VL image-processor config in one directory that `Qwen3VLProcessor.from_pretrained` reads."""
    build_tiny_tokenizer(directory)
    image_config = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen3VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
        "patch_size": patch_size, "temporal_patch_size": temporal_patch_size, "merge_size": merge_size,
        "size": {"shortest_edge": min_pixels, "longest_edge": max_pixels},
    }
    with open(os.path.join(directory, "preprocessor_config.json"), "w", encoding="utf-8") as f:
        json.dump(image_config, f, indent=2)
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
    return directory


def load_processor_without_torchvision(directory: str):
    """transformers' own `Qwen3VLProcessor` on a `build_tiny_processor`/`build_tiny_tokenizer` directory.

    `Qwen3VLProcessor.from_pretrained` insists on a video processor, which needs torchvision (not importable beside
    torch 2.13 here). Images and text go through the unchanged transformers code; only the class check on the missing
    video processor is skipped. Without a preprocessor_config.json there is no image processor (text-only use).
    """
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen3VLProcessor

    class _Qwen3VLProcessorNoVideo(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    tokenizer = AutoTokenizer.from_pretrained(directory)
    image_processor = None
    if os.path.exists(os.path.join(directory, "preprocessor_config.json")):
        image_processor = AutoImageProcessor.from_pretrained(directory)
    return _Qwen3VLProcessorNoVideo(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                                    chat_template=tokenizer.chat_template)
