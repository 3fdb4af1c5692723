"""Test setup: 8 fake CPU devices for sharding tests, fp32 everywhere, quiet and deterministic torch."""
import os

# Must happen before jax is imported anywhere.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def max_rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|: the parity metric used across the suite."""
    ours = np.asarray(ours, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert ours.shape == ref.shape, f"shape mismatch: ours {ours.shape} vs reference {ref.shape}"
    scale = max(float(np.max(np.abs(ref))), 1e-12)
    return float(np.max(np.abs(ours - ref)) / scale)


@pytest.fixture(autouse=True, scope="session")
def _torch_setup():
    try:
        import torch
    except ImportError:  # parity tests fail on their own with a clear message
        yield
        return
    torch.set_num_threads(2)
    torch.use_deterministic_algorithms(False)
    yield
