"""Qwen-Image-2 prompt templates (raw strings fed to the tokenizer/processor, as diffusers' QwenImage21Pipeline
does), the system-turn drop index, and the chat messages used for prompt expansion."""
from __future__ import annotations

from typing import Any

SYSTEM_PROMPT = "Comprehend and analyze the provided prompt."
IMAGE_PAD = "<|image_pad|>"
_SYSTEM_TURN = f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n"
T2I_TEMPLATE = _SYSTEM_TURN + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"

EXPAND_SYSTEM_PROMPT = (
    "You are a prompt engineer for a text-to-image model. Rewrite the user's short description into one detailed, "
    "vivid English prompt: subject, composition, setting, lighting, colours, style and any text to render. "
    "Keep every detail the user gave. Reply with the prompt only."
)


def image_placeholders(num_images: int) -> str:
    """'<image1><|vision_start|><|image_pad|><|vision_end|>' then ' <imageK>...' for K = 2..num_images."""
    parts = [f"<image{i}><|vision_start|>{IMAGE_PAD}<|vision_end|>" for i in range(1, num_images + 1)]
    return " ".join(parts)


def build_prompt(prompt: str, num_images: int = 0) -> str:
    """One Qwen-Image-2 encoder prompt. Empty prompts become ' ' (Qwen has no BOS token)."""
    if not isinstance(prompt, str):
        raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
    text = prompt or " "
    if num_images < 0:
        raise ValueError(f"num_images={num_images} must be >= 0")
    if num_images == 0:
        return T2I_TEMPLATE.format(text)
    return _SYSTEM_TURN + f"<|im_start|>user\n{image_placeholders(num_images)}{text}<|im_end|>\n<|im_start|>assistant\n"


def system_messages() -> list[dict]:
    return [{"role": "system", "content": [{"type": "text", "text": SYSTEM_PROMPT}]}]


def drop_index(chat_renderer: Any) -> int:
    """Number of leading tokens (the system turn) the pipeline drops, from the tokenizer's/processor's chat template.

    chat_renderer: a transformers tokenizer or processor with `apply_chat_template`.
    """
    ids = chat_renderer.apply_chat_template(system_messages(), tokenize=True, return_dict=False)
    if len(ids) and not isinstance(ids[0], int):  # processors return one list per conversation
        ids = ids[0]
    return len(ids)


def expand_messages(prompt: str) -> list[dict]:
    """Chat messages asking a decoder LM to expand `prompt`."""
    return [{"role": "system", "content": EXPAND_SYSTEM_PROMPT}, {"role": "user", "content": prompt}]
