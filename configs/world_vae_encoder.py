"""The small world's VAE, first phase: the encoder alone learns a latent code that holds each cell's pixels.

Trained on pixel losses from step 0, this VAE's latents hold no more than each 16 px cell's mean colour (a
least-squares read-out of each cell from its 3 x 3 latent neighbourhood scores 0.0217 MSE, the cell means 0.0222:
world_build/vae_readout_from_scratch.json), so its decoder can only paint blobs and the judge reads shape at
chance: the decoder cannot use detail the encoder drops, and the encoder gets no gradient to keep detail the
decoder does not yet use.
This phase breaks that loop: `trainable="encoder"` runs the encoder and a linear per-cell head only (the decoder is
frozen and never run: the recipe's 2500 steps of this phase take 567 s, the whole VAE's 1200 steps 1800 s, evals
included: world_build/times.json) and trains them on `patch_l2` alone, each latent's linear read-out of its own
16 x 16 px patch. configs/world_vae.py then trains the whole VAE from this encoder
(`init_from`), with the pixel losses and the alignment, patch_l2 kept.

Measured (world_build/vae_encoder/metrics.jsonl, the recipe's run of this config: eval/cell_readout_mse on the
validation scenes of `eval.judge`, EMA; the step-0 references eval/readout_ref_*: 16 px cell means 0.0222, 4 px
block means 0.0067, per-cell PCA-64 0.0033): 0.0177 at step 250, 0.0094 at 1000, 0.0073 at 1500, 0.0056 at 2500,
past the 4 px block means.

    qwenimage-jax train-vae --config configs/world_vae_encoder.py --workdir /tmp/world/vae_encoder
"""
import importlib.util
import os


def get_config(arg=None):
    spec = importlib.util.spec_from_file_location("world_vae", os.path.join(os.path.dirname(__file__), "world_vae.py"))
    base = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(base)
    c = base.get_config(arg)
    c.trainable = "encoder"
    c.total_steps = 2500
    # a constant 2e-3 after warmup: at step 600 it reads out at 0.0109, 4e-4 at 0.0126 (measured at commit 5db9d4b)
    c.optimizer.learning_rate = dict(name="warmup_constant", peak_value=2e-3, warmup_steps=50)
    c.losses.update(l1=0.0, l2=0.0, salient_l1=0.0, patch_l2=1.0)
    c.losses.align.aligner = "none"        # both ablation arms share this encoder; alignment comes in phase two
    c.eval_every = 250
    c.image_every = 0                      # nothing to show: the decoder is untrained
    c.checkpoint_every = 250
    if arg == "smoke":
        c.total_steps = 2
        c.optimizer.learning_rate.update(warmup_steps=1)
        c.eval_every = 0
        c.checkpoint_every = 2
    return c
