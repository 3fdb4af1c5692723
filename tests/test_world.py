"""The small world's scene generator, captions, held-out split and short prompts."""
import dataclasses
import re

import numpy as np
import pytest

from qwenimage_jax.data import prompts, world


def _scenes(num, size, split="train", offset=0):
    word_prob = 0.5 if size >= world.MIN_WORD_IMAGE_SIZE else 0.0  # words are off by default: test them too
    return [world.generate_scene(np.random.default_rng(offset + i), size, split, word_prob) for i in range(num)]


@pytest.fixture(scope="module")
def scenes_128():
    return _scenes(150, 128)


def test_same_seed_same_scene_and_different_seeds_differ():
    image_a, caption_a, record_a = world.generate_scene(np.random.default_rng(7), 128)
    image_b, caption_b, record_b = world.generate_scene(np.random.default_rng(7), 128)
    np.testing.assert_array_equal(image_a, image_b)
    assert caption_a == caption_b and record_a == record_b
    image_c, _, _ = world.generate_scene(np.random.default_rng(8), 128)
    assert not np.array_equal(image_a, image_c)


@pytest.mark.parametrize("size", [64, 128, 256])
def test_images_are_uint8_rgb_of_the_requested_size(size):
    image, caption, record = world.generate_scene(np.random.default_rng(0), size)
    assert image.shape == (size, size, 3) and image.dtype == np.uint8
    assert isinstance(caption, str) and 1 <= len(record.groups) <= 3


def test_exact_object_colours_are_drawn_and_background_dominates(scenes_128):
    for image, _, record in scenes_128:
        colours = [g.colour for g in record.groups]
        assert len(set(colours)) == len(colours), "groups must have distinct colours"
        for group in record.groups:
            exact = np.all(image == np.asarray(world.OBJECT_COLOURS[group.colour], np.uint8), axis=-1)
            assert exact.sum() >= group.count * 0.3 * world.object_diameter("small", 128) ** 2
        background = np.asarray(world.BACKGROUND_COLOURS[record.background], np.int32)
        near_background = np.all(np.abs(image.astype(np.int32) - background) <= 16, axis=-1)
        assert near_background.mean() > 0.4
        if record.word is not None:
            assert record.word in world.WORDS
            assert record.word_colour not in colours
            word_rgb = np.asarray(world.OBJECT_COLOURS[record.word_colour], np.uint8)
            assert np.all(image == word_rgb, axis=-1).sum() > 20


def test_caption_states_every_attribute(scenes_128):
    for _, caption, record in scenes_128:
        text = caption.lower()
        for group in record.groups:
            noun = world.shape_noun(group.shape, group.count)
            assert re.search(rf"\b{group.colour} {noun}\b", text), (caption, group)
            count_words = ("a", "an", "one") if group.count == 1 else (world.NUMBER_WORDS[group.count],)
            assert any(re.search(rf"\b{w} (\w+ )?{group.colour}", text) for w in count_words), (caption, group)
            assert any(p in text for p in world.POSITION_PHRASES[group.position]), (caption, group)
            assert any(re.search(rf"\b{s}\b", text) for s in world.SIZE_WORDS[group.size]), (caption, group)
        assert record.background in text
        if record.word is not None:
            assert record.word in caption and record.word_colour in text


def test_captions_use_several_templates(scenes_128):
    openings = {caption.split()[0] for _, caption, _ in scenes_128}
    assert len(openings) >= 4


def test_words_need_at_least_128_pixels():
    _, _, record = world.generate_scene(np.random.default_rng(0), 64)
    assert record.word is None
    with pytest.raises(ValueError, match="word_prob=0"):
        world.generate_scene(np.random.default_rng(0), 64, word_prob=0.5)
    with pytest.raises(ValueError, match="split"):
        world.generate_scene(np.random.default_rng(0), 128, split="validation")


