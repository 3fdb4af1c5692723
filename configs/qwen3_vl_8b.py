"""Qwen3-VL-8B's text decoder as the Qwen-Image-2 prompt encoder (bf16), for `aot` memory/FLOP checks.

    qwenimage-jax aot --config configs/qwen3_vl_8b.py --topology v6e-8 [--batch 64 --prompt-tokens 512]

`text_config` holds the transformers `text_config` fields of Qwen3-VL-8B-Instruct (36 layers, width 4096, 32 query
/ 8 key-value heads, MLP 12288, vocab 151936); real runs read them from the checkpoint's config.json instead.
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.text_config = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6,
                         rope_parameters=dict(rope_type="default", rope_theta=5_000_000.0,
                                              mrope_section=[24, 20, 20], mrope_interleaved=True),
                         tie_word_embeddings=False)
    c.dtype = "bfloat16"
    c.quantize = "none"         # weight-only "int8" / "fp8" / "int4" decoder kernels (docs/quantization.md)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.batch_size = 0            # 0 = one prompt per data x fsdp shard
    c.prompt_tokens = 256
    return c
