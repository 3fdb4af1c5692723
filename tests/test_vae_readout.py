"""evals.vae's latent read-out and its references, on arrays whose answers are known in closed form."""
import numpy as np

from qwenimage_jax.evals import vae as vae_evals


def _images(n=6, size=32, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, size, size, 3))


def test_readout_of_a_lossless_code_is_exact():
    images = _images()
    latents = vae_evals.cell_patches(images, 8).reshape(6, 4, 4, 8 * 8 * 3)  # each cell's own pixels
    assert vae_evals.cell_readout_mse(latents, images, latents, images) < 1e-20


def test_readout_of_cell_means_matches_block_means_and_no_code_matches_the_variance():
    fit, test = _images(n=300, seed=1), _images(n=20, seed=2)  # 4800 fitted cells for 28 coefficients

    def means(x):
        return x.reshape(len(x), 4, 8, 4, 8, 3).mean(axis=(2, 4))
    # neighbours of i.i.d. noise carry nothing about a cell, so the read-out is the cell mean, up to fitting noise
    mse = vae_evals.cell_readout_mse(means(fit), fit, means(test), test)
    assert abs(mse - vae_evals.block_mean_mse(test, 8)) < 0.03 * vae_evals.block_mean_mse(test, 8)
    blank = vae_evals.cell_readout_mse(np.zeros((300, 4, 4, 2)), fit, np.zeros((20, 4, 4, 2)), test)
    per_pixel_mean = vae_evals.cell_patches(fit, 8).mean(axis=0)
    expected = np.mean((vae_evals.cell_patches(test, 8) - per_pixel_mean) ** 2)
    assert abs(blank - expected) < 1e-9


def test_readout_images_are_the_patches_in_place():
    """cell_readout_images puts each cell's read-out back where the cell is: a lossless code gives the images."""
    images = _images(n=3, size=16)
    latents = vae_evals.cell_patches(images, 4).reshape(3, 4, 4, 4 * 4 * 3)
    np.testing.assert_allclose(vae_evals.cell_readout_images(latents, images, latents[:2]), images[:2], atol=1e-9)


def test_block_mean_mse_closed_form():
    checker = np.indices((16, 16)).sum(axis=0) % 2 * 2.0 - 1.0  # +-1 checkerboard
    images = np.repeat(checker[None, :, :, None], 3, axis=-1)
    assert vae_evals.block_mean_mse(images, 1) == 0.0
    assert abs(vae_evals.block_mean_mse(images, 2) - 1.0) < 1e-12  # every 2 x 2 block averages to 0
    assert vae_evals.block_mean_mse(np.full((2, 16, 16, 3), 0.3), 16) < 1e-25


def test_cell_pca_is_exact_at_full_rank_and_improves_with_k():
    fit, test = _images(n=40, size=8, seed=3), _images(n=5, size=8, seed=4)
    errors = [vae_evals.cell_pca_mse(fit, test, 4, k) for k in (1, 8, 24, 48)]
    assert all(a > b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-20  # 48 = 4 * 4 * 3 components span every patch


def test_readout_report_of_the_shipped_world_vae(tmp_path):
    """The command writes every figure with the sets it used; the PCA with the latent's width beats one with 16."""
    import json
    import os

    from qwenimage_jax.evals import vae_readout

    vae_dir = os.path.join(os.path.dirname(vae_evals.__file__), "..", "assets", "tiny_world", "vae")
    out = tmp_path / "readout.json"
    vae_readout.main([vae_dir, str(out), "--fit", "48", "--test", "8"])
    result = json.loads(out.read_text())
    assert result["fit"]["num"] == 48 and result["test"]["split"] == "heldout"
    assert 0.0 < result["cell_readout_mse"] < 1.0
    for name in ("judge_on_readout", "judge_on_reconstructions"):
        assert set(result[name]) >= {"shape", "size", "overall"} and result[name]["background"] == 1.0, result[name]
    # a linear map per 16 px cell, fitted on 48 scenes, already recovers most of a held-out scene from the latents
    assert result["judge_on_readout"]["overall"] >= 0.75, result["judge_on_readout"]
    assert result["judge_on_reconstructions"]["colour"] == 1.0 and result["judge_on_reconstructions"]["position"] == 1.0
    z_dim = [k for k in result if k.startswith("ref_cell_pca_") and k != "ref_cell_pca_16"]
    assert not z_dim or result[z_dim[0]] <= result["ref_cell_pca_16"]