def test_position_regions():
    assert world.position_of(0.5, 0.5) == "centre"
    assert world.position_of(0.1, 0.5) == "left"
    assert world.position_of(0.9, 0.45) == "right"
    assert world.position_of(0.5, 0.05) == "top"
    assert world.position_of(0.4, 0.95) == "bottom"
    assert world.position_of(0.2, 0.2, margin=0.04) is None  # on the left/top diagonal


def test_record_json_round_trip(scenes_128):
    for _, _, record in scenes_128[:20]:
        assert world.Scene.from_json(record.to_json()) == record


def test_heldout_split_is_a_fifth_of_compositions_and_keeps_every_shape_and_colour():
    every = world.composition_pairs("all")
    held = world.composition_pairs("heldout")
    train = world.composition_pairs("train")
    assert len(every) == len(world.SHAPES) * len(world.COLOURS) == 40
    assert len(held) == 8 and len(train) == 32 and not set(held) & set(train)
    assert {s for s, _ in train} == set(world.SHAPES) and {c for _, c in train} == set(world.COLOURS)


def test_train_scenes_avoid_and_heldout_scenes_contain_heldout_compositions(scenes_128):
    held = set(world.composition_pairs("heldout"))
    assert all(not set(r.compositions()) & held for _, _, r in scenes_128)
    heldout_scenes = _scenes(60, 64, split="heldout")
    assert all(set(r.compositions()) & held for _, _, r in heldout_scenes)
    assert all(r.is_heldout() for _, _, r in heldout_scenes)


def test_short_prompt_drops_details_and_states_a_subset(scenes_128):
    dropped = {"count": 0, "position": 0, "background": 0}
    for i, (_, caption, record) in enumerate(scenes_128):
        text, partial = prompts.degrade_record(record, np.random.default_rng(i))
        assert len(text) < len(caption), (text, caption)
        assert prompts.degrade_caption(record, np.random.default_rng(i)) == text  # deterministic per rng
        full = {(g.shape, g.colour): g for g in record.groups}
        assert partial.groups and all((g.shape, g.colour) in full for g in partial.groups)
        for group in partial.groups:
            truth = full[(group.shape, group.colour)]
            assert group.colour in text.lower()
            for name in ("count", "position", "size"):
                value = getattr(group, name)
                assert value is None or value == getattr(truth, name)
            dropped["count"] += group.count is None
            dropped["position"] += group.position is None
        assert partial.word in (None, record.word) and partial.background in (None, record.background)
        dropped["background"] += partial.background is None
        assert partial.texture is None
    assert all(n > 50 for n in dropped.values()), dropped


def test_short_prompt_of_a_single_object_keeps_its_singular():
    record = world.Scene(groups=(world.ObjectGroup("cross", "red", 1, "left", "small"),), background="gray",
                         texture="plain")
    for seed in range(20):
        text, partial = prompts.degrade_record(record, np.random.default_rng(seed))
        assert "red cross" in text and "crosses" not in text
        assert partial.groups[0].count == 1
        assert dataclasses.replace(partial.groups[0], position=None, size=None) == world.ObjectGroup("cross", "red", 1)


def test_prompts_are_read_back_into_groups_and_contradictions_are_named():
    assert prompts.stated_groups("pls draw a couple of red rings & 3 tiny green triangles, white crosses") == [
        ("red", "ring", 2), ("green", "triangle", 3), ("white", "cross", None)]
    rng = np.random.default_rng(11)
    for _ in range(200):  # a scene's own rich caption never contradicts its short prompt, nor the prompt itself
        scene = world._sample_content(rng, "train", 0.0)
        caption = world.rich_caption(scene, rng)
        short, partial = prompts.degrade_record(scene, rng)
        assert prompts.contradictions(caption, partial) == [] and prompts.contradictions(short, partial) == []
    partial = world.Scene(groups=(world.ObjectGroup("circle", "red", count=2),), background="teal")
    assert prompts.contradictions("Two red circles on a teal background", partial) == []
    assert prompts.contradictions("Two red squares on a teal background", partial) == ["shape of red circle"]
    assert prompts.contradictions("Three red circles on a pink background", partial) == [
        "count of red circle", "background"]
