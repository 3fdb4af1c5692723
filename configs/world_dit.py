"""The small world's shipped DiT: a tiny Qwen-Image-2 transformer trained with flow matching on cached world latents.

Data: `num_scenes` 128 px scenes of the train split (no held-out composition) encoded by the world VAE (8 x 8 x 64
latents: 64 image tokens) and the world text encoder (64-wide states), written by cache-latents:

    qwenimage-jax cache-latents --source world:8000:train:128 --vae /tmp/world/vae_diffusers \
        --text-encoder /tmp/world/text_encoder --tokenizer /tmp/world/tokenizer --out /tmp/world/latents
    qwenimage-jax train-dit --config configs/world_dit.py --workdir /tmp/world/dit \
        --config.data.path=/tmp/world/latents

`python -m qwenimage_jax.recipes.world --stage cache --stage dit` runs both and exports the EMA weights, in phases:
the run to `ablation_steps` (the alignment ablation's budget), the same run on to `steps` at a constant learning
rate (a warmup-stable schedule, so the run can be stopped at any checkpoint and continued: `time_budget_s` stops
it there, `--dit-budget-min` sets it), then `cooldown`: from those weights, the learning rate annealed to ~0 over
`cooldown.steps`. A SIGTERM stops any phase at a checkpoint; re-running the stage resumes it.
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_scenes = 8_000         # read by the world recipe's cache stage
    c.image_size = 128
    c.model = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=6, attention_head_dim=32,
                   num_attention_heads=4, context_in_dim=64, mlp_ratio=3, axes_dims_rope=[8, 12, 12], eps=1e-6,
                   causal_condition=True)
    c.compute_dtype = "float32"
    c.remat = "none"
    c.attention = "xla"
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.sharding_rules = "fsdp"        # parallel/rules.py presets: fsdp | replicated | tensor
    c.batch_size = 32
    c.grad_accum = 1
    c.steps = 6000                   # the stable phase's end (cumulative over resumed runs)
    c.time_budget_s = 0.0            # > 0: stop at a checkpoint after this many seconds of one call (resumable)
    # the world recipe's dit stage exports the run at this step too: the alignment ablation compares both VAE arms'
    # DiTs at this budget (the shipped arm's run then continues to `steps`)
    c.ablation_steps = 500
    c.optimizer = dict(learning_rate=dict(name="warmup_constant", peak_value=1e-3, warmup_steps=100),
                       b1=0.9, b2=0.99, weight_decay=0.0, grad_clip_norm=1.0)
    c.ema_decay = 0.995
    c.flow = dict(distribution="logit_normal", mean=0.0, std=1.0, shift="tokens", whiten=0.0, whiten_cap=10.0)
    c.cfg_dropout = 0.1
    # the last phase: from the stable phase's EMA weights, a fresh optimizer warmed up over 20 steps, then the
    # learning rate annealed by a cosine to end_value over `steps`
    c.cooldown = dict(steps=300, learning_rate=1e-3, end_value=1e-5)
    c.data = dict(path="", max_text_tokens=64, seed=0, bucket_weights={})
    c.checkpoint = dict(every=250, keep=1, async_save=False)
    c.log_every = 50
    c.peak_flops_per_device = 0.0
    c.init_from = ""
    c.progress = True
    c.executable = ""              # a step saved by `aot --save` to run instead of compiling (one layout)
    if arg == "smoke":  # CI: the recipe's stages end to end in seconds (64 px world, a 1-layer DiT)
        c.num_scenes, c.image_size = 32, 64
        c.model.update(num_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=[4, 6, 6],
                       context_in_dim=32, in_channels=16, out_channels=16)  # the smoke text encoder / VAE widths
        c.batch_size, c.steps, c.ablation_steps = 4, 2, 1
        c.optimizer.learning_rate.update(warmup_steps=1)
        c.cooldown = dict(steps=1, learning_rate=3e-4, end_value=1e-5)
        c.checkpoint.every = 2
        c.log_every = 1
    return c
