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

    python -m qwenimage_jax.world_assets --workdir /tmp/world --out qwenimage_jax/assets/tiny_world
    python -m qwenimage_jax.world_assets --workdir /tmp/world --stage text      # one stage
    python -m qwenimage_jax.world_assets --workdir /tmp/world --stage vae --stage cache --stage dit --arm noalign

`--arm` picks the ablation arm the vae / cache / dit stages work on (default: align, the shipped one; `all` runs
both in turn). `--text-from MODEL_DIR` copies the text stage's outputs (tokenizer, text encoder, expander) from an
earlier build instead of retraining them.

Wall times of every stage are appended to WORKDIR/times.json and copied into the shipped README.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np

STAGES = ("text", "expander", "text_check", "vae_encoder", "vae", "vae_decoder", "cache", "dit", "ablation", "distill", "assemble",
          "figures")
# ablation arm -> (suffix of its WORKDIR paths, config overrides of its VAE run)
ARMS = {"align": ("", []), "noalign": ("_noalign", ["--config.losses.align.probe_only=True"])}
SHIPPED_ARM = "align"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def stage_text(workdir: str, config_arg=None) -> dict:
    import numpy as np

    from qwenimage_jax.training import text_lm

    c = _config("world_text_lm", config_arg)
    t0 = time.time()
    pre_items = text_lm.world_text_scenes(c.pretrain.num_captions, seed=c.seed)
    pre_pairs = [(caption, short) for caption, short, _, _ in pre_items]
    exp_pairs = text_lm.world_text_pairs(c.expand.num_pairs, seed=c.seed + 1)
    held_pairs = text_lm.world_text_pairs(c.eval_captions, seed=c.seed + 2, split="heldout")
    tok_dir = os.path.join(workdir, "tokenizer")
    tokenizer = text_lm.build_tokenizer(tok_dir, text_lm.tokenizer_corpus(pre_pairs + exp_pairs), c.vocab_size)
    config = text_lm.hf_config(tokenizer, c.model)
    module = text_lm.text_module(config)
    pad = tokenizer.pad_token_id

    def arrays(seqs):
        length = int(np.ceil(max(len(s) for s, _ in seqs) / 16) * 16)
        return text_lm.pad_left(seqs, length, pad)

    pre = arrays(text_lm.encoder_sequences(tokenizer, [r for r, _ in pre_pairs]))
    pre_eval = arrays(text_lm.encoder_sequences(tokenizer, [r for r, _ in held_pairs]))
    field_weight = float(c.pretrain.get("field_weight", 0.0))
    targets = None
    if field_weight > 0:  # the states must keep every stated attribute (see text_lm.field_targets)
        targets = text_lm.field_targets(tokenizer, [(cap, scene, spans) for cap, _, scene, spans in pre_items],
                                        pre[0].shape[1])
    print(f"[text] vocab {len(tokenizer)}, pretrain {pre[0].shape}, field targets: {targets is not None}", flush=True)
    params = text_lm.init_params(module, c.seed)
    loss0 = text_lm.eval_loss(module, params, pre_eval)
    t1 = time.time()
    params, hist_pre = text_lm.train_lm(module, params, pre, seed=c.seed, steps=c.pretrain.steps,
                                        batch_size=c.pretrain.batch_size, learning_rate=c.pretrain.learning_rate,
                                        warmup_steps=c.pretrain.warmup_steps, field_targets=targets,
                                        field_weight=field_weight)
    t_pre = time.time() - t1
    loss_pre = text_lm.eval_loss(module, params, pre_eval)
    text_lm.save_text_model(params, config, os.path.join(workdir, "text_encoder"), tok_dir, seed=c.seed)
    probe = text_probe_report(workdir, small=(config_arg in ("smoke", "test")))
    exp_stats, hist_exp = _finetune_expander(workdir, c, module, params, tokenizer, config, tok_dir)
    stats = dict(vocab=len(tokenizer), heldout_caption_loss_init=round(loss0, 4),
                 heldout_caption_loss_pretrained=round(loss_pre, 4), pretrain_seconds=round(t_pre, 1),
                 swap_change_min=round(min(probe["swap"].values()), 3),
                 probe_accuracy_min=round(min(probe["probe"].values()), 3), **exp_stats)
    text_lm.save_history(os.path.join(workdir, "text_history.json"), pretrain=hist_pre, expand=hist_exp, stats=stats)
    print(f"[text] {stats}", flush=True)
    _record(workdir, "text", time.time() - t0, **stats)
    return stats


