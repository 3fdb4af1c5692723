"""The small world's GenEval as library functions: world prompts of a split, batched generation with a pipeline
(prompt states padded to the length the world DiT was trained on), the judge's per-attribute accuracy of generated
images beside the world's own renderings (the ceiling), and the prompt-expansion gain.

    pipe = QwenImagePipeline.from_pretrained(model_dir)
    steps, cfg = sampling_defaults(pipe, None, None)
    result = evaluate(pipe, model_dir, "heldout", 64, steps, model_size(model_dir), cfg, expand=True)
    print(format_table(result))

Prompts are world scenes the DiT never saw (eval seed 1000). `qwenimage-jax eval-t2i` is the command around it.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

EVAL_SEED = 1000        # the reported figures' prompts
VALIDATION_SEED = 1500  # prompts for choices made while building a model (e.g. the alignment ablation's arm)
TEXT_TOKENS = 64  # configs/world_dit.py data.max_text_tokens: the padded prompt length the DiT was trained on


def world_prompts(split: str, num: int, size: int, seed: int = EVAL_SEED) -> list[dict]:
    """`num` world records of `split` (WorldSource fields + parsed `record` / `short_record` Scenes)."""
    from qwenimage_jax.data import world
    from qwenimage_jax.data.world_source import WorldSource

    source = WorldSource(num, seed=seed, split=split, size=size)
    out = []
    for i in range(num):
        r = dict(source[i])
        r["record"] = world.Scene.from_json(r["record_json"])
        r["short_record"] = world.Scene.from_json(r["short_record_json"])
        out.append(r)
    return out


WORLD_FILE = "world.json"  # written by the world recipe's assemble stage: {"image_size": ...} of the world trained on


def model_size(model_dir: str) -> int:
    """Pixel size a world model was trained at: `image_size` of MODEL_DIR/world.json (64 when it has none)."""
    path = os.path.join(model_dir, WORLD_FILE)
    if not os.path.exists(path):
        return 64
    with open(path) as f:
        return int(json.load(f)["image_size"])


def padded_prompt_embeds(pipe, prompts: list[str], length: int = TEXT_TOKENS):
    """Prompt states right-padded (or cut) to `length` tokens with a mask, as the DiT trainer padded them: one
    compiled sampler for every batch, and the conditioning layout the world DiT was trained on."""
    embeds, mask, _ = pipe.encode_prompt(list(prompts))
    return pad_states(embeds, mask, length)


def pad_states(embeds, mask, length: int):
    """(B, L, D) text states and their mask (None: all valid) -> float32 (B, length, D), int32 (B, length)."""
    embeds = np.asarray(embeds, np.float32)
    mask = np.ones(embeds.shape[:2], np.int32) if mask is None else np.asarray(mask, np.int32)
    n = min(length, embeds.shape[1])
    out = np.zeros((embeds.shape[0], length, embeds.shape[2]), np.float32)
    out_mask = np.zeros((embeds.shape[0], length), np.int32)
    out[:, :n], out_mask[:, :n] = embeds[:, :n], mask[:, :n]
    return out, out_mask


def generate(pipe, prompts: list[str], steps: int, size: int, cfg: float = 4.0, seed: int = 0,
             batch_size: int = 16) -> np.ndarray:
    """uint8 (N, size, size, 3) images, one per prompt (noise seeded by seed + batch offset)."""
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        embeds, mask = padded_prompt_embeds(pipe, chunk)
        kwargs = {}
        if cfg > 1:
            neg, neg_mask = padded_prompt_embeds(pipe, [" "] * len(chunk))
            kwargs = dict(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask)
        images = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=cfg, height=size, width=size,
                      num_inference_steps=steps, seed=seed + start, output_type="np", progress=False,
                      **kwargs).images
        out.append(np.clip(np.round(np.asarray(images)[..., :3] * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)


def judge_images(images: np.ndarray, records) -> dict[str, float]:
    """Mean judge accuracy per attribute of uint8 images against their Scene records."""
    from qwenimage_jax.data import judge

    return judge.evaluate(images, records)


def load_expander(model_dir: str):
    """MODEL_DIR/expander: the world model's prompt expander (a Qwen3-VL text model with its tokenizer)."""
    from qwenimage_jax.checkpoints import load_text_encoder

    path = os.path.join(model_dir, "expander")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{model_dir!r} has no expander/ directory; --expand needs the prompt expander")
    return load_text_encoder(path, with_vision=False)


def evaluate(pipe, model_dir: str, split: str, num: int, steps: int, size: int = 64, cfg: float = 4.0,
             seed: int = 0, batch_size: int = 16, expand: bool = False, log=print, prompt_seed: int = EVAL_SEED,
             keep_stated: bool = True, constrain: bool = True) -> dict:
    """Judge scores of generated images vs ground truth on `num` world prompts (of `prompt_seed`; `seed` seeds the
    noise); optionally the expansion gain (`expansion_report`: constrained decoding and rejection of an expansion
    that contradicts its short prompt, on by default)."""
    items = world_prompts(split, num, size, seed=prompt_seed)
    t0 = time.time()
    images = generate(pipe, [r["caption"] for r in items], steps, size, cfg, seed, batch_size)
    result = {"split": split, "num_prompts": num, "steps": steps, "cfg": cfg,
              "generated": judge_images(images, [r["record"] for r in items]),
              "ground_truth": judge_images(np.stack([r["image"] for r in items]), [r["record"] for r in items]),
              "generate_seconds": round(time.time() - t0, 1)}
    result["images"] = images
    if expand:
        shorts = [r["short_caption"] for r in items]
        short_records = [r["short_record"] for r in items]
        expanded, report = expansion_report(load_expander(model_dir), shorts, short_records, keep_stated, constrain)
        result["short"] = judge_images(generate(pipe, shorts, steps, size, cfg, seed, batch_size), short_records)
        result["expanded"] = judge_images(generate(pipe, expanded, steps, size, cfg, seed, batch_size),
                                          short_records)
        result.update(report)
    return result


