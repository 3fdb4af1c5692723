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


def _square(blur: int = 0):
    """A black 16 x 16 image with a white 6 x 6 square; `blur` box-blurs it (radius in pixels) by hand."""
    image = np.full((1, 16, 16, 3), -1.0, np.float32)
    image[0, 5:11, 5:11] = 1.0
    for _ in range(blur):
        padded = np.pad(image, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        image = sum(padded[:, i:i + 16, j:j + 16] for i in range(3) for j in range(3)) / 9.0
    return image


def test_edge_l1_counts_blurred_and_missing_edges_but_not_flat_areas():
    sharp, soft = jnp.asarray(_square()), jnp.asarray(_square(blur=2))
    assert float(losses.edge_l1_loss(sharp, sharp)) == 0.0
    # the square's outline: 4 sides x 6 px, each a jump of 2.0 in both the x and y difference maps -> 24 edge
    # pixels (per channel); painting the square away leaves every one of them as an error of 2.0
    background = jnp.full_like(sharp, -1.0)
    assert float(losses.edge_l1_loss(background, sharp)) == pytest.approx(2.0, rel=1e-5)
    blurred = float(losses.edge_l1_loss(soft, sharp))
    # blur keeps the colour nearly right but pays for every spread edge: here more than painting the square away
    assert blurred > 2.0
    # plain L1 sees the blur much less than the edge term does
    assert float(losses.l1_loss(soft, sharp)) < 0.5 * blurred
    # a flat image as target has no edges: the sum of spurious edges is divided by 1, never by 0
    flat = jnp.zeros((1, 8, 8, 3))
    assert float(losses.edge_l1_loss(flat, flat)) == 0.0


def test_focal_frequency_loss_matches_a_numpy_spectrum_and_weights_the_worst_frequencies():
    import jax
    import numpy as np

    from qwenimage_jax.training import losses

    rng = np.random.default_rng(0)
    target = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    recon = target + 0.1 * rng.normal(size=target.shape).astype(np.float32)
    diff = np.fft.fft2(np.moveaxis(recon, -1, 1), norm="ortho") - np.fft.fft2(np.moveaxis(target, -1, 1), norm="ortho")
    dist = np.abs(diff) ** 2
    weight = np.sqrt(dist) / np.sqrt(dist).max(axis=(1, 2, 3), keepdims=True)
    expected = np.mean(weight * dist)
    got = float(losses.focal_frequency_loss(recon, target))
    assert abs(got - expected) <= 1e-5 * expected
    assert float(losses.focal_frequency_loss(target, target)) == 0.0
    # the weights are constants: the gradient is 2 w (x_hat - x) through the (unitary) FFT, non-zero and finite
    grad = jax.grad(lambda r: losses.focal_frequency_loss(r, target))(recon)
    assert np.isfinite(np.asarray(grad)).all() and np.abs(np.asarray(grad)).max() > 0


def test_palette_ce_matches_a_numpy_cross_entropy_and_charges_the_pixels_that_change_label():
    """Per labelled pixel: -log softmax(-|x_hat - c|^2 / T)[label of x]; pixels far from every colour carry no
    label. A square whose corner pixels are painted in the background colour (a rounded corner: what makes the judge
    read a circle) costs more than the same square blurred, whose pixels keep their labels."""
    from scipy import ndimage
    from scipy.special import log_softmax

    rng = np.random.default_rng(0)
    palette = np.array([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [1.0, -1.0, -1.0]], np.float32)
    target = palette[rng.integers(0, 3, (2, 5, 6))] + rng.uniform(-0.1, 0.1, (2, 5, 6, 3)).astype(np.float32)
    target[0, 0, 0] = [0.0, 0.9, -0.9]                         # farther than max_distance from every colour
    recon = target + rng.normal(0, 0.4, target.shape).astype(np.float32)
    labels = np.argmin(((target[..., None, :] - palette) ** 2).sum(-1), -1)
    valid = np.min(((target[..., None, :] - palette) ** 2).sum(-1), -1) <= 0.86 ** 2
    log_p = log_softmax(-((recon[..., None, :] - palette) ** 2).sum(-1) / 0.05, axis=-1)
    expected = -np.take_along_axis(log_p, labels[..., None], -1)[..., 0][valid].mean()
    assert not valid[0, 0, 0] and valid.sum() == valid.size - 1
    assert float(losses.palette_ce_loss(recon, target, palette)) == pytest.approx(expected, rel=1e-5)

    square = np.full((1, 32, 32, 3), -1.0, np.float32)
    square[:, 8:24, 8:24] = 1.0
    rounded = square.copy()
    for y, x in ((8, 8), (8, 23), (23, 8), (23, 23), (8, 9), (9, 8), (22, 23), (23, 22)):
        rounded[:, y, x] = -1.0
    blurred = ndimage.gaussian_filter(square, (0, 0.7, 0.7, 0))
    assert float(losses.palette_ce_loss(square, square, palette)) < 1e-6
    assert float(losses.palette_ce_loss(rounded, square, palette)) > 3 * float(losses.palette_ce_loss(blurred, square, palette))
    assert float(losses.l1_loss(rounded, square)) < float(losses.l1_loss(blurred, square))  # what L1 pays instead