def text_probe_report(workdir: str, small: bool = False) -> dict:
    """evals.text_probe on WORKDIR/text_encoder (one-word swaps, linear probes, embedding cosines) ->
    WORKDIR/text_probe.json."""
    from qwenimage_jax.checkpoints import load_text_encoder
    from qwenimage_jax.evals import text_probe

    encoder = load_text_encoder(os.path.join(workdir, "text_encoder"), with_vision=False,
                                tokenizer_path=os.path.join(workdir, "tokenizer"))
    sizes = dict(num_swaps=8, num_train=64, num_test=16) if small else {}
    report = text_probe.report(encoder, **sizes)
    from qwenimage_jax.io_utils import provenance, write_json

    write_json(os.path.join(workdir, "text_probe.json"), dict(report, provenance=provenance()), indent=1)
    print(f"[text] probe {report}", flush=True)
    return report


def _finetune_expander(workdir, c, module, params, tokenizer, config, tok_dir):
    """The prompt expander: the text encoder fine-tuned on (short prompt -> rich caption) chats of the world."""
    from qwenimage_jax.training import text_lm

    pad = tokenizer.pad_token_id
    exp_pairs = text_lm.world_text_pairs(c.expand.num_pairs, seed=c.seed + 1)
    held_pairs = text_lm.world_text_pairs(c.eval_captions, seed=c.seed + 2, split="heldout")

    def arrays(seqs):
        length = int(np.ceil(max(len(s) for s, _ in seqs) / 16) * 16)
        return text_lm.pad_left(seqs, length, pad)

    exp = arrays(text_lm.expansion_sequences(tokenizer, exp_pairs))
    exp_eval = arrays(text_lm.expansion_sequences(tokenizer, held_pairs))
    exp_before = text_lm.eval_loss(module, params, exp_eval)
    t2 = time.time()
    params, hist_exp = text_lm.train_lm(module, params, exp, seed=c.seed + 1, steps=c.expand.steps,
                                        batch_size=c.expand.batch_size, learning_rate=c.expand.learning_rate,
                                        warmup_steps=c.expand.warmup_steps)
    t_exp = time.time() - t2
    exp_after = text_lm.eval_loss(module, params, exp_eval)
    text_lm.save_text_model(params, config, os.path.join(workdir, "expander"), tok_dir, seed=c.seed)
    return dict(heldout_expansion_loss_before_finetune=round(exp_before, 4),
                heldout_expansion_loss_after_finetune=round(exp_after, 4), finetune_seconds=round(t_exp, 1)), hist_exp


def stage_expander(workdir: str) -> dict:
    """Re-runs only the expander fine-tune from WORKDIR/text_encoder (e.g. after the world's captions changed while
    the text encoder was kept, `--text-from`)."""
    from qwenimage_jax.checkpoints import load_text_encoder
    from qwenimage_jax.training import text_lm

    c = _config("world_text_lm")
    t0 = time.time()
    encoder_dir, tok_dir = os.path.join(workdir, "text_encoder"), os.path.join(workdir, "tokenizer")
    encoder = load_text_encoder(encoder_dir, with_vision=False, tokenizer_path=tok_dir)
    config = json.load(open(os.path.join(encoder_dir, "config.json")))
    module = text_lm.text_module(config)
    stats, history = _finetune_expander(workdir, c, module, encoder.params, encoder.tokenizer, config, tok_dir)
    text_lm.save_history(os.path.join(workdir, "expander_history.json"), expand=history, stats=stats)
    print(f"[expander] {stats}", flush=True)
    _record(workdir, "expander", time.time() - t0, **stats)
    return stats


