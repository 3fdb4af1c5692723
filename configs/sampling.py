"""Sampling presets for `qwenimage-jax sample` (command-line flags override every field).

    qwenimage-jax sample --model Qwen-Image-2.1 --config configs/sampling.py:base --prompt "a red fox" --out fox.png
    qwenimage-jax sample --model Qwen-Image-2.1-Turbo --config configs/sampling.py:turbo --prompt "..." --out t.png
    qwenimage-jax sample --model Qwen-Image-2.1 --config configs/sampling.py:guided --prompt "..." \
        --negative-prompt "blurry" --out g.png
    qwenimage-jax sample --model TINY_DIR --config configs/sampling.py:tiny --prompt "a cat" --out cat.png   # CPU

Presets:
  base   - the values Qwen recommends for Qwen-Image-2.1: 40 steps, no guidance, 1024x1024, bf16.
  turbo  - the checkpoint's own `sample_sigmas` grid (model_index.json) when it has one, else 8 steps; no guidance.
  guided - 40 steps with true CFG 4.0 against the negative prompt (" " unless given).
  tiny   - 64x64, 4 steps, fp32: a smoke test of a tiny random model on CPU.
Expected cost (released 7B DiT, bf16, one H100/H200-class GPU, 1024x1024): base ~40 DiT forwards of 4096 target
tokens per image; guided doubles the batch. Measure with bench/sample_bench.py --gpu.
"""
import ml_collections

PRESETS = {
    "base": dict(steps=40, cfg=1.0, resolution=1024, dtype="bfloat16"),
    "turbo": dict(steps=8, cfg=1.0, resolution=1024, dtype="bfloat16"),
    "guided": dict(steps=40, cfg=4.0, negative_prompt=" ", resolution=1024, dtype="bfloat16"),
    "tiny": dict(steps=4, cfg=1.0, resolution=64, dtype="float32"),
}


def get_config(arg=None):
    name = arg or "base"
    if name not in PRESETS:
        raise ValueError(f"unknown sampling preset {name!r}; choose one of {sorted(PRESETS)}")
    c = ml_collections.ConfigDict()
    c.preset = name
    c.steps = 40
    c.cfg = 1.0
    c.negative_prompt = ""          # "" = none (CFG needs one)
    c.resolution = 1024             # output_resolution: default side, and the area condition images are resized to
    c.height = 0                    # 0 = from the resolution / the last condition image
    c.width = 0
    c.dtype = "bfloat16"
    c.attention = "auto"            # DiT attention backend: auto = "cudnn" on GPU, "splash" on TPU, "xla" on CPU
    c.quantize = "none"             # weight-only "int8" / "fp8" / "int4" of the DiT + text encoder (docs/quantization.md)
    c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    for key, value in PRESETS[name].items():
        c[key] = value
    return c
