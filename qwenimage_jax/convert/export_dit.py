"""Export our DiT parameters as a diffusers `QwenImage21Transformer2DModel` directory (the reference's own format).

    export_transformer(params, dit_config, dst, dtype="float32", max_shard_bytes=5 * 2**30) -> dst
        dst/config.json + dst/diffusion_pytorch_model.safetensors (or numbered shards + .safetensors.index.json)
    export_plan(dit_config) -> {flax_path: fn(array) -> {torch_key: np.ndarray}}     the exact inverse of
        `convert.dit.dit_plan`: kernels transposed back, head axes merged, scanned `layers` axes unstacked.
    write_pipeline_dir(dst, params, dit_config, sample_sigmas=None, components=None, scheduler_config=None)
        A `QwenImage21Pipeline` directory: model_index.json (with `sample_sigmas`, like the Turbo release),
        transformer/ (exported), scheduler/ (the released config unless given) and the other components copied
        (or symlinked) from existing directories.

The safetensors files are written here (header + raw little-endian tensors), one tensor at a time, so bf16 needs no
torch and a 7B model never sits twice in host memory. Multi-host: call on a process whose devices can read every
shard of `params` (each leaf is gathered with `jax.device_get`).
"""
from __future__ import annotations

import json
import os
import shutil
import struct
from typing import Any, Callable, Iterable, Mapping

import flax
import ml_dtypes
import numpy as np

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = SAFETENSORS_NAME + ".index.json"
_ST_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
              np.dtype(np.float64): "F64"}
_DTYPE_NAMES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}

# The released scheduler/scheduler_config.json of Qwen-Image-2.1 (REFERENCE.md 2.4).
SCHEDULER_CONFIG = {
    "_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0,
    "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 0.9, "base_image_seq_len": 256,
    "max_image_seq_len": 8192, "shift_terminal": 0.02, "time_shift_type": "exponential", "invert_sigmas": False,
    "stochastic_sampling": False, "use_karras_sigmas": False, "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
}
# model_index.json entries of the pipeline's components: (library, class).
PIPELINE_COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "vae": ["diffusers", "AutoencoderKLQwenImage21"],
    "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
    "processor": ["transformers", "Qwen3VLProcessor"],
    "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
}


# ----------------------------------------------------------------------------------------------------------------
# The inverse plan


def _linear(key: str) -> Callable[[np.ndarray], dict]:
    """flax Dense kernel (in, out) -> torch Linear (out, in)."""
    return lambda a: {key: np.ascontiguousarray(np.transpose(a))}


def _heads_in(key: str) -> Callable[[np.ndarray], dict]:
    """(embed, heads, head_dim) -> torch (heads*head_dim, embed)."""
    return lambda a: {key: np.ascontiguousarray(np.transpose(a.reshape(a.shape[0], -1)))}


def _heads_out(key: str) -> Callable[[np.ndarray], dict]:
    """(heads, head_dim, embed) -> torch (embed, heads*head_dim)."""
    return lambda a: {key: np.ascontiguousarray(np.transpose(a.reshape(-1, a.shape[-1])))}


def _same(key: str) -> Callable[[np.ndarray], dict]:
    return lambda a: {key: np.ascontiguousarray(a)}


def _unstack(make: Callable[[str], Callable], template: str, layers: int) -> Callable[[np.ndarray], dict]:
    """Scanned leaf (layers, ...) -> one torch tensor per block (`template` holds `{i}`)."""
    def split(a):
        if a.shape[0] != layers:
            raise ValueError(f"{template}: leading layers axis is {a.shape[0]}, config says {layers}")
        out = {}
        for i in range(layers):
            out.update(make(template.format(i=i))(a[i]))
        return out
    return split


