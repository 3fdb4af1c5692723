"""LoRA adapters for the DiT: read the community's files, map them onto our kernels, write the diffusers format.

An adapter on a torch `nn.Linear` W (out, in) adds `scaling * B @ A` with A (r, in) and B (out, r). Our Dense
kernels are W transposed and split by name (e.g. (embed, heads, head_dim)), and the blocks are stacked on a
`layers` axis, so the factors are stored the same way: `a` (layers?, *kernel_in, r), `b` (layers?, r, *kernel_out)
and `scale` (layers?, r), one entry per Dense (see `models.dit.Dense`). Which torch module feeds which kernel is
read off the converter's key plan (`convert.dit.dit_plan`), so it is never written twice.

Formats read (all safetensors): diffusers `save_lora_weights` (`transformer.<module>.lora_A.weight`, its
`lora_adapter_metadata`), peft `save_pretrained` (`base_model.model.<module>.lora_A[.name].weight` beside
`adapter_config.json`), and the usual community variants (`diffusion_model.` prefix, `lora_down`/`lora_up` with
a per-module `.alpha`, kohya's flattened `lora_unet_transformer_blocks_0_attn_to_q`).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Mapping

import numpy as np

from qwenimage_jax.checkpoints.dit import dit_plan
from qwenimage_jax.checkpoints.safetensors_io import (SafetensorsReader, WeightFileError, read_json_file, read_metadata,
                                                      write_safetensors)
from qwenimage_jax.errors import WeightsError, WeightsNotFoundError

DIFFUSERS_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PEFT_WEIGHT_NAME = "adapter_model.safetensors"
METADATA_KEY = "lora_adapter_metadata"  # diffusers' safetensors metadata entry (a JSON LoraConfig per component)
_PREFIXES = ("transformer.", "base_model.model.", "diffusion_model.", "model.")
_SUFFIX = re.compile(r"^(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_down|lora_up)(\.[A-Za-z0-9_\-]+)?\.weight$")


class LoraKeyError(WeightsError, ValueError):
    """An adapter file that does not fit this transformer (unknown modules, wrong shapes, unsupported parts)."""


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    path: tuple[str, ...]   # the Dense module's path in the params tree, e.g. ("blocks", "attn", "to_q")
    layer: int | None       # index on the stacked `layers` axis, None outside the blocks


def lora_targets(config) -> dict[str, LoraTarget]:
    """torch module name (e.g. "transformer_blocks.3.attn.to_q") -> where its kernel lives, for every Linear."""
    targets = {}
    for path, spec in dit_plan(config).items():
        if path[-1] != "kernel":
            continue
        modules = [k.removesuffix(".weight") for k in spec.keys]
        if path[0] == "blocks":
            targets.update({m: LoraTarget(path[:-1], i) for i, m in enumerate(modules)})
        else:
            targets[modules[0]] = LoraTarget(path[:-1], None)
    return targets


def matches(module: str, pattern: str) -> bool:
    """peft's target rule: the full name, or a dotted suffix of it (`to_q` matches `transformer_blocks.0.attn.to_q`);
    a pattern with regex characters must match the whole name."""
    if module == pattern or module.endswith("." + pattern):
        return True
    return any(c in pattern for c in "*[]()|+?\\^$") and re.fullmatch(pattern, module) is not None


# ----------------------------------------------------------------------------------------------------------------
# Reading


def find_adapter_file(path: str, weight_name: str | None = None) -> str:
    """The safetensors file of an adapter given a file or a directory (diffusers, then peft file names)."""
    if os.path.isfile(path):
        return path
    if not os.path.isdir(path):
        raise WeightsNotFoundError(f"LoRA path {path!r} does not exist; pass a .safetensors file or the directory "
                                   f"save_lora_weights / save_pretrained wrote")
    names = [weight_name] if weight_name else [DIFFUSERS_WEIGHT_NAME, PEFT_WEIGHT_NAME]
    for name in names:
        if os.path.isfile(os.path.join(path, name)):
            return os.path.join(path, name)
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if len(found) == 1 and not weight_name:
        return os.path.join(path, found[0])
    raise WeightsNotFoundError(f"no LoRA weights in {path!r}: looked for {', '.join(names)}"
                               + (f"; it holds {found}, pass weight_name=" if found else ""))


def _adapter_config(file: str) -> dict:
    """The LoraConfig fields that decide scaling: diffusers' metadata, else a peft adapter_config.json beside it."""
    raw = read_metadata(file).get(METADATA_KEY)
    if raw:
        meta = json.loads(raw)
        packed = {k.removeprefix("transformer."): v for k, v in meta.items() if k.startswith("transformer.")}
        return packed or meta
    beside = os.path.join(os.path.dirname(file), "adapter_config.json")
    return read_json_file(beside, "peft adapter_config.json") if os.path.isfile(beside) else {}