def expansion_report(expander, shorts: list[str], short_records, keep_stated: bool = True,
                     constrain: bool = True) -> tuple[list[str], dict]:
    """(the texts to draw, the figures) of expanding `shorts` (greedy) with each prompt's partial record:

    expansion_contradiction_rate / expansion_contradictions_by_attribute: of the expander's answers (constrained
    decoding when `constrain`, before any rejection), the fraction of prompts with a contradiction
    (`data.prompts.contradictions`), overall and per attribute; expansion_contradictions_when_stated: per
    attribute among the prompts that state it; expansion_fallback_rate: the fraction replaced by the prompt as
    written (`keep_stated`; 0 without it); expansion_used_contradiction_rate: of the texts drawn;
    expansion_contradictions: the first few contradicting answers with what they change."""
    from qwenimage_jax.data import prompts as world_prompts_text
    from qwenimage_jax.text.expand import expand_checked

    checked = expand_checked(expander, shorts, constrain=constrain, stated=short_records)
    used = checked.texts if keep_stated else checked.first
    first = world_prompts_text.contradiction_rates(checked.first_contradictions, short_records)
    after = world_prompts_text.contradiction_rates(
        [world_prompts_text.contradictions(t, r) for t, r in zip(used, short_records)], short_records)
    report = {
        "expansion_settings": {"keep_stated": keep_stated, "constrain": constrain, "decoding": "greedy"},
        "expansion_examples": list(zip(shorts[:3], used[:3])),
        "expansion_contradiction_rate": first["rate"],
        "expansion_contradictions_by_attribute": first["by_attribute"],
        "expansion_contradictions_when_stated": first["by_attribute_when_stated"],
        "expansion_fallback_rate": checked.fallback_rate if keep_stated else 0.0,
        "expansion_used_contradiction_rate": after["rate"],
        "expansion_contradictions": [[s, t, found] for s, t, found in
                                     zip(shorts, checked.first, checked.first_contradictions) if found][:5],
    }
    return used, report


def sampling_defaults(pipe, steps: int | None, cfg: float | None) -> tuple[int, float]:
    """(steps, cfg) to sample with: a distilled model (sample_sigmas in model_index.json) runs its own grid without
    CFG (guidance is distilled into it); any other model runs 40 steps with CFG 4. Explicit values win."""
    distilled = pipe.sample_sigmas is not None
    if steps is None:
        steps = len(pipe.sample_sigmas) if distilled else 40
    elif distilled and steps != len(pipe.sample_sigmas):
        # another step count than the distilled grid: the scheduler's default grid for `steps`, so the printed
        # step count is the one that runs (the pipeline otherwise always follows sample_sigmas)
        pipe.sample_sigmas = None
    if cfg is None:
        cfg = 1.0 if distilled else 4.0
    return int(steps), float(cfg)


def format_table(result: dict) -> str:
    """The judge's per-attribute accuracy of an `evaluate` result, one column per image set."""
    columns = [("generated", "generated"), ("ground_truth", "ground truth")]
    if "short" in result:
        columns += [("short", "short prompt"), ("expanded", "expanded")]
    keys = []
    for name, _ in columns:
        for k in result[name]:
            if k not in keys:
                keys.append(k)
    keys = [k for k in keys if k not in ("overall", "all_correct")] + ["overall", "all_correct"]
    lines = [f"judge accuracy: {result['num_prompts']} {result['split']} prompts, {result['steps']} steps, "
             f"CFG {result['cfg']}"]
    lines.append(f"{'attribute':<14}" + "".join(f"{title:>15}" for _, title in columns))
    for k in keys:
        cells = "".join(f"{result[name][k]:>15.3f}" if k in result[name] else f"{'-':>15}" for name, _ in columns)
        lines.append(f"{k:<14}" + cells)
    for short, long in result.get("expansion_examples", []):
        lines.append(f"expansion: {short!r} -> {long!r}")
    if "expansion_contradiction_rate" in result:
        settings = result.get("expansion_settings", {})
        how = "constrained decoding" if settings.get("constrain") else "unconstrained decoding"
        by = result.get("expansion_contradictions_by_attribute", {})
        lines.append(f"expansions that change or drop what the short prompt states ({how}): "
                     f"{result['expansion_contradiction_rate']:.3f} ("
                     + ", ".join(f"{k} {v:.3f}" for k, v in by.items()) + ")")
        if settings.get("keep_stated", False):
            lines.append(f"fell back to the prompt as written: {result['expansion_fallback_rate']:.3f}; "
                         f"contradictions in the prompts drawn: {result['expansion_used_contradiction_rate']:.3f}")
    return "\n".join(lines)