def export_plan(config) -> dict[tuple[str, ...], Callable[[np.ndarray], dict[str, np.ndarray]]]:
    """`config`: a `models.dit.DiTConfig`. `{flax_path: fn(leaf) -> {torch_key: tensor}}` inverting `dit_plan`."""
    layers = config.num_layers
    plan = {
        ("img_in", "kernel"): _linear("img_in.weight"),
        ("time_linear_1", "kernel"): _linear("time_text_embed.timestep_embedder.linear_1.weight"),
        ("time_linear_2", "kernel"): _linear("time_text_embed.timestep_embedder.linear_2.weight"),
        ("modulation", "kernel"): _linear("modulation.1.weight"),
        ("txt_in", "text_norm", "scale"): _same("txt_in.text_norm.weight"),
        ("txt_in", "in_layer", "kernel"): _linear("txt_in.in_layer.weight"),
        ("txt_in", "out_layer", "kernel"): _linear("txt_in.out_layer.weight"),
        ("norm_out", "kernel"): _linear("norm_out.linear.weight"),
        ("proj_out", "kernel"): _linear("proj_out.weight"),
    }
    for name in ("to_q", "to_k", "to_v"):
        plan[("blocks", "attn", name, "kernel")] = _unstack(
            _heads_in, f"transformer_blocks.{{i}}.attn.{name}.weight", layers)
    plan[("blocks", "attn", "to_out", "kernel")] = _unstack(
        _heads_out, "transformer_blocks.{i}.attn.to_out.0.weight", layers)
    for name in ("norm_q", "norm_k"):
        plan[("blocks", "attn", name, "scale")] = _unstack(
            _same, f"transformer_blocks.{{i}}.attn.{name}.weight", layers)
    for name in ("proj", "gate_layer", "out"):
        plan[("blocks", "mlp", name, "kernel")] = _unstack(
            _linear, f"transformer_blocks.{{i}}.img_mlp.{name}.weight", layers)
    return plan


def torch_state(params: Mapping, config, dtype=None) -> Iterable[tuple[str, np.ndarray]]:
    """Yields (torch_key, numpy tensor) for every leaf of `params` (unboxed DiT params), one leaf at a time."""
    import jax

    flat = {tuple(str(k) for k in p): v for p, v in flax.traverse_util.flatten_dict(
        flax.linen.meta.unbox(dict(params))).items()}
    plan = export_plan(config)
    missing, extra = sorted(set(plan) - set(flat)), sorted(set(flat) - set(plan))
    if missing or extra:
        raise ValueError("params do not match the DiT layout: "
                         + (f"missing {['/'.join(p) for p in missing]} " if missing else "")
                         + (f"unexpected {['/'.join(p) for p in extra]}" if extra else ""))
    for path, fn in plan.items():
        leaf = np.asarray(jax.device_get(flat[path]))
        if dtype is not None:
            leaf = leaf.astype(np.float32).astype(dtype) if leaf.dtype != dtype else leaf
        yield from fn(leaf).items()


# ----------------------------------------------------------------------------------------------------------------
# safetensors writing


