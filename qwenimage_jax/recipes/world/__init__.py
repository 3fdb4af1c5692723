"""The recipe that builds and ships the small world's tiny models as ONE diffusers-format directory.

Stages (each skips itself when its output exists, so an interrupted run resumes; --force redoes one):

  text      configs/world_text_lm.py: BPE tokenizer, text encoder (next-token pretraining on captions), prompt
            expander (fine-tuned on short -> rich pairs)                          -> WORKDIR/{tokenizer,text_encoder,expander}
  expander  only the expander fine-tune again, from WORKDIR/text_encoder (after --text-from)  -> WORKDIR/expander
  text_check  the cheap test of the text states before the long DiT run: a fresh DiT trained `check.steps` on
            `check.num_scenes` cached scenes (WORKDIR's VAE, else the shipped one), then the swapped-prompt loss gap
            per attribute (evals.conditioning)                                  -> WORKDIR/text_check.json
  vae_encoder  configs/world_vae_encoder.py: the encoder alone learns latents that hold each cell's pixels
            (patch_l2, the decoder not run); both arms start from it            -> WORKDIR/vae_encoder/vae_export
  vae       configs/world_vae.py through the VAE trainer from that encoder, once per arm of the alignment
            ablation ("align": the recipe; "noalign": no alignment gradient)     -> WORKDIR/vae{,_noalign}_diffusers
  vae_decoder  configs/world_vae_decoder.py: the decoder fine-tuned for sharp outlines, the encoder (and so the
            latents) frozen                                                     -> WORKDIR/vae{,_noalign}_diffusers
  vae_palette  configs/world_vae_palette.py: the shipped arm's decoder fine-tuned further with a palette
            cross-entropy (the label the judge reads per pixel), in `cycles` runs, the latents still frozen
                                                                                -> WORKDIR/vae_diffusers
  cache     world train scenes -> VAE latents + text-encoder states (cache-latents) -> WORKDIR/latents{,_noalign}
  dit       configs/world_dit.py through the DiT trainer (the 40-step teacher)     -> WORKDIR/transformer{,_noalign}
  ablation  the judge on both arms: VAE reconstructions and 40-step CFG teacher samples -> WORKDIR/ablation.json
  distill   configs/world_distill.py: DMD, 40-step CFG-4 teacher -> a student per `student_steps` entry N (2 and
            1 steps) -> WORKDIR/distill_N/export, each judged on the validation prompts (times.json distill_N)
  assemble  model_index.json (+ the student's sample_sigmas) + vae/ transformer/ (the shipped student when
            distilled: the fewest steps within 0.03 of the teacher on validation) teacher/transformer/
            text_encoder/ processor/ scheduler/ expander/ -> --out
  figures   judge accuracy of the teacher at 40/8/4/2/1 steps and of every student on train / held-out
            compositions, two distances of each to the teacher's 40-step images from the same noise (sliced-W2 of
            16 x 16 pixels; of 32 x 32 foreground masks, which sees shape), expansion gain -> README figures

    python -m qwenimage_jax.recipes.world --workdir /tmp/world --out qwenimage_jax/assets/tiny_world
    python -m qwenimage_jax.recipes.world --workdir /tmp/world --stage text      # one stage
    python -m qwenimage_jax.recipes.world --workdir /tmp/world --stage vae --stage cache --stage dit --arm noalign

`--arm` picks the ablation arm the vae / cache / dit stages work on (default: align, the shipped one; `all` runs
both in turn). `--text-from MODEL_DIR` copies the text stage's outputs (tokenizer, text encoder, expander) from an
earlier build instead of retraining them.

Wall times of every stage are appended to WORKDIR/times.json and copied into the shipped README.

The modules: stages.py (the shared settings and records; vae_encoder, vae, vae_decoder, vae_palette, cache, dit,
ablation, distill), text.py (text, expander, text_check, --text-from), ship.py (assemble, the README, figures) and
snapshots.py (--snapshot, --resume-from); `main` here is the command line. `--config-arg` is
`stages.CONFIG_ARG`, which `stages._config` passes to every get_config.
"""
from __future__ import annotations

import argparse
import os

from qwenimage_jax.recipes.world import stages as world_stages  # (main has a local `stages`)
from qwenimage_jax.recipes.world.ship import assemble, stage_figures, write_readme
from qwenimage_jax.recipes.world.snapshots import BUILD_DIR, resume_from, snapshot
from qwenimage_jax.recipes.world.stages import (ARMS, DEFAULT_OUT, SHIPPED_ARM, STAGES, stage_ablation, stage_cache,
                                                stage_dit, stage_distill, stage_vae, stage_vae_decoder,
                                                stage_vae_encoder, stage_vae_palette)
