"""What one ahead-of-time compile is about: a `Program` (a jitted function, its abstract arguments and the cost of one
call), the `Report` of its compile, the per-chip bytes of its argument shards, and the helpers the builders share to
make abstract arguments and to trace under a mesh and the logical rules."""
from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.parallel.rules import LOGICAL_RULES

GIB = 1024 ** 3


@dataclasses.dataclass
class Program:
    """A jitted function + abstract arguments + what one call costs."""
    kind: str
    description: str
    fn: Any                       # jitted
    args: tuple                   # ShapeDtypeStructs (with shardings) / static values as the call takes them
    kwargs: dict
    mesh: Any
    flops: float                  # analytic FLOPs of one call, all chips together
    flops_note: str
    expected_argument_bytes: int  # per chip, from the shardings of the abstract arguments
    hints: tuple = ()             # what to change when it does not fit
    unit: str = "step"            # what one call is: a training step, or a whole sampling call


@dataclasses.dataclass
class Report:
    """The result of one ahead-of-time compile (bytes are per chip)."""
    kind: str
    description: str
    topology: str
    chips: int
    mesh: dict
    capacity_bytes: float
    fits: bool
    compile_s: float
    flops_per_chip: float
    flops_note: str
    peak_flops_per_chip: float
    chip: str = ""
    unit: str = "step"
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    total_bytes: int = 0
    expected_argument_bytes: int = 0  # the rules' shard shapes, unpadded
    layout_argument_bytes: int = 0    # the same shards padded to the compiled input layouts' tiles
    needed_bytes: float | None = None  # from the compiler's refusal
    error: str = ""
    advice: tuple = ()
    saved: str = ""

    def step_time_at(self, mfu: float) -> float:
        """Predicted seconds per call at a model-FLOPs utilisation `mfu` of the chip's bf16 peak."""
        return self.flops_per_chip / (mfu * self.peak_flops_per_chip)

    def summary(self) -> str:
        def gib(b):
            return f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 1024 ** 2:.2f} MiB"
        lines = [f"program:   {self.kind}: {self.description}",
                 f"topology:  {self.topology}",
                 f"mesh:      {' x '.join(f'{k}={v}' for k, v in self.mesh.items())}",
                 f"compile:   {self.compile_s:.1f} s"]
        if self.fits:
            lines += [f"HBM/chip:  arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)} "
                      f"(aliased {gib(self.alias_bytes)}), temporaries {gib(self.temp_bytes)}; "
                      f"total {gib(self.total_bytes)} of {gib(self.capacity_bytes)} "
                      f"({100 * self.total_bytes / self.capacity_bytes:.0f}%)",
                      f"arguments from the sharding rules: {gib(self.expected_argument_bytes)} "
                      f"({gib(self.layout_argument_bytes)} in the compiled tiled layouts)"]
        lines += [f"FLOPs:     {self.flops_per_chip:.3e} per chip per {self.unit} ({self.flops_note})",
                  f"predicted: {self.step_time_at(0.4):.3g} s per {self.unit} at 40% MFU, {self.step_time_at(0.6):.3g} s at "
                  f"60% (prediction from the chip's bf16 peak {self.peak_flops_per_chip / 1e12:.0f} TFLOP/s, "
                  "not a measurement)"]
        if not self.fits:
            need = f"{self.needed_bytes / GIB:.2f} GiB" if self.needed_bytes else "more than that"
            lines.append(f"does not fit: needs {need} per chip, {self.chip} has "
                         f"{self.capacity_bytes / GIB:.2f} GiB")
            lines += [f"  - {a}" for a in self.advice]
            if self.error and not self.needed_bytes:
                lines.append(f"  compiler: {self.error[:300]}")
        if self.saved:
            lines.append(f"saved:     {self.saved}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["predicted_step_s_at_40pct_mfu"] = self.step_time_at(0.4)
        d["predicted_step_s_at_60pct_mfu"] = self.step_time_at(0.6)
        return d


# ------------------------------------------------------------------------------------------------ helpers
def _leaf_bytes(leaf, layout=None) -> int:
    """One chip's shard of `leaf` in bytes; with the compiled `layout`, padded to its tiles (TPU layouts tile
    the minor dimensions, e.g. (8, 128) for fp32)."""
    sharding = getattr(leaf, "sharding", None)
    shape = list(sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape)
    dtype = leaf.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # threefry keys are uint32[..., 2] on device
        shape, itemsize = shape + [2], 4
    else:
        itemsize = np.dtype(dtype).itemsize
    tiling = getattr(layout, "tiling", None) if layout is not None else None
    order = getattr(layout, "major_to_minor", None) if layout is not None else None
    if tiling and order is not None and len(order) == len(shape):
        physical = [shape[i] for i in order]
        tile = tiling[0]
        for j, t in enumerate(tile):
            dim = len(physical) - len(tile) + j
            if dim >= 0:
                physical[dim] = -(-physical[dim] // t) * t
            elif t > 1:  # a rank-0/1 array laid out in a larger tile
                physical = [1] * (-dim) + physical
                physical[0] = t
        shape = physical
    return int(math.prod(shape)) * itemsize


def argument_bytes(args, compiled=None) -> int:
    """Per-chip bytes of the arguments' shards as the sharding rules lay them out; given the compiled program,
    padded to the tiles of its input layouts (what the compiler's argument size counts)."""
    leaves = [x for x in jax.tree.leaves(args) if hasattr(x, "shape") and hasattr(x, "dtype")]
    if compiled is None:
        return sum(_leaf_bytes(x) for x in leaves)
    formats = jax.tree.leaves(compiled.input_formats, is_leaf=lambda x: hasattr(x, "layout"))
    if len(formats) != len(leaves):
        raise ValueError(f"{len(leaves)} abstract arguments but the executable has {len(formats)} inputs")
    # an input the program never reads gets no layout and no buffer
    return sum(_leaf_bytes(x, f.layout) for x, f in zip(leaves, formats) if f.layout is not None)


def _abstract(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype), sharding=sharding)


def _key(sharding):
    k = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=sharding)


def _mesh_context(mesh):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    return stack


class _MeshCall:
    """A jitted function lowered under its mesh and the logical rules (as the sampler/encoder call it)."""

    def __init__(self, fn, mesh):
        self.fn, self.mesh = fn, mesh

    def lower(self, *args, **kwargs):
        with _mesh_context(self.mesh):
            return self.fn.lower(*args, **kwargs)


def _params(tree) -> str:
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"
