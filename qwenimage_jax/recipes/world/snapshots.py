"""A build in progress carried to another machine: `--snapshot DIR` copies what a later run needs to go on
(trained components, exported DiT phases, records, each run's metrics.jsonl) and writes DIR/README.md;
`--resume-from DIR` fills a workdir from it."""
from __future__ import annotations

import json
import os
import shutil

from qwenimage_jax.recipes.world.stages import REPO, TRAINED_FILE, _config, _times, stage_time_lines

BUILD_DIR = os.path.join(REPO, "world_build")
# What a later run on another machine needs to go on from where a build stopped (`--snapshot` / `--resume-from`):
# the trained components, the stable DiT phase's exported weights, the records, and each run's metrics.jsonl
SNAPSHOT_ITEMS = ("tokenizer", "text_encoder", "expander", "vae_diffusers", "vae_noalign_diffusers",
                  "transformer_ablation", "transformer_ablation_noalign", "transformer_base", "transformer",
                  "times.json", "figures.json", "shape_trace_teacher.json", "latent_directions.json",
                  "prompt_gaps_teacher.json",
                  "text_probe.json", "text_check.json", "ablation.json", "text_history.json", "stable_run.json")
SNAPSHOT_RUNS = ("vae_encoder", "vae", "vae_noalign", "vae_decoder", "vae_noalign_decoder", "dit", "dit_noalign")


# a component the shipped model holds byte for byte is not copied again: DST/NAME.shipped.json points at it
SHIPPED_DIR = os.path.join(REPO, "qwenimage_jax", "assets", "tiny_world")
SHIPPED_COPIES = {"vae_diffusers": "vae"}


