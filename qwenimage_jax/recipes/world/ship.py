"""The world recipe's last stages: assemble (the trained components of the shipped arm -> ONE diffusers-format
pipeline directory, the distilled student as its default transformer), the shipped README.md, the teacher's loss
curve and figures (the judge on the step table, sliced-W2 distances, swapped-prompt gaps)."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from qwenimage_jax.recipes.world.stages import (ARMS, SHIPPED_ARM, TRAINED_FILE, _config, _image_size, _record,
                                                judge_pipeline, stage_time_lines,
                                                shipped_student, write_pipeline_files)

def assemble(workdir: str, out: str, arm: str = SHIPPED_ARM) -> str:
    """Copies the trained components of `arm` into ONE diffusers-format QwenImage21Pipeline directory + expander/."""
    suffix = ARMS[arm][0]
    if os.path.isdir(out):
        for name in os.listdir(out):
            path = os.path.join(out, name)
            if name not in ("README.md", "__init__.py"):
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    os.makedirs(out, exist_ok=True)
    num_steps = shipped_student(workdir)
    student = os.path.join(workdir, f"distill_{num_steps}", "export")
    sample_sigmas = None
    if num_steps is not None:
        # the shipped student is the default transformer (its grid in model_index.json); the teacher stays beside it
        shutil.copytree(os.path.join(student, "transformer"), os.path.join(out, "transformer"))
        shutil.copytree(os.path.join(workdir, "transformer" + suffix), os.path.join(out, "teacher", "transformer"))
        sample_sigmas = json.load(open(os.path.join(student, "model_index.json")))["sample_sigmas"]
    else:
        shutil.copytree(os.path.join(workdir, "transformer" + suffix), os.path.join(out, "transformer"))
    shutil.copytree(os.path.join(workdir, f"vae{suffix}_diffusers"), os.path.join(out, "vae"))
    os.makedirs(os.path.join(out, "text_encoder"))
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        src = os.path.join(workdir, "text_encoder", name)
        if os.path.exists(src):
            shutil.copy(src, os.path.join(out, "text_encoder", name))
    shutil.copytree(os.path.join(workdir, "tokenizer"), os.path.join(out, "processor"))
    shutil.copytree(os.path.join(workdir, "expander"), os.path.join(out, "expander"))
    write_pipeline_files(workdir, out, sample_sigmas)
    shutil.copy(os.path.join(workdir, "times.json"), os.path.join(out, "build_times.json"))
    return out


def component_sizes(out: str) -> dict:
    """Bytes on disk of each shipped component and in total (the README that lists them, and Python's caches, not
    counted: the figure must not depend on the README it is written into)."""
    def counted(d, f):
        return "__pycache__" not in d and not (d == out and f == "README.md")

    sizes = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if os.path.isdir(path) and name != "__pycache__":
            sizes[name] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs
                              if counted(d, f))
    sizes["total"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs
                         if counted(d, f))
    return sizes


def _param_counts(out: str) -> dict:
    from qwenimage_jax.checkpoints.safetensors_io import SafetensorsReader

    counts = {}
    for name in ("transformer", "vae", "text_encoder", "expander"):
        reader = SafetensorsReader(os.path.join(out, name))
        counts[name] = int(sum(int(np.prod(reader[k].shape)) for k in reader.keys()))
    return counts


def write_readme(workdir: str, out: str, figures: dict | None = None) -> str:
    """README.md of the shipped directory: what it is, the exact commands/seeds, wall times, sizes, figures."""
    times = json.load(open(os.path.join(workdir, "times.json")))
    sizes = component_sizes(out)
    lines = [
        "# tiny_world: the small world's text-to-image model (diffusers format)",
        "",
        "A Qwen-Image-2-format pipeline directory (`model_index.json`, `transformer/`, `vae/`, `text_encoder/`,",
        "`processor/`, `scheduler/`) plus `expander/` (the prompt-expansion LM) and, when distilled, `teacher/`:",
        "`transformer/` is then a few-step DMD student (its grid is `sample_sigmas` in model_index.json; it samples",
        "without CFG) and `teacher/transformer/` the 40-step teacher it was distilled from. Trained from scratch on CPU on the",
        f"procedural world of `qwenimage_jax/data/world.py` at {_image_size()} x {_image_size()} pixels (1-2 object "
        "groups on plain backgrounds, no words;",
        "`world.json` records the size). 20% of the (shape, colour) compositions never appear in any training data.",
        "These are deliberately tiny models trained for minutes on 2 CPU cores.",
        "",
        "    qwenimage-jax demo                                   # text-to-image + judge, out/demo/demo_grid.png",
        "    qwenimage-jax eval-t2i --model qwenimage_jax/assets/tiny_world --num-prompts 64            # student, its grid",
        "    qwenimage-jax eval-t2i --model qwenimage_jax/assets/tiny_world --transformer teacher/transformer \\",
        "        --steps 40 --num-prompts 64 --expand                                                   # teacher",
        "",
        "## Reproduce (seeds are fixed in the configs; all stages resume)",
        "",
        "    python -m qwenimage_jax.recipes.world --workdir /tmp/world --out qwenimage_jax/assets/tiny_world",
        "",
        "which runs, in order:",
        "",
        "1. `text` (configs/world_text_lm.py, seed 0): BPE tokenizer on world captions + Qwen specials; text encoder",
        "   = tiny Qwen3-VL decoder pretrained by next-token prediction on rich captions in the encoder template, with",
        "   untied embeddings and linear heads reading every scene field from its states; expander = that model",
        "   fine-tuned on (short prompt -> rich caption) chats (`expander` re-runs only this).",
        "2. `vae_encoder`, `vae`, `vae_decoder`, `vae_palette`: the Qwen-Image-2 f16 VAE in four phases",
        "   (configs/world_vae_encoder.py, configs/world_vae.py, configs/world_vae_decoder.py,",
        "   configs/world_vae_palette.py, seed 0): the encoder (and a linear per-cell head) on each latent's read-out",
        "   of its own 16 px patch; the whole VAE (L1 + L2 + salient L1 + the VGG16 alignment, no discriminator); the",
        "   decoder alone with the latents frozen (+ an edge L1), then (+ a palette cross-entropy) in three cycles.",
        "   Exported to diffusers format with per-channel latent mean/std measured on 256 train scenes.",
        f"3. `cache`: `qwenimage-jax cache-latents --source world:{_config('world_dit').num_scenes}:train:"
        f"{_image_size()} --vae /tmp/world/vae_diffusers",
        "   --text-encoder /tmp/world/text_encoder --tokenizer /tmp/world/tokenizer --out /tmp/world/latents`.",
        "4. `dit`: the DiT trainer with configs/world_dit.py on those latents (seed 0): a warmup-stable phase at a",
        "   constant learning rate to `steps` (resumable across runs), then `cooldown` (the learning rate annealed to",
        "   ~0); the EMA weights are exported (`teacher/transformer/` here, its loss curve in",
        "   `teacher/loss_curve.json`). 5. `ablation`: the alignment ablation's arms judged at `ablation_steps`.",
        "6. `distill`: configs/world_distill.py (DMD: real score = teacher with CFG 4, fake score, 2- and 1-step",
        "   students, plus DMD1's regression to the teacher's CFG-4 ODE from the same noise), each student's EMA",
        "   weights exported with sample_sigmas; the fewest-step student within 0.03 of the teacher on the validation",
        "   prompts ships, else the best-judged one.",
        "7. `assemble`: this directory; 8. `figures`: the tables below.",
        "",
        "## Wall times (2 CPU cores, shared with other jobs while this was built; the text stage ran under heavy load)",
        "",
    ]
    lines += stage_time_lines(times, workdir)
    lines += ["", "## Sizes", ""]
    counts = _param_counts(out)
    for name, size in sizes.items():
        count = f", {counts[name]:,} parameters" if name in counts else ""
        lines.append(f"- {name}: {size / 2**20:.2f} MiB{count}")
    ablation_path = os.path.join(workdir, "ablation.json")
    if os.path.exists(ablation_path):
        lines += ["", "## Alignment ablation (same VAE recipe and budget, same DiT budget; 40 steps, CFG 4)", "",
                  "| arm | VAE held-out PSNR | judge on VAE reconstructions | teacher judge, train | teacher judge, "
                  "held-out | held-out all_correct |", "|---|---|---|---|---|---|"]
        for arm, entry in json.load(open(ablation_path)).items():
            if arm not in ARMS:  # its provenance record
                continue
            vae = entry.get("vae", {})
            train, held = entry["teacher_40_train"]["generated"], entry["teacher_40_heldout"]["generated"]
            lines.append(f"| {arm} | {vae.get('heldout_psnr', '-')} dB | {vae.get('heldout_judge_on_reconstructions', '-')} "
                         f"| {train['overall']:.3f} | {held['overall']:.3f} | {held['all_correct']:.3f} |")
    else:
        lines += ["", "## Alignment ablation", "", "Not run on this build: the control arm (`--arm noalign`: its VAE "
                  "without the alignment term, cached latents and a DiT of the same budget) and `--stage ablation` "
                  "would add the table here."]
    if figures and figures.get("summary"):
        lines += ["", f"## Steps (judge accuracy on {figures.get('num_prompts')} prompts "
                  "per split; every sampler from the same noise)", "", figures["summary"]]
    if figures:
        lines += ["", "## Figures (judge accuracy, `overall` = mean over all attribute checks)", ""]
        lines += [f"    {line}" for line in figures.get("table", "").splitlines()]
    with open(os.path.join(out, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(out, "README.md")


def write_loss_curve(workdir: str, out: str, arm: str = SHIPPED_ARM) -> str | None:
    """OUT/teacher/loss_curve.json: the teacher's training loss per logged step, the stable run then the cooldown
    that made the shipped weights (its steps counted on from the base step)."""
    suffix = ARMS[arm][0]
    final = os.path.join(workdir, "transformer" + suffix, TRAINED_FILE)
    if not os.path.exists(final):
        return None
    base_step = int(json.load(open(final)).get("base_step", json.load(open(final))["steps"]))

    def losses(run_dir, offset=0, upto=None):
        path = os.path.join(run_dir, "metrics.jsonl")
        rows = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
        points = {int(r["step"]) + offset: float(r["loss"]) for r in rows if "loss" in r}
        return sorted((k, v) for k, v in points.items() if upto is None or k <= upto)

    import re

    stable = dict(losses(os.path.join(workdir, "dit" + suffix), upto=base_step))
    continued = sorted((int(m.group(1)), name) for name in os.listdir(workdir)
                       if (m := re.fullmatch(f"dit{suffix}_from_(\\d+)", name)))
    for offset, name in continued:  # later runs continue the earlier ones (stable_run)
        stable.update(losses(os.path.join(workdir, name), offset=offset, upto=base_step))
    curve = {"stable": sorted(stable.items()),
             "cooldown": losses(os.path.join(workdir, f"dit_cooldown{suffix}_from_{base_step}"), offset=base_step),
             "base_step": base_step}
    teacher_dir = os.path.join(out, "teacher") if os.path.isdir(os.path.join(out, "teacher")) else out
    path = os.path.join(teacher_dir, "loss_curve.json")
    with open(path, "w") as f:
        json.dump(curve, f)
    return path


def stage_figures(workdir: str, out: str, num_prompts: int = 64) -> dict:
    """The reports' figures on the shipped directory: judge accuracy of the teacher at 40 and 4 steps (CFG 4) and,
    when distilled, of the 4-step student (no CFG), on train and held-out compositions, with ground truth; the
    sliced-W2 distance (16 x 16 box-downsampled pixels) of each to the teacher's 40-step images from the same
    noise; and the prompt-expansion gain on short prompts (teacher, 40 steps)."""
    from qwenimage_jax.evals import t2i as eval_t2i
    from qwenimage_jax.metrics.distribution import foreground_features, image_features, sliced_wasserstein
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    t0 = time.time()
    distilled = os.path.isdir(os.path.join(out, "teacher", "transformer"))
    teacher = QwenImagePipeline.from_pretrained(
        out, transformer_subfolder="teacher/transformer" if distilled else "transformer")
    # the step table: the teacher (Euler, CFG 4) at 40 (the reference and the expansion run), 8, 4, 2 and 1 steps,
    # then every student distilled in WORKDIR (no CFG, its own grid), the shipped one loaded from OUT
    runs = [("teacher", teacher, steps, 4.0) for steps in (40, 8, 4, 2, 1)]
    if distilled:
        shipped = QwenImagePipeline.from_pretrained(out)
        for num_steps in sorted((int(n) for n in _config("world_distill").student_steps), reverse=True):
            export = os.path.join(workdir, f"distill_{num_steps}", "export")
            if len(shipped.sample_sigmas) == num_steps:
                runs.append(("student", shipped, num_steps, 1.0))
            elif os.path.isdir(export):
                sigmas = json.load(open(os.path.join(export, "model_index.json")))["sample_sigmas"]
                path = judge_pipeline(workdir, os.path.relpath(os.path.join(export, "transformer"), workdir), sigmas,
                                      name=f"student_{num_steps}")
                runs.append(("student", QwenImagePipeline.from_pretrained(path), num_steps, 1.0))
    figures, tables = {}, []
    for split in ("train", "heldout"):
        reference = None
        for name, pipe, steps, cfg in runs:
            result = eval_t2i.evaluate(pipe, out, split, num_prompts, steps, _image_size(), cfg=cfg,
                                       expand=(name == "teacher" and steps == 40))
            images = result.pop("images")
            if reference is None:
                reference = image_features(images), foreground_features(images)
            else:
                result["sliced_w2_to_teacher_40"] = round(sliced_wasserstein(image_features(images), reference[0]), 4)
                result["mask_sliced_w2_to_teacher_40"] = round(
                    sliced_wasserstein(foreground_features(images), reference[1]), 4)
            figures[f"{split}_{name}_{steps}"] = result
            title = f"{name}, {steps} steps" + (f"; sliced-W2 to the teacher's 40-step images "
                                                f"{result['sliced_w2_to_teacher_40']:.4f} (pixels), "
                                                f"{result['mask_sliced_w2_to_teacher_40']:.4f} (foreground masks)"
                                                if "sliced_w2_to_teacher_40" in result else "")
            tables.append(f"[{title}]\n" + eval_t2i.format_table(result))
            print(tables[-1], flush=True)
    # the swapped-prompt test: how much worse the teacher predicts from a caption with one attribute changed
    from qwenimage_jax.evals import conditioning

    gaps = conditioning.prompt_gaps(teacher.transformer, teacher.vae, teacher.text_encoder, num=num_prompts,
                                    split="heldout", seed=eval_t2i.EVAL_SEED + 7, size=_image_size())
    figures["teacher_prompt_gaps"] = {k: round(v, 4) for k, v in gaps.items()}
    tables.append("[teacher: swapped-prompt loss gap on held-out scenes, sigma in "
                  f"{list(conditioning.SIGMAS)}]\n" + "\n".join(f"{k:<14}{v:>10.4f}" for k, v in gaps.items()))
    print(tables[-1], flush=True)
    write_loss_curve(workdir, out)
    attributes = ("colour", "shape", "count", "position", "size", "background")
    summary = ["| sampler | train overall | held-out overall | " + " | ".join(attributes) +
               " | held-out all_correct | sliced-W2 to teacher-40 (pixels / masks) |",
               "|---" * (len(attributes) + 5) + "|"]
    for name, _, steps, cfg in runs:
        train, held = figures[f"train_{name}_{steps}"], figures[f"heldout_{name}_{steps}"]
        w2 = held.get("sliced_w2_to_teacher_40")
        distances = "-" if w2 is None else f"{w2:.4f} / {held['mask_sliced_w2_to_teacher_40']:.4f}"
        summary.append(f"| {name}, {steps} steps{', CFG 4' if cfg > 1 else ''} | {train['generated']['overall']:.3f} | "
                       f"{held['generated']['overall']:.3f} | "
                       + " | ".join(f"{held['generated'].get(a, float('nan')):.3f}" for a in attributes) +
                       f" | {held['generated']['all_correct']:.3f} | {distances} |")
    # the README's tables are kept in figures.json too, so the README can be checked against (and rebuilt from)
    # its artifacts alone (tests/test_doc_figures.py)
    figures["readme"] = {"table": "\n\n".join(tables), "summary": "\n".join(summary), "num_prompts": num_prompts}
    from qwenimage_jax.io_utils import provenance, write_json

    figures["provenance"] = provenance()
    figures["commit"] = figures["provenance"]["commit"]
    for path in (os.path.join(workdir, "figures.json"), os.path.join(out, "figures.json")):
        write_json(path, figures, indent=1)
    _record(workdir, "figures", time.time() - t0, num_prompts=num_prompts)
    write_readme(workdir, out, figures["readme"])
    return figures
