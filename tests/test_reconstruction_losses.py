"""The VAE trainer's pixel losses (training/losses.py): L1 / L2 and the salient-pixel L1 the small world uses."""
import jax.numpy as jnp
import numpy as np
import pytest

from qwenimage_jax.training import losses


def _scene():
    """A gray image with one small white square (4% of the pixels) and faint +-0.1 texture."""
    rng = np.random.default_rng(0)
    image = np.full((1, 20, 20, 3), 0.0, np.float32) + rng.uniform(-0.1, 0.1, (1, 20, 20, 3)).astype(np.float32)
    image[0, 4:8, 4:8] = 0.9
    return image


def test_salient_l1_averages_only_over_the_pixels_that_stand_out():
    target = _scene()
    background_only = np.where(target > 0.5, 0.0, target)  # paints the square with the background
    plain = float(losses.l1_loss(jnp.asarray(background_only), jnp.asarray(target)))
    salient = float(losses.salient_l1_loss(jnp.asarray(background_only), jnp.asarray(target)))
    # the square is 16 of 400 pixels: plain L1 barely sees it, the salient term is the full 0.9 error
    assert plain == pytest.approx(0.9 * 16 / 400, rel=1e-5)
    assert salient == pytest.approx(0.9, rel=1e-5)
    # errors on the (non-salient) textured background do not count
    noisy_background = np.where(target > 0.5, target, target + 0.05)
    assert float(losses.salient_l1_loss(jnp.asarray(noisy_background), jnp.asarray(target))) == pytest.approx(0.0)


def test_salient_l1_is_zero_on_a_flat_image_and_has_gradients():
    import jax

    flat = jnp.zeros((2, 8, 8, 3))
    assert float(losses.salient_l1_loss(flat + 0.3, flat)) == 0.0  # no salient pixel: no term, no NaN
    target = jnp.asarray(_scene())
    grad = jax.grad(lambda r: losses.salient_l1_loss(r, target))(jnp.zeros_like(target))
    assert float(jnp.abs(grad[0, 4:8, 4:8]).sum()) > 0 and float(jnp.abs(grad[0, 12:, 12:]).sum()) == 0.0
