"""The world recipe's text stages: text (BPE tokenizer, text encoder pretraining, prompt expander fine-tune),
expander (the fine-tune again), text_check (a short DiT run on the text states before the long one), and
`--text-from` (an earlier build's text outputs copied instead of retrained)."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np

from qwenimage_jax.recipes.world.stages import DEFAULT_OUT, _cli, _config, _image_size, _record

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
    # an interrupted run resumes from WORKDIR/text_lm_pretrain; once exported, its checkpoints go (a later run of
    # the stage trains afresh)
    run_dir = os.path.join(workdir, "text_lm_pretrain")
    params, hist_pre = text_lm.train_lm(module, params, pre, seed=c.seed, steps=c.pretrain.steps,
                                        batch_size=c.pretrain.batch_size, learning_rate=c.pretrain.learning_rate,
                                        warmup_steps=c.pretrain.warmup_steps, field_targets=targets,
                                        field_weight=field_weight, workdir=run_dir)
    t_pre = time.time() - t1
    loss_pre = text_lm.eval_loss(module, params, pre_eval)
    text_lm.save_text_model(params, config, os.path.join(workdir, "text_encoder"), tok_dir, seed=c.seed)
    shutil.rmtree(run_dir, ignore_errors=True)
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
    run_dir = os.path.join(workdir, "text_lm_expand")   # resumed when interrupted, removed once exported
    params, hist_exp = text_lm.train_lm(module, params, exp, seed=c.seed + 1, steps=c.expand.steps,
                                        batch_size=c.expand.batch_size, learning_rate=c.expand.learning_rate,
                                        warmup_steps=c.expand.warmup_steps, workdir=run_dir)
    t_exp = time.time() - t2
    exp_after = text_lm.eval_loss(module, params, exp_eval)
    text_lm.save_text_model(params, config, os.path.join(workdir, "expander"), tok_dir, seed=c.seed)
    shutil.rmtree(run_dir, ignore_errors=True)
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
