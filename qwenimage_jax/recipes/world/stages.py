"""The world recipe's shared settings and records (the stage names, the ablation arms, `--config-arg`, configs/,
times.json) and its training stages after the text one: vae_encoder, vae, vae_decoder, cache, dit (ablation,
stable and cooldown phases), ablation, distill (+ the regression pairs), and the judge pipelines they evaluate
with. The recipe as a whole: `qwenimage_jax.recipes.world` (`python -m qwenimage_jax.recipes.world`)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

STAGES = ("text", "expander", "text_check", "vae_encoder", "vae", "vae_decoder", "vae_palette", "cache", "dit", "ablation",
          "distill", "assemble", "figures")
# ablation arm -> (suffix of its WORKDIR paths, config overrides of its VAE run)
ARMS = {"align": ("", []), "noalign": ("_noalign", ["--config.losses.align.probe_only=True"])}
SHIPPED_ARM = "align"
# qwenimage_jax/recipes/world/stages.py -> the repository root (configs/, world_build/)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
DEFAULT_OUT = os.path.join(REPO, "qwenimage_jax", "assets", "tiny_world")


CONFIG_ARG = None  # set by --config-arg ("smoke": every stage in seconds, for CI); passed to every get_config


def _config(name: str, arg=None):
    import importlib.util

    arg = CONFIG_ARG if arg is None else arg
    path = os.path.join(REPO, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"configs_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def _record(workdir: str, stage: str, seconds: float, **extra) -> None:
    path = os.path.join(workdir, "times.json")
    data = json.load(open(path)) if os.path.exists(path) else {}
    from qwenimage_jax.io_utils import provenance, write_json

    # each stage keeps the commit that ran it; the top-level record is the latest write's
    data["provenance"] = provenance()
    data["commit"] = data["provenance"]["commit"]
    data[stage] = dict(seconds=round(seconds, 1), **extra, commit=data["commit"])
    write_json(path, data, indent=1)


def recorded_stages(times: dict) -> list[tuple[str, dict]]:
    """times.json's stage entries (name, record), without its provenance keys."""
    return [(k, v) for k, v in times.items() if isinstance(v, dict) and "seconds" in v]


