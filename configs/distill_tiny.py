"""DMD distillation of the tiny world DiT: 40-step teacher -> 4-step student, on 2 CPU cores.

    # 1. the world's cached latents + text states (train split) and a trained tiny teacher DiT
    qwenimage-jax cache-latents --source world:2000:train --vae VAE_DIR --text-encoder TE_DIR --out /tmp/world_latents
    qwenimage-jax train-dit --config configs/dit_train_tiny.py --workdir /tmp/dit_tiny \
        --config.data.path=/tmp/world_latents
    # (export the teacher with checkpoints.export("transformer", ...), or point at an Orbax/diffusers transformer dir)
    # 2. distil; re-running the same command resumes from WORKDIR/checkpoints
    qwenimage-jax distill --config configs/distill_tiny.py --workdir /tmp/distill_tiny \
        --config.teacher=TEACHER_TRANSFORMER_DIR --config.data.path=/tmp/world_latents \
        --config.export.components="{'vae': 'VAE_DIR'}"
    # -> /tmp/distill_tiny/export: QwenImage21Pipeline dir (transformer/, scheduler/, model_index.json with
    #    sample_sigmas = [1.0, 0.75, 0.5, 0.25]) that our pipeline and diffusers both sample with in 4 steps.

Measured on 2 shared CPU cores (load ~12), batch 8, 4x4 latents, 5 fake updates per student update: ~0.2 s per
student update without regression, ~0.4 s with it (40-step teacher ODE per update), plus ~1.5 min of compiles;
600 updates = 2.5-4 min. On a synthetic 4-prompt x 2-mode latent set (tiny teacher trained 2000 steps) after 600
updates, sliced-W2 to the teacher's 40-step samples (same noise, 32 per prompt): teacher at 4 steps 0.156, student
(regression 1.0) 0.137, student without regression 0.321 (sharper, MSE to the nearest mode 0.12 vs 0.24, but one of
8 modes dropped: DMD's mode seeking). The small-world judge comparison needs the trained world teacher.

With a teacher the architecture comes from the teacher's config.json (`model` below only shapes a random teacher
for smoke tests). Cost per student update at batch 8 on the tiny model: (fake.updates + 1) backward simulations
(<= 3 student forwards each) + fake.updates fake fwd/bwd + 1 student fwd/bwd + 1-2 teacher forwards (2 with CFG).
"""
import ml_collections


def get_config(arg=None):
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.teacher = ""                   # transformer dir (diffusers or our Orbax format) of the many-step teacher
    c.model = dict(patch_size=1, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=16,
                   num_attention_heads=4, context_in_dim=32, mlp_ratio=3, axes_dims_rope=[4, 6, 6], eps=1e-6,
                   causal_condition=True)
    c.compute_dtype = "float32"
    c.teacher_param_dtype = "float32"
    c.remat = "none"
    c.attention = "xla"
    c.mesh = dict(data=-1, fsdp=1, tensor=1)
    c.batch_size = 8
    c.steps = 1000                   # student updates
    # The student's grid: pre-shift sigmas (None = linspace(1, 1/n, n)); the scheduler's mu shift and terminal
    # stretch apply on top, exactly as in the pipeline. backward_sim: "euler" (what the pipeline runs) | "renoise".
    c.student = dict(num_steps=4, sample_sigmas=None, backward_sim="euler")
    c.scheduler = {}                 # overrides of the released scheduler config (sampling.scheduler)
    # DMD term: re-noising times in [t_min, t_max]; real_cfg_scale > 1 runs true CFG inside the real score.
    c.dmd = dict(weight=1.0, t_min=0.02, t_max=0.98, distribution="uniform", mean=0.0, std=1.0, shift="none",
                 real_cfg_scale=1.0)
    # Constant learning rates (DMD2); Adam with b1 = 0 for both, as DMD2 trains its generator and fake score.
    c.fake = dict(updates=5, optimizer=dict(learning_rate=1e-4, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0,
                                            grad_clip_norm=1.0),
                  times={})
    c.optimizer = dict(learning_rate=2e-5, b1=0.0, b2=0.999, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0)
    c.ema_decay = 0.99
    # Paired regression to the teacher's ODE solution from the same noise (DMD1); weight 0 disables it. On the
    # tiny model it keeps DMD's mode-seeking in check (see the docstring's figures) for ~1.7x the step time.
    # pairs: "" solves the target online every update (teacher_steps CFG Euler steps from the update's noise); a
    # store written by `qwenimage-jax distill-pairs` (training/distill_pairs.py) is read as the data instead of
    # data.path, and its precomputed (noise, solution) pairs replace the online solve. num_pairs: how many pairs
    # distill-pairs solves (the step itself does not read it).
    c.regression = dict(weight=1.0, teacher_steps=40, cfg_scale=None, pairs="", num_pairs=2048)
    c.data = dict(path="", max_text_tokens=48, seed=0, bucket_weights={})
    c.checkpoint = dict(every=100, keep=2, async_save=True)
    c.export = dict(enabled=True, dtype="float32", components={}, link=False)
    c.log_every = 10
    c.progress = True
    return c