def stage_text_check(workdir: str, steps: int = 150, num_scenes: int = 2000, num_eval: int = 64) -> dict:
    """A fresh DiT (configs/world_dit.py) trained `steps` steps on `num_scenes` scenes encoded with WORKDIR's text
    encoder: how much of each attribute it already takes from the prompt (loss gaps, evals.conditioning). The
    background must show a gap >= 0.5 before the long teacher run is worth its time."""
    from qwenimage_jax import checkpoints
    from qwenimage_jax.checkpoints.exporters import export_transformer
    from qwenimage_jax.evals import conditioning
    from qwenimage_jax.models.dit import dit_config_from
    from qwenimage_jax.training.dit import export_params, train

    t0 = time.time()
    vae_dir = os.path.join(workdir, "vae_diffusers")
    if not os.path.exists(os.path.join(vae_dir, "config.json")):
        vae_dir = os.path.join(DEFAULT_OUT, "vae")
    check = os.path.join(workdir, "text_check")
    latents = os.path.join(check, "latents")
    if not os.path.exists(os.path.join(latents, "meta.json")):
        _cli(["cache-latents", "--source", f"world:{num_scenes}:train:{_image_size()}", "--vae", vae_dir,
              "--text-encoder", os.path.join(workdir, "text_encoder"), "--tokenizer", os.path.join(workdir, "tokenizer"),
              "--out", latents])
    vae = checkpoints.load("vae", vae_dir)
    config = _config("world_dit")
    config.data.path = latents
    config.steps = steps
    config.model.in_channels = config.model.out_channels = int(vae.vae_config.z_dim)
    config.optimizer.learning_rate.decay_steps = steps
    config.checkpoint.every = steps
    result = train(config, os.path.join(check, "dit"))
    # the raw weights: after 150 steps an EMA of decay 0.995 still holds half of the initialisation
    export_transformer(export_params(result["state"], use_ema=False), dit_config_from(config),
                       os.path.join(check, "transformer"))
    transformer = checkpoints.load("transformer", os.path.join(check, "transformer"))
    encoder = checkpoints.load("text_encoder", os.path.join(workdir, "text_encoder"), with_vision=False,
                               tokenizer_path=os.path.join(workdir, "tokenizer"))
    gaps = conditioning.prompt_gaps(transformer, vae, encoder, num=num_eval, split="train", seed=5,
                                    size=_image_size())
    gaps = {k: round(v, 4) for k, v in gaps.items()}
    # at sigma 0.98 the noisy latent shows almost nothing: what the DiT knows there comes from the prompt
    high = conditioning.prompt_gaps(transformer, vae, encoder, num=num_eval, split="train", seed=5,
                                    size=_image_size(), sigmas=(0.98,))
    gaps.update({f"{k}@0.98": round(v, 4) for k, v in high.items()})
    with open(os.path.join(workdir, "text_check.json"), "w") as f:
        json.dump(dict(steps=steps, num_scenes=num_scenes, vae=vae_dir, gaps=gaps), f, indent=1)
    print(f"[text_check] loss gaps after {steps} steps: {gaps}", flush=True)
    _record(workdir, "text_check", time.time() - t0, steps=steps, **{f"gap_{k}": v for k, v in gaps.items()
                                                                     if k.startswith(("background", "loss"))})
    return gaps


BUILD_DIR = os.path.join(REPO, "world_build")
# What a later run on another machine needs to go on from where a build stopped (`--snapshot` / `--resume-from`):
# the trained components, the stable DiT phase's exported weights, the records, and each run's metrics.jsonl
SNAPSHOT_ITEMS = ("tokenizer", "text_encoder", "expander", "vae_diffusers", "vae_noalign_diffusers",
                  "transformer_ablation", "transformer_ablation_noalign", "transformer_base", "transformer",
                  "times.json", "figures.json", "shape_trace_teacher.json",
                  "text_probe.json", "text_check.json", "ablation.json", "text_history.json", "stable_run.json")
SNAPSHOT_RUNS = ("vae_encoder", "vae", "vae_noalign", "vae_decoder", "vae_noalign_decoder", "dit", "dit_noalign")


