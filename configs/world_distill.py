"""DMD distillation of the small world's DiT: the shipped 40-step teacher (CFG 4) -> a 4-step student (no CFG).

The teacher is `WORKDIR/transformer` of `python -m qwenimage_jax.world_assets` (configs/world_dit.py) and the data
its cached world latents; both paths are filled in by the recipe's `distill` stage:

    python -m qwenimage_jax.world_assets --workdir /tmp/world --stage distill --stage assemble --stage figures
    # which runs, in process:
    qwenimage-jax distill --config configs/world_distill.py --workdir /tmp/world/distill \
        --config.teacher=/tmp/world/transformer --config.data.path=/tmp/world/latents

The real score is the teacher with true CFG 4 inside it (the guidance the 40-step teacher samples with), so the
student samples with CFG off; DMD2's two time-scale rule (2 fake-score updates per student update) plus DMD1's
paired regression to the teacher's CFG-4 ODE solution from the same noise (`regression.teacher_steps` = 10 Euler
steps: each costs a teacher forward with CFG per update, so 40 would quadruple the update on 2 CPU cores). 30 updates
of batch 8; the figures of the shipped student (judge, sliced-W2 to the teacher's 40-step images, wall time) are in
the shipped README, written by the recipe's `figures` stage from figures.json and build_times.json.
"""
import importlib.util
import os


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("distill_tiny", os.path.join(os.path.dirname(__file__),
                                                                               "distill_tiny.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(arg)
    c.seed = 0
    c.mesh = dict(data=1, fsdp=1, tensor=1)
    c.batch_size = 8
    c.steps = 30
    c.student = dict(num_steps=4, sample_sigmas=None, backward_sim="euler")
    c.dmd.real_cfg_scale = 4.0
    c.fake.updates = 2
    c.fake.optimizer.learning_rate = 2e-4
    c.optimizer.learning_rate = 1e-4
    c.ema_decay = 0.9
    c.regression = dict(weight=1.0, teacher_steps=10, cfg_scale=4.0)
    c.data.max_text_tokens = 64
    c.checkpoint = dict(every=50, keep=1, async_save=False)
    c.export = dict(enabled=True, dtype="float32", components={}, link=False)
    c.log_every = 10
    if arg == "smoke":  # CI: the recipe's distill stage in seconds
        c.batch_size, c.steps = 2, 1
        c.regression.teacher_steps = 2
        c.checkpoint.every = 1
        c.log_every = 1
    return c
