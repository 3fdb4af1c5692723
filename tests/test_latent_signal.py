"""evals.latent_signal on a tiny random VAE with 64 px world scenes, and metrics.whitening.covariance_weights on
covariances whose eigen-decomposition is chosen by the test."""
import dataclasses

import jax
import numpy as np
import pytest

from qwenimage_jax.data import world
from qwenimage_jax.evals import latent_signal
from qwenimage_jax.metrics.whitening import covariance_weights
from qwenimage_jax.models.vae import init_vae

SIZE = 64
# f4, 3 -> 4 channels: 64 px scenes give 16 x 16 x 4 latents
TINY = dict(base_dim=8, decoder_base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, attn_scales=[],
            temperal_downsample=[False, True], is_residual=True, in_channels=3, out_channels=3,
            scale_factor_spatial=4, latents_mean=[0.1, -0.2, 0.0, 0.3], latents_std=[0.5, 2.0, 1.0, 0.25])


@pytest.fixture(scope="module")
def vae():
    return init_vae(TINY, jax.random.key(0))


@pytest.fixture(scope="module")
def scenes():
    rng = np.random.default_rng(3)
    return [world.generate_scene(rng, SIZE, "train")[2] for _ in range(4)]


def test_identical_records_move_nothing(vae, scenes):
    changes = latent_signal.latent_changes(vae, scenes, scenes, SIZE)
    assert changes.shape[1:] == (SIZE // 4, SIZE // 4, 4) and 0 < len(changes) <= len(scenes)
    assert np.all(changes == 0.0)
    reference = latent_signal.encode(vae, latent_signal.render_pairs(scenes, scenes, SIZE)[0])
    assert latent_signal.share(changes, reference) == 0.0
    assert latent_signal.share(changes, reference, np.diag([1.0, 2.0, 3.0, 4.0])) == 0.0


def test_encode_is_the_normalised_posterior_mean(vae, scenes):
    image = latent_signal.render_pairs(scenes[:1], scenes[:1], SIZE)[0][0]
    x = image[None].astype(np.float32) / 127.5 - 1.0
    raw = np.asarray(vae.module.apply({"params": vae.params}, x, method="encode")[0])
    expected = (raw - np.asarray(TINY["latents_mean"])) / np.asarray(TINY["latents_std"])
    np.testing.assert_allclose(latent_signal.encode(vae, [image])[0], expected[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attribute", latent_signal.ATTRIBUTES)
def test_swap_changes_only_that_attribute_to_a_valid_value(scenes, attribute):
    train_pairs = set(world.composition_pairs("train"))
    for i, scene in enumerate(scenes):
        other = latent_signal.swapped(scene, attribute, np.random.default_rng(i))
        if attribute == "background":
            assert other.background != scene.background and other.background in world.BACKGROUNDS
            assert other.groups == scene.groups
            continue
        first, new = scene.groups[0], other.groups[0]
        assert getattr(new, attribute) != getattr(first, attribute)
        assert dataclasses.replace(new, **{attribute: getattr(first, attribute)}) == first
        assert other.groups[1:] == scene.groups[1:] and other.background == scene.background
        assert (new.shape, new.colour) in train_pairs
        assert new.colour not in {g.colour for g in other.groups[1:]}
        assert new.position not in {g.position for g in other.groups[1:]}


def test_report_shares_and_spectrum(vae):
    result = latent_signal.report(vae, num=6, num_fit=8, alpha=1.0, cap=10.0, size=SIZE)
    for key in ("share", "share_whitened", "pairs"):
        assert set(result[key]) == set(latent_signal.ATTRIBUTES)
    for attribute in latent_signal.ATTRIBUTES:
        assert 0 < result["pairs"][attribute] <= 6
        for key in ("share", "share_whitened"):
            value = result[key][attribute]
            assert np.isfinite(value) and value > 0.0  # every swap changes pixels, so the latent moves
    assert result["latent_variance"] > 0 and result["latent_variance_whitened"] > 0
    spectrum = result["spectrum"]
    assert spectrum["channels"] == 4 and len(spectrum["top5"]) == 4
    assert spectrum["top5"] == sorted(spectrum["top5"], reverse=True) and spectrum["top5"][-1] >= -1e-12
    assert abs(np.mean(spectrum["top5"]) - spectrum["mean"]) < 1e-9 * max(1.0, spectrum["mean"])
    assert 0.0 <= spectrum["fraction_below_0.01_mean"] <= spectrum["fraction_below_0.1_mean"] <= 1.0
    assert result["scenes"]["num"] == 6 and result["fit"]["num"] == 8 and result["scenes"]["size"] == SIZE


def test_share_is_the_ratio_to_twice_the_variance_and_alpha_zero_is_plain():
    rng = np.random.default_rng(0)
    reference = rng.normal(0.0, 3.0, (4000, 2, 2, 3))  # per-element variance 9
    changes = np.full((5, 2, 2, 3), 3.0)  # mean squared change 9 -> share 9 / 18
    assert abs(latent_signal.share(changes, reference) - 0.5) < 0.03
    covariance = np.cov(reference.reshape(-1, 3).T)
    identity_metric = covariance_weights(covariance, 0.0, 10.0)
    assert latent_signal.share(changes, reference, identity_metric) == pytest.approx(
        latent_signal.share(changes, reference), rel=1e-12)


def _covariance(eigvals, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(len(eigvals), len(eigvals))))
    return q, (q * np.asarray(eigvals, np.float64)) @ q.T


def test_covariance_weights_share_the_eigenvectors_and_clip_before_normalising():
    eigvals = [100.0, 1.0, 1.0, 1e-4]  # mean 25.500025
    q, covariance = _covariance(eigvals)
    w = covariance_weights(covariance, 1.0, 10.0)
    metric = w @ w.T
    np.testing.assert_allclose(w, w.T, atol=1e-12)
    in_basis = q.T @ metric @ q
    np.testing.assert_allclose(in_basis - np.diag(np.diag(in_basis)), 0.0, atol=1e-10)  # same eigenvectors
    # (lambda / mean)^-1 = 0.255, 25.5, 25.5, 255000 -> clipped to [0.1, 10]: 0.255, 10, 10, 10 -> mean 1
    clipped = np.array([25.500025 / 100.0, 10.0, 10.0, 10.0])
    np.testing.assert_allclose(np.diag(in_basis), clipped / clipped.mean(), rtol=1e-9)
    assert np.mean(np.diag(in_basis)) == pytest.approx(1.0)


def test_covariance_weights_alpha_zero_is_identity_and_uncapped_alpha_one_whitens():
    _, covariance = _covariance([5.0, 2.0, 0.5, 0.01, 3.0], seed=1)
    np.testing.assert_allclose(covariance_weights(covariance, 0.0, 10.0), np.eye(5), atol=1e-12)
    w = covariance_weights(covariance, 1.0, 1e6)
    whitened = w @ covariance @ w.T
    np.testing.assert_allclose(whitened, whitened[0, 0] * np.eye(5), atol=1e-9 * whitened[0, 0])
    # a small cap bounds the ratio of any two weights by cap^2
    weights = np.linalg.eigvalsh(covariance_weights(covariance, 1.0, 3.0) @ covariance_weights(covariance, 1.0, 3.0))
    assert weights.max() / weights.min() <= 9.0 + 1e-9


def test_training_keeps_the_name():
    from qwenimage_jax.training import latent_metric

    assert latent_metric.covariance_weights is covariance_weights