def _times(workdir: str) -> dict:
    path = os.path.join(workdir, "times.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def _cli(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "qwenimage_jax.cli"] + args
    print("[run]", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


def _last_eval(run: str, keys) -> dict:
    """The last logged value of each of `keys` in RUN/metrics.jsonl (the figures a stage records)."""
    values = {}
    path = os.path.join(run, "metrics.jsonl")
    for line in open(path) if os.path.exists(path) else ():
        record = json.loads(line)
        values.update({k.split("/")[-1]: round(float(record[k]), 5) for k in keys if k in record})
    return values


def _image_size() -> int:
    return int(_config("world_dit").image_size)


TRAINED_FILE = "trained_steps.json"  # beside each exported DiT: {"steps": the step its run reached}


def _trained_steps(export_dir: str) -> int:
    path = os.path.join(export_dir, TRAINED_FILE)
    return int(json.load(open(path))["steps"]) if os.path.exists(path) else -1


def stage_time_lines(times: dict, build_dir: str) -> list[str]:
    """README lines of the recorded stages (wall seconds and figures) and the stable DiT phase's total step time,
    shared by the shipped model's README and the snapshot's."""
    lines = []
    for stage, info in recorded_stages(times):
        extra = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("seconds", "commit"))
        lines.append(f"- {stage}: {info['seconds']:.0f} s" + (f" ({extra})" if extra else ""))
    stable_seconds = logged_step_seconds(os.path.join(build_dir, "dit"))
    if stable_seconds:
        lines.append(f"- the stable DiT phase ran over several resumed calls (`dit` above is the last one's wall "
                     f"time): its steps took {stable_seconds[1]:.0f} s in all to step {stable_seconds[0]} "
                     "(logged step times x steps between logs, dit/metrics.jsonl)")
    return lines


def logged_step_seconds(run_dir: str) -> tuple[int, float] | None:
    """(last logged step, the run's step time in all) of a resumable run: each logged `step_time_s` times the
    steps since the previous log; None without a metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    key = lambda r: "step_time_s" if "step_time_s" in r else "train/step_time_s"  # noqa: E731 (DiT / VAE logs)
    rows = sorted({int(r["step"]): float(r[key(r)]) for r in map(json.loads, open(path))
                   if key(r) in r}.items())
    total, previous = 0.0, 0
    for step, seconds in rows:
        total, previous = total + seconds * (step - previous), step
    return (previous, total) if rows else None


def stage_vae_encoder(workdir: str) -> str:
    """The shared first VAE phase (configs/world_vae_encoder.py); returns its Orbax export."""
    run = os.path.join(workdir, "vae_encoder")
    export = os.path.join(run, "vae_export")
    if os.path.exists(os.path.join(export, "params")) and "vae_encoder" in _times(workdir):
        print(f"[vae_encoder] {export} exists; skipping", flush=True)
        return export
    t0 = time.time()
    config = os.path.join(REPO, "configs", "world_vae_encoder.py") + (f":{CONFIG_ARG}" if CONFIG_ARG else "")
    _cli(["train-vae", "--config", config, "--workdir", run])
    _record(workdir, "vae_encoder", time.time() - t0, **_last_eval(run, ("eval/cell_readout_mse",)))
    return export


def stage_vae(workdir: str, arm: str = SHIPPED_ARM) -> None:
    suffix, overrides = ARMS[arm]
    if os.path.exists(os.path.join(workdir, f"vae{suffix}_diffusers", "config.json")):
        print(f"[vae{suffix}] {workdir}/vae{suffix}_diffusers exists; skipping", flush=True)
        return
    encoder = stage_vae_encoder(workdir)  # (skips itself when done)
    t0 = time.time()
    run = os.path.join(workdir, "vae" + suffix)
    config = os.path.join(REPO, "configs", "world_vae.py") + (f":{CONFIG_ARG}" if CONFIG_ARG else "")
    _cli(["train-vae", "--config", config, "--workdir", run, f"--config.init_from={encoder}"] + overrides)
    stats = export_vae_diffusers(os.path.join(run, "vae_export"), os.path.join(workdir, f"vae{suffix}_diffusers"))
    _record(workdir, "vae" + suffix, time.time() - t0, **stats)


def stage_vae_decoder(workdir: str, arm: str = SHIPPED_ARM) -> None:
    """The arm's VAE decoder fine-tuned with the encoder frozen (configs/world_vae_decoder.py); its export replaces
    WORKDIR/vae{suffix}_diffusers (same encoder, so the same latents and latent statistics)."""
    suffix = ARMS[arm][0]
    run = os.path.join(workdir, f"vae{suffix}_decoder")
    if os.path.exists(os.path.join(run, "vae_export", "params")) and f"vae_decoder{suffix}" in _times(workdir):
        print(f"[vae_decoder{suffix}] {run}/vae_export exists; skipping", flush=True)
        return
    t0 = time.time()
    config = os.path.join(REPO, "configs", "world_vae_decoder.py") + (f":{CONFIG_ARG}" if CONFIG_ARG else "")
    first = os.path.join(workdir, "vae" + suffix, "vae_export")
    if not os.path.exists(os.path.join(first, "params")):  # a machine with only the snapshot: the same weights
        first = os.path.join(workdir, f"vae{suffix}_diffusers")
    _cli(["train-vae", "--config", config, "--workdir", run, f"--config.init_from={first}"])
    stats = export_vae_diffusers(os.path.join(run, "vae_export"), os.path.join(workdir, f"vae{suffix}_diffusers"))
    _record(workdir, "vae_decoder" + suffix, time.time() - t0, **stats)


def stage_vae_palette(workdir: str, arm: str = SHIPPED_ARM) -> None:
    """The arm's decoder fine-tuned further with the palette cross-entropy (configs/world_vae_palette.py), the
    encoder frozen: its `cycles` run in order, each from the previous one's export (the first from the
    vae_decoder phase's); the last export replaces WORKDIR/vae{suffix}_diffusers (the same latents)."""
    suffix = ARMS[arm][0]
    name = f"vae_palette{suffix}"
    if name in _times(workdir):
        print(f"[{name}] done; skipping", flush=True)
        return
    cfg = _config("world_vae_palette")
    config = os.path.join(REPO, "configs", "world_vae_palette.py") + (f":{CONFIG_ARG}" if CONFIG_ARG else "")
    previous = os.path.join(workdir, f"vae{suffix}_decoder", "vae_export")
    if not os.path.exists(os.path.join(previous, "params")):  # a machine with only the snapshot: the same weights
        previous = os.path.join(workdir, f"vae{suffix}_diffusers")
    t0 = time.time()
    for i, steps in enumerate(cfg.cycles):
        run = os.path.join(workdir, name, f"cycle_{i}")
        if not os.path.exists(os.path.join(run, "vae_export", "params")):
            _cli(["train-vae", "--config", config, "--workdir", run, f"--config.init_from={previous}",
                  f"--config.total_steps={steps}", f"--config.optimizer.learning_rate.decay_steps={steps}"])
        previous = os.path.join(run, "vae_export")
    stats = export_vae_diffusers(previous, os.path.join(workdir, f"vae{suffix}_diffusers"))
    # seconds: this call's wall time; each cycle's own training time (from its logged step times) beside it, since
    # the cycles may have run in earlier calls
    cycle_seconds = [round((logged_step_seconds(os.path.join(workdir, name, f"cycle_{i}")) or (0, 0.0))[1], 1)
                     for i in range(len(cfg.cycles))]
    _record(workdir, name, time.time() - t0, cycles=list(cfg.cycles), trained_steps=int(sum(cfg.cycles)),
            cycle_train_seconds=cycle_seconds, **stats,
            **_last_eval(previous.rsplit("/vae_export", 1)[0], ("eval/judge_shape", "eval/judge_overall")))


def export_vae_diffusers(orbax_dir: str, dst: str, num_images: int = 256) -> dict:
    """The trained VAE (Orbax) -> a diffusers AutoencoderKLQwenImage21 directory, with per-channel latent
    statistics measured on `num_images` train scenes (the DiT works on normalised latents); returns the stats and
    the reconstruction PSNR on held-out-composition scenes."""
    import dataclasses

    import numpy as np

    from qwenimage_jax import checkpoints
    from qwenimage_jax.data.world_source import WorldSource

    vae = checkpoints.load("vae", orbax_dir)
    size = _config("world_vae").data.resolution

    def images(n, seed, split):
        src = WorldSource(n, seed=seed, split=split, size=size)
        return np.stack([src[i]["image"] for i in range(n)]).astype(np.float32) / 127.5 - 1.0

    def records(n, seed, split):
        from qwenimage_jax.data.world import Scene

        src = WorldSource(n, seed=seed, split=split, size=size)
        return [Scene.from_json(src[i]["record_json"]) for i in range(n)]

    train = images(num_images, 5, "train")
    # (batches of 32: one compiled encoder for every chunk)
    z = np.concatenate([np.asarray(vae.encode(train[i:i + 32])) for i in range(0, num_images, 32)])
    mean = z.reshape(-1, z.shape[-1]).mean(0)
    std = z.reshape(-1, z.shape[-1]).std(0) + 1e-6
    held = images(64, 6, "heldout")
    recon = np.concatenate([np.asarray(vae.decode(vae.encode(held[i:i + 32]))) for i in range(0, 64, 32)])
    from qwenimage_jax.metrics.image_quality import mean_psnr

    psnr = mean_psnr(np.clip(recon, -1, 1), held, 2.0)
    # The DiT can draw at best what the VAE keeps: the judge on reconstructions bounds the DiT's accuracy.
    from qwenimage_jax.data import judge

    judged = judge.evaluate(np.clip(recon, -1, 1), records(64, 6, "heldout"))
    judge_recon = judged["overall"]
    cfg = dataclasses.replace(vae.vae_config, latents_mean=tuple(float(v) for v in mean),
                              latents_std=tuple(float(v) for v in std))
    checkpoints.export("vae", vae.params, cfg, dst)
    return dict(heldout_psnr=round(psnr, 2), heldout_judge_on_reconstructions=round(float(judge_recon), 3),
                heldout_judge_attributes={k: round(float(v), 3) for k, v in judged.items()},
                latent_std_mean=round(float(std.mean()), 4))


def stage_cache(workdir: str, arm: str = SHIPPED_ARM) -> None:
    suffix = ARMS[arm][0]
    c = _config("world_dit")
    if os.path.exists(os.path.join(workdir, "latents" + suffix, "meta.json")):
        print(f"[cache{suffix}] {workdir}/latents{suffix} exists; skipping", flush=True)
        return
    t0 = time.time()
    _cli(["cache-latents", "--source", f"world:{c.num_scenes}:train:{c.image_size}", "--vae",
          os.path.join(workdir, f"vae{suffix}_diffusers"), "--text-encoder", os.path.join(workdir, "text_encoder"),
          "--tokenizer", os.path.join(workdir, "tokenizer"), "--out", os.path.join(workdir, "latents" + suffix)])
    _record(workdir, "cache" + suffix, time.time() - t0, num_scenes=c.num_scenes)


def stage_dit(workdir: str, arm: str = SHIPPED_ARM, full: bool = True, budget_s: float = 0.0,
              cool_now: bool = False) -> None:
    """The arm's DiT on its cached latents, in phases that each skip themselves when their export has reached its
    target step (and resume from their checkpoints otherwise):

      dit_ablation  configs/world_dit.py for its first `ablation_steps` steps -> WORKDIR/transformer_ablation{suffix}:
                    the alignment ablation compares the arms at this budget
      dit           the same run continued towards `steps` at the stable learning rate; with `budget_s` > 0 it
                    stops at a checkpoint after that long and its weights at the step reached go on (re-running
                    the stage later continues the run)                          -> WORKDIR/transformer_base{suffix}
      dit_cooldown  config.cooldown: from those weights, the learning rate annealed to ~0, once the stable phase
                    has reached `steps` (or now, with `cool_now`)             -> WORKDIR/transformer{suffix}

    `full=False` stops after the ablation phase (the arm that is not shipped)."""
    import logging

    from qwenimage_jax.models.dit import dit_config_from
    from qwenimage_jax.training.dit import export_params, train

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    suffix = ARMS[arm][0]
    latents = os.path.join(workdir, "latents" + suffix)

    def config_for(steps: int):
        cfg = _config("world_dit")
        cfg.data.path = latents
        cfg.steps = int(steps)
        return cfg

    run = "dit" + suffix  # phases 1 and 2 are one run: phase 2 resumes phase 1's checkpoint
    phases = [("dit_ablation" + suffix, run, config_for(_config("world_dit").ablation_steps),
               os.path.join(workdir, "transformer_ablation" + suffix))]
    offsets = {run: 0}
    if full:
        base = os.path.join(workdir, "transformer_base" + suffix)
        target = int(_config("world_dit").steps)
        stable_run, offset, init_from = _stable_run(workdir, suffix, base)
        stable = config_for(target - offset)
        stable.time_budget_s = float(budget_s)
        if init_from:  # a fresh optimizer on the exported weights: a short warmup again
            stable.init_from = init_from
            stable.optimizer.learning_rate.warmup_steps = 50
        offsets[stable_run] = offset
        phases.append(("dit" + suffix, stable_run, stable, base))
    for name, run_dir, cfg, out in phases:
        offset = offsets.get(run_dir, 0)
        if _trained_steps(out) >= int(cfg.steps) + offset:
            print(f"[{name}] {out} has reached step {int(cfg.steps) + offset}; skipping", flush=True)
            continue
        budget = f" --config.time_budget_s={cfg.time_budget_s:g}" if cfg.time_budget_s else ""
        print(f"[run] train-dit --config configs/world_dit.py --workdir {workdir}/{run_dir} "
              f"--config.data.path={cfg.data.path} --config.steps={cfg.steps}{budget}  (in process, then EMA "
              "export)", flush=True)
        t0 = time.time()
        result = train(cfg, os.path.join(workdir, run_dir))
        reached = int(result["final_step"])
        if reached < int(cfg.steps) and not cfg.time_budget_s:
            raise SystemExit(f"[{name}] stopped at step {reached} of {cfg.steps}; re-run the stage to resume it")
        _export_dit(export_params(result["state"]), dit_config_from(cfg), out, offset + reached)
        _record(workdir, name, time.time() - t0, final_step=offset + reached, target_step=int(cfg.steps) + offset,
                run=run_dir, trained_steps=reached - int(result.get("start_step", 0)), final_loss=_last_loss(result))
    if not full:
        return
    base_step, target = _trained_steps(phases[-1][3]), int(phases[-1][2].steps)
    if base_step < target and not cool_now:
        print(f"[dit] the stable phase is at step {base_step} of {target}: re-run the stage to continue it "
              "(--dit-budget-min bounds each run), or add --cool-now to cool down and ship these weights", flush=True)
        return
    _cooldown(workdir, suffix, latents)


def _stable_run(workdir: str, suffix: str, base: str) -> tuple[str, int, str]:
    """(run dir, steps already trained, init_from) of the run that takes the stable phase on: WORKDIR/dit{suffix}
    from scratch while its checkpoints are there; on a machine that has only the exported weights of an earlier
    run (`--resume-from` a build snapshot), a new run from those weights, its steps counted on from theirs."""
    record = os.path.join(workdir, f"stable_run{suffix}.json")
    if os.path.exists(record):
        info = json.load(open(record))
        if os.path.isdir(os.path.join(workdir, info["run"], "checkpoints")) or _trained_steps(base) <= info["offset"]:
            return info["run"], int(info["offset"]), info["init_from"]
    first = "dit" + suffix
    if os.path.isdir(os.path.join(workdir, first, "checkpoints")) or _trained_steps(base) < 0:
        return first, 0, ""
    offset = _trained_steps(base)
    init_from = os.path.join(workdir, f"transformer_base{suffix}_{offset}")
    if not os.path.isdir(init_from):
        shutil.copytree(base, init_from)
    info = dict(run=f"dit{suffix}_from_{offset}", offset=offset, init_from=init_from)
    with open(record, "w") as f:
        json.dump(info, f)
    return info["run"], offset, init_from


def _export_dit(params, dit_config, out: str, steps: int) -> None:
    from qwenimage_jax.checkpoints.exporters import export_transformer

    if os.path.isdir(out):
        shutil.rmtree(out)
    export_transformer(params, dit_config, out)
    with open(os.path.join(out, TRAINED_FILE), "w") as f:
        json.dump({"steps": int(steps)}, f)


def _last_loss(result) -> float | None:
    """Mean of the last 5 logged losses of this call; None when it trained nothing (it only resumed and exported)."""
    losses = result["losses"]
    last = [losses[k] for k in sorted(losses)[-5:]]
    return round(float(sum(last) / len(last)), 4) if last else None


def _cooldown(workdir: str, suffix: str, latents: str) -> None:
    """config.cooldown from WORKDIR/transformer_base{suffix} -> WORKDIR/transformer{suffix}; redone whenever the
    stable phase has moved on since (its run directory is named after the base step)."""
    from qwenimage_jax.models.dit import dit_config_from
    from qwenimage_jax.training.dit import export_params, train

    base = os.path.join(workdir, "transformer_base" + suffix)
    final = os.path.join(workdir, "transformer" + suffix)
    base_step = _trained_steps(base)
    tune = _config("world_dit").cooldown
    if int(tune.steps) <= 0:  # no cooldown: the stable weights ship
        if os.path.isdir(final):
            shutil.rmtree(final)
        shutil.copytree(base, final)
        return
    done = os.path.join(final, TRAINED_FILE)
    if os.path.exists(done) and json.load(open(done)).get("base_step") == base_step:
        print(f"[dit_cooldown] {final} is the cooldown of step {base_step}; skipping", flush=True)
        return
    cfg = _config("world_dit")
    cfg.data.path = latents
    cfg.init_from = base
    cfg.steps = int(tune.steps)
    cfg.optimizer.learning_rate = dict(name="warmup_cosine", peak_value=float(tune.learning_rate), warmup_steps=20,
                                       decay_steps=int(tune.steps), end_value=float(tune.end_value))
    cfg.checkpoint.every = int(tune.steps)
    run_dir = os.path.join(workdir, f"dit_cooldown{suffix}_from_{base_step}")
    print(f"[run] train-dit --config configs/world_dit.py --workdir {run_dir} --config.init_from={base} "
          f"--config.steps={cfg.steps} (cooldown learning rate)  (in process, then EMA export)", flush=True)
    t0 = time.time()
    result = train(cfg, run_dir)
    if result["final_step"] < cfg.steps:
        raise SystemExit(f"[dit_cooldown] stopped at step {result['final_step']}; re-run the stage to resume it")
    _export_dit(export_params(result["state"]), dit_config_from(cfg), final, base_step + cfg.steps)
    with open(done, "w") as f:
        json.dump({"steps": base_step + cfg.steps, "base_step": base_step}, f)
    _record(workdir, "dit_cooldown" + suffix, time.time() - t0, base_step=base_step, final_step=int(cfg.steps),
            trained_steps=int(result["final_step"]) - int(result.get("start_step", 0)), final_loss=_last_loss(result))


def stage_distill(workdir: str, arm: str = SHIPPED_ARM, budget_s: float = 0.0) -> None:
    """configs/world_distill.py's regression pairs once (WORKDIR/distill_pairs, times.json distill_pairs), then the
    config once per `student_steps` entry N -> WORKDIR/distill_N/export, then the student's and the teacher's judge
    on the validation prompts (times.json distill_N), which assemble ships by."""
    import logging

    from qwenimage_jax.evals import t2i as eval_t2i
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline
    from qwenimage_jax.training.distill import distill

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    suffix = ARMS[arm][0]
    # the ship choice compares judges 0.03 apart: 64 prompts a split read +-0.03 (world_build/levers/distill_pairs40)
    num = 2 if CONFIG_ARG == "smoke" else int(_config("world_distill").get("validation_prompts", 64))
    teacher_judge = None
    pairs = stage_distill_pairs(workdir, arm)
    for num_steps in tuple(_config("world_distill").student_steps):
        config = _distill_config(workdir, arm)
        config.student.num_steps = int(num_steps)
        config.regression.pairs = pairs
        if budget_s:
            config.time_budget_s = float(budget_s)
        run_dir = os.path.join(workdir, f"distill_{num_steps}")
        print(f"[run] distill --config configs/world_distill.py --workdir {run_dir} --config.teacher={config.teacher} "
              f"--config.data.path={config.data.path} --config.student.num_steps={num_steps} "
              f"--config.regression.pairs={pairs}  (in process)", flush=True)
        t0 = time.time()
        result = distill(config, run_dir)
        if result["export_dir"] is None:
            raise SystemExit(f"distillation of the {num_steps}-step student stopped at step {result['final_step']} of "
                             f"{config.steps}; re-run the stage to resume it")
        seconds = time.time() - t0
        last = [result["losses"][k] for k in sorted(result["losses"])[-4:]]
        previous = _times(workdir).get(f"distill_{num_steps}", {})
        if teacher_judge is None:  # the teacher's validation judge, once: the bar each student is shipped against
            pipe = QwenImagePipeline.from_pretrained(judge_pipeline(workdir, "transformer" + suffix, arm=arm))
            teacher_judge = eval_t2i.evaluate(pipe, "", "heldout", num, 40, _image_size(), cfg=4.0,
                                              prompt_seed=eval_t2i.VALIDATION_SEED)["generated"]["overall"]
        sigmas = json.load(open(os.path.join(result["export_dir"], "model_index.json")))["sample_sigmas"]
        pipe = QwenImagePipeline.from_pretrained(judge_pipeline(
            workdir, os.path.join(os.path.relpath(result["export_dir"], workdir), "transformer"), sigmas, arm=arm))
        judged = eval_t2i.evaluate(pipe, "", "heldout", num, int(num_steps), _image_size(), cfg=1.0,
                                   prompt_seed=eval_t2i.VALIDATION_SEED)["generated"]
        # wall time is cumulative over resumed runs, as the update count is (a run with nothing left adds nothing)
        if previous.get("final_step", 0) == result["final_step"]:
            seconds = float(previous["seconds"])
        elif previous.get("final_step", 0) < result["final_step"]:
            seconds += float(previous.get("seconds", 0.0))
        _record(workdir, f"distill_{num_steps}", seconds, final_step=result["final_step"],
                final_loss=round(float(sum(last) / len(last)), 4) if last else previous.get("final_loss"),
                validation_judge=round(judged["overall"], 4), teacher_40_validation_judge=round(teacher_judge, 4))


def _distill_config(workdir: str, arm: str):
    """configs/world_distill.py on this workdir's teacher (the arm's transformer) and cached latents."""
    suffix = ARMS[arm][0]
    config = _config("world_distill")
    config.teacher = os.path.join(workdir, "transformer" + suffix)
    config.data.path = os.path.join(workdir, "latents" + suffix)
    return config


def stage_distill_pairs(workdir: str, arm: str = SHIPPED_ARM) -> str:
    """WORKDIR/distill_pairs: the teacher's `regression.teacher_steps`-step solutions from `regression.num_pairs`
    fixed noises, shared by every student's regression term; resumes an interrupted build, reuses a complete one.
    Returns its path."""
    from qwenimage_jax.training.distill_pairs import make_pairs

    config = _distill_config(workdir, arm)
    out = os.path.join(workdir, "distill_pairs")
    print(f"[run] distill-pairs --config configs/world_distill.py --out {out} --config.teacher={config.teacher} "
          f"--config.data.path={config.data.path}  (in process)", flush=True)
    manifest = make_pairs(config, out)
    _record(workdir, "distill_pairs", manifest["seconds"], num_pairs=manifest["num_pairs"],
            teacher_steps=manifest["teacher_steps"], cfg_scale=manifest["cfg_scale"])
    return out


def shipped_student(workdir: str) -> int | None:
    """The student assemble ships: the fewest steps whose validation judge is within `ship_tolerance` of the
    teacher's (40 steps, CFG 4), else the best-judged one; None when nothing was distilled."""
    config = _config("world_distill")
    path = os.path.join(workdir, "times.json")
    times = json.load(open(path)) if os.path.exists(path) else {}
    done = {int(n): times[f"distill_{n}"] for n in config.student_steps
            if f"distill_{n}" in times and os.path.isdir(os.path.join(workdir, f"distill_{n}", "export"))}
    if not done:
        return None
    close = [n for n, t in done.items()
             if t["validation_judge"] >= t["teacher_40_validation_judge"] - float(config.ship_tolerance)]
    return min(close) if close else max(done, key=lambda n: (done[n]["validation_judge"], -n))


def judge_pipeline(workdir: str, transformer: str, sample_sigmas=None, arm: str = SHIPPED_ARM,
                   name: str = "judge") -> str:
    """WORKDIR/pipeline_NAME: a pipeline directory of symlinks (WORKDIR/`transformer`, the arm's VAE, the shared
    text encoder) for judge runs on the workdir's components before anything is assembled."""
    suffix = ARMS[arm][0]
    out = os.path.join(workdir, "pipeline_" + name)
    if os.path.isdir(out):
        shutil.rmtree(out)
    os.makedirs(out)
    for part, src in (("vae", f"vae{suffix}_diffusers"), ("transformer", transformer),
                      ("text_encoder", "text_encoder"), ("processor", "tokenizer"), ("expander", "expander")):
        os.symlink(os.path.abspath(os.path.join(workdir, src)), os.path.join(out, part))
    write_pipeline_files(workdir, out, sample_sigmas=sample_sigmas, processor_config=False)
    return out


def arm_pipeline(workdir: str, arm: str) -> str:
    """WORKDIR/pipeline_ARM: one ablation arm (its VAE and its DiT after `ablation_steps`), for the ablation."""
    return judge_pipeline(workdir, "transformer_ablation" + ARMS[arm][0], arm=arm, name=arm)


def stage_ablation(workdir: str, num_prompts: int = 64) -> dict:
    """The seed's alignment claim on this world: for each arm, the judge on its VAE's held-out reconstructions
    (from the vae stage) and on 40-step CFG-4 samples of train / held-out prompts from its DiT after the same
    `ablation_steps` (configs/world_dit.py)."""
    from qwenimage_jax.evals import t2i as eval_t2i
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    t0 = time.time()
    times = json.load(open(os.path.join(workdir, "times.json")))
    path = os.path.join(workdir, "ablation.json")
    result = json.load(open(path)) if os.path.exists(path) else {}
    for arm, (suffix, _) in ARMS.items():
        dit_dir = os.path.join(workdir, "transformer_ablation" + suffix)
        if result.get(arm, {}).get("dit_steps") == _trained_steps(dit_dir) >= 0 and arm in result:
            print(f"[ablation] arm {arm}: judged already (ablation.json)", flush=True)
            continue
        if not os.path.exists(os.path.join(dit_dir, "config.json")):
            print(f"[ablation] arm {arm}: no teacher yet (run --stage dit --arm {arm}); skipped", flush=True)
            continue
        pipe = QwenImagePipeline.from_pretrained(arm_pipeline(workdir, arm))
        entry = {"vae": times.get("vae" + suffix, {}), "dit": times.get("dit_ablation" + suffix, {}),
                 "dit_steps": _trained_steps(dit_dir), "prompt_seed": eval_t2i.VALIDATION_SEED}
        for split in ("train", "heldout"):
            # validation prompts: the arm to ship is chosen on prompts the reported figures never use
            judged = eval_t2i.evaluate(pipe, workdir, split, num_prompts, 40, _image_size(), cfg=4.0,
                                       prompt_seed=eval_t2i.VALIDATION_SEED)
            judged.pop("images")
            entry[f"teacher_40_{split}"] = judged
            print(f"[ablation] {arm} {split}\n" + eval_t2i.format_table(judged), flush=True)
        result[arm] = entry
        from qwenimage_jax.io_utils import provenance, write_json

        result["provenance"] = provenance()
        write_json(path, result, indent=1)
    _record(workdir, "ablation", time.time() - t0, num_prompts=num_prompts)
    return result


def write_pipeline_files(workdir: str, out: str, sample_sigmas, processor_config: bool = True) -> None:
    """model_index.json, scheduler/, world.json (+ processor/preprocessor_config.json) of a pipeline dir."""
    from qwenimage_jax.checkpoints.pipeline_dir import write_pipeline_index
    from qwenimage_jax.evals.t2i import WORLD_FILE

    if processor_config:
        te_config = json.load(open(os.path.join(workdir, "text_encoder", "config.json")))
        vision = te_config.get("vision_config", {})
        image_config = {
            "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen3VLProcessor",
            "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
            "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
            "patch_size": vision.get("patch_size", 16), "temporal_patch_size": vision.get("temporal_patch_size", 2),
            "merge_size": vision.get("spatial_merge_size", 2),
            "size": {"shortest_edge": 32 * 32, "longest_edge": 256 * 256},
        }
        with open(os.path.join(out, "processor", "preprocessor_config.json"), "w") as f:
            json.dump(image_config, f, indent=2)
    write_pipeline_index(out, sample_sigmas, text_pad_tokens=int(_config("world_dit").data.max_text_tokens))
    with open(os.path.join(out, WORLD_FILE), "w") as f:
        json.dump({"image_size": _image_size()}, f)