def snapshot(workdir: str, dst: str) -> str:
    """Copies SNAPSHOT_ITEMS of WORKDIR (those present) and the metrics.jsonl of its runs to `dst`."""
    import re

    os.makedirs(dst, exist_ok=True)
    for name in SNAPSHOT_ITEMS:
        src, out = os.path.join(workdir, name), os.path.join(dst, name)
        if not os.path.exists(src):
            continue
        if os.path.isdir(out):
            shutil.rmtree(out)
        shutil.copytree(src, out) if os.path.isdir(src) else shutil.copy(src, out)
    for name in sorted(os.listdir(workdir)):
        if name in SNAPSHOT_RUNS or re.fullmatch(r"dit(_noalign)?_(from|cooldown)_?\w*", name):
            metrics = os.path.join(workdir, name, "metrics.jsonl")
            if os.path.exists(metrics):
                os.makedirs(os.path.join(dst, name), exist_ok=True)
                shutil.copy(metrics, os.path.join(dst, name, "metrics.jsonl"))
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
    lines = ["# A build of the small world in progress (`python -m qwenimage_jax.world_assets --snapshot`)", "",
             "The trained stages of the recipe so far, so that a run on another machine goes on from here instead "
             "of retraining them:", "",
             f"    python -m qwenimage_jax.world_assets --workdir /tmp/world --resume-from {os.path.basename(dst)} "
             "--stage cache --stage dit --dit-budget-min 60 --snapshot " + os.path.basename(dst), "",
             "The stable DiT phase continues from `transformer_base/` (its step count in `trained_steps.json`); "
             "cached latents are recomputed from the VAE and the text encoder (`cache`, ~3 min). `--stage distill "
             "--stage assemble --stage figures` (re)ships the world into qwenimage_jax/assets/tiny_world; "
             "`levers/` records the levers tried on this build.", "", f"Written at commit {_git_commit()}.", "",
             "## Stages recorded (times.json: wall seconds on 2 CPU cores and each stage's figures)", ""]
    for stage, info in recorded_stages(times):
        extra = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("seconds", "commit"))
        lines.append(f"- {stage}: {info['seconds']:.0f} s" + (f" ({extra})" if extra else ""))
    stable_seconds = logged_step_seconds(os.path.join(dst, "dit"))
    if stable_seconds:
        lines.append(f"- the stable DiT phase ran over several resumed calls (`dit` above is the last one's wall "
                     f"time): its steps took {stable_seconds[1]:.0f} s in all to step {stable_seconds[0]} "
                     "(logged step times x steps between logs, dit/metrics.jsonl)")
    probe = os.path.join(dst, "text_probe.json")
    if os.path.exists(probe):
        lines += ["", "## Text encoder probes (text_probe.json, `evals.text_probe.report`)", ""]
        for name, values in json.load(open(probe)).items():
            if name == "provenance":
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
        if name == "times.json" and os.path.exists(out):
            continue
        if os.path.isdir(path):
            if name in SNAPSHOT_ITEMS and os.path.exists(out):
                continue
            shutil.copytree(path, out, dirs_exist_ok=True)
        elif not os.path.exists(out):
            shutil.copy(path, out)
    print(f"[resume] {src} -> {workdir}", flush=True)


def copy_text_stage(model_dir: str, workdir: str) -> None:
    """The text stage's outputs from an earlier build (a shipped model dir: processor/ is the tokenizer)."""
    t0 = time.time()
    for src, dst in (("processor", "tokenizer"), ("text_encoder", "text_encoder"), ("expander", "expander")):
        if os.path.exists(os.path.join(workdir, dst)):
            shutil.rmtree(os.path.join(workdir, dst))
        shutil.copytree(os.path.join(model_dir, src), os.path.join(workdir, dst))
    previous = os.path.join(model_dir, "build_times.json")
    stats = json.load(open(previous)).get("text", {}) if os.path.exists(previous) else {}
    stats = {k: v for k, v in stats.items() if k != "seconds"}
    stats["note"] = f"copied from {os.path.basename(os.path.normpath(model_dir))} (--text-from), not retrained"
    _record(workdir, "text", time.time() - t0, **stats)


def _cli(args: list[str]) -> None:
    cmd = [sys.executable, "-m", "qwenimage_jax.cli"] + args
    print("[run]", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)


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


def _last_eval(run: str, keys) -> dict:
    """The last logged value of each of `keys` in RUN/metrics.jsonl (the figures a stage records)."""
    values = {}
    path = os.path.join(run, "metrics.jsonl")
    for line in open(path) if os.path.exists(path) else ():
        record = json.loads(line)
        values.update({k.split("/")[-1]: round(float(record[k]), 5) for k in keys if k in record})
    return values


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


