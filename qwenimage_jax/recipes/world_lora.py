"""The small world's LoRA demonstration: teach the shipped 40-step teacher purple backgrounds, then judge it.

    python -m qwenimage_jax.recipes.world_lora --workdir /tmp/world_lora [--out qwenimage_jax/assets/tiny_world]

Stages (each resumes or is skipped when its output exists):
1. cache: 400 "novel"-split scenes (on a purple background, which the world's other splits never draw: purple
   is an object colour there) plus 400 replayed training scenes, encoded by the shipped VAE and text encoder (seed 0).
2. train: `train-lora` with configs/world_lora.py on the teacher (base frozen).
3. eval: the judge on fresh prompts (eval seed 1000, never trained on) of the novel, held-out and train splits,
   40 steps CFG 4, the teacher without and with the adapter, the same noise for both.
With --out, the adapter is copied to OUT/lora_purple/ and the figures to OUT/lora_figures.json.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time

SOURCE = "world:400:novel:128+world:400:train:128"
SPLITS = ("novel", "heldout", "train")


def _config_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "..", "..", "configs", "world_lora.py")


def stage_cache(workdir: str, model: str) -> str:
    from qwenimage_jax.data.cache_latents import cache_latents

    out = os.path.join(workdir, "latents")
    if not os.path.exists(os.path.join(out, "meta.json")):
        cache_latents(SOURCE, os.path.join(model, "vae"), os.path.join(model, "text_encoder"), out,
                      tokenizer_path=os.path.join(model, "processor"))
    return out


def stage_train(workdir: str, model: str, latents: str, overrides=()) -> dict:
    from qwenimage_jax.config_cli import load_config
    from qwenimage_jax.training.lora import train

    config = load_config(_config_path(), [f"--config.base={os.path.join(model, 'teacher', 'transformer')}",
                                          f"--config.data.path={latents}", *overrides])
    t0 = time.time()
    result = train(config, os.path.join(workdir, "run"))
    return {"export_dir": result["export_dir"], "final_step": result["final_step"],
            "trainable_params": result["trainable_params"], "base_params": result["base_params"],
            "seconds": round(time.time() - t0, 1),
            "last_loss": result["losses"][max(result["losses"])] if result["losses"] else None}


def stage_eval(model: str, adapter: str, num_prompts: int = 64, steps: int = 40, cfg: float = 4.0) -> dict:
    from qwenimage_jax.evals import t2i as eval_t2i
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(model, transformer_subfolder="teacher/transformer")
    pipe.load_lora_weights(adapter, adapter_name="purple")
    size = eval_t2i.model_size(model)
    figures = {}
    for split in SPLITS:
        for arm, weight in (("teacher", 0.0), ("teacher+lora", 1.0)):
            pipe.set_adapters("purple", adapter_weights=weight)  # same compiled sampler, same noise
            result = eval_t2i.evaluate(pipe, model, split, num_prompts, steps, size, cfg)
            figures.setdefault(split, {})[arm] = result["generated"]
            figures[split]["ground_truth"] = result["ground_truth"]
            print(f"{split:8s} {arm:13s} overall {result['generated']['overall']:.3f}"
                  + (f"  purple background {result['generated']['novel_background']:.3f}"
                     if "novel_background" in result["generated"] else ""), flush=True)
    return figures


def figure(model: str, adapter: str, out_png: str, num: int = 6, steps: int = 40, cfg: float = 4.0) -> str:
    """Rows: the prompt's rendering, the teacher, the teacher with the adapter (same noise), for `num` fresh
    novel-split prompts (eval seed 1000)."""
    import numpy as np
    from PIL import Image

    from qwenimage_jax.evals import t2i as eval_t2i
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(model, transformer_subfolder="teacher/transformer")
    pipe.load_lora_weights(adapter, adapter_name="purple")
    size = eval_t2i.model_size(model)
    items = eval_t2i.world_prompts("novel", num, size)
    prompts = [r["caption"] for r in items]
    rows = [np.concatenate([r["image"] for r in items], axis=1)]
    for weight in (0.0, 1.0):
        pipe.set_adapters("purple", adapter_weights=weight)
        rows.append(np.concatenate(list(eval_t2i.generate(pipe, prompts, steps, size, cfg, 0, num)), axis=1))
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    Image.fromarray(np.concatenate(rows, axis=0)).save(out_png)
    with open(os.path.splitext(out_png)[0] + ".txt", "w") as f:
        f.write("rows: rendering | teacher | teacher + LoRA; prompts:\n" + "\n".join(prompts) + "\n")
    return out_png


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--model", default=None, help="the world model (default: the shipped tiny_world)")
    parser.add_argument("--out", default=None, help="copy the adapter and figures into this model directory")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--figure", default=None, help="also write the before/after picture here (PNG)")
    args, overrides = parser.parse_known_args(argv)
    from qwenimage_jax.commands.demo import TINY_WORLD_DIR

    model = args.model or str(TINY_WORLD_DIR)
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.time()
    latents = stage_cache(args.workdir, model)
    cache_seconds = round(time.time() - t0, 1)
    run = stage_train(args.workdir, model, latents, [o for o in overrides if o.startswith("--config.")])
    figures = {"train": run, "cache_seconds": cache_seconds,
               "splits": stage_eval(model, run["export_dir"], args.num_prompts)}
    if args.figure:
        figure(model, run["export_dir"], args.figure)
    from qwenimage_jax.io_utils import provenance, write_json

    figures["provenance"] = provenance()
    figures["commit"] = figures["provenance"]["commit"]
    write_json(os.path.join(args.workdir, "lora_figures.json"), figures, indent=1)
    if args.out:
        shutil.copytree(run["export_dir"], os.path.join(args.out, "lora_purple"), dirs_exist_ok=True)
        shutil.copy(os.path.join(args.workdir, "lora_figures.json"), os.path.join(args.out, "lora_figures.json"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
