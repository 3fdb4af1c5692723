"""DMD distillation of the small world's DiT: the 40-step teacher (CFG 4) -> 2-step and 1-step students (no CFG).

Sampled with fewer Euler steps, the teacher is judged 0.622 at 4 steps against 0.685 at 40 on the held-out test
prompts, but 0.467 at 2 and 0.468 at 1 (world_build/figures.json), so the students that show whether the
objective works are the 2- and 1-step ones (`student_steps`: the recipe runs one distillation per entry, each into
WORKDIR/distill_N). The teacher is `WORKDIR/transformer` of `python -m qwenimage_jax.recipes.world`
(configs/world_dit.py) and the data its cached world latents; both paths are filled in by the `distill` stage:

    python -m qwenimage_jax.recipes.world --workdir /tmp/world --stage distill --stage assemble --stage figures
    # which runs, in process, once (resumable; skipped when complete):
    qwenimage-jax distill-pairs --config configs/world_distill.py --out /tmp/world/distill_pairs \
        --config.teacher=/tmp/world/transformer --config.data.path=/tmp/world/latents
    # then for N in student_steps:
    qwenimage-jax distill --config configs/world_distill.py --workdir /tmp/world/distill_N \
        --config.teacher=/tmp/world/transformer --config.data.path=/tmp/world/latents --config.student.num_steps=N \
        --config.regression.pairs=/tmp/world/distill_pairs

The real score is the teacher with true CFG 4 inside it (the guidance the 40-step teacher samples with), so the
student samples with CFG off; DMD2's two time-scale rule (2 fake-score updates per student update) plus DMD1's
paired regression to the teacher's CFG-4 ODE solution from the same noise. As in DMD1 the pairs are solved once,
offline, at the teacher's own 40 steps (`regression.num_pairs` pairs; training/distill_pairs.py) rather than every
update: 40 online steps would quadruple the teacher's cost per update on 2 CPU cores, and a shorter online target
sits below the teacher (the teacher at 8 steps is judged 0.658 against 0.685 at 40 on the test prompts). Without
`regression.pairs` this config would solve 40 steps online in every update. The regression term is
kept beside DMD as in DMD1, to anchor a 1-2 step student to the teacher's own noise-to-image map where DMD alone is
mode-seeking (not ablated here). The assemble stage ships the fewest-step student whose validation judge
(`validation_prompts` held-out prompts of the validation seed, recorded in times.json as distill_N) is within
`ship_tolerance` of the teacher's, else the best-judged one (64 prompts can put two students 0.03 apart that 256
prompts find equal); the figures stage reports every student on the test prompts beside the teacher at
40/8/4/2/1 steps, with two distances to the teacher's 40-step images from the same noise.

Measured (world_build/figures.json, written by the recipe's figures stage, and qwenimage_jax/assets/tiny_world/
README.md; test prompts of seed 1000, 64 per split; the teacher: configs/world_dit.py at 6300 steps, held-out 0.685;
teacher@2 0.467, teacher@1 0.468; times from world_build/times.json): 2048 pairs in 515 s, then each student 1200
updates of batch 8 in ~900 s on 2 CPU cores; student@2 held-out 0.631, train 0.650; student@1 held-out 0.604,
train 0.642 (held-out, both: colour 0.87-0.88, position 0.78-0.79, size 0.59-0.60, count 0.38-0.45, shape
0.12-0.16, background 1.0). Sliced-W2 to the teacher's 40-step images: 0.0256 (pixels) / 0.055 (foreground masks)
for both, against teacher@2's 0.1041 / 0.1856 and teacher@1's 0.1042 / 0.1878. On 256
validation prompts (world_build/levers/distill_pairs40/) the students are 0.05-0.06 below the teacher (the bar is
0.03) and within about a standard error of the same recipe with a 10-step online target, which takes twice as
long (~1770 s a student: world_build/levers/distill_online10/). Twice the updates (2400: 0.6516 / 0.6558) and the
regression term alone (1-step, no DMD term: 0.649) move the validation judge by less than its standard error
(world_build/levers/distill_2400/, distill_regression_only/).
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
    c.steps = 1200
    c.student_steps = (2, 1)         # one distillation per entry (the world recipe's distill stage)
    c.ship_tolerance = 0.03          # assemble ships the fewest steps within this of the teacher's validation judge
    c.validation_prompts = 256       # held-out validation prompts of that judge (64 read +-0.03, the tolerance itself)
    c.student = dict(num_steps=2, sample_sigmas=None, backward_sim="euler")
    c.dmd.real_cfg_scale = 4.0
    c.fake.updates = 2
    c.fake.optimizer.learning_rate = 2e-4
    c.optimizer.learning_rate = 1e-4
    c.ema_decay = 0.9
    # teacher_steps: the pairs' solver (the world recipe builds WORKDIR/distill_pairs and sets `pairs` to it); num_pairs
    # pairs of the cached world latents' batch stream, each with its own noise (see configs/distill_tiny.py)
    c.regression = dict(weight=1.0, teacher_steps=40, cfg_scale=4.0, pairs="", num_pairs=2048)
    c.data.max_text_tokens = 64
    c.checkpoint = dict(every=50, keep=1, async_save=False)
    c.time_budget_s = 0.0            # > 0: stop at a checkpoint after this many seconds (re-running resumes)
    c.export = dict(enabled=True, dtype="float32", components={}, link=False)
    c.log_every = 10
    if arg == "smoke":  # CI: the recipe's distill stage in seconds
        c.batch_size, c.steps = 2, 1
        c.student_steps = (2, 1)
        c.regression.teacher_steps = 2
        c.regression.num_pairs = 4
        c.checkpoint.every = 1
        c.log_every = 1
    return c
