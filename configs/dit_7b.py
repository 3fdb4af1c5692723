"""The released Qwen-Image-2 (diffusers "Qwen-Image 2.1") DiT: 32 single-stream blocks, width 4096, 7.1B params.

    python bench/dit_bench.py --gpu                       # per-step latency + MFU at 1024x1024, bf16, random weights
    # in Python: load_transformer("Qwen-Image-2.1/transformer", dtype=jnp.bfloat16, attention="cudnn")

`model` holds the diffusers config fields exactly as `transformer/config.json`; the rest are our runtime options
(see `models.dit.DiTConfig`). One 1024x1024 step sees 4096 target tokens + ~128 text tokens: ~68 TFLOP forward
(66 TFLOP for a cached step; formula in bench/dit_bench.py).
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
                   num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, axes_dims_rope=[16, 56, 56], eps=1e-6,
                   causal_condition=True)
    c.dtype = "bfloat16"          # activations / matmuls
    c.param_dtype = "bfloat16"    # "float32" for training (optimizer state stays fp32 either way)
    c.attention = "cudnn"         # "splash" on TPU, "xla" / "dot_product_attention" anywhere
    c.remat = "none"              # "full" or "dots" for training
    c.quantize = "none"           # sampling: weight-only "int8" / "fp8" / "int4" block kernels (docs/quantization.md)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
