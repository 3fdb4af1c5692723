"""The judge of one world DiT on the validation prompts, for choices made while building the world (levers,
checkpoints, which run to continue); never the reported test prompts (evals.t2i.EVAL_SEED):

    python -m qwenimage_jax.recipes.world_validation --workdir /tmp/world --transformer transformer \
        --out world_build/judge_validation.json [--num 256] [--steps 40] [--cfg 4]
    python -m qwenimage_jax.recipes.world_validation --workdir /tmp/world --transformer distill_1/export/transformer \
        --student --out judge_student.json          # a DMD student: its own grid (sample_sigmas), no CFG

`--transformer` is a diffusers transformer directory relative to the workdir (e.g. `dit/export/transformer`); the
workdir's VAE, text encoder and tokenizer complete the pipeline (`recipes.world.stages.judge_pipeline`). Prints and
writes the judge per attribute on train and held-out compositions of the validation seed (t2i.VALIDATION_SEED), with
the commit. At 256 prompts a split's shape score has a standard error of ~0.02 (~380 object groups).
"""
from __future__ import annotations

import argparse
import json
import os

from qwenimage_jax.recipes.world import stages as world_stages


def student_grid(workdir: str, transformer: str) -> list[float]:
    """sample_sigmas of a distilled export (model_index.json beside its transformer directory)."""
    index = os.path.join(workdir, transformer, "..", "model_index.json")
    if not os.path.exists(index):
        raise SystemExit(f"{os.path.normpath(index)} not found: --student needs a distill export's transformer")
    return list(json.load(open(index))["sample_sigmas"])


def validation_judge(workdir: str, transformer: str, num: int = 64, steps: int = 40, cfg: float = 4.0,
                     splits=("train", "heldout"), sample_sigmas=None) -> dict:
    from qwenimage_jax.evals import t2i
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    name = "validation_" + transformer.strip("/").replace("/", "_")
    pipe = QwenImagePipeline.from_pretrained(world_stages.judge_pipeline(workdir, transformer, sample_sigmas,
                                                                         name=name))
    if sample_sigmas is not None:
        steps = len(sample_sigmas)
    result = {"transformer": transformer, "num_prompts": num, "steps": steps, "cfg": cfg,
              "prompt_seed": t2i.VALIDATION_SEED, "sample_sigmas": sample_sigmas}
    trained = os.path.join(workdir, transformer, world_stages.TRAINED_FILE)
    if os.path.exists(trained):
        result["steps_trained"] = json.load(open(trained))
    for split in splits:
        judged = t2i.evaluate(pipe, "", split, num, steps, world_stages._image_size(), cfg=cfg,
                              prompt_seed=t2i.VALIDATION_SEED)
        result[split] = {k: round(float(v), 4) for k, v in judged["generated"].items()}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True,
                        help="a world build directory (python -m qwenimage_jax.recipes.world)")
    parser.add_argument("--transformer", required=True, help="transformer directory, relative to --workdir")
    parser.add_argument("--out", required=True, help="where to write the JSON")
    parser.add_argument("--num", type=int, default=64, help="prompts per split (default 64)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--cfg", type=float, default=4.0)
    parser.add_argument("--student", action="store_true",
                        help="a distilled student: sample on its own grid (sample_sigmas of its export), CFG 1")
    args = parser.parse_args(argv)
    if not os.path.isdir(os.path.join(args.workdir, args.transformer)):
        raise SystemExit(f"no transformer directory {os.path.join(args.workdir, args.transformer)!r}")
    from qwenimage_jax.evals.vae_readout import write_result

    sigmas = student_grid(args.workdir, args.transformer) if args.student else None
    result = validation_judge(args.workdir, args.transformer, args.num, args.steps, 1.0 if args.student else args.cfg,
                              sample_sigmas=sigmas)
    write_result(result, args.out)
    for split in ("train", "heldout"):
        print(f"{split}: " + " ".join(f"{k} {v:.3f}" for k, v in result[split].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