def _write_safetensors(file: str, tensors: list[tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    header, offset = {}, 0
    for key, array in tensors:
        if array.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {key!r} has dtype {array.dtype}; export as float32, float16 or bfloat16")
        header[key] = {"dtype": _ST_DTYPES[array.dtype], "shape": list(array.shape),
                       "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    header["__metadata__"] = {"format": "pt", **(metadata or {})}
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for _, array in tensors:
            f.write(np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False).tobytes())


def export_transformer(params: Mapping, config, dst: str, dtype: Any = "float32",
                       max_shard_bytes: int = 5 * 2 ** 30) -> str:
    """Writes `dst/config.json` + safetensors weights with the reference key names; returns `dst`.

    params: unboxed DiT params (any shardings). config: `DiTConfig`. dtype: "float32" | "bfloat16" | "float16"
    (or None to keep each leaf's dtype). Refuses to overwrite existing weights."""
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype={dtype!r}; use one of {sorted(_DTYPE_NAMES)} or None")
        dtype = _DTYPE_NAMES[dtype]
    np_dtype = None if dtype is None else np.dtype(dtype)
    os.makedirs(dst, exist_ok=True)
    if any(f.endswith(".safetensors") for f in os.listdir(dst)):
        raise FileExistsError(f"{dst} already holds safetensors weights; choose an empty destination")
    shards: list[list[tuple[str, np.ndarray]]] = [[]]
    sizes = [0]
    files: list[str] = []

    def flush():
        if shards[-1]:
            files.append(os.path.join(dst, f"_shard_{len(files):05d}.tmp"))
            _write_safetensors(files[-1], shards[-1])
            shards.append([])
            sizes.append(0)

    weight_map_keys: list[list[str]] = []
    for key, array in torch_state(params, config, np_dtype):
        if sizes[-1] and sizes[-1] + array.nbytes > max_shard_bytes:
            weight_map_keys.append([k for k, _ in shards[-1]])
            flush()
        shards[-1].append((key, array))
        sizes[-1] += array.nbytes
    weight_map_keys.append([k for k, _ in shards[-1]])
    total = sum(sizes)
    flush()
    if len(files) == 1:
        os.replace(files[0], os.path.join(dst, SAFETENSORS_NAME))
    else:
        stem = SAFETENSORS_NAME[:-len(".safetensors")]
        names = [f"{stem}-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
        for tmp, name in zip(files, names):
            os.replace(tmp, os.path.join(dst, name))
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for keys, name in zip(weight_map_keys, names) for k in keys}}
        with open(os.path.join(dst, INDEX_NAME), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_diffusers(), f, indent=2)
    return dst


# ----------------------------------------------------------------------------------------------------------------
# Pipeline directory


def write_pipeline_dir(dst: str, params: Mapping, config, sample_sigmas: Iterable[float] | None = None,
                       components: Mapping[str, str] | None = None, scheduler_config: Mapping | None = None,
                       dtype: Any = "float32", link: bool = False) -> str:
    """A `QwenImage21Pipeline` directory with our transformer; returns `dst`.

    sample_sigmas: the pipeline's default sigma grid without the terminal 0 (diffusers applies the scheduler's mu
        shift and terminal stretch to it, exactly as to its linspace default); None = the base model's behaviour.
    components: {"vae": DIR, "text_encoder": DIR, "processor": DIR, "scheduler": DIR} copied (or symlinked with
        `link=True`) into dst; absent entries are written as null in model_index.json (pass them at load time).
    scheduler_config: written to scheduler/ when no scheduler component is given (default: the released config).
    """
    components = dict(components or {})
    unknown = sorted(set(components) - set(PIPELINE_COMPONENTS) - {"transformer"})
    if unknown or "transformer" in components:
        raise ValueError(f"components {unknown or ['transformer']} not allowed; give any of "
                         f"{sorted(set(PIPELINE_COMPONENTS) - {'transformer'})} (the transformer comes from params)")
    os.makedirs(dst, exist_ok=True)
    export_transformer(params, config, os.path.join(dst, "transformer"), dtype=dtype)
    for name, src in components.items():
        target = os.path.join(dst, name)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"component {name!r}: {src!r} is not a directory")
        if link:
            os.symlink(os.path.abspath(src), target)
        else:
            shutil.copytree(src, target)
    if "scheduler" not in components:
        os.makedirs(os.path.join(dst, "scheduler"), exist_ok=True)
        with open(os.path.join(dst, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(scheduler_config or SCHEDULER_CONFIG), f, indent=2)
    index: dict[str, Any] = {"_class_name": "QwenImage21Pipeline", "_diffusers_version": _diffusers_version()}
    for name, entry in PIPELINE_COMPONENTS.items():
        present = name in ("transformer", "scheduler") or name in components
        index[name] = list(entry) if present else [None, None]
    index["sample_sigmas"] = None if sample_sigmas is None else [float(s) for s in sample_sigmas]
    with open(os.path.join(dst, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return dst


def read_sample_sigmas(pipeline_dir: str) -> list[float] | None:
    """`sample_sigmas` of a pipeline directory's model_index.json (None when absent or null)."""
    with open(os.path.join(pipeline_dir, "model_index.json"), encoding="utf-8") as f:
        return json.load(f).get("sample_sigmas")


def _diffusers_version() -> str:
    try:
        from importlib.metadata import version
        return version("diffusers")
    except Exception:  # noqa: BLE001  (diffusers is optional at export time)
        return "0.42.1"
