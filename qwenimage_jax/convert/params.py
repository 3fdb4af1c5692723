"""Assemble a Flax params tree from a torch-named tensor store, validating every key and shape.

A model's converter is a dict `{flax_path: WeightSpec}`: which torch key(s) feed that leaf and how to transform
them (transpose a Linear, permute a Conv, stack per-layer tensors for `nn.scan`). `assemble_params` checks the plan
against the checkpoint (every key consumed, none missing) and against the model's abstract params (every leaf
filled, every shape equal) and reports all offenders at once. Leaves are converted and placed one at a time, onto
their target sharding when given, so a large checkpoint never sits twice in host memory.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Iterable, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np


class WeightKeyError(ValueError):
    """Checkpoint and model disagree on key names or shapes."""


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Torch keys feeding one Flax leaf and the transform applied to the list of arrays."""
    keys: tuple[str, ...]
    transform: Callable[[list[np.ndarray]], np.ndarray]


def unchanged(key: str) -> WeightSpec:
    return WeightSpec((key,), lambda a: a[0])


def linear_kernel(key: str) -> WeightSpec:
    """torch Linear `(out, in)` -> flax Dense kernel `(in, out)`."""
    return WeightSpec((key,), lambda a: np.transpose(a[0]))


def conv2d_kernel(key: str) -> WeightSpec:
    """torch Conv2d `(O, I, kh, kw)` -> flax Conv `(kh, kw, I, O)`."""
    return WeightSpec((key,), lambda a: np.transpose(a[0], (2, 3, 1, 0)))


def stack_layers(specs: Sequence[WeightSpec]) -> WeightSpec:
    """Per-layer specs -> one spec for a scanned leaf with a leading `layers` axis."""
    keys = tuple(k for s in specs for k in s.keys)
    sizes = [len(s.keys) for s in specs]

    def transform(arrays) -> np.ndarray:
        # Filled layer by layer (not np.stack of a list): with lazily read sources only one layer's tensors are
        # in host memory beside the stacked result.
        out, i = None, 0
        for j, (spec, n) in enumerate(zip(specs, sizes)):
            layer = np.asarray(spec.transform(arrays[i:i + n]))
            i += n
            if out is None:
                out = np.empty((len(specs),) + layer.shape, layer.dtype)
            elif layer.shape != out.shape[1:]:
                raise WeightKeyError(f"{specs[j].keys[0]} gives shape {layer.shape} but layer 0 gave "
                                     f"{out.shape[1:]}; the layers of one stacked leaf must agree")
            out[j] = layer
            del layer
        return out

    return WeightSpec(keys, transform)


def _flatten(tree: Mapping) -> dict[tuple[str, ...], Any]:
    return {tuple(str(k) for k in path): v for path, v in flax.traverse_util.flatten_dict(dict(tree)).items()}


def unbox_abstract(tree):
    """Strips logical-partitioning boxes WITHOUT applying their sharding constraints: the trees here are abstract
    shapes, and a loader may run inside a mesh context (e.g. the DiT trainer's `init_from`)."""
    if tree is None:
        return None
    is_box = lambda x: isinstance(x, flax.linen.meta.AxisMetadata)  # noqa: E731
    return jax.tree.map(lambda x: x.unbox(apply_constraint=False) if is_box(x) else x, tree, is_leaf=is_box)


def assemble_params(
    store: Mapping[str, np.ndarray] | Any,
    plan: Mapping[tuple[str, ...], WeightSpec],
    abstract_params: Mapping,
    *,
    dtype: Any = jnp.float32,
    shardings: Mapping | None = None,
    ignore: Iterable[str] = (),
    source: str = "checkpoint",
    keep_dtype: Callable[[tuple[str, ...]], bool] | None = None,
) -> dict:
    """Builds the params tree.

    store:            object with `keys()` and `__getitem__` returning numpy arrays (e.g. SafetensorsReader).
    plan:             `{flax_path: WeightSpec}`.
    abstract_params:  params tree of ShapeDtypeStructs (possibly `nn.Partitioned`-boxed), e.g. from eval_shape.
    shardings:        optional tree of shardings (same structure) to place each leaf on.
    ignore:           fnmatch patterns of checkpoint keys that are knowingly unused (e.g. video-only convs).
    keep_dtype:       predicate on a flax path; True keeps fp32 for that leaf regardless of `dtype`.
    """
    ignore = tuple(ignore)
    expected = _flatten(unbox_abstract(abstract_params))
    target_shardings = _flatten(shardings) if shardings is not None else {}
    store_keys = set(store.keys())

    problems: list[str] = []
    unknown_paths = sorted(set(plan) - set(expected))
    if unknown_paths:
        problems.append("converter produces leaves the model does not have: "
                        + ", ".join("/".join(p) for p in unknown_paths[:20]))
    unfilled = sorted(set(expected) - set(plan))
    if unfilled:
        problems.append("model leaves with no source tensor: " + ", ".join("/".join(p) for p in unfilled[:20]))
    wanted = {k for spec in plan.values() for k in spec.keys}
    missing = sorted(wanted - store_keys)
    if missing:
        problems.append(f"{len(missing)} key(s) missing from the {source}: " + ", ".join(missing[:20])
                        + (" ..." if len(missing) > 20 else ""))
    unexpected = sorted(k for k in store_keys - wanted if not any(fnmatch.fnmatchcase(k, p) for p in ignore))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s) in the {source}: " + ", ".join(unexpected[:20])
                        + (" ..." if len(unexpected) > 20 else ""))
    if not problems and hasattr(store, "dtype"):
        ints = sorted(f"{k} ({np.dtype(store.dtype(k)).name})" for k in wanted
                      if not _is_float(np.dtype(store.dtype(k))))
        if ints:
            problems.append(f"{len(ints)} tensor(s) are not floating point, but every parameter is: "
                            + ", ".join(ints[:20]) + "; the file holds something else (quantised or "
                            "index data): use the unquantised bf16/fp32 weights")
    if problems:
        raise WeightKeyError(f"cannot load {source}:\n  - " + "\n  - ".join(problems)
                             + (_CONFIG_HINT if missing or unexpected else ""))

    flat_out: dict[tuple[str, ...], Any] = {}
    shape_errors: list[str] = []
    for path, spec in plan.items():
        array = spec.transform(_LazySources(store, spec.keys, source))
        want = tuple(expected[path].shape)
        if tuple(array.shape) != want:
            shape_errors.append(f"{'/'.join(path)} (from {spec.keys[0]}{'...' if len(spec.keys) > 1 else ''}): "
                                f"checkpoint gives {tuple(array.shape)}, model expects {want}")
            continue
        leaf_dtype = expected[path].dtype if (keep_dtype is not None and keep_dtype(path)) else dtype
        # Cast straight to the target dtype (no fp32 detour: a stacked 8B leaf would double host memory).
        if _is_float(array.dtype):
            array = array.astype(jnp.dtype(leaf_dtype), copy=False)
        sharding = target_shardings.get(path)
        flat_out[path] = jax.device_put(array, sharding) if sharding is not None else jax.device_put(array)
    if shape_errors:
        raise WeightKeyError(f"cannot load {source}: {len(shape_errors)} shape mismatch(es):\n  - "
                             + "\n  - ".join(shape_errors[:30]) + _CONFIG_HINT)
    return flax.traverse_util.unflatten_dict(flat_out)


