"""LoRA on a tiny DiT, the trainer's test config: rank 4 on the attention projections of a 2-layer base.

    qwenimage-jax train-lora --config configs/lora_tiny.py --workdir /tmp/lora_tiny \
        --config.base=/tmp/dit_tiny/export/transformer --config.data.path=/tmp/world_latents

Expect ~0.1 s/step on 2 CPU cores and the adapter in /tmp/lora_tiny/export/lora (diffusers format).
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.base = ""                      # diffusers or Orbax transformer/ directory (frozen)
    # the base's shape, read by `aot` only (training reads it from config.base): configs/dit_train_tiny.py's
    c.model = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                   num_attention_heads=4, context_in_dim=32, mlp_ratio=3, axes_dims_rope=[4, 6, 6], eps=1e-6,
                   causal_condition=True)
    c.base_dtype = "float32"         # storage of the frozen base: "bfloat16" halves its memory
    c.quantize = "none"              # QLoRA: "int8" / "fp8" / "int4" stores the frozen base quantized (qwix)
    c.compute_dtype = "float32"
    c.remat = "none"
    c.attention = "xla"
    c.lora = dict(rank=4, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"], dropout=0.0)
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding_rules = "fsdp"        # parallel/rules.py presets: fsdp | replicated | tensor
    c.batch_size = 8
    c.steps = 40
    c.optimizer = dict(learning_rate=dict(name="warmup_constant", peak_value=1e-3, warmup_steps=5),
                       b1=0.9, b2=0.999, weight_decay=0.0, grad_clip_norm=1.0)
    c.flow = dict(distribution="logit_normal", mean=0.0, std=1.0, shift="tokens")
    c.cfg_dropout = 0.1
    c.data = dict(path="", max_text_tokens=12, seed=0, bucket_weights={})
    c.checkpoint = dict(every=10, keep=2, async_save=False)
    c.log_every = 1
    c.on_nonfinite = "stop"
    c.nonfinite_in_a_row = 10
    c.export = True                  # write WORKDIR/export/lora (diffusers format) at the end
    c.progress = True
    return c
