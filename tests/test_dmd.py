"""DMD loss pieces on a toy Gaussian world with analytic scores.

Data x0 ~ N(m, s^2 I) under x_t = (1 - t) x0 + t eps has the analytic denoiser
E[x0 | x_t] = m + (1 - t) s^2 / ((1 - t)^2 s^2 + t^2) (x_t - (1 - t) m). The teacher (real score) is that of
N(m_r, s_r^2); the student is the one-step generator x0 = a z + b, whose fake score is the analytic one of N(b, a^2).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from qwenimage_jax.training import dmd

DIM, BATCH = 16, 4096
M_REAL, S_REAL = 1.5, 0.7


def denoiser(x_t, t, m, s):
    t = t[:, None]
    return m + (1 - t) * s ** 2 / ((1 - t) ** 2 * s ** 2 + t ** 2) * (x_t - (1 - t) * m)


def expected_student_grad(params, key):
    """Gradient wrt (a, b) of the DMD surrogate for the generator a z + b (fake score tracks the student)."""
    kz, kt, ke = jax.random.split(key, 3)
    z = jax.random.normal(kz, (BATCH, DIM))
    t = dmd.sample_times(kt, BATCH)
    eps = jax.random.normal(ke, (BATCH, DIM))

    def loss(p):
        x0 = p["a"] * z + p["b"]
        x_t = dmd.renoise(jax.lax.stop_gradient(x0), eps, t)
        x0_real = denoiser(x_t, t, M_REAL, S_REAL)
        x0_fake = denoiser(x_t, t, jax.lax.stop_gradient(p["b"]), jax.lax.stop_gradient(p["a"]))
        return dmd.dmd_loss(x0, dmd.dmd_gradient(x0, x0_real, x0_fake))

    return jax.grad(loss)(params)


def test_dmd_gradient_vanishes_when_student_matches_teacher():
    g = jax.jit(expected_student_grad)({"a": jnp.float32(S_REAL), "b": jnp.float32(M_REAL)}, jax.random.key(0))
    assert abs(float(g["a"])) < 1e-7 and abs(float(g["b"])) < 1e-7, g


@pytest.mark.parametrize("a,b", [(0.7, 0.0), (1.5, 1.5), (0.3, 3.0)])
def test_dmd_gradient_is_nonzero_and_points_to_the_teacher(a, b):
    g = jax.jit(expected_student_grad)({"a": jnp.float32(a), "b": jnp.float32(b)}, jax.random.key(1))
    if b != M_REAL:
        assert float(g["b"]) * (b - M_REAL) > 0, "descending must move the mean towards the teacher's"
    if a != S_REAL:
        assert float(g["a"]) * (a - S_REAL) > 0, "descending must move the scale towards the teacher's"
    assert abs(float(g["a"])) + abs(float(g["b"])) > 1e-5


def test_dmd_descent_recovers_the_teacher_distribution():
    params = {"a": jnp.float32(0.2), "b": jnp.float32(-1.0)}
    tx = optax.sgd(0.05)  # the normalised direction is O(1) per element
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, key):
        g = expected_student_grad(params, key)
        updates, opt = tx.update(g, opt)
        return optax.apply_updates(params, updates), opt

    for i in range(300):
        params, opt = step(params, opt, jax.random.key(i))
    assert abs(float(params["b"]) - M_REAL) < 0.05 and abs(abs(float(params["a"])) - S_REAL) < 0.05, params


def test_dmd_loss_gradient_wrt_x0_is_the_normalised_direction():
    k = jax.random.split(jax.random.key(2), 3)
    x0, real, fake = (jax.random.normal(kk, (3, 5, 4)) for kk in k)
    grad = dmd.dmd_gradient(x0, real, fake)
    weight = np.mean(np.abs(np.asarray(x0) - np.asarray(real)), axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(grad, (np.asarray(fake) - np.asarray(real)) / (weight + 1e-6), rtol=1e-6)
    g = jax.grad(lambda x: dmd.dmd_loss(x, grad))(x0)
    np.testing.assert_allclose(g, np.asarray(grad) / x0.size, rtol=1e-5, atol=1e-9)


def test_guided_velocity_is_true_cfg():
    c, u = jnp.full((2,), 3.0), jnp.full((2,), 1.0)
    np.testing.assert_allclose(dmd.guided_velocity(c, u, 4.0), 1.0 + 4.0 * 2.0)
    assert dmd.guided_velocity(c, None, 4.0) is c


def test_fake_score_update_reduces_its_flow_matching_loss():
    """A small fake-score MLP trained on student samples (a z + b) with flow matching: the loss falls and its x0
    estimate approaches the analytic denoiser of the student's distribution."""
    a, b = 0.5, -0.8
    key = jax.random.key(3)

    def fake(p, x_t, t):
        h = jnp.concatenate([x_t, jnp.broadcast_to(t[:, None], x_t.shape[:1] + (1,))], -1)
        h = jnp.tanh(h @ p["w1"] + p["b1"])
        return h @ p["w2"] + x_t * p["skip"]

    k1, k2 = jax.random.split(key)
    p = {"w1": 0.3 * jax.random.normal(k1, (DIM + 1, 64)), "b1": jnp.zeros(64),
         "w2": 0.3 * jax.random.normal(k2, (64, DIM)), "skip": jnp.zeros(())}
    tx = optax.adam(3e-3)
    opt = tx.init(p)

    def batch_loss(p, k):
        kz, kt, ke = jax.random.split(k, 3)
        x0 = a * jax.random.normal(kz, (512, DIM)) + b
        t = dmd.sample_times(kt, 512)
        eps = jax.random.normal(ke, (512, DIM))
        return dmd.fake_score_loss(fake(p, dmd.renoise(x0, eps, t), t), x0, eps)

    @jax.jit
    def step(p, opt, k):
        loss, g = jax.value_and_grad(batch_loss)(p, k)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, loss

    eval_key = jax.random.key(99)
    before = float(batch_loss(p, eval_key))
    for i in range(300):
        p, opt, _ = step(p, opt, jax.random.key(100 + i))
    after = float(batch_loss(p, eval_key))
    assert after < 0.6 * before, (before, after)
    # x0 estimate vs the analytic fake score of N(b, a^2)
    kz, ke = jax.random.split(jax.random.key(7))
    x0 = a * jax.random.normal(kz, (512, DIM)) + b
    t = jnp.full((512,), 0.5)
    x_t = dmd.renoise(x0, jax.random.normal(ke, (512, DIM)), t)
    learned = dmd.x0_from_velocity(x_t, fake(p, x_t, t), t)
    err = float(jnp.sqrt(jnp.mean(jnp.square(learned - denoiser(x_t, t, b, a)))))
    assert err < 0.15, err