def _digest(directory: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    for name in sorted(os.listdir(directory)):
        digest.update(name.encode())
        with open(os.path.join(directory, name), "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()


def snapshot(workdir: str, dst: str) -> str:
    """Copies SNAPSHOT_ITEMS of WORKDIR (those present) and the metrics.jsonl of its runs to `dst`; an item the
    shipped model holds unchanged (SHIPPED_COPIES) is recorded as a pointer with its digest instead."""
    import re

    os.makedirs(dst, exist_ok=True)
    for name in SNAPSHOT_ITEMS:
        src, out = os.path.join(workdir, name), os.path.join(dst, name)
        if not os.path.exists(src):
            continue
        if os.path.isdir(out):
            shutil.rmtree(out)
        shipped = os.path.join(SHIPPED_DIR, SHIPPED_COPIES.get(name, "-"))
        if os.path.isdir(shipped) and os.path.isdir(src) and _digest(src) == _digest(shipped):
            with open(out + ".shipped.json", "w") as f:
                json.dump({"same_as": os.path.relpath(shipped, REPO), "sha256": _digest(src)}, f, indent=1)
            continue
        if os.path.exists(out + ".shipped.json"):
            os.remove(out + ".shipped.json")
        shutil.copytree(src, out) if os.path.isdir(src) else shutil.copy(src, out)
    for name in sorted(os.listdir(workdir)):
        if name in SNAPSHOT_RUNS or re.fullmatch(r"dit(_noalign)?_(from|cooldown)_?\w*", name):
            metrics = os.path.join(workdir, name, "metrics.jsonl")
            if os.path.exists(metrics):
                os.makedirs(os.path.join(dst, name), exist_ok=True)
                shutil.copy(metrics, os.path.join(dst, name, "metrics.jsonl"))
        if re.fullmatch(r"vae(_noalign)?_palette", name):  # the decoder's palette phase: each cycle's metrics
            for cycle in sorted(os.listdir(os.path.join(workdir, name))):
                metrics = os.path.join(workdir, name, cycle, "metrics.jsonl")
                if os.path.exists(metrics):
                    os.makedirs(os.path.join(dst, name, cycle), exist_ok=True)
                    shutil.copy(metrics, os.path.join(dst, name, cycle, "metrics.jsonl"))
        if re.fullmatch(r"distill_\d+", name):  # a student: its metrics and its exported weights
            for part in ("metrics.jsonl", "export"):
                src, out = os.path.join(workdir, name, part), os.path.join(dst, name, part)
                if os.path.isdir(src):
                    shutil.rmtree(out, ignore_errors=True)
                    shutil.copytree(src, out)
                elif os.path.exists(src):
                    os.makedirs(os.path.dirname(out), exist_ok=True)
                    shutil.copy(src, out)
    _write_snapshot_readme(dst)
    print(f"[snapshot] {workdir} -> {dst}", flush=True)
    return dst


def _git_commit() -> str:
    from qwenimage_jax.io_utils import git_commit

    return git_commit(REPO)


def _write_snapshot_readme(dst: str) -> None:
    """DST/README.md: what the snapshot holds and how to go on, with its recorded stages (times.json) and probes."""
    times = _times(dst)
    lines = ["# A build of the small world in progress (`python -m qwenimage_jax.recipes.world --snapshot`)", "",
             "The trained stages of the recipe so far, so that a run on another machine goes on from here instead "
             "of retraining them:", "",
             f"    python -m qwenimage_jax.recipes.world --workdir /tmp/world --resume-from {os.path.basename(dst)} "
             "--stage cache --stage dit --dit-budget-min 60 --snapshot " + os.path.basename(dst), "",
             "The stable DiT phase continues from `transformer_base/` (its step count in `trained_steps.json`); "
             "cached latents are recomputed from the VAE and the text encoder (`cache`, ~3 min). `--stage distill "
             "--stage assemble --stage figures` (re)ships the world into qwenimage_jax/assets/tiny_world; "
             "`levers/` records the levers tried on this build. A component the shipped model holds byte for byte "
             "is a pointer (`NAME.shipped.json`: its path and digest), restored from there by `--resume-from`.", "",
             f"Written at commit {_git_commit()}.", "",
             "## Stages recorded (times.json: wall seconds on 2 CPU cores and each stage's figures)", ""]
    lines += stage_time_lines(times, dst)
    probe = os.path.join(dst, "text_probe.json")
    if os.path.exists(probe):
        lines += ["", "## Text encoder probes (text_probe.json, `evals.text_probe.report`)", ""]
        for name, values in json.load(open(probe)).items():
            if not isinstance(values, dict) or name == "provenance":  # its record of what wrote it
                continue
            lines.append(f"- {name}: " + ", ".join(f"{k} {v:.3f}" for k, v in values.items()))
    base = os.path.join(dst, "transformer_base", TRAINED_FILE)
    if os.path.exists(base):
        lines += ["", f"Stable DiT phase: step {json.load(open(base))['steps']} of "
                      f"{int(_config('world_dit').steps)} (configs/world_dit.py)."]
    with open(os.path.join(dst, "README.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def resume_from(src: str, workdir: str) -> None:
    """The inverse of `snapshot`: whatever WORKDIR lacks is copied from the snapshot `src`."""
    if not os.path.isdir(src):
        raise FileNotFoundError(f"--resume-from {src!r}: no such directory (a `--snapshot` of an earlier build)")
    os.makedirs(workdir, exist_ok=True)
    for name in sorted(os.listdir(src)):
        path, out = os.path.join(src, name), os.path.join(workdir, name)
        if name.endswith(".shipped.json"):  # a pointer to the shipped copy (see `snapshot`)
            item, pointer = os.path.join(workdir, name[:-len(".shipped.json")]), json.load(open(path))
            shipped = os.path.join(REPO, pointer["same_as"])
            if not os.path.exists(item):
                if _digest(shipped) != pointer["sha256"]:
                    raise ValueError(f"{path}: {shipped} is no longer the snapshot's {os.path.basename(item)} "
                                     "(the shipped model changed since); rebuild that stage or take an older "
                                     "snapshot")
                shutil.copytree(shipped, item)
            continue
        if name == "times.json" and os.path.exists(out):
            continue
        if os.path.isdir(path):
            if name in SNAPSHOT_ITEMS and os.path.exists(out):
                continue
            shutil.copytree(path, out, dirs_exist_ok=True)
        elif not os.path.exists(out):
            shutil.copy(path, out)
    print(f"[resume] {src} -> {workdir}", flush=True)
