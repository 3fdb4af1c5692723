"""PSNR/SSIM against scikit-image, Frechet distance against an independent eigen-decomposition formula."""
import numpy as np
import pytest

from qwenimage_jax.assets import load_photo
from qwenimage_jax.metrics.fid import feature_statistics, frechet_distance, frechet_distance_from_features
from qwenimage_jax.metrics.image_quality import psnr, ssim

from skimage.metrics import peak_signal_noise_ratio, structural_similarity


def _sk_ssim(a, b, data_range):
    return structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                 data_range=data_range, channel_axis=-1)


@pytest.fixture(scope="module")
def photo_pairs():
    """Real photos in [-1, 1] and noisy/blurred versions of them, (2, 64, 96, 3) float64 each."""
    rng = np.random.default_rng(0)
    clean = np.stack([load_photo("chelsea", (64, 96)), load_photo("coffee", (64, 96))]).astype(np.float64)
    clean = clean / 127.5 - 1.0
    noisy = np.clip(clean + rng.normal(0, 0.1, clean.shape), -1, 1)
    noisy[1] = 0.5 * (noisy[1] + np.roll(clean[1], 1, axis=1))
    return clean, noisy


def test_psnr_matches_skimage(photo_pairs):
    clean, noisy = photo_pairs
    ours = np.asarray(psnr(clean, noisy, data_range=2.0))
    ref = [peak_signal_noise_ratio(c, n, data_range=2.0) for c, n in zip(clean, noisy)]
    np.testing.assert_allclose(ours, ref, rtol=1e-5)
    single = float(psnr(clean[0], noisy[0], data_range=2.0))
    np.testing.assert_allclose(single, ref[0], rtol=1e-5)


def test_psnr_uint8_range():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 256, (32, 48, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-9, 10, a.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(float(psnr(a, b, 255.0)), peak_signal_noise_ratio(a, b, data_range=255), rtol=1e-5)


def test_ssim_matches_skimage_gaussian_window(photo_pairs):
    clean, noisy = photo_pairs
    ours = np.asarray(ssim(clean, noisy, data_range=2.0))
    ref = [_sk_ssim(c, n, 2.0) for c, n in zip(clean, noisy)]
    np.testing.assert_allclose(ours, ref, atol=2e-5)
    assert ref[0] < 0.9  # the pairs really differ


def test_ssim_non_square_uint8_and_identity():
    rng = np.random.default_rng(2)
    a = load_photo("rocket", (40, 72))
    b = np.clip(a.astype(int) + rng.integers(-30, 31, a.shape), 0, 255).astype(np.uint8)
    np.testing.assert_allclose(float(ssim(a, b, 255.0)), _sk_ssim(a, b, 255), atol=2e-5)
    np.testing.assert_allclose(float(ssim(a, a, 255.0)), 1.0, atol=1e-6)


def test_metrics_reject_bad_shapes():
    with pytest.raises(ValueError, match="shapes differ"):
        psnr(np.zeros((8, 8, 3)), np.zeros((8, 9, 3)), 1.0)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(np.zeros((8, 8, 3)), np.zeros((8, 8, 3)), 1.0)


def _reference_frechet(mu1, s1, mu2, s2):
    """Independent formula: Tr((S1 S2)^1/2) = sum of sqrt of eigenvalues of S1^1/2 S2 S1^1/2 (symmetric PSD)."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root1 @ s2 @ root1)
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.sum(np.sqrt(np.clip(inner, 0, None))))


def test_frechet_distance_matches_eigen_formula_on_random_features():
    rng = np.random.default_rng(3)
    dim = 64
    mix = rng.normal(size=(dim, dim)) / np.sqrt(dim)
    feats1 = rng.normal(size=(500, dim)) @ mix
    feats2 = rng.normal(size=(400, dim)) @ (mix + 0.3 * rng.normal(size=(dim, dim)) / np.sqrt(dim)) + 0.2
    mu1, s1 = feats1.mean(0), np.cov(feats1, rowvar=False)
    mu2, s2 = feats2.mean(0), np.cov(feats2, rowvar=False)
    ref = _reference_frechet(mu1, s1, mu2, s2)
    assert ref > 1.0
    np.testing.assert_allclose(frechet_distance(mu1, s1, mu2, s2), ref, rtol=1e-8)
    np.testing.assert_allclose(frechet_distance_from_features(feats1, feats2), ref, rtol=1e-8)
    ours_mu, ours_s = feature_statistics(feats1)
    np.testing.assert_allclose(ours_s, s1)
    np.testing.assert_allclose(ours_mu, mu1)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1.0 + 4.0 + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)  # |mu1-mu2|^2 + sum (sqrt a - sqrt b)^2
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(a), mu2, np.diag(b)), expected, rtol=1e-10)
    np.testing.assert_allclose(frechet_distance(mu1, np.diag(a), mu1, np.diag(a)), 0.0, atol=1e-10)


def test_frechet_distance_singular_covariance_few_samples():
    rng = np.random.default_rng(4)
    feats1, feats2 = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 0.5
    value = frechet_distance_from_features(feats1, feats2)
    ref = _reference_frechet(*feature_statistics(feats1), *feature_statistics(feats2))
    np.testing.assert_allclose(value, ref, rtol=1e-4)