class _LazySources:
    """The source tensors of one leaf as a sequence that reads each tensor from the store when indexed (checked
    for NaN/Inf as it is read); slices are lazy too, so a stacked leaf holds one layer's sources at a time."""

    def __init__(self, store, keys: Sequence[str], source: str):
        self.store, self.keys, self.source = store, tuple(keys), source
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.keys)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _LazySources(self.store, self.keys[index], self.source)
        index = range(len(self.keys))[index]
        if index not in self._cache:
            array = np.asarray(self.store[self.keys[index]])
            bad = _first_non_finite(array) if _is_float(array.dtype) else None
            if bad is not None:
                raise WeightKeyError(f"cannot load {self.source}: tensor {self.keys[index]} holds {bad[1]} NaN/Inf "
                                     "value(s); the data section of the file is corrupt: re-download or re-convert it")
            self._cache[index] = array
        return self._cache[index]


_CONFIG_HINT = ("\n(the component's config.json describes a different model than its tensors: use the config.json "
                "that came with these weights, or weights that match the config)")


def _is_float(dtype) -> bool:
    return np.issubdtype(dtype, np.floating) or dtype.name in ("bfloat16", "float8_e4m3fn", "float8_e5m2")


def _first_non_finite(array: np.ndarray, chunk: int = 1 << 24) -> tuple[int, int] | None:
    """(flat index of the first NaN/Inf, how many) of a float array, or None; checked in chunks so a large leaf
    never needs a second full-size buffer."""
    flat = np.ravel(array)           # a view: store arrays are contiguous
    count, first = 0, None
    for start in range(0, flat.size, chunk):
        part = flat[start:start + chunk]
        finite = np.isfinite(part.astype(np.float32) if part.dtype.itemsize < 4 else part)
        if not finite.all():
            count += int(finite.size - finite.sum())
            first = start + int(np.argmin(finite)) if first is None else first
    return None if first is None else (first, count)


def export_tensors(params: Mapping, plan: Mapping[tuple[str, ...], WeightSpec],
                   torch_shapes: Mapping[str, Sequence[int]]) -> dict[str, np.ndarray]:
    """The inverse of `assemble_params`: Flax params -> `{torch_key: array}` in the reference layout.

    Works for every plan whose transforms only move elements (transpose, reshape, stack): each transform is
    applied to arrays of element indices, which tells where every element of the Flax leaf came from.
    `torch_shapes` gives the reference shape of each key (e.g. from the reference model's state dict, or the
    keys of a checkpoint written earlier).
    """
    flat = _flatten(unbox_abstract(params))
    out: dict[str, np.ndarray] = {}
    for path, spec in plan.items():
        if path not in flat:
            raise WeightKeyError(f"params have no leaf {'/'.join(path)} required by the plan")
        missing = [k for k in spec.keys if k not in torch_shapes]
        if missing:
            raise WeightKeyError(f"no reference shape for {missing}")
        shapes = [tuple(int(d) for d in torch_shapes[k]) for k in spec.keys]
        sizes = [int(np.prod(s)) for s in shapes]
        offsets = np.cumsum([0] + sizes)
        probes = [np.arange(o, o + n, dtype=np.int64).reshape(s) for o, n, s in zip(offsets, sizes, shapes)]
        index = np.rint(np.asarray(spec.transform(probes), dtype=np.float64)).astype(np.int64)
        value = np.asarray(jax.device_get(flat[path]))
        if index.shape != value.shape:
            raise WeightKeyError(f"{'/'.join(path)}: the plan maps {spec.keys[0]} to shape {index.shape}, "
                                 f"but the params hold {value.shape}")
        total = int(offsets[-1])
        if index.size != total or not np.array_equal(np.sort(index.ravel()), np.arange(total)):
            raise WeightKeyError(f"{'/'.join(path)}: its transform is not a pure rearrangement; export it by hand")
        buffer = np.empty(total, value.dtype)
        buffer[index.ravel()] = value.ravel()
        for key, shape, start, size in zip(spec.keys, shapes, offsets, sizes):
            out[key] = buffer[start:start + size].reshape(shape)
    return out
