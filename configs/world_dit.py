"""The small world's shipped DiT: a tiny Qwen-Image-2 transformer trained with flow matching on cached world latents.

Data: `num_scenes` 128 px scenes of the train split (no held-out composition) encoded by the world VAE (8 x 8 x 16
latents: 64 image tokens) and the world text encoder (64-wide states), written by cache-latents:

    qwenimage-jax cache-latents --source world:8000:train:128 --vae /tmp/world/vae_diffusers \
        --text-encoder /tmp/world/text_encoder --tokenizer /tmp/world/tokenizer --out /tmp/world/latents
    qwenimage-jax train-dit --config configs/world_dit.py --workdir /tmp/world/dit \
        --config.data.path=/tmp/world/latents

`python -m qwenimage_jax.world_assets --stage cache --stage dit` runs both and exports the EMA weights. A SIGTERM
stops the trainer at a checkpoint (PreemptionGuard); the stage then exports the weights of the step reached and
records it (final_step in times.json / the shipped README).
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.num_scenes = 8_000         # read by world_assets' cache stage (session 2 cached 3,000)
    c.image_size = 128
    c.model = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=6, attention_head_dim=32,
                   num_attention_heads=4, context_in_dim=64, mlp_ratio=3, axes_dims_rope=[8, 12, 12], eps=1e-6,
                   causal_condition=True)
    c.compute_dtype = "float32"
    c.remat = "none"
    c.attention = "xla"
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.sharding_rules = "fsdp"        # parallel/rules.py presets: fsdp | replicated | tensor
    c.batch_size = 32
    c.grad_accum = 1
    c.steps = 1031  # session 3 stopped here for time (preempted); the schedule below decays over 1200
    # world_assets' dit stage exports the run at this step too: the alignment ablation compares both VAE arms'
    # DiTs at this budget (the shipped arm's run then continues to `steps`)
    c.ablation_steps = 500
    c.optimizer = dict(learning_rate=dict(name="warmup_cosine", peak_value=1e-3, warmup_steps=100,
                                          decay_steps=1200, end_value=5e-5),
                       b1=0.9, b2=0.99, weight_decay=0.0, grad_clip_norm=1.0)
    c.ema_decay = 0.995
    # The world VAE keeps backgrounds only, which a noisy latent gives away at all but the highest noise levels;
    # the first recipe (mean 0, 4 x 64 wide, 1500 steps) learnt to ignore the prompt (background at chance, 0.23).
    # mean 0.5 puts more of the training at the high noise where the prompt is the only evidence.
    c.flow = dict(distribution="logit_normal", mean=0.5, std=1.0, shift="tokens")
    c.cfg_dropout = 0.1
    # Phase 2 of world_assets' dit stage: from the phase-1 weights, `steps` more at logit-normal mean `flow_mean`
    # (median sigma ~0.95 after the shift): the background is decided in the first sampling steps, from the prompt
    # alone, and phase 1 left the prompt nearly unused there (loss 1.105 vs 1.122 with shuffled prompts at sigma
    # 0.995; background at chance, 0.28, in 40-step samples). Set steps=0 to skip.
    c.high_noise_finetune = dict(steps=100, flow_mean=2.5, learning_rate=3e-4)
    c.data = dict(path="", max_text_tokens=64, seed=0, bucket_weights={})
    c.checkpoint = dict(every=500, keep=1, async_save=False)
    c.log_every = 100
    c.peak_flops_per_device = 0.0
    c.init_from = ""
    c.progress = True
    if arg == "smoke":  # CI: the recipe's stages end to end in seconds (64 px world, a 1-layer DiT)
        c.num_scenes, c.image_size = 32, 64
        c.model.update(num_layers=1, attention_head_dim=16, num_attention_heads=2, axes_dims_rope=[4, 6, 6],
                       context_in_dim=32)  # the smoke text encoder's width (configs/world_text_lm.py "smoke")
        c.batch_size, c.steps, c.ablation_steps = 4, 2, 1
        c.optimizer.learning_rate.update(warmup_steps=1, decay_steps=2)
        c.high_noise_finetune = dict(steps=1, flow_mean=2.5, learning_rate=3e-4)
        c.checkpoint.every = 2
        c.log_every = 1
    return c
