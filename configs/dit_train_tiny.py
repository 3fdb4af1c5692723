"""Tiny DiT trained with flow matching on CPU, on a cached latent dataset.

    qwenimage-jax cache-latents --world 2000 --vae VAE_DIR --text-encoder TE_DIR --out /tmp/world_latents
    qwenimage-jax train-dit --config configs/dit_train_tiny.py --workdir /tmp/dit_tiny \
        --config.data.path=/tmp/world_latents

Expect ~0.1-0.3 s/step on 2 CPU cores at batch 8 (4x4 latents, <= 48 text tokens) and a flow-matching loss that
falls from ~2 towards ~0.6 within a few hundred steps.
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                   num_attention_heads=4, context_in_dim=32, mlp_ratio=3, axes_dims_rope=[4, 6, 6], eps=1e-6,
                   causal_condition=True)
    c.compute_dtype = "float32"      # "bfloat16" on accelerators (params and optimizer state stay fp32)
    c.remat = "none"
    c.attention = "xla"
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.sharding_rules = "fsdp"        # parallel/rules.py presets: fsdp | replicated | tensor
    c.batch_size = 8
    c.grad_accum = 1
    c.steps = 500
    c.optimizer = dict(learning_rate=dict(name="warmup_cosine", peak_value=3e-4, warmup_steps=50,
                                          decay_steps=500, end_value=3e-5),
                       b1=0.9, b2=0.999, weight_decay=0.001, grad_clip_norm=1.0)
    c.ema_decay = 0.999
    c.flow = dict(distribution="logit_normal", mean=0.0, std=1.0, shift="tokens", whiten=0.0, whiten_cap=10.0)
    c.cfg_dropout = 0.1
    c.data = dict(path="", max_text_tokens=48, seed=0, bucket_weights={})
    c.checkpoint = dict(every=100, keep=2, async_save=True)
    c.log_every = 10
    c.on_nonfinite = "stop"          # NaN/Inf loss or gradients: "stop" (error) or "skip" the update
    c.nonfinite_in_a_row = 10        # "skip" still stops after this many non-finite steps in a row
    c.peak_flops_per_device = 0.0    # e.g. 989e12 for an H100/H200 in bf16; 0 disables MFU
    c.init_from = ""
    c.export = True                  # write WORKDIR/export/transformer (diffusers format) at the end
    c.progress = True
    c.executable = ""              # a step saved by `aot --save` to run instead of compiling (one layout)
    return c
