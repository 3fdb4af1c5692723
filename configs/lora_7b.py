"""LoRA rank 32 on the released Qwen-Image-2 DiT (7.1B): the community's fine-tuning recipe, on a TPU slice or GPUs.

    launch/tpu_pod.sh run train-lora --config configs/lora_7b.py --workdir gs://b/lora \
        --config.base=/path/Qwen-Image-2.1/transformer --config.data.path=gs://b/latents
    qwenimage-jax aot --config configs/lora_7b.py --topology v5p-8      # per-chip memory, without a TPU

The base is stored in bf16 and sharded over fsdp (frozen: no gradients, no optimizer state); only the rank-32
factors on the attention and SwiGLU projections (83.9M, 1.18% of the base) and their AdamW moments are trained,
in fp32. `aot` on v5p-8 (4 chips, fsdp 4): 14.2 GiB per chip (docs/aot/lora_7b_v5p-8.json).
`model` gives the base's shape to `aot` (training reads it from config.base).
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.base = ""
    c.model = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
                   num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, axes_dims_rope=[16, 56, 56],
                   eps=1e-6, causal_condition=True)
    c.base_dtype = "bfloat16"
    c.quantize = "none"              # QLoRA: "int8" / "fp8" / "int4" stores the frozen base quantized (qwix)
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    c.attention = "splash"             # TPU; "cudnn" on GPU, "xla" anywhere
    c.lora = dict(rank=32, alpha=32.0, dropout=0.0,
                  target_modules=["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer",
                                  "img_mlp.out"])
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding_rules = "fsdp"        # parallel/rules.py presets: fsdp | replicated | tensor
    c.batch_size = 8
    c.steps = 2000
    c.optimizer = dict(learning_rate=dict(name="warmup_constant", peak_value=1e-4, warmup_steps=100),
                       b1=0.9, b2=0.999, weight_decay=0.0, grad_clip_norm=1.0)
    c.flow = dict(distribution="logit_normal", mean=0.0, std=1.0, shift="tokens")
    c.cfg_dropout = 0.1
    c.data = dict(path="", max_text_tokens=512, seed=0, bucket_weights={})
    c.checkpoint = dict(every=250, keep=2, async_save=True)
    c.log_every = 10
    c.on_nonfinite = "stop"
    c.nonfinite_in_a_row = 10
    c.export = True
    c.progress = True
    return c
