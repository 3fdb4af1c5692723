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
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.errors import WeightsError


class WeightKeyError(WeightsError, ValueError):
    """Checkpoint and model disagree on key names or shapes."""


Shape = tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """Torch keys feeding one Flax leaf and the transform applied to the list of arrays.

    reference_shapes: the torch shapes of `keys` given the Flax leaf's shape, so `export_tensors` can invert the
        plan without the reference model; None where the leaf alone does not tell them (pass `torch_shapes`).
    layers: for a stacked leaf, its per-layer specs; export inverts one layer at a time, so the index probes stay
        the size of one layer rather than the whole stack.
    """
    keys: tuple[str, ...]
    transform: Callable[[list[np.ndarray]], np.ndarray]
    reference_shapes: Callable[[Shape], tuple[Shape, ...]] | None = None
    layers: tuple["WeightSpec", ...] | None = None


def unchanged(key: str) -> WeightSpec:
    return WeightSpec((key,), lambda a: a[0], lambda shape: (tuple(shape),))


def linear_kernel(key: str) -> WeightSpec:
    """torch Linear `(out, in)` -> flax Dense kernel `(in, out)`."""
    return WeightSpec((key,), lambda a: np.transpose(a[0]), lambda shape: (tuple(shape)[::-1],))


def conv2d_kernel(key: str) -> WeightSpec:
    """torch Conv2d `(O, I, kh, kw)` -> flax Conv `(kh, kw, I, O)`."""
    return WeightSpec((key,), lambda a: np.transpose(a[0], (2, 3, 1, 0)),
                      lambda s: ((s[3], s[2], s[0], s[1]),))


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

    def reference_shapes(shape: Shape) -> tuple[Shape, ...]:
        if any(s.reference_shapes is None for s in specs):
            raise WeightKeyError(f"{keys[0]}: a layer of this stacked leaf has no reference shapes")
        return tuple(t for s in specs for t in s.reference_shapes(tuple(shape)[1:]))

    return WeightSpec(keys, transform, reference_shapes, tuple(specs))


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
    leaf_hook: Callable[[tuple[str, ...], Any], Any] | None = None,
) -> dict:
    """Builds the params tree.

    store:            object with `keys()` and `__getitem__` returning numpy arrays (e.g. SafetensorsReader).
    plan:             `{flax_path: WeightSpec}`.
    abstract_params:  params tree of ShapeDtypeStructs (possibly `nn.Partitioned`-boxed), e.g. from eval_shape.
    shardings:        optional tree of shardings (same structure) to place each leaf on.
    ignore:           fnmatch patterns of checkpoint keys that are knowingly unused (e.g. video-only convs).
    keep_dtype:       predicate on a flax path; True keeps fp32 for that leaf regardless of `dtype`.
    leaf_hook:        (flax path, placed array) -> what the tree keeps, called as each leaf is read (e.g. a
                      quantizer: the float copy of one tensor is then all that exists of it at a time).
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
        placed = jax.device_put(array, sharding) if sharding is not None else jax.device_put(array)
        del array
        flat_out[path] = placed if leaf_hook is None else leaf_hook(path, placed)
        del placed
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
                   torch_shapes: Mapping[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    """The inverse of `assemble_params`: Flax params -> `{torch_key: array}` in the reference layout (all at once;
    `iter_export_tensors` yields them leaf by leaf)."""
    return dict(iter_export_tensors(params, plan, torch_shapes))


def iter_export_tensors(params: Mapping, plan: Mapping[tuple[str, ...], WeightSpec],
                        torch_shapes: Mapping[str, Sequence[int]] | None = None,
                        dtype: Any = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yields `(torch_key, array)` for every key of the plan, one Flax leaf at a time (a large model is never
    twice in host memory).

    Works for every plan whose transforms only move elements (transpose, reshape, stack): each transform is
    applied to arrays of element indices, which tells where every element of the Flax leaf came from.
    The reference shape of each key comes from `torch_shapes` (e.g. the reference model's state dict) when given,
    else from the spec's `reference_shapes`. dtype: cast each float tensor to it (None keeps the leaf's dtype).
    """
    flat = _flatten(unbox_abstract(params))
    for path, spec in plan.items():
        if path not in flat:
            raise WeightKeyError(f"params have no leaf {'/'.join(path)} required by the plan")
        value = np.asarray(jax.device_get(flat[path]))
        if dtype is not None and _is_float(value.dtype) and value.dtype != np.dtype(dtype):
            value = value.astype(np.dtype(dtype))
        if spec.layers is not None:
            if value.shape[0] != len(spec.layers):
                raise WeightKeyError(f"{'/'.join(path)}: leading layers axis is {value.shape[0]}, the plan "
                                     f"stacks {len(spec.layers)} layers")
            for layer, layer_spec in zip(value, spec.layers):
                yield from _invert(path, layer_spec, layer, torch_shapes).items()
        else:
            yield from _invert(path, spec, value, torch_shapes).items()
        del value


def _invert(path, spec: WeightSpec, value: np.ndarray, torch_shapes) -> dict[str, np.ndarray]:
    """One leaf (or one layer of a stacked leaf) -> its torch tensors, by probing the transform with indices."""
    if torch_shapes is not None:
        missing = [k for k in spec.keys if k not in torch_shapes]
        if missing:
            raise WeightKeyError(f"no reference shape for {missing}")
        shapes = [tuple(int(d) for d in torch_shapes[k]) for k in spec.keys]
    elif spec.reference_shapes is not None:
        shapes = [tuple(int(d) for d in s) for s in spec.reference_shapes(tuple(value.shape))]
    else:
        raise WeightKeyError(f"{'/'.join(path)}: the plan cannot tell the reference shapes of {spec.keys[0]} "
                             "from the leaf; pass torch_shapes (e.g. from the reference model's state dict)")
    sizes = [int(np.prod(s)) for s in shapes]
    offsets = np.cumsum([0] + sizes)
    total = int(offsets[-1])
    index_dtype = np.int32 if total < 2 ** 31 else np.int64  # half the probe memory for every realistic layer
    probes = [np.arange(o, o + n, dtype=index_dtype).reshape(s) for o, n, s in zip(offsets, sizes, shapes)]
    index = np.asarray(spec.transform(probes))
    if not np.issubdtype(index.dtype, np.integer):
        index = np.rint(index.astype(np.float64)).astype(np.int64)
    if index.shape != value.shape:
        raise WeightKeyError(f"{'/'.join(path)}: the plan maps {spec.keys[0]} to shape {index.shape}, "
                             f"but the params hold {value.shape}")
    flat_index = index.ravel()
    if index.size != total or not np.array_equal(np.sort(flat_index), np.arange(total)):
        raise WeightKeyError(f"{'/'.join(path)}: its transform is not a pure rearrangement; export it by hand")
    buffer = np.empty(total, value.dtype)
    buffer[flat_index] = value.ravel()
    return {key: buffer[start:start + size].reshape(shape)
            for key, shape, start, size in zip(spec.keys, shapes, offsets, sizes)}
