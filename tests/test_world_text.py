"""The world text encoder keeps every attribute a caption states (evals/text_probe.py), and the pieces its training
objective is built from: caption spans, per-token scene-field targets, the auxiliary heads."""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from qwenimage_jax.recipes.world.snapshots import BUILD_DIR
from qwenimage_jax.data import world
from qwenimage_jax.evals import text_probe

# The recipe's current text encoder: the build snapshot (world_build/, the stages done so far) until the rebuilt
# world is assembled into qwenimage_jax/assets/tiny_world
BUILD = BUILD_DIR


@pytest.fixture(scope="module")
def world_encoder():
    from qwenimage_jax.checkpoints import load_text_encoder

    return load_text_encoder(os.path.join(BUILD, "text_encoder"), with_vision=False,
                             tokenizer_path=os.path.join(BUILD, "tokenizer"))


def test_world_encoder_moves_its_states_for_every_attribute_word(world_encoder):
    """One changed attribute word moves the state at the changed token by >= 0.3 of its norm (the next-token-only
    encoder this replaced: 0.03 for size, 0.045 for count, 0.067 for background)."""
    swaps = text_probe.swap_sensitivity(world_encoder, num=32)
    assert set(swaps) == set(text_probe.ATTRIBUTES)
    assert min(swaps.values()) >= 0.3, swaps


def test_linear_probe_recovers_every_attribute_of_heldout_captions(world_encoder):
    """A ridge probe fitted on train captions reads each group's colour, shape, count, size and position at the
    group phrase's last token, and the background at the prompt's last token, on held-out compositions (the
    replaced encoder: colour 0.16, shape 0.20, background 0.31)."""
    accuracy = text_probe.linear_probe(world_encoder, num_train=512, num_test=128)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_attribute_word_embeddings_are_distinct(world_encoder):
    cosines = text_probe.embedding_cosines(world_encoder)
    assert max(cosines.values()) < 0.6, cosines  # replaced encoder: background 0.991, size 0.990


def test_caption_spans_point_at_the_stated_words():
    for seed in range(200):
        rng = np.random.default_rng(seed)
        scene = world._sample_content(rng, "heldout", 0.0)
        text, spans = world.rich_caption_spans(scene, np.random.default_rng([seed, 1]))
        assert text == world.rich_caption(scene, np.random.default_rng([seed, 1]))
        assert text[slice(*spans["background"])] == scene.background
        for group, group_spans in zip(scene.groups, spans["groups"]):
            assert text[slice(*group_spans["colour"])] == group.colour
            assert text[slice(*group_spans["shape"])] == world.shape_noun(group.shape, group.count)
            phrase = text[slice(*group_spans["phrase"])]
            assert phrase.endswith(text[slice(*group_spans["position"])])
            assert text[slice(*group_spans["count"])].lower() in ("a", "an", "one", "two", "three")
            assert text[slice(*group_spans["size"])] in world.SIZE_WORDS[group.size]


def test_field_targets_label_each_token_with_what_it_has_read(tmp_path):
    from qwenimage_jax.text import templates
    from qwenimage_jax.training import text_lm

    items = text_lm.world_text_scenes(16, seed=4)
    tokenizer = text_lm.build_tokenizer(str(tmp_path / "tok"), text_lm.tokenizer_corpus(
        [(c, s) for c, s, _, _ in items]), 400)
    seqs = text_lm.encoder_sequences(tokenizer, [c for c, _, _, _ in items])
    length = max(len(ids) for ids, _ in seqs)
    targets = text_lm.field_targets(tokenizer, [(c, scene, spans) for c, _, scene, spans in items], length)
    heads = text_lm.LOCAL_HEADS + text_lm.SUMMARY_HEADS
    assert targets.shape == (16, length, len(heads))
    assert len(text_lm.head_classes()) == len(heads)
    for (caption, _, scene, spans), labels, (ids, _) in zip(items, targets, seqs):
        labels = labels[length - len(ids):]
        summary = labels[len(ids) - 2]  # the prompt's last token (before the closing <|im_end|>)
        assert summary[heads.index("summary_background")] == world.BACKGROUNDS.index(scene.background)
        assert summary[heads.index("slot0_shape")] == world.SHAPES.index(scene.groups[0].shape) + 1
        assert summary[heads.index("slot1_colour")] == (
            world.COLOURS.index(scene.groups[1].colour) + 1 if len(scene.groups) > 1 else 0)
        colour = labels[:, heads.index("colour")]
        assert set(colour[colour >= 0]) == {world.COLOURS.index(g.colour) for g in scene.groups}
        assert (labels[:templates.drop_index(tokenizer)] == -1).all()  # the system turn reads nothing
        assert (labels[len(ids) - 1] == -1).all()       # nor the closing token


