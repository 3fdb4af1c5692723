"""The shipped tiny world model (qwenimage_jax/assets/tiny_world): it loads through our loaders and through
diffusers/transformers with the same numbers, `eval-t2i` and `demo` run end to end, and the text-LM trainer learns."""
from __future__ import annotations

import json
import os
import re

import numpy as np
import pytest

from qwenimage_jax import cli
from qwenimage_jax.commands import demo
from tests.conftest import max_rel_err

MODEL = str(demo.TINY_WORLD_DIR)
CAPTIONS = ["two red circles on the left and a blue square at the top, on a gray background.",
            "A large green triangle in the centre."]


def _dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def test_shipped_directory_layout_and_size():
    index = json.load(open(os.path.join(MODEL, "model_index.json")))
    assert index["_class_name"] == "QwenImage21Pipeline"
    for name in ("transformer", "vae", "text_encoder", "processor", "scheduler"):
        assert index[name][0] is not None and os.path.isdir(os.path.join(MODEL, name)), name
    assert os.path.exists(os.path.join(MODEL, "scheduler", "scheduler_config.json"))
    assert os.path.exists(os.path.join(MODEL, "expander", "model.safetensors"))
    assert os.path.exists(os.path.join(MODEL, "README.md"))
    assert _dir_bytes(MODEL) <= 40 * 2**20


@pytest.fixture(scope="module")
def pipe():
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(MODEL)


def test_text_encoder_matches_transformers(pipe):
    import torch
    from transformers import AutoTokenizer, Qwen3VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(MODEL, "processor"))
    ref = Qwen3VLForConditionalGeneration.from_pretrained(os.path.join(MODEL, "text_encoder")).eval()
    batch = tokenizer(CAPTIONS, padding=True, padding_side="left", return_tensors="pt")
    with torch.no_grad():
        out = ref(**batch)
    mask = batch["attention_mask"].numpy().astype(bool)
    ours_logits = np.asarray(pipe.text_encoder.logits(batch["input_ids"].numpy(), batch["attention_mask"].numpy()))
    assert max_rel_err(ours_logits[mask], out.logits.numpy()[mask]) <= 1e-4


def test_vae_matches_diffusers(pipe):
    import torch
    from diffusers import AutoencoderKLQwenImage21

    from qwenimage_jax.data import world

    ref = AutoencoderKLQwenImage21.from_pretrained(os.path.join(MODEL, "vae")).eval()
    from qwenimage_jax.evals.t2i import model_size

    image = world.generate_scene(np.random.default_rng(3), model_size(MODEL))[0].astype(np.float32) / 127.5 - 1.0
    ours = np.asarray(pipe.vae.decode(pipe.vae.encode(image[None])))
    x = torch.from_numpy(image).permute(2, 0, 1)[None, :, None]
    with torch.no_grad():
        z = ref.encode(x).latent_dist.mode()
        recon = ref.decode(z).sample[:, :, 0].permute(0, 2, 3, 1).numpy()
    assert max_rel_err(ours, recon) <= 1e-4
    # the shipped latent statistics normalise the world's latents to about unit scale
    z_norm = np.asarray(pipe.vae.encode(image[None], normalize=True))
    assert 0.2 < float(z_norm.std()) < 5.0