GRID = np.asarray([1.0, 0.8, 0.55, 0.2, 0.0], np.float32)


def point_mass_velocity(m):
    """Exact flow velocity of data concentrated at m: v = (x_t - m) / t; Euler on it is exact."""
    return lambda x, t: (x - m) / t.reshape(-1, 1, 1)


@pytest.mark.parametrize("k", [0, 1, 2, 3])
def test_backward_simulation_reaches_the_student_grid_states(k):
    m = 0.5
    noise = jax.random.normal(jax.random.key(4), (2, 6, 3))
    run = jax.jit(lambda kk: dmd.backward_simulate(point_mass_velocity(m), noise, GRID, GRID[:-1], kk))
    x_k, sigma_k, t_k = run(jnp.int32(k))     # traced k: one program for every k
    np.testing.assert_allclose(sigma_k, [GRID[k]] * 2)
    np.testing.assert_allclose(t_k, [GRID[k]] * 2)
    np.testing.assert_allclose(x_k, (1 - GRID[k]) * m + GRID[k] * np.asarray(noise), rtol=1e-5, atol=1e-6)


def test_backward_simulation_counts_student_calls_and_renoise_mode():
    calls = []

    def velocity(x, t):
        jax.debug.callback(lambda tt: calls.append(float(tt[0])), t)
        return point_mass_velocity(0.0)(x, t)

    noise = jax.random.normal(jax.random.key(5), (2, 64, 8))
    model_t = GRID[:-1] * 0.999
    dmd.backward_simulate(velocity, noise, GRID, model_t, jnp.int32(3))
    jax.effects_barrier()
    np.testing.assert_allclose(calls, model_t[:3], rtol=1e-6)   # the network reads the pipeline's timesteps
    x, sigma, _ = dmd.backward_simulate(point_mass_velocity(0.0), noise, GRID, GRID[:-1], jnp.int32(2),
                                        mode="renoise", key=jax.random.key(6))
    assert float(sigma[0]) == pytest.approx(GRID[2])
    assert float(jnp.std(x)) == pytest.approx(GRID[2], rel=0.1)   # (1 - s) * 0 + s * fresh noise
    assert not np.allclose(x, GRID[2] * np.asarray(noise))
    with pytest.raises(ValueError, match="needs a PRNG key"):
        dmd.backward_simulate(velocity, noise, GRID, GRID[:-1], 1, mode="renoise")
