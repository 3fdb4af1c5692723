"""The released Qwen-Image-2 DiT shape (7.1B, 32 layers, width 4096) trained with flow matching on a TPU pod.

    qwenimage-jax cache-latents --source folder:/data/captioned --vae VAE --text-encoder TE --out gs://b/latents
    launch/tpu_pod.sh run train-dit --config configs/dit_7b_train.py --workdir gs://b/dit_7b \
        --config.data.path=gs://b/latents [--config.init_from=/path/Qwen-Image-2.1/transformer]

Recipe numbers from the Qwen-Image-2.0 report (Table 2): AdamW, weight decay 0.001, grad clip 1.0, LR 1e-4
(pre-training) / 2e-5 (continued) / 1e-5 (SFT), unconditional dropout 0.1. fsdp over the slice, tensor 1-4 by
slice size; bf16 compute with fp32 master weights; full remat. On v5p-256 expect ~35-45% MFU at 4096 image tokens
(to be measured; `mfu` is logged every `log_every` steps with peak_flops_per_device set below).
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.model = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
                   num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, axes_dims_rope=[16, 56, 56],
                   eps=1e-6, causal_condition=True)
    c.compute_dtype = "bfloat16"
    c.remat = "full"
    c.attention = "splash"             # TPU; "cudnn" on GPU, "xla" anywhere
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.sharding_rules = "fsdp"        # parallel/rules.py presets: fsdp | replicated | tensor
    c.batch_size = 256
    c.grad_accum = 1
    c.steps = 250_000
    c.optimizer = dict(learning_rate=dict(name="warmup_constant", peak_value=1e-4, warmup_steps=2000),
                       b1=0.9, b2=0.999, weight_decay=0.001, grad_clip_norm=1.0)
    c.ema_decay = 0.9999
    c.flow = dict(distribution="logit_normal", mean=0.0, std=1.0, shift="tokens")
    c.cfg_dropout = 0.1
    c.data = dict(path="", max_text_tokens=512, seed=0, bucket_weights={})
    c.checkpoint = dict(every=1000, keep=3, async_save=True)
    c.log_every = 50
    c.on_nonfinite = "stop"          # NaN/Inf loss or gradients: "stop" (error) or "skip" the update
    c.nonfinite_in_a_row = 10        # "skip" still stops after this many non-finite steps in a row
    c.peak_flops_per_device = 459e12   # TPU v5p bf16; 989e12 for H100/H200
    c.init_from = ""
    c.export = True                  # write WORKDIR/export/transformer (diffusers format) at the end
    c.progress = True
    c.executable = ""              # a step saved by `aot --save` to run instead of compiling (one layout)
    return c