def test_transformer_loads_in_diffusers_with_same_output(pipe):
    """diffusers' QwenImage21Transformer2DModel.from_pretrained(tiny_world/transformer) and our loaded DiT give the
    same velocities (fp32) on seeded latents and text states, batch 2 with one padded text mask."""
    import torch
    from diffusers import QwenImage21Transformer2DModel

    ref = QwenImage21Transformer2DModel.from_pretrained(os.path.join(MODEL, "transformer")).eval()
    cfg = ref.config
    grid, text_len = (1, 4, 4), 9
    n_target = int(np.prod(grid))
    g = torch.Generator().manual_seed(11)
    hidden = torch.randn(2, n_target, cfg.in_channels, generator=g)
    text = torch.randn(2, text_len, cfg.context_in_dim, generator=g)
    img_mask = torch.tensor([[False] * text_len + [True] * (n_target // 4)] * 2)
    mask = torch.ones(2, text_len, dtype=torch.bool)
    mask[1, -3:] = False
    timesteps = torch.tensor([0.3, 0.85])
    with torch.no_grad():
        expected = ref(hidden, text, timesteps, [[grid]] * 2, img_mask, encoder_hidden_states_mask=mask).sample
    ours = pipe.transformer(hidden.numpy(), text.numpy(), timesteps.numpy(), [[grid]] * 2, img_mask.numpy(),
                            encoder_hidden_states_mask=mask.numpy())
    assert np.asarray(ours.sample).shape == tuple(expected.shape) == (2, text_len + n_target, cfg.out_channels)
    assert max_rel_err(np.asarray(ours.sample), expected.numpy()) <= 1e-4


def test_prompts_are_padded_as_the_world_dit_was_trained(pipe):
    """model_index.json's text_pad_tokens (64: cache-latents + the DiT trainer pad the text states to it) makes
    `pipe(prompt)` (and so `qwenimage-jax sample`) see the training layout: the same image as from states padded by
    hand, and not the image of the unpadded states (the image's RoPE frame starts after the text)."""
    from qwenimage_jax.evals import t2i as eval_t2i

    assert json.load(open(os.path.join(MODEL, "model_index.json")))["text_pad_tokens"] == 64
    assert pipe.text_pad_tokens == 64
    prompt = "two red circles on the left on a teal background"
    kwargs = dict(height=128, width=128, num_inference_steps=2, seed=3, output_type="np", progress=False)
    padded = pipe(prompt, **kwargs).images
    embeds, mask = eval_t2i.padded_prompt_embeds(pipe, [prompt])
    assert embeds.shape[1] == 64
    by_hand = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, **kwargs).images
    np.testing.assert_allclose(padded, by_hand, atol=1e-6)
    pipe.text_pad_tokens = None
    try:
        unpadded = pipe(prompt, **kwargs).images
    finally:
        pipe.text_pad_tokens = 64
    assert np.abs(unpadded - padded).max() > 1e-3


def test_tokenizer_round_trips_captions_with_qwen_specials():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(os.path.join(MODEL, "processor"))
    for caption in CAPTIONS:
        assert tokenizer.decode(tokenizer(caption)["input_ids"]) == caption
    for special in ("<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|endoftext|>"):
        assert tokenizer.convert_tokens_to_ids(special) is not None
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_eval_t2i_prints_the_judge_table(capsys, tmp_path):
    """The command prints the table and writes the JSON of `evals.t2i.evaluate`; the generated column is the judge
    on exactly the images the library generates for the same prompts, steps and noise."""
    from qwenimage_jax.evals import t2i

    out_json = tmp_path / "eval.json"
    assert cli.main(["eval-t2i", "--model", MODEL, "--steps", "2", "--num-prompts", "2", "--split", "heldout",
                     "--json", str(out_json)]) == 0
    stdout = capsys.readouterr().out
    assert "judge accuracy: 2 heldout prompts, 2 steps" in stdout
    figures = json.load(open(out_json))
    assert figures["ground_truth"]["overall"] >= 0.9  # the judge's ceiling on the world's own renderings
    row = re.search(r"^overall\s+(\d\.\d{3})\s+(\d\.\d{3})", stdout, re.M)
    assert row and float(row.group(1)) == pytest.approx(figures["generated"]["overall"], abs=5e-4)
    assert float(row.group(2)) == pytest.approx(figures["ground_truth"]["overall"], abs=5e-4)
    # independent recomputation: same prompts, steps, CFG (the student's default: 1) and seed through the library
    from qwenimage_jax.data import judge
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    student = QwenImagePipeline.from_pretrained(MODEL)
    steps, cfg = t2i.sampling_defaults(student, 2, None)
    items = t2i.world_prompts("heldout", 2, t2i.model_size(MODEL))
    images = t2i.generate(student, [r["caption"] for r in items], steps, t2i.model_size(MODEL), cfg, seed=0)
    recomputed = judge.evaluate(images, [r["record"] for r in items])
    assert figures["generated"] == pytest.approx(recomputed, abs=1e-6)


def test_eval_t2i_expand_reports_contradictions_and_fallbacks(capsys, tmp_path):
    """`eval-t2i --expand` on the shipped expander: constrained decoding and rejection are on by default, and the
    JSON and the table carry the contradiction rate (overall, per attribute) and the fallback rate, which agree
    with `data.prompts.contradictions` of the printed expansions."""
    from qwenimage_jax.data import prompts
    from qwenimage_jax.evals import t2i

    out_json = tmp_path / "eval.json"
    assert cli.main(["eval-t2i", "--model", MODEL, "--steps", "1", "--num-prompts", "2", "--split", "heldout",
                     "--expand", "--json", str(out_json)]) == 0
    stdout = capsys.readouterr().out
    figures = json.load(open(out_json))
    assert figures["expansion_settings"] == {"keep_stated": True, "constrain": True, "decoding": "greedy"}
    assert set(figures["expansion_contradictions_by_attribute"]) == set(prompts.ATTRIBUTES)
    # the two examples are both prompts: the fallback rate is the share drawn as written
    assert figures["expansion_fallback_rate"] == np.mean([u == s for s, u in figures["expansion_examples"]])
    assert figures["expansion_used_contradiction_rate"] == 0.0  # rejection: every prompt drawn keeps what it states
    items = t2i.world_prompts("heldout", 2, t2i.model_size(MODEL))
    for (short, used), item in zip(figures["expansion_examples"], items):
        assert short == item["short_caption"] and prompts.contradictions(used, item["short_record"]) == []
    rate = figures["expansion_contradiction_rate"]
    assert f"expansions that change or drop what the short prompt states (constrained decoding): {rate:.3f}" in stdout
    assert f"fell back to the prompt as written: {figures['expansion_fallback_rate']:.3f}" in stdout


def test_demo_runs_text_to_image_end_to_end(tmp_path, capsys):
    from PIL import Image

    assert cli.main(["demo", "--out", str(tmp_path), "--steps", "2", "--num-prompts", "2"]) == 0
    stdout = capsys.readouterr().out
    assert "prompt expansion:" in stdout and "judge accuracy over 2 world captions" in stdout
    assert "teacher (40 steps, CFG 4) on the same captions and noise" in stdout
    grid = np.asarray(Image.open(tmp_path / "demo_grid.png"))
    # 2 captions + short + expanded; truth | recon | student | teacher, tiles of 128 px
    assert grid.shape == (4 * 128, 4 * 128, 3)


def test_text_lm_training_lowers_the_caption_loss(tmp_path):
    from qwenimage_jax.training import text_lm

    pairs = text_lm.world_text_pairs(64, seed=3)
    tokenizer = text_lm.build_tokenizer(str(tmp_path / "tok"), text_lm.tokenizer_corpus(pairs), 400)
    config = text_lm.hf_config(tokenizer, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                               mrope_section=[4, 2, 2]))
    module = text_lm.text_module(config)
    seqs = text_lm.encoder_sequences(tokenizer, [c for c, _ in pairs])
    data = text_lm.pad_left(seqs, max(len(ids) for ids, _ in seqs), tokenizer.pad_token_id)
    params = text_lm.init_params(module, 0)
    before = text_lm.eval_loss(module, params, data, batch_size=32)
    params, history = text_lm.train_lm(module, params, data, steps=30, batch_size=16, learning_rate=3e-3,
                                       warmup_steps=3, log=None, log_every=10)
    after = text_lm.eval_loss(module, params, data, batch_size=32)
    assert after < 0.85 * before and history[-1][1] < history[0][1], (before, after, history)


def test_distilled_student_is_the_default_and_the_teacher_ships_beside_it():
    """The demo's default is the shipped few-step student (one of configs/world_distill.py's student_steps; its
    grid is sample_sigmas in model_index.json, sampled without CFG); the 40-step teacher loads from
    teacher/transformer with the scheduler's own grid."""
    from qwenimage_jax.config_cli import load_config
    from qwenimage_jax.evals import t2i as eval_t2i
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    index = json.load(open(os.path.join(MODEL, "model_index.json")))
    sigmas = index["sample_sigmas"]
    recipe = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "world_distill.py"))
    assert sigmas is not None and len(sigmas) in tuple(recipe.student_steps), sigmas
    assert sigmas[0] == 1.0 and all(a > b for a, b in zip(sigmas, sigmas[1:]))
    student = QwenImagePipeline.from_pretrained(MODEL, load_text_encoder=False)
    teacher = QwenImagePipeline.from_pretrained(MODEL, load_text_encoder=False,
                                                transformer_subfolder="teacher/transformer")
    assert eval_t2i.sampling_defaults(student, None, None) == (len(sigmas), 1.0)
    assert teacher.sample_sigmas is None and eval_t2i.sampling_defaults(teacher, None, None) == (40, 4.0)
    import jax

    diffs = [float(np.abs(np.asarray(a) - np.asarray(b)).max())
             for a, b in zip(jax.tree.leaves(student.transformer.params), jax.tree.leaves(teacher.transformer.params))]
    assert max(diffs) > 0  # distillation changed the weights
    with pytest.raises(FileNotFoundError, match="no nowhere/ directory"):
        QwenImagePipeline.from_pretrained(MODEL, load_text_encoder=False, transformer_subfolder="nowhere")
    # an explicit step count other than the student's grid runs the scheduler's grid with that many steps
    assert eval_t2i.sampling_defaults(student, 3, None) == (3, 1.0) and student.sample_sigmas is None