from qwenimage_jax.recipes.world.text import copy_text_stage, stage_expander, stage_text, stage_text_check

def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--stage", choices=STAGES, action="append", help="run only these stages (repeatable)")
    parser.add_argument("--config-arg", default=None,
                        help="argument for every stage's get_config (\"smoke\": tiny models, seconds per stage)")
    parser.add_argument("--arm", default=None, choices=tuple(ARMS) + ("all",),
                        help="ablation arm of the vae / cache / dit stages (default: both when all stages run, "
                             f"else {SHIPPED_ARM})")
    parser.add_argument("--ship", default=SHIPPED_ARM, choices=tuple(ARMS) + ("none",),
                        help="the arm whose DiT is trained past the ablation budget and shipped by assemble "
                             f"(default {SHIPPED_ARM}; none: stop every arm at the ablation budget)")
    parser.add_argument("--dit-budget-min", type=float, default=0.0,
                        help="stop the shipped arm's stable DiT phase at a checkpoint after this many minutes, then "
                             "cool down and go on (0: train to configs/world_dit.py's steps); re-running continues it")
    parser.add_argument("--distill-budget-min", type=float, default=0.0,
                        help="stop each student's distillation at a checkpoint after this many minutes (0: train to "
                             "configs/world_distill.py's steps); re-running the stage continues it")
    parser.add_argument("--cool-now", action="store_true",
                        help="cool down and ship the stable DiT phase where it stands (default: only once it has "
                             "reached configs/world_dit.py's steps)")
    parser.add_argument("--snapshot", default=None, metavar="DIR",
                        help=f"after the stages, copy what a later run needs to go on into DIR (e.g. {BUILD_DIR})")
    parser.add_argument("--resume-from", default=None, metavar="DIR",
                        help="before the stages, fill WORKDIR from a --snapshot of an earlier build")
    parser.add_argument("--text-from", default=None,
                        help="copy the text stage's outputs from this earlier build (a shipped model dir)")
    args = parser.parse_args(argv)
    CONFIG_ARG = world_stages.CONFIG_ARG = args.config_arg  # read by every stage's get_config (stages._config)
    num_prompts = 2 if CONFIG_ARG == "smoke" else 64
    os.makedirs(args.workdir, exist_ok=True)
    if args.resume_from:
        resume_from(args.resume_from, args.workdir)
    stages = args.stage or list(STAGES)
    arm = args.arm or ("all" if not args.stage else SHIPPED_ARM)
    arms = list(ARMS) if arm == "all" else [arm]
    if "text" in stages:
        if args.text_from:
            copy_text_stage(args.text_from, args.workdir)
        else:
            stage_text(args.workdir, args.config_arg)
    if "expander" in stages and (args.stage or args.text_from):  # a full run's text stage made it already
        stage_expander(args.workdir)
    if "text_check" in stages:
        stage_text_check(args.workdir, *((2, 16, 4) if CONFIG_ARG == "smoke" else ()))
    if "vae_encoder" in stages:
        stage_vae_encoder(args.workdir)
    for name in arms:
        if "vae" in stages:
            stage_vae(args.workdir, name)
        if "vae_decoder" in stages:
            stage_vae_decoder(args.workdir, name)
        if "vae_palette" in stages and name == (SHIPPED_ARM if args.ship == "none" else args.ship):
            # the shipped arm's decoder only: its latents (and so every DiT's data) are unchanged
            stage_vae_palette(args.workdir, name)
        if "cache" in stages:
            stage_cache(args.workdir, name)
        if "dit" in stages:
            stage_dit(args.workdir, name, full=(name == args.ship), budget_s=60.0 * args.dit_budget_min,
                      cool_now=args.cool_now)
    if "ablation" in stages:
        stage_ablation(args.workdir, num_prompts)
    shipped = SHIPPED_ARM if args.ship == "none" else args.ship
    if "distill" in stages:
        stage_distill(args.workdir, shipped, budget_s=60.0 * args.distill_budget_min)
    if "assemble" in stages:
        assemble(args.workdir, args.out, shipped)
        write_readme(args.workdir, args.out)
    if "figures" in stages:
        stage_figures(args.workdir, args.out, num_prompts)
    if args.snapshot:
        snapshot(args.workdir, args.snapshot)
    return 0
