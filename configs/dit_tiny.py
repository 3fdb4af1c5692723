"""A tiny Qwen-Image-2 DiT (the REFERENCE.md 6.1 model: 2 blocks, width 32) for CPU tests, demos and benches.

    python bench/dit_bench.py                              # CPU: ours (jit) vs diffusers eager, compile vs depth

Same fields as configs/dit_7b.py; `models.dit.dit_config_from(get_config())` builds the `DiTConfig`.
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.model = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                   num_attention_heads=2, context_in_dim=32, mlp_ratio=3, axes_dims_rope=[4, 6, 6], eps=1e-6,
                   causal_condition=True)
    c.dtype = "float32"
    c.param_dtype = "float32"
    c.attention = "xla"
    c.quantize = "none"           # weight-only "int8" / "fp8" / "int4" block kernels (sampling, aot)
    c.remat = "none"
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    return c
