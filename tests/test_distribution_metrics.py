"""Sliced Wasserstein (metrics/distribution.py) against scipy's exact 1-D Wasserstein distance."""
import numpy as np
import pytest
from scipy import stats

from qwenimage_jax.metrics.distribution import image_features, sliced_wasserstein


def test_one_dimensional_sets_match_scipy_exactly():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 1)), rng.normal(1.5, 2.0, size=(200, 1))
    # in 1-D every unit direction is +-1, so SW_1 is the exact W_1
    assert sliced_wasserstein(x, y, num_projections=8, p=1) == pytest.approx(
        stats.wasserstein_distance(x[:, 0], y[:, 0]), rel=1e-12)
    w2 = np.sqrt(np.mean((np.sort(x[:, 0]) - np.sort(y[:, 0])) ** 2))
    assert sliced_wasserstein(x, y, num_projections=8, p=2) == pytest.approx(w2, rel=1e-12)


def test_identical_sets_are_at_distance_zero_and_a_shift_is_seen():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(256, 12))
    assert sliced_wasserstein(x, x[::-1]) == pytest.approx(0.0, abs=1e-12)  # order does not matter
    near, far = sliced_wasserstein(x, x + 0.1), sliced_wasserstein(x, x + 1.0)
    # a shift s along a random direction projects to |s . theta|: E[(s . theta)^2] = |s|^2 / d
    assert far == pytest.approx(np.sqrt(12 * 1.0 ** 2 / 12), rel=0.1) and near < far / 5
    with pytest.raises(ValueError, match="same size"):
        sliced_wasserstein(x, x[:10])


def test_image_features_box_downsample():
    images = np.zeros((2, 64, 64, 3), np.uint8)
    images[0, :32] = 255
    feats = image_features(images).reshape(2, 16, 16, 3)
    assert feats[0, :8].min() == 1.0 and feats[0, 8:].max() == 0.0 and feats[1].max() == 0.0
    with pytest.raises(ValueError, match="multiple of 16"):
        image_features(np.zeros((1, 40, 40, 3), np.uint8))


def test_foreground_features_see_outlines_not_colours():
    """Hand-drawn 64 px scenes: a 16 x 16 square at the top left on grey, the same square in another colour on
    another background, and a ring (a square with its middle 8 x 8 cut out) at the same place."""
    from qwenimage_jax.metrics.distribution import foreground_features

    def scene(background, colour, hole=False):
        image = np.empty((64, 64, 3), np.uint8)
        image[:] = background
        image[8:24, 8:24] = colour
        if hole:
            image[12:20, 12:20] = background
        return image

    red_on_grey = scene((128, 128, 128), (220, 30, 30))
    blue_on_pink = scene((240, 160, 200), (30, 30, 220))
    ring = scene((128, 128, 128), (220, 30, 30), hole=True)
    feats = foreground_features(np.stack([red_on_grey, blue_on_pink, ring]))
    assert feats.shape == (3, 32 * 32)
    mask = feats[0].reshape(32, 32)
    # the square covers 32 px cells 4..11 in each direction (2 x 2 pixel boxes), nothing else
    assert mask[4:12, 4:12].min() == 1.0 and mask.sum() == 64.0
    np.testing.assert_array_equal(feats[0], feats[1])          # colour-blind
    assert feats[2].reshape(32, 32)[6:10, 6:10].max() == 0.0   # the hole is background
    assert feats[2].sum() == 64.0 - 16.0