def _tiny_lm(tmp_path, num: int, seed: int, vocab: int):
    """`num` world captions, a BPE tokenizer on them, a 1-layer width-32 encoder config and module, and the
    captions as left-padded (ids, attention, loss mask) arrays."""
    from qwenimage_jax.training import text_lm

    items = text_lm.world_text_scenes(num, seed=seed)
    tokenizer = text_lm.build_tokenizer(str(tmp_path / "tok"), text_lm.tokenizer_corpus(
        [(c, s) for c, s, _, _ in items]), vocab)
    config = text_lm.hf_config(tokenizer, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                               mrope_section=[4, 2, 2], tie_word_embeddings=True))
    seqs = text_lm.encoder_sequences(tokenizer, [c for c, _, _, _ in items])
    length = int(np.ceil(max(len(ids) for ids, _ in seqs) / 16) * 16)
    return items, tokenizer, config, text_lm.text_module(config), text_lm.pad_left(seqs, length,
                                                                                    tokenizer.pad_token_id)


def test_field_heads_make_the_states_keep_attributes(tmp_path):
    """On a 1-layer encoder, 150 steps with the field heads separate the background words' states far more than
    next-token prediction alone does from the same init."""
    from qwenimage_jax.training import text_lm

    items, tokenizer, config, module, data = _tiny_lm(tmp_path, 256, seed=5, vocab=400)
    length = data[0].shape[1]
    targets = text_lm.field_targets(tokenizer, [(c, scene, spans) for c, _, scene, spans in items], length)
    from qwenimage_jax import checkpoints

    accuracy = {}
    for name, kwargs in (("lm", {}), ("fields", dict(field_targets=targets))):
        params = text_lm.init_params(module, 0)
        params, _ = text_lm.train_lm(module, params, data, steps=150, batch_size=16, learning_rate=3e-3,
                                     warmup_steps=10, log=None, **kwargs)
        out = str(tmp_path / name)
        text_lm.save_text_model(params, config, out, str(tmp_path / "tok"))
        encoder = checkpoints.load("text_encoder", out, with_vision=False, tokenizer_path=str(tmp_path / "tok"))
        accuracy[name] = text_probe.linear_probe(encoder, num_train=256, num_test=64)["background"]
    assert accuracy["fields"] >= 0.9 and accuracy["fields"] > accuracy["lm"] + 0.2, accuracy


def test_text_lm_training_resumes_where_it_stopped(tmp_path):
    """train_lm runs on the shared loop: a run stopped early (its time budget spent, as a SIGTERM stops it) raises
    instead of returning half-trained weights, and called again ends with the weights of an unbroken run (the batch generator's state is in the checkpoint), and
    logs metrics.jsonl."""
    from qwenimage_jax.training import text_lm

    _, _, _, module, data = _tiny_lm(tmp_path, 32, seed=3, vocab=300)
    kw = dict(batch_size=4, learning_rate=3e-3, warmup_steps=2, log=None, log_every=3, checkpoint_every=3)
    init = text_lm.init_params(module, 0)
    straight, history = text_lm.train_lm(module, init, data, steps=12, **kw)
    with pytest.raises(text_lm.TrainingStopped, match=r"stopped at step 1 of 12; its checkpoint is in .*run: call"):
        text_lm.train_lm(module, init, data, steps=12, workdir=str(tmp_path / "run"), time_budget_s=1e-9, **kw)
    assert not (tmp_path / "run" / "metrics.jsonl").exists() or \
        (tmp_path / "run" / "metrics.jsonl").read_text() == ""   # stopped after step 1, before any log step
    resumed, _ = text_lm.train_lm(module, init, data, steps=12, workdir=str(tmp_path / "run"), **kw)
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    assert [step for step, _ in history] == [3, 6, 9, 12]
    logged = [json.loads(line)["step"] for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert logged == [3, 6, 9, 12]
    assert len(list((tmp_path / "run" / "checkpoints").iterdir())) >= 1
