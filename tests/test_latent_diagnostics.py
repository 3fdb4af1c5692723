"""The world diagnostics that say where an attribute lives: `evals.latent_directions` (which principal latent
directions the decoder reads it from) and `evals.conditioning` by noise level (where the DiT reads it from the
prompt), on closed-form inputs and on the shipped world."""
import os

import numpy as np

from qwenimage_jax.evals import conditioning, latent_directions

WORLD = os.path.join(os.path.dirname(latent_directions.__file__), "..", "assets", "tiny_world")


def test_principal_directions_of_a_known_covariance():
    rng = np.random.default_rng(0)
    basis = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    scales = np.array([3.0, 2.0, 1.0, 0.5])
    latents = (rng.standard_normal((20000, 4)) * scales) @ basis.T + 7.0
    mean, eigvals, eigvecs = latent_directions.principal_directions(latents.reshape(100, 200, 4))
    np.testing.assert_allclose(mean, 7.0, atol=0.05)
    np.testing.assert_allclose(eigvals, scales ** 2, rtol=0.05)
    np.testing.assert_allclose(np.abs(eigvecs.T @ basis), np.eye(4), atol=0.05)


def test_the_shipped_decoder_draws_from_its_largest_directions():
    """Replacing the 32 largest directions by noise wrecks the reconstructions; the 32 smallest carry nothing the
    judge sees (the shipped VAE: shape lives in the top ~24, world_build/levers/README.md)."""
    from qwenimage_jax import checkpoints

    vae = checkpoints.load("vae", os.path.join(WORLD, "vae"))
    result = latent_directions.report(vae, num=8, group=32, num_fit=64)
    top, bottom = (row["judge"]["overall"] for row in result["replaced"])
    assert result["eigenvalues"][0] > 100 * result["eigenvalues"][-1]
    assert top < result["clean"]["overall"] - 0.3
    assert abs(bottom - result["clean"]["overall"]) <= 0.05


def test_the_shipped_teacher_reads_the_background_from_the_prompt():
    from qwenimage_jax import checkpoints

    parts = {k: checkpoints.load(k, os.path.join(WORLD, sub)) for k, sub in
             (("vae", "vae"), ("text_encoder", "text_encoder"), ("transformer", "teacher/transformer"))}
    gaps = conditioning.gaps_by_sigma(parts["transformer"], parts["vae"], parts["text_encoder"], (0.7,), num=8)
    assert set(gaps) == {"0.7"} and gaps["0.7"]["loss"] > 0
    assert gaps["0.7"]["background"] > 1.0        # a wrong background word more than doubles the loss
