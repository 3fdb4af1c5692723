"""Mesh construction: -1 axes, defaults, and readable errors."""
import jax
import pytest

from qwenimage_jax.parallel.mesh import make_mesh


def test_one_axis_takes_the_remaining_devices():
    assert dict(make_mesh(fsdp=4, tensor=2).shape) == {"data": 1, "fsdp": 4, "tensor": 2, "context": 1}
    assert dict(make_mesh(fsdp=-1).shape)["fsdp"] == jax.device_count()
    assert dict(make_mesh().shape)["data"] == jax.device_count()


def test_bad_meshes_are_readable_errors():
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        make_mesh(data=-1, fsdp=-1)
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(data=16)