# Seeds of the two tests below are used nowhere else (not for tuning, not for the shipped figures).
_TEST_SEED = 20261201


def _heldout_items(num: int):
    from qwenimage_jax.evals import t2i as eval_t2i

    return eval_t2i.world_prompts("heldout", num, eval_t2i.model_size(MODEL), seed=_TEST_SEED)


def test_shipped_vae_keeps_every_object(pipe):
    """The judge on the shipped VAE's reconstructions of 16 held-out scenes: every object is kept with its colour,
    place and size (>= 0.9, size >= 0.8) and most counts (>= 0.8). Shapes are not kept yet (the decoder draws round
    blobs; the issue's bar of 0.9 on every attribute is not met: see configs/world_vae_decoder.py), so shape is
    not asserted."""
    from qwenimage_jax.data import judge

    items = _heldout_items(16)
    images = np.stack([r["image"] for r in items]).astype(np.float32) / 127.5 - 1.0
    recon = np.asarray(pipe.vae.decode(pipe.vae.encode(images)))
    scores = judge.evaluate(np.clip(recon[..., :3], -1, 1), [r["record"] for r in items])
    assert scores["colour"] >= 0.9 and scores["position"] >= 0.9 and scores["size"] >= 0.8, scores
    assert scores["count"] >= 0.8, scores