def recorded_stages(times: dict) -> list[tuple[str, dict]]:
    """times.json's stage entries (name, record), without its provenance keys."""
    return [(k, v) for k, v in times.items() if isinstance(v, dict) and "seconds" in v]


def _times(workdir: str) -> dict:
    path = os.path.join(workdir, "times.json")
    return json.load(open(path)) if os.path.exists(path) else {}


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


TRAINED_FILE = "trained_steps.json"  # beside each exported DiT: {"steps": the step its run reached}


def _trained_steps(export_dir: str) -> int:
    path = os.path.join(export_dir, TRAINED_FILE)
    return int(json.load(open(path))["steps"]) if os.path.exists(path) else -1


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
                run=run_dir, final_loss=_last_loss(result))
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


def _last_loss(result) -> float:
    losses = result["losses"]
    last = [losses[k] for k in sorted(losses)[-5:]]
    return round(float(sum(last) / max(len(last), 1)), 4)


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
            final_loss=_last_loss(result))


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


def _image_size() -> int:
    return int(_config("world_dit").image_size)


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
    """Bytes on disk of each shipped component and in total."""
    sizes = {}
    for name in sorted(os.listdir(out)):
        path = os.path.join(out, name)
        if os.path.isdir(path):
            sizes[name] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)
    sizes["total"] = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
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
        "    python -m qwenimage_jax.world_assets --workdir /tmp/world --out qwenimage_jax/assets/tiny_world",
        "",
        "which runs, in order:",
        "",
        "1. `text` (configs/world_text_lm.py, seed 0): BPE tokenizer on world captions + Qwen specials; text encoder",
        "   = tiny Qwen3-VL decoder pretrained by next-token prediction on rich captions in the encoder template, with",
        "   untied embeddings and linear heads reading every scene field from its states; expander = that model",
        "   fine-tuned on (short prompt -> rich caption) chats (`expander` re-runs only this).",
        "2. `vae_encoder`, `vae`, `vae_decoder`: the Qwen-Image-2 f16 VAE in three phases (configs/world_vae_encoder.py,",
        "   configs/world_vae.py, configs/world_vae_decoder.py, seed 0): the encoder (and a linear per-cell head) on",
        "   each latent's read-out of its own 16 px patch; the whole VAE (L1 + L2 + salient L1 + the VGG16 alignment,",
        "   no discriminator); the decoder alone with the latents frozen (+ an edge L1). Exported to diffusers format with per-channel latent mean/std measured on 256 train scenes.",
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
    for stage, info in recorded_stages(times):
        extra = ", ".join(f"{k}={v}" for k, v in info.items() if k not in ("seconds", "commit"))
        lines.append(f"- {stage}: {info['seconds']:.0f} s" + (f" ({extra})" if extra else ""))
    stable_seconds = logged_step_seconds(os.path.join(workdir, "dit"))
    if stable_seconds:
        lines.append(f"- the stable DiT phase ran over several resumed calls (`dit` above is the last one's wall "
                     f"time): its steps took {stable_seconds[1]:.0f} s in all to step {stable_seconds[0]} "
                     "(logged step times x steps between logs, dit/metrics.jsonl)")
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


def logged_step_seconds(run_dir: str) -> tuple[int, float] | None:
    """(last logged step, the run's step time in all) of a resumable run: each logged `step_time_s` times the
    steps since the previous log; None without a metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    rows = sorted({int(r["step"]): float(r["step_time_s"]) for r in map(json.loads, open(path))
                   if "step_time_s" in r}.items())
    total, previous = 0.0, 0
    for step, seconds in rows:
        total, previous = total + seconds * (step - previous), step
    return (previous, total) if rows else None


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
    from qwenimage_jax.io_utils import provenance, write_json

    figures["provenance"] = provenance()
    figures["commit"] = figures["provenance"]["commit"]
    for path in (os.path.join(workdir, "figures.json"), os.path.join(out, "figures.json")):
        write_json(path, figures, indent=1)
    _record(workdir, "figures", time.time() - t0, num_prompts=num_prompts)
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
    write_readme(workdir, out, {"table": "\n\n".join(tables), "summary": "\n".join(summary),
                                "num_prompts": num_prompts})
    return figures


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
    global CONFIG_ARG
    CONFIG_ARG = args.config_arg
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


if __name__ == "__main__":
    sys.exit(main())
