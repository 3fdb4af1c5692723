"""Build `jax.sharding.Mesh`es over (data, fsdp, tensor, context) with Auto axis types.

Auto axes matter: with Explicit axes (the default of `jax.make_mesh` in jax 0.10) `with_sharding_constraint`,
and therefore flax's logical constraints, turn into assertions.
"""
from __future__ import annotations

import math
from typing import Sequence

import jax
import numpy as np

from qwenimage_jax.parallel.rules import MESH_AXES


def make_mesh(data: int | None = None, fsdp: int = 1, tensor: int = 1, context: int = 1,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """A 4-axis mesh; one axis may be -1 to take the remaining devices. `data` defaults to -1, or to 1 when
    another axis is -1.

    >>> make_mesh(fsdp=4, tensor=2)   # on 8 devices: data=1
    >>> make_mesh(fsdp=-1)            # all devices on fsdp
    """
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        data = 1 if -1 in (fsdp, tensor, context) else -1
    sizes = {"data": data, "fsdp": fsdp, "tensor": tensor, "context": context}
    free = [k for k, v in sizes.items() if v == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    fixed = math.prod(v for v in sizes.values() if v != -1)
    if free:
        if len(devices) % fixed:
            raise ValueError(f"{len(devices)} devices are not divisible by the fixed mesh axes {sizes}")
        sizes[free[0]] = len(devices) // fixed
    total = math.prod(sizes.values())
    if total != len(devices):
        if total < len(devices):
            devices = devices[:total]
        else:
            raise ValueError(f"mesh {sizes} needs {total} devices but only {len(devices)} are available; "
                             f"set XLA_FLAGS=--xla_force_host_platform_device_count={total} on CPU")
    shape = tuple(sizes[a] for a in MESH_AXES)
    device_array = np.asarray(devices, dtype=object).reshape(shape)
    auto = getattr(jax.sharding, "AxisType", None)
    if auto is not None:
        return jax.sharding.Mesh(device_array, MESH_AXES, axis_types=(auto.Auto,) * len(MESH_AXES))
    return jax.sharding.Mesh(device_array, MESH_AXES)


def mesh_from_config(mesh_config, devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """`config.mesh` with fields data/fsdp/tensor/context -> Mesh over `devices` (default: all of jax.devices();
    e.g. the compile-only devices of a TPU topology for ahead-of-time compilation)."""
    return make_mesh(data=mesh_config.get("data", -1), fsdp=mesh_config.get("fsdp", 1),
                     tensor=mesh_config.get("tensor", 1), context=mesh_config.get("context", 1), devices=devices)
