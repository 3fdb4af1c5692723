"""The flow-matching schedule and Euler step against diffusers' FlowMatchEulerDiscreteScheduler, driven the way
QwenImage21Pipeline drives it (sigmas = linspace(1, 1/n, n) or a custom grid, mu from the token count)."""
import numpy as np
import pytest

from qwenimage_jax.sampling import scheduler as sch
from tests.conftest import max_rel_err

TURBO_SIGMAS = [1.0, 0.978453, 0.95418, 0.926626, 0.89508, 0.845148, 0.704534, 0.414568]


def _reference(config, steps, tokens, sigmas=None):
    import torch  # noqa: F401
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage21.pipeline_qwenimage21 import calculate_shift

    ref = FlowMatchEulerDiscreteScheduler(**config)
    grid = sigmas if sigmas is not None else np.linspace(1.0, 1 / steps, steps)
    mu = calculate_shift(tokens, ref.config.get("base_image_seq_len", 256), ref.config.get("max_image_seq_len", 4096),
                         ref.config.get("base_shift", 0.5), ref.config.get("max_shift", 1.15))
    ref.set_timesteps(sigmas=grid, mu=mu)
    return ref, mu


@pytest.mark.parametrize("steps,tokens", [(40, 4096), (4, 4096), (40, 16384), (4, 16384), (50, 4096), (3, 8)])
def test_sigmas_match_diffusers(steps, tokens):
    ref, mu = _reference(sch.QWEN_IMAGE_SCHEDULER_CONFIG, steps, tokens)
    sigmas, timesteps = sch.flow_match_sigmas(steps, tokens, sch.QWEN_IMAGE_SCHEDULER_CONFIG)
    assert sigmas.dtype == np.float32 and timesteps.dtype == np.float32
    assert sigmas.shape == (steps + 1,) and timesteps.shape == (steps,)
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=0)
    assert sch.mu_for(tokens, sch.SchedulerConfig.from_dict(sch.QWEN_IMAGE_SCHEDULER_CONFIG)) == pytest.approx(mu)
    assert sigmas[-1] == 0.0 and sigmas[-2] == pytest.approx(0.02, abs=1e-6)


def test_known_values_at_1024():
    # REFERENCE.md 2.4: N=4096 -> mu = 0.693548; 4 steps: 1.0, 0.766709, 0.455614, 0.02, 0.
    sigmas, _ = sch.flow_match_sigmas(4, 4096, sch.QWEN_IMAGE_SCHEDULER_CONFIG)
    np.testing.assert_allclose(sigmas, [1.0, 0.766709, 0.455614, 0.02, 0.0], atol=2e-6)
    assert sch.calculate_shift(4096, 256, 8192, 0.5, 0.9) == pytest.approx(0.693548, abs=1e-6)


@pytest.mark.parametrize("config", [
    sch.QWEN_IMAGE_SCHEDULER_CONFIG,
    dict(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False),          # a non-shifting Turbo config
    dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False, shift_terminal=0.05),
    dict(num_train_timesteps=1000, use_dynamic_shifting=True, time_shift_type="linear", base_shift=0.5,
         max_shift=1.15),
])
def test_custom_sigmas_match_diffusers(config):
    ref, _ = _reference(config, None, 4096, sigmas=TURBO_SIGMAS)
    sigmas, timesteps = sch.flow_match_sigmas(None, 4096, config, sigmas=TURBO_SIGMAS)
    np.testing.assert_allclose(sigmas, ref.sigmas.numpy(), rtol=0, atol=1e-6)
    np.testing.assert_allclose(timesteps, ref.timesteps.numpy(), rtol=1e-6, atol=0)


def test_euler_step_matches_diffusers():
    import torch

    ref, _ = _reference(sch.QWEN_IMAGE_SCHEDULER_CONFIG, 4, 4096)
    sigmas, timesteps = sch.flow_match_sigmas(4, 4096, sch.QWEN_IMAGE_SCHEDULER_CONFIG)
    rng = np.random.default_rng(0)
    sample = rng.standard_normal((2, 16, 8)).astype(np.float32)
    velocity = rng.standard_normal((2, 16, 8)).astype(np.float32)
    ref.set_begin_index(0)
    expected = torch.from_numpy(sample)
    ours = sample
    for i, t in enumerate(ref.timesteps):
        expected = ref.step(torch.from_numpy(velocity), t, expected, return_dict=False)[0]
        ours = sch.euler_step(ours, velocity, sigmas[i], sigmas[i + 1])
    assert max_rel_err(ours, expected.numpy()) <= 1e-6
    jax_out = np.asarray(sch.euler_step(np.asarray(sample), __import__("jax").numpy.asarray(velocity),
                                        sigmas[0], sigmas[1]))
    np.testing.assert_allclose(jax_out, sample + (sigmas[1] - sigmas[0]) * velocity, atol=1e-6)


def test_bad_inputs_have_clear_errors():
    with pytest.raises(ValueError, match="num_steps"):
        sch.flow_match_sigmas(0, 4096, sch.QWEN_IMAGE_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        sch.flow_match_sigmas(None, 4096, sch.QWEN_IMAGE_SCHEDULER_CONFIG, sigmas=[1.0, 0.5, 0.0])
    with pytest.raises(ValueError, match="stochastic_sampling"):
        sch.SchedulerConfig.from_dict(dict(stochastic_sampling=True))


def test_one_step_grid_is_finite_where_the_reference_is_nan():
    """One step: the reference's terminal stretch divides 0 by 0 (NaN sigmas, black images); ours keeps the
    single step from pure noise to the image."""
    ref, _ = _reference(sch.QWEN_IMAGE_SCHEDULER_CONFIG, 1, 4096)
    assert np.isnan(ref.sigmas.numpy()[0])
    sigmas, timesteps = sch.flow_match_sigmas(1, 4096, sch.QWEN_IMAGE_SCHEDULER_CONFIG)
    np.testing.assert_array_equal(sigmas, np.array([1.0, 0.0], np.float32))
    np.testing.assert_array_equal(timesteps, np.array([1000.0], np.float32))