def test_shipped_teacher_follows_the_prompt():
    """The 40-step teacher at 4 steps (CFG 4) on 16 held-out prompts scores clearly higher against each scene's
    record when it gets that scene's prompt than when the prompts are shuffled: it draws what the prompt says."""
    from qwenimage_jax.evals import t2i as eval_t2i
    from qwenimage_jax.data import judge
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    teacher = QwenImagePipeline.from_pretrained(MODEL, transformer_subfolder="teacher/transformer")
    items = _heldout_items(16)
    records = [r["record"] for r in items]
    prompts = [r["caption"] for r in items]
    shuffled = prompts[5:] + prompts[:5]
    size = eval_t2i.model_size(MODEL)
    both = eval_t2i.generate(teacher, prompts + shuffled, 4, size, 4.0, 0, batch_size=32)
    right = judge.evaluate(both[:16], records)["overall"]
    wrong = judge.evaluate(both[16:], records)["overall"]
    assert right >= wrong + 0.2, (right, wrong)


def _swapped(record, attribute: str, rng):
    """`record` with one attribute of its first object group (or its background) changed to another valid value."""
    import dataclasses

    from qwenimage_jax.data import world

    if attribute == "background":
        return dataclasses.replace(record, background=str(rng.choice(
            [b for b in world.BACKGROUNDS if b != record.background])))
    first = record.groups[0]
    taken = {g.colour for g in record.groups}
    options = {"colour": [c for c in world.COLOURS if c not in taken], "size": list(world.SIZES),
               "position": [p for p in world.POSITIONS if p not in {g.position for g in record.groups}],
               "count": [1, 2, 3], "shape": list(world.SHAPES)}[attribute]
    value = rng.choice([o for o in options if o != getattr(first, attribute)])
    value = int(value) if attribute == "count" else str(value)
    return dataclasses.replace(record, groups=(dataclasses.replace(first, **{attribute: value}),) + record.groups[1:])


