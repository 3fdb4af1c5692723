"""Cloud TPU topologies by name, as compile-only devices on any host (ahead-of-time compilation).

Two spellings are accepted:
  * jax's own, `<generation>:<shape>`: `v5:4x8x8` (v5p, 3-D torus), `v6e:16x16`, `v5e:4x4`, `v4:2x2x2`;
  * the product names users type: `v5p-512` (Google counts v5p and v4 TensorCores, two per chip: 256 chips),
    `v6e-256` (256 chips), `v5e-16` / `v5litepod-16` (16 chips), `v4-32` (16 chips).
`devices(name)` needs libtpu (`pip install -e '.[aot]'`), no TPU: the compiler runs on the host's CPU.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class ChipSpec:
    """One TPU generation: jax's topology prefix, HBM per chip (what the compiler offers a program), bf16 peak."""
    product: str            # product prefix: v5p, v6e, v5e, v4
    jax_prefix: str         # jax topology prefix: v5, v6e, v5e, v4
    hbm_gib: float          # per chip
    peak_bf16_flops: float  # per chip, dense bf16
    cores_per_chip: int     # what the product name counts per chip (TensorCores for v5p/v4)
    torus_dims: int         # 3: v5p/v4, 2: v5e/v6e


CHIPS = {
    "v5p": ChipSpec("v5p", "v5", 95.74, 459e12, 2, 3),
    "v6e": ChipSpec("v6e", "v6e", 31.25, 918e12, 1, 2),
    "v5e": ChipSpec("v5e", "v5e", 15.75, 197e12, 1, 2),
    "v4": ChipSpec("v4", "v4", 32.0, 275e12, 2, 3),
}
_ALIASES = {"v5litepod": "v5e", "v5": "v5p", "v6": "v6e", "v5lite": "v5e"}

# chips -> torus shape, the slice shapes Cloud TPU offers
_SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
              512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}

EXAMPLES = ("v5p-64 (32 chips), v5p-128 (64), v5p-512 (256), v6e-64, v6e-256, v5e-4, v5e-16, v5e-256; "
            "or jax's names: v5:2x2x1, v5:4x8x8, v6e:16x16, v5e:2x2")


@dataclasses.dataclass(frozen=True)
class Topology:
    """A resolved name: `label` as typed, `jax_name` (e.g. v5:4x8x8), `chips`, the generation's `spec`."""
    label: str
    jax_name: str
    chips: int
    spec: ChipSpec

    def describe(self) -> str:
        name = self.label if self.label == self.jax_name else f"{self.label} = {self.jax_name}"
        return f"{name}, {self.chips} {self.spec.product} chips"


def _spec(prefix: str) -> ChipSpec:
    key = _ALIASES.get(prefix, prefix)
    if key not in CHIPS:
        raise ValueError(f"unknown TPU generation {prefix!r}; known: {', '.join(CHIPS)} (examples: {EXAMPLES})")
    return CHIPS[key]


def resolve(name: str) -> Topology:
    """`v5p-512`, `v6e:16x16`, ... -> Topology (no devices yet)."""
    name = name.strip()
    m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)+)", name)
    if m:
        prefix, shape = m.groups()
        spec = _spec(prefix)
        dims = [int(d) for d in shape.split("x")]
        if len(dims) != spec.torus_dims:
            raise ValueError(f"topology {name!r}: a {spec.product} slice is a {spec.torus_dims}-D torus "
                             f"(e.g. {spec.jax_prefix}:{(_SHAPES_3D if spec.torus_dims == 3 else _SHAPES_2D)[4]})")
        return Topology(name, f"{spec.jax_prefix}:{shape}", math.prod(dims), spec)
    m = re.fullmatch(r"([a-z0-9]+)-(\d+)", name)
    if m:
        prefix, count = m.group(1), int(m.group(2))
        spec = _spec(prefix)
        if count % spec.cores_per_chip:
            raise ValueError(f"{name!r}: {spec.product} sizes count TensorCores ({spec.cores_per_chip} per chip), "
                             f"so the number must be even")
        chips = count // spec.cores_per_chip
        shapes = _SHAPES_3D if spec.torus_dims == 3 else _SHAPES_2D
        if chips not in shapes:
            sizes = ", ".join(f"{spec.product}-{c * spec.cores_per_chip}" for c in shapes)
            raise ValueError(f"{name!r} ({chips} chips) is not a {spec.product} slice size; choose one of {sizes}")
        return Topology(name, f"{spec.jax_prefix}:{shapes[chips]}", chips, spec)
    raise ValueError(f"cannot read topology {name!r}; examples: {EXAMPLES}")


def devices(topology: Topology | str):
    """The compile-only TPU devices of a topology (a list of `jax.Device`), built by libtpu on this host."""
    topo = resolve(topology) if isinstance(topology, str) else topology
    # libtpu takes a host-wide lock file when it loads; the compiler alone needs no TPU, so share it.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise ImportError("compiling for a TPU topology needs libtpu on this host: pip install -e '.[aot]' "
                          "(jax[tpu] of the installed jax version; no TPU needed)") from e
    from jax.experimental import topologies

    # libtpu assumes a host's default chip block (2x2x1 on v5e/v6e); a slice smaller than one host (v6e-1, v5e-1)
    # is only accepted with its own bounds as the host's
    dims = [int(d) for d in topo.jax_name.split(":")[1].split("x")]
    kwargs = {}
    if topo.chips < 4:
        kwargs["chips_per_host_bounds"] = tuple(dims + [1] * (3 - len(dims)))
    desc = topologies.get_topology_desc(platform="tpu", topology_name=topo.jax_name, **kwargs)
    devs = list(desc.devices)
    if len(devs) != topo.chips:
        raise RuntimeError(f"libtpu built {len(devs)} devices for {topo.jax_name}, expected {topo.chips} chips")
    return devs
