"""grain image pipelines: determinism, per-host sharding, buckets, resumable iterator state, and each source."""
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from qwenimage_jax.data import images


def _config(**overrides):
    cfg = dict(sources=[dict(name="photos", weight=1.0), dict(name="synthetic_text", canvas=96, weight=0.5)],
               resolution=32, aspect_ratios=(1.0, 0.5, 2.0), num_threads=0, prefetch=0)
    cfg.update(overrides)
    return ml_collections.ConfigDict(cfg)


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """12 constant-colour images; the red channel holds the record number so outputs identify their record."""
    root = tmp_path_factory.mktemp("folder")
    for i in range(12):
        Image.fromarray(np.full((40, 56, 3), (10 * i, 50, 200), np.uint8)).save(root / f"img_{i:02d}.png")
    return str(root)


def test_same_seed_same_batches_other_seed_other_batches():
    a = _take(images.train_dataset(_config(), 4, seed=0, multiple=16, process_index=0, process_count=1), 4)
    b = _take(images.train_dataset(_config(), 4, seed=0, multiple=16, process_index=0, process_count=1), 4)
    c = _take(images.train_dataset(_config(), 4, seed=1, multiple=16, process_index=0, process_count=1), 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    assert any(x.shape != y.shape or not np.array_equal(x, y) for x, y in zip(a, c))
    for batch in a:
        assert batch.dtype == np.float32 and batch.shape[0] == 4 and batch.shape[-1] == 3
        assert -1.0 <= batch.min() and batch.max() <= 1.0


def test_buckets_one_shape_per_batch_multiple_of_compression():
    buckets = images.buckets_for(32, (1.0, 0.5, 2.0), 16)
    assert buckets == [(32, 32), (48, 16), (16, 48)]
    shapes = {b.shape[1:3] for b in _take(images.train_dataset(_config(), 2, 0, 16, 0, 1), 12)}
    assert shapes <= set(buckets) and len(shapes) >= 2


def test_hosts_read_disjoint_interleaved_slices(colour_folder):
    cfg = _config(sources=[dict(name="folder", path=colour_folder)], aspect_ratios=(1.0,), min_scale=1.0,
                  max_scale=1.0, flip=False)
    records = lambda batches: [int(round((img[0, 0, 0] + 1) * 127.5 / 10)) for b in batches for img in b]
    single = records(_take(images.train_dataset(cfg, 4, 0, 16, 0, 1), 3))
    host0 = records(_take(images.train_dataset(cfg, 4, 0, 16, 0, 2), 3))
    host1 = records(_take(images.train_dataset(cfg, 4, 0, 16, 1, 2), 3))
    assert sorted(single) == sorted(set(single))        # an epoch is a permutation (12 records, 12 draws)
    assert sorted(single) == list(range(12))
    assert host0 == single[0::2][:6] and host1 == single[1::2][:6]
    assert not set(host0) & set(host1)


def test_iterator_state_resumes_exactly():
    ds = images.train_dataset(_config(), 2, 0, 16, 0, 1)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    it2 = iter(images.train_dataset(_config(), 2, 0, 16, 0, 1))
    it2.set_state(state)
    for want in expected:
        np.testing.assert_array_equal(next(it2), want)


def test_synthetic_text_is_deterministic_and_draws_glyphs():
    backgrounds = images.PhotoSource(names=["brick"])
    source = images.SyntheticTextSource(backgrounds, length=10, seed=3, canvas=128)
    np.testing.assert_array_equal(source[4], source[4])
    assert source[4].shape == (128, 128, 3) and source[4].dtype == np.uint8
    assert not np.array_equal(source[4], source[5])
    rng = np.random.default_rng(0)
    plain = np.full((64, 64, 3), 120, np.uint8)
    drawn = images.render_text(plain, rng, images.font_paths(), (8, 12), max_lines=3)
    assert np.mean(np.any(drawn != plain, axis=-1)) > 0.005   # some pixels now belong to glyphs


def test_photo_holdout_and_eval_sets():
    train = images.PhotoSource(exclude=["coffee", "chelsea"])
    held = images.PhotoSource(names=["coffee", "chelsea"])
    assert not {p.name for p in train.paths} & {p.name for p in held.paths}
    crops = images.eval_crops(dict(name="photos", names=["coffee", "chelsea"]), 32, 3, seed=0)
    assert crops.shape == (6, 32, 32, 3)
    np.testing.assert_array_equal(crops, images.eval_crops(dict(name="photos", names=["coffee", "chelsea"]), 32, 3))
    assert images.eval_images(dict(name="photos", names=["coffee"]), 48).shape == (1, 48, 48, 3)
    with pytest.raises(KeyError, match="no bundled photo"):
        images.PhotoSource(names=["not_a_photo"])


def test_tfds_source_reads_array_record_without_tensorflow(tmp_path):
    import io

    import tensorflow_datasets as tfds

    class TinyPngs(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
                {"image": tfds.features.Tensor(shape=(), dtype=np.object_)}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for i in range(3):
                buffer = io.BytesIO()
                Image.fromarray(np.full((20, 24, 3), 40 * i, np.uint8)).save(buffer, format="PNG")
                yield i, {"image": buffer.getvalue()}

    builder = TinyPngs(data_dir=str(tmp_path), file_format="array_record")
    builder.download_and_prepare()
    source = images.TfdsSource("tiny_pngs", "train", data_dir=str(tmp_path))
    assert len(source) == 3
    values = sorted(int(source[i][0, 0, 0]) for i in range(3))
    assert values == [0, 40, 80] and source[0].shape == (20, 24, 3)


def test_bad_source_names_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown image source"):
        images.make_source(dict(name="nope"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        images.make_source(dict(name="folder", path=str(tmp_path / "missing")))


def test_skimage_source_holds_out_by_name_and_returns_rgb():
    import skimage.data

    every = images.make_source({"name": "skimage"})
    train = images.make_source({"name": "skimage", "exclude": ["chelsea", "coffee"]})
    assert len(every) == len(images.SKIMAGE_IMAGES) and len(train) == len(every) - 2
    assert "chelsea" not in train.names and "stereo_motorcycle:1" in train.names
    for i in range(len(train)):
        image = train[i]
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[-1] == 3, train.names[i]
    # gray images are repeated to RGB; the stereo pair gives its two views
    camera = train[train.names.index("camera")]
    assert np.array_equal(camera[..., 0], skimage.data.camera()) and np.array_equal(camera[..., 2], camera[..., 0])
    left, right = (train[train.names.index(f"stereo_motorcycle:{k}")] for k in (0, 1))
    assert not np.array_equal(left, right)
    with pytest.raises(KeyError, match="no offline scikit-image image"):
        images.make_source({"name": "skimage", "names": ["lily"]})