def test_shipped_teacher_takes_each_attribute_from_the_prompt():
    """Per attribute: 24 held-out scenes, each prompted as written and with that one attribute of its first group
    (or the background) swapped, from the same noise (teacher, 4 steps, CFG 4). Judged against the scene's own first
    group, the attribute is drawn right clearly more often from the right prompt: it comes from the prompt.
    Colour, background, position, size and count are asserted; shape is not yet learnt (the world's README: held-out
    shape 0.13), so it is measured beside them but not asserted."""
    from qwenimage_jax.data import judge, world
    from qwenimage_jax.evals import t2i as eval_t2i
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    teacher = QwenImagePipeline.from_pretrained(MODEL, transformer_subfolder="teacher/transformer")
    size = eval_t2i.model_size(MODEL)
    records = [r["record"] for r in _heldout_items(24)]
    rng = np.random.default_rng(_TEST_SEED)
    attributes = ("colour", "background", "position", "size", "count", "shape")
    prompts, targets = [], []
    for attribute in attributes:
        for record in records:
            phrase_rng = int(rng.integers(1 << 30))
            prompts += [world.rich_caption(record, np.random.default_rng(phrase_rng)),
                        world.rich_caption(_swapped(record, attribute, rng), np.random.default_rng(phrase_rng))]
            targets.append(world.Scene(groups=record.groups[:1], background=record.background))
    images = eval_t2i.generate(teacher, prompts, 4, size, 4.0, 0, batch_size=48)
    gaps = {}
    for i, attribute in enumerate(attributes):
        rows = range(i * len(records), (i + 1) * len(records))
        right = np.mean([judge.judge(images[2 * r], targets[r])[attribute] for r in rows])
        wrong = np.mean([judge.judge(images[2 * r + 1], targets[r])[attribute] for r in rows])
        gaps[attribute] = (round(float(right), 3), round(float(wrong), 3))
    for attribute in ("colour", "background", "position", "size", "count"):
        right, wrong = gaps[attribute]
        assert right >= wrong + 0.2, (attribute, gaps)


LORA = os.path.join(MODEL, "lora_purple")


def test_shipped_lora_gives_diffusers_numbers():
    """The shipped adapter (trained by train-lora, written in diffusers' format) loaded by diffusers'
    QwenImage21Pipeline on the teacher and by ours: the same denoised latents (fp32, 3 steps, CFG 4)."""
    import torch
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)

    from qwenimage_jax.sampling.pipeline import QwenImagePipeline
    from qwenimage_jax.testing.tokenizer import load_processor_without_torchvision
    from qwenimage_jax.testing.pipeline import reference_noise

    ref = QwenImage21Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(os.path.join(MODEL, "scheduler")),
        vae=AutoencoderKLQwenImage21.from_pretrained(os.path.join(MODEL, "vae")), text_encoder=None,
        processor=load_processor_without_torchvision(os.path.join(MODEL, "processor")),
        transformer=QwenImage21Transformer2DModel.from_pretrained(os.path.join(MODEL, "teacher", "transformer")))
    ref.set_progress_bar_config(disable=True)
    ref.load_lora_weights(LORA, adapter_name="purple")
    ours = QwenImagePipeline.from_pretrained(MODEL, load_text_encoder=False, transformer_subfolder="teacher/transformer")
    ours.load_lora_weights(LORA, adapter_name="purple")
    gen = torch.Generator().manual_seed(0)
    embeds, neg = torch.randn(1, 12, 64, generator=gen), torch.randn(1, 12, 64, generator=gen)
    mask = torch.ones(1, 12, dtype=torch.long)
    noise = reference_noise(1, 128, 128, channels=ours.latent_channels, seed=1)
    kwargs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
                  negative_prompt_embeds_mask=mask, true_cfg_scale=4.0, num_inference_steps=3, height=128, width=128,
                  output_type="latent")
    with torch.no_grad():
        expected = ref(latents=noise.clone(), **kwargs).images.numpy()
    got = np.asarray(ours(latents=noise.numpy(), progress=False,
                          **{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}).images)
    assert max_rel_err(got, expected) <= 1e-4
    ours.set_adapters("purple", adapter_weights=0.0)
    base = np.asarray(ours(latents=noise.numpy(), progress=False,
                           **{k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}).images)
    assert max_rel_err(base, expected) > 1e-2  # the adapter matters


def test_shipped_lora_teaches_purple_backgrounds():
    """Fresh prompts of the novel split (seed 2000, never trained on), 8 steps CFG 4, the same noise: the
    teacher never draws the purple background they ask for; with the adapter it does in most images."""
    from qwenimage_jax.evals import t2i as eval_t2i
    from qwenimage_jax.data import judge
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(MODEL, transformer_subfolder="teacher/transformer")
    pipe.load_lora_weights(LORA, adapter_name="purple")
    items = eval_t2i.world_prompts("novel", 16, eval_t2i.model_size(MODEL), seed=2000)
    scores = {}
    for weight in (0.0, 1.0):
        pipe.set_adapters("purple", adapter_weights=weight)
        images = eval_t2i.generate(pipe, [r["caption"] for r in items], 8, eval_t2i.model_size(MODEL), 4.0, 0, 16)
        scores[weight] = judge.evaluate(images, [r["record"] for r in items])["novel_background"]
    assert scores[0.0] <= 0.1 and scores[1.0] >= 0.3, scores
