"""Meshes and the logical-axis -> mesh-axis rules shared by every model."""
from qwenimage_jax.parallel.mesh import make_mesh, mesh_from_config  # noqa: F401
from qwenimage_jax.parallel.rules import (  # noqa: F401
    LOGICAL_RULES,
    MESH_AXES,
    logical_shardings,
    shard_params,
)
