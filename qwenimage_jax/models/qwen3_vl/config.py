"""Qwen3-VL text-decoder configuration read from a transformers `config.json` (5.x `rope_parameters` or 4.x
`rope_scaling` + `rope_theta`), plus the multimodal token ids the composition needs."""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """Hyper-parameters of `Qwen3VLTextModel` + `lm_head` (defaults: Qwen3-VL-8B)."""
    vocab_size: int = 151936
    hidden_size: int = 4096
    intermediate_size: int = 12288
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000.0
    mrope_section: tuple[int, int, int] = (24, 20, 20)
    mrope_interleaved: bool = True
    attention_bias: bool = False
    hidden_act: str = "silu"
    tie_word_embeddings: bool = False

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                             f"num_key_value_heads={self.num_key_value_heads}")
        if sum(self.mrope_section) != self.head_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} sums to {sum(self.mrope_section)}, "
                             f"expected head_dim // 2 = {self.head_dim // 2}")
        if self.hidden_act != "silu":
            raise ValueError(f"hidden_act={self.hidden_act!r} is not supported; Qwen3-VL uses 'silu'")
        if not self.mrope_interleaved:
            raise ValueError("mrope_interleaved=False (chunked MRoPE) is not supported; Qwen3-VL uses interleaved")

    @property
    def num_kv_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclasses.dataclass(frozen=True)
class MultimodalIds:
    """Special-token ids of the composed model (top level of a `Qwen3VLConfig`)."""
    image_token_id: int = 151655
    video_token_id: int = 151656
    vision_start_token_id: int = 151652
    vision_end_token_id: int = 151653


def text_config_from_hf(config: Mapping[str, Any]) -> TextConfig:
    """`Qwen3VLConfig` dict (or a bare `text_config` dict) -> TextConfig."""
    text = dict(config.get("text_config", config))
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "mrope"):
        raise ValueError(f"rope_type={rope_type!r} is not supported; only the default (unscaled) RoPE is ported")
    theta = rope.get("rope_theta", text.get("rope_theta", 5_000_000.0))
    num_heads = text.get("num_attention_heads", 32)
    hidden = text.get("hidden_size", 4096)
    tie = config.get("tie_word_embeddings", text.get("tie_word_embeddings", False))
    return TextConfig(
        vocab_size=text.get("vocab_size", 151936),
        hidden_size=hidden,
        intermediate_size=text.get("intermediate_size", 22016),
        num_hidden_layers=text.get("num_hidden_layers", 32),
        num_attention_heads=num_heads,
        num_key_value_heads=text.get("num_key_value_heads", num_heads),
        head_dim=text.get("head_dim") or hidden // num_heads,
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        mrope_section=tuple(rope.get("mrope_section", (24, 20, 20))),
        mrope_interleaved=bool(rope.get("mrope_interleaved", True)),
        attention_bias=bool(text.get("attention_bias", False)),
        hidden_act=text.get("hidden_act", "silu"),
        tie_word_embeddings=bool(tie),
    )


def multimodal_ids_from_hf(config: Mapping[str, Any]) -> MultimodalIds:
    defaults = MultimodalIds()
    return MultimodalIds(**{f.name: config.get(f.name, getattr(defaults, f.name))
                            for f in dataclasses.fields(MultimodalIds)})
