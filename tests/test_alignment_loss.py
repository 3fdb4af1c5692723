"""Alignment loss (marginal cosine + marginal distance matrix), its projection, grid matching, and the
annealing schedules that drive its weight and margins."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from qwenimage_jax.training import losses, schedules


def _reference_alignment(z, f, m_cos, m_dist):
    """Loop-based numpy form of the VAE-2.0 report's equations, per image then averaged over the batch."""
    totals = []
    for zi, fi in zip(z.astype(np.float64), f.astype(np.float64)):
        zi = zi.reshape(-1, zi.shape[-1])
        fi = fi.reshape(-1, fi.shape[-1])
        n = len(zi)
        cos = lambda a, b: float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
        mcos = sum(max(0.0, 1 - cos(zi[p], fi[p]) - m_cos) for p in range(n)) / n
        mdms = sum(max(0.0, abs(cos(zi[p], zi[q]) - cos(fi[p], fi[q])) - m_dist)
                   for p in range(n) for q in range(n)) / n ** 2
        totals.append(mcos + mdms)
    return float(np.mean(totals))


@pytest.mark.parametrize("m_cos,m_dist", [(0.0, 0.0), (0.1, 0.05), (0.5, 0.25)])
def test_alignment_loss_matches_loop_reference(m_cos, m_dist):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    f = rng.normal(size=(2, 3, 4, 8)).astype(np.float32)
    ours, _ = losses.alignment_loss(jnp.asarray(z), jnp.asarray(f), m_cos, m_dist)
    ref = _reference_alignment(z, f, m_cos, m_dist)
    assert ref > 0.05
    assert abs(float(ours) - ref) <= 1e-5 * max(1.0, ref)


def test_zero_loss_when_projection_equals_features_and_margins_zero():
    f = jax.random.normal(jax.random.key(1), (2, 4, 4, 16))
    loss, aux = losses.alignment_loss(f, f, 0.0, 0.0)
    assert float(loss) < 1e-6
    assert abs(float(aux["align_cosine"]) - 1.0) < 1e-6
    # positive scaling does not change cosines either
    loss_scaled, _ = losses.alignment_loss(3.0 * f, f, 0.0, 0.0)
    assert float(loss_scaled) < 1e-6


def test_margins_clip_loss_and_gradient():
    key_z, key_f = jax.random.split(jax.random.key(2))
    z = jax.random.normal(key_z, (2, 4, 4, 8))
    f = jax.random.normal(key_f, (2, 4, 4, 8))
    loss_fn = lambda z, mc, md: losses.alignment_loss(z, f, mc, md)[0]
    assert float(loss_fn(z, 0.0, 0.0)) > 0.5
    # cos >= -1 and |Δcos| <= 2: margins 2 make every hinge inactive -> zero loss, zero gradient
    assert float(loss_fn(z, 2.0, 2.0)) == 0.0
    grad = jax.grad(loss_fn)(z, 2.0, 2.0)
    assert float(jnp.max(jnp.abs(grad))) == 0.0
    # loosening margins never increases the loss
    values = [float(loss_fn(z, m, m / 2)) for m in (0.0, 0.1, 0.3, 0.6, 1.0)]
    assert all(a >= b for a, b in zip(values, values[1:])), values


def test_gradient_flows_to_projection_and_not_to_features():
    proj = losses.AlignmentProjection(features=12)
    latents = jax.random.normal(jax.random.key(3), (2, 4, 4, 6))
    feats = jax.random.normal(jax.random.key(4), (2, 8, 8, 12))  # finer grid: matched by interpolation
    params = jax.jit(proj.init)(jax.random.key(5), latents)

    def loss(params, feats):
        return losses.alignment_loss(proj.apply(params, latents), feats, 0.1, 0.05)[0]

    grads_p, grads_f = jax.grad(loss, argnums=(0, 1))(params, feats)
    kernel_grad = grads_p["params"]["kernel"].value
    assert kernel_grad.shape == (6, 12)
    assert float(jnp.linalg.norm(kernel_grad)) > 1e-4
    assert float(jnp.max(jnp.abs(grads_f))) == 0.0   # the aligner is frozen

    # a few SGD steps on the projection alone raise the latent-feature cosine similarity
    unboxed = params
    step = jax.jit(lambda p: jax.tree.map(lambda a, g: a - 0.5 * g, p, jax.grad(loss)(p, feats)))
    cos0 = float(losses.alignment_loss(proj.apply(unboxed, latents), feats, 0.1, 0.05)[1]["align_cosine"])
    for _ in range(30):
        unboxed = step(unboxed)
    cos1 = float(losses.alignment_loss(proj.apply(unboxed, latents), feats, 0.1, 0.05)[1]["align_cosine"])
    assert cos1 > cos0 + 0.05, (cos0, cos1)


def test_match_grid_identity_and_average_pooling():
    x = jax.random.normal(jax.random.key(6), (1, 8, 8, 3))
    assert losses.match_grid(x, 8, 8) is x
    pooled = losses.match_grid(x, 4, 4)
    assert pooled.shape == (1, 4, 4, 3)
    # a constant map stays constant under resizing
    const = jnp.full((1, 14, 14, 2), 0.7)
    assert float(jnp.max(jnp.abs(losses.match_grid(const, 4, 4) - 0.7))) < 1e-6


def test_alignment_rejects_width_mismatch():
    with pytest.raises(ValueError, match="projection width"):
        losses.alignment_loss(jnp.ones((1, 2, 2, 4)), jnp.ones((1, 2, 2, 5)), 0.0, 0.0)


def test_pixel_and_kl_losses():
    x = jnp.zeros((1, 2, 2, 3))
    y = jnp.full((1, 2, 2, 3), 0.5)
    assert float(losses.l1_loss(y, x)) == pytest.approx(0.5)
    assert float(losses.l2_loss(y, x)) == pytest.approx(0.25)
    assert float(losses.kl_loss(jnp.zeros(4), jnp.zeros(4))) == pytest.approx(0.0)
    # KL(N(1, e^1) || N(0,1)) per element = 0.5 (1 + e - 1 - 1)
    assert float(losses.kl_loss(jnp.ones(4), jnp.ones(4))) == pytest.approx(0.5 * (np.e - 1), rel=1e-6)


def test_alignment_schedules_follow_configured_optax_schedules():
    cfg = ml_collections.ConfigDict(dict(
        align_weight=dict(name="hold_then_cosine", init_value=1.0, end_value=0.1, hold_steps=10,
                          transition_steps=20),
        m_cos=dict(name="hold_then_linear", init_value=0.1, end_value=0.5, hold_steps=10, transition_steps=20),
        m_dist=0.25))
    built = schedules.make_schedules(cfg)
    weight_ref = optax.join_schedules(
        [optax.constant_schedule(1.0), optax.cosine_decay_schedule(1.0, 20, alpha=0.1)], [10])
    mcos_ref = optax.join_schedules([optax.constant_schedule(0.1), optax.linear_schedule(0.1, 0.5, 20)], [10])
    for step in [0, 5, 10, 11, 15, 20, 29, 30, 45]:
        values = schedules.schedule_values(built, jnp.asarray(step))
        assert float(values["align_weight"]) == pytest.approx(float(weight_ref(step)), abs=1e-6)
        assert float(values["m_cos"]) == pytest.approx(float(mcos_ref(step)), abs=1e-6)
        assert float(values["m_dist"]) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="unknown schedule"):
        schedules.make_schedule(dict(name="nope"))
