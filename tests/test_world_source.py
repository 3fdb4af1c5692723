"""The small world as a grain source: random access, splits, the batched pipeline's resumable state, PNG dump."""
import json
import os

import grain
import numpy as np
import pytest
from PIL import Image

from qwenimage_jax.data import judge, world
from qwenimage_jax.data.world_source import WorldSource, main, to_model_inputs, world_dataset, write_scene_folder


@pytest.fixture(scope="module")
def source():
    return WorldSource(24, seed=3, split="train", size=64)


def test_is_a_grain_random_access_source(source):
    assert isinstance(source, grain.sources.RandomAccessDataSource)
    assert len(source) == 24
    record = source[5]
    assert set(record) == {"image", "caption", "short_caption", "record_json", "short_record_json"}
    assert record["image"].shape == (64, 64, 3) and record["image"].dtype == np.uint8
    assert all(isinstance(record[k], str) for k in record if k != "image")
    with pytest.raises(IndexError, match="out of range"):
        source[24]
    with pytest.raises(ValueError, match="split"):
        WorldSource(4, split="test")


def test_records_are_deterministic_per_index_and_seed(source):
    again = WorldSource(24, seed=3, split="train", size=64)
    for index in (0, 7, 23):
        a, b = source[index], again[index]
        np.testing.assert_array_equal(a["image"], b["image"])
        assert {k: v for k, v in a.items() if k != "image"} == {k: v for k, v in b.items() if k != "image"}
    assert source[0]["caption"] != source[1]["caption"]
    assert WorldSource(24, seed=4, split="train", size=64)[0]["record_json"] != source[0]["record_json"]


def test_records_pass_the_judge_and_respect_the_split():
    for split in ("train", "heldout"):
        src = WorldSource(20, seed=0, split=split, size=128)
        for index in range(len(src)):
            record = src[index]
            scene = world.Scene.from_json(record["record_json"])
            assert scene.is_heldout() == (split == "heldout")
            assert judge.judge(record["image"], scene)["overall"] == 1.0
            short = world.Scene.from_json(record["short_record_json"])
            assert judge.judge(record["image"], short)["overall"] == 1.0  # the short prompt states true facts


def test_pipeline_batches_floats_in_minus_one_one(source):
    batch = next(iter(world_dataset(source, batch_size=4, seed=0)))
    assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
    assert batch["image"].min() >= -1.0 and batch["image"].max() <= 1.0
    assert batch["caption"].shape == (4,) and isinstance(str(batch["caption"][0]), str)
    np.testing.assert_allclose(to_model_inputs(source[0])["image"][0, 0], source[0]["image"][0, 0] / 127.5 - 1.0, atol=1e-6)


def test_one_epoch_visits_every_record_once_in_shuffled_order(source):
    dataset = world_dataset(source, batch_size=1, seed=5, num_epochs=1, drop_remainder=False)
    seen = [str(batch["record_json"][0]) for batch in dataset]
    expected = [source[i]["record_json"] for i in range(len(source))]
    assert sorted(seen) == sorted(expected) and seen != expected


def test_iterator_state_resumes_exactly(source):
    dataset = world_dataset(source, batch_size=4, seed=1)
    iterator = iter(dataset)
    for _ in range(7):  # past the end of the first epoch (24 records / 4)
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(3)]
    resumed = iter(dataset)
    resumed.set_state(state)
    for want, got in zip(expected, (next(resumed) for _ in range(3))):
        np.testing.assert_array_equal(want["image"], got["image"])
        assert list(want["caption"]) == list(got["caption"])


def test_scene_folder_round_trips(tmp_path, source):
    path = write_scene_folder(str(tmp_path / "world"), source, count=5)
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert len(lines) == 5
    for index, line in enumerate(lines):
        image = np.asarray(Image.open(os.path.join(tmp_path, "world", line["file"])))
        np.testing.assert_array_equal(image, source[index]["image"])
        assert line["caption"] == source[index]["caption"]
        assert world.Scene.from_json(json.dumps(line["record"])) == world.Scene.from_json(source[index]["record_json"])
    main(["--out", str(tmp_path / "cli"), "--num", "3", "--size", "64", "--split", "heldout"])
    assert sorted(os.listdir(tmp_path / "cli")) == ["000000.png", "000001.png", "000002.png", "captions.jsonl"]