def _pattern_value(module: str, pattern: Mapping[str, Any] | None, default):
    for key, value in (pattern or {}).items():
        if matches(module, key):
            return value
    return default


@dataclasses.dataclass
class TorchLora:
    """One adapter as torch-layout factors: module -> (A (r, in), B (out, r), scaling)."""
    modules: dict[str, tuple[np.ndarray, np.ndarray, float]]
    config: dict
    source: str

    @property
    def rank(self) -> int:
        return max(a.shape[0] for a, _, _ in self.modules.values())


def read_lora(source, config, weight_name: str | None = None) -> TorchLora:
    """Reads an adapter file / directory (or a `{key: array}` dict) for a transformer with DiTConfig `config`.

    Every key must be a LoRA factor or alpha of one of the transformer's linears; all offenders are listed at once.
    """
    if isinstance(source, Mapping):
        tensors, lora_config, where = {k: np.asarray(v) for k, v in source.items()}, {}, "the given state dict"
    else:
        file = find_adapter_file(os.fspath(source), weight_name)
        reader = SafetensorsReader(file)
        tensors, lora_config, where = dict(reader.items()), _adapter_config(file), file
    targets = lora_targets(config)
    flat = {m.replace(".", "_"): m for m in targets}  # kohya's flattened names
    factors: dict[str, dict[str, np.ndarray]] = {}
    alphas: dict[str, float] = {}
    unknown, unsupported = [], []
    for key, value in tensors.items():
        name = key
        for prefix in _PREFIXES:
            name = name.removeprefix(prefix)
        if name.startswith("lora_unet_") or name.startswith("lora_transformer_"):
            head, _, rest = name.partition(".")
            head = head.removeprefix("lora_unet_").removeprefix("lora_transformer_")
            name = f"{flat.get(head, head)}.{rest}"
        if "dora_scale" in name or "lora_magnitude_vector" in name or name.endswith(".bias"):
            unsupported.append(key)
            continue
        if name.endswith(".alpha"):
            module = name.removesuffix(".alpha")
            if module not in targets:
                unknown.append(key)
            else:
                alphas[module] = float(np.asarray(value, np.float64).reshape(-1)[0])
            continue
        found = _SUFFIX.match(name)
        if found is None or found["module"] not in targets:
            unknown.append(key)
            continue
        kind = "a" if found["kind"] in ("lora_A", "lora_down") else "b"
        factors.setdefault(found["module"], {})[kind] = np.asarray(value, np.float32)
    if unsupported:
        raise LoraKeyError(f"{where}: {len(unsupported)} tensor(s) belong to LoRA variants this loader does not apply "
                           f"(DoRA magnitudes, LoRA biases): {unsupported[:8]}; export a plain LoRA")
    if unknown:
        raise LoraKeyError(f"{where}: {len(unknown)} key(s) are not LoRA factors of this transformer's linears: "
                           f"{sorted(unknown)[:12]}{' ...' if len(unknown) > 12 else ''}; expected e.g. "
                           f"'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' (the adapter may be for "
                           f"another model or another number of layers)")
    half = sorted(m for m, f in factors.items() if set(f) != {"a", "b"})
    if half:
        raise LoraKeyError(f"{where}: module(s) {half[:8]} have only one of lora_A/lora_B; the file is incomplete")
    if not factors:
        raise LoraKeyError(f"{where} holds no LoRA factors")
    modules = {}
    for module, f in factors.items():
        a, b = f["a"], f["b"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise LoraKeyError(f"{where}: {module} has lora_A {a.shape} and lora_B {b.shape}; expected (r, in) and "
                               "(out, r) of one rank r")
        rank = a.shape[0]
        alpha = alphas.get(module)
        if alpha is None:
            alpha = float(_pattern_value(module, lora_config.get("alpha_pattern"),
                                         lora_config.get("lora_alpha", rank)))
        scaling = alpha / math.sqrt(rank) if lora_config.get("use_rslora") else alpha / rank
        modules[module] = (a, b, scaling)
    return TorchLora(modules, dict(lora_config), where)


# ----------------------------------------------------------------------------------------------------------------
# Our layout


def _split(kernel_shape: tuple[int, ...], n_in: int, n_out: int, module: str, where: str) -> int:
    """How many leading kernel axes are the linear's input (the rest are its output)."""
    for k in range(1, len(kernel_shape)):
        if math.prod(kernel_shape[:k]) == n_in and math.prod(kernel_shape[k:]) == n_out:
            return k
    raise LoraKeyError(f"{where}: {module} maps {n_in} -> {n_out} features but this transformer's layer has kernel "
                       f"shape {tuple(kernel_shape)}; the adapter was trained for another model size")


def to_factors(lora: TorchLora, config, kernel_shapes: Mapping[tuple[str, ...], tuple[int, ...]]) -> dict:
    """TorchLora -> {dense path: {"a", "b", "scale"}} in our kernel layout (padded to one rank per path).

    kernel_shapes: Dense path -> kernel shape (with the leading layers axis for block kernels). `scale` holds the
    module's alpha / r per rank column (0 in padding and in layers the adapter does not touch).
    """
    targets = lora_targets(config)
    grouped: dict[tuple[str, ...], list] = {}
    for module, (a, b, scaling) in lora.modules.items():
        grouped.setdefault(targets[module].path, []).append((targets[module].layer, module, a, b, scaling))
    out = {}
    for path, entries in grouped.items():
        shape = tuple(kernel_shapes[path])
        stacked = entries[0][0] is not None
        per_layer = shape[1:] if stacked else shape
        rank = max(e[2].shape[0] for e in entries)
        n_in = _split(per_layer, entries[0][2].shape[1], entries[0][3].shape[0], entries[0][1], lora.source)
        lead = (shape[0],) if stacked else ()
        a_all = np.zeros(lead + per_layer[:n_in] + (rank,), np.float32)
        b_all = np.zeros(lead + (rank,) + per_layer[n_in:], np.float32)
        s_all = np.zeros(lead + (rank,), np.float32)
        for layer, module, a, b, scaling in entries:
            if (a.shape[1], b.shape[0]) != (math.prod(per_layer[:n_in]), math.prod(per_layer[n_in:])):
                raise LoraKeyError(f"{lora.source}: {module} has lora_A {a.shape} / lora_B {b.shape} but the layer "
                                   f"maps {math.prod(per_layer[:n_in])} -> {math.prod(per_layer[n_in:])} features")
            r = a.shape[0]
            idx = (layer,) if stacked else ()
            a_all[idx + (Ellipsis, slice(0, r))] = a.T.reshape(per_layer[:n_in] + (r,))
            b_all[idx + (slice(0, r),)] = b.T.reshape((r,) + per_layer[n_in:])
            s_all[idx + (slice(0, r),)] = scaling
        out[path] = {"a": a_all, "b": b_all, "scale": s_all}
    return out


def combine(adapters: list[tuple[Mapping, float]]) -> dict | None:
    """Adapters' factors side by side on the rank axis, each `scale` times its weight: the `lora` collection
    (nested dict) that `models.dit.Dense` reads, or None when no adapter is given."""
    by_path: dict[tuple[str, ...], list] = {}
    for factors, weight in adapters:
        for path, f in factors.items():
            by_path.setdefault(path, []).append((f, weight))
    if not by_path:
        return None
    tree: dict = {}
    for path, entries in by_path.items():
        a = np.concatenate([np.asarray(f["a"]) for f, _ in entries], axis=-1)
        stacked = np.asarray(entries[0][0]["scale"]).ndim == 2
        axis = 1 if stacked else 0
        b = np.concatenate([np.asarray(f["b"]) for f, _ in entries], axis=axis)
        scale = np.concatenate([np.asarray(f["scale"]) * w for f, w in entries], axis=-1)
        node = tree
        for name in path:
            node = node.setdefault(name, {})
        node.update(a=a, b=b, scale=scale.astype(np.float32))
    return tree


def kernel_delta(f: Mapping, weight: float = 1.0) -> np.ndarray:
    """weight * (a * scale) @ b in the kernel's layout (stacked layers kept): what fusing adds to the kernel."""
    a, b, scale = (np.asarray(f[k], np.float32) for k in ("a", "b", "scale"))
    stacked = scale.ndim == 2
    a_flat = a.reshape((a.shape[0], -1, a.shape[-1]) if stacked else (-1, a.shape[-1])) * scale[..., None, :]
    b_flat = b.reshape((b.shape[0], b.shape[1], -1) if stacked else (b.shape[0], -1))
    delta = np.matmul(a_flat, b_flat) * weight
    in_shape = a.shape[1:-1] if stacked else a.shape[:-1]
    out_shape = b.shape[2:] if stacked else b.shape[1:]
    return delta.reshape(((a.shape[0],) if stacked else ()) + tuple(in_shape) + tuple(out_shape))


# ----------------------------------------------------------------------------------------------------------------
# Writing


def to_torch_state(factors: Mapping, config, prefix: str = "transformer.") -> dict[str, np.ndarray]:
    """{dense path: {"a", "b", "scale"}} -> diffusers keys `<prefix><module>.lora_{A,B}.weight` (torch layout).
    Layers the adapter does not touch (scale 0, or all-zero factors) are left out."""
    by_place = {(t.path, t.layer): m for m, t in lora_targets(config).items()}
    state = {}
    for path, f in factors.items():
        a, b = np.asarray(f["a"], np.float32), np.asarray(f["b"], np.float32)
        stacked = path[0] == "blocks"
        layers = range(a.shape[0]) if stacked else [None]
        scale = np.asarray(f["scale"]) if "scale" in f else None
        for layer in layers:
            a_l, b_l = (a[layer], b[layer]) if stacked else (a, b)
            s_l = None if scale is None else (scale[layer] if stacked else scale)
            if (not a_l.any() and not b_l.any()) or (s_l is not None and not s_l.any()):
                continue
            rank = a_l.shape[-1]
            module = by_place[(tuple(path), layer)]
            state[f"{prefix}{module}.lora_A.weight"] = np.ascontiguousarray(a_l.reshape(-1, rank).T)
            state[f"{prefix}{module}.lora_B.weight"] = np.ascontiguousarray(b_l.reshape(rank, -1).T)
    return state


def save_lora(directory: str, factors: Mapping, config, *, rank: int, alpha: float,
              weight_name: str = DIFFUSERS_WEIGHT_NAME) -> str:
    """Writes `directory/pytorch_lora_weights.safetensors` as diffusers' `save_lora_weights` does (keys and the
    `lora_adapter_metadata` LoraConfig), so `QwenImage21Pipeline.load_lora_weights(directory)` reads it."""

    state = to_torch_state(factors, config)
    if not state:
        raise ValueError("the adapter has no non-zero factors to save")
    modules = sorted({k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in state})
    lora_config = {"r": int(rank), "lora_alpha": float(alpha), "target_modules": modules, "lora_dropout": 0.0,
                   "bias": "none", "use_dora": False, "use_rslora": False, "init_lora_weights": True}
    meta = {f"transformer.{k}": v for k, v in lora_config.items()}
    os.makedirs(directory, exist_ok=True)
    file = os.path.join(directory, weight_name)
    tmp = file + ".tmp"
    write_safetensors(tmp, sorted(state.items()), {METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)})
    os.replace(tmp, file)
    return file


__all__ = ["LoraKeyError", "LoraTarget", "TorchLora", "combine", "find_adapter_file", "kernel_delta",
           "lora_targets", "matches", "read_lora", "save_lora", "to_factors", "to_torch_state", "WeightFileError"]
