"""DMD distillation of the released-size Qwen-Image-2 DiT (7.1B): 40-step teacher -> 4-step student.

    qwenimage-jax distill --config configs/distill_7b.py --workdir gs://BUCKET/distill_7b \
        --config.teacher=Qwen-Image-2.1/transformer --config.data.path=LATENTS_DIR \
        --config.export.components="{'vae': 'Qwen-Image-2.1/vae', 'text_encoder': 'Qwen-Image-2.1/text_encoder', \
                                     'processor': 'Qwen-Image-2.1/processor'}" --config.export.link=True

Memory: student (fp32 master + EMA + 2 Adam moments = 16 B/param), fake (12 B/param), teacher in bf16 (2 B/param):
~30 B/param = ~215 GB for 7.1B, fsdp-sharded over every device (plus activations; remat "full").
Compute per student update: (fake.updates + 1) backward simulations (<= 3 student forwards each), fake.updates
fake fwd/bwd, one student fwd/bwd, 2 teacher forwards (CFG inside the real score).
"""


def get_config(arg=None):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("distill_tiny", os.path.join(os.path.dirname(__file__),
                                                                               "distill_tiny.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config()
    c.model = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
                   num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, axes_dims_rope=[16, 56, 56], eps=1e-6,
                   causal_condition=True)
    c.compute_dtype = "bfloat16"
    c.teacher_param_dtype = "bfloat16"
    c.remat = "full"
    c.attention = "cudnn"            # "splash" on TPU
    c.mesh = dict(data=1, fsdp=-1, tensor=1)
    c.batch_size = 64
    c.steps = 4000
    c.dmd = dict(weight=1.0, t_min=0.02, t_max=0.98, distribution="logit_normal", mean=0.0, std=1.0,
                 shift="tokens", real_cfg_scale=4.0)
    c.fake.optimizer.learning_rate = 2e-6
    c.optimizer.learning_rate = 2e-6
    c.ema_decay = 0.999
    c.data.max_text_tokens = 256
    c.checkpoint = dict(every=250, keep=3, async_save=True)
    c.regression.weight = 0.0      # 40 teacher forwards (x2 with CFG) per update: enable only with a budget for it
    c.export.dtype = "bfloat16"
    c.log_every = 10
    return c
