"""Streaming reader for safetensors files and sharded directories, without torch.

Reads the JSON header itself (validated against the file size before any tensor is read) and reads each tensor
into its own buffer on request, so a 16 GB sharded checkpoint passes through host memory one tensor at a time and
nothing of it stays resident once the loader has placed that tensor (a memory map would keep every page it touched
counted in the process's resident memory until the whole load ends; bench/load_memory_bench.py). bf16 via ml_dtypes. Handles `*.safetensors` single files and `*.safetensors.index.json` shard indexes.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from qwenimage_jax.errors import WeightsError, WeightsNotFoundError

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}

# File-name stems tried in order: diffusers components, transformers models.
_STEMS = ("diffusion_pytorch_model", "model")


class WeightFileError(WeightsError, ValueError):
    """A weights or config file that cannot be read as it is (truncated, corrupt, inconsistent index)."""


_REDOWNLOAD = "re-download or re-convert it (e.g. `huggingface-cli download` resumes partial files)"


def read_json_file(file: str, what: str = "JSON file") -> dict:
    """Reads a JSON object from `file`; a syntax error or a non-object becomes a WeightFileError naming the file
    and the position."""
    try:
        with open(file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise WeightFileError(f"{what} {file} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg}); "
                              f"it is corrupt or was cut short: {_REDOWNLOAD}") from None
    except UnicodeDecodeError:
        raise WeightFileError(f"{what} {file} is not UTF-8 text; it is corrupt: {_REDOWNLOAD}") from None
    if not isinstance(data, dict):
        raise WeightFileError(f"{what} {file} holds a JSON {type(data).__name__}, not an object; {_REDOWNLOAD}")
    return data


def load_json_config(path: str, name: str = "config.json") -> dict:
    """Reads `path/name` (or `path` itself if it is a file) with a clear error when missing or malformed."""
    file = path if os.path.isfile(path) else os.path.join(path, name)
    if not os.path.exists(file):
        raise WeightsNotFoundError(f"no {name} in {path!r}; expected a diffusers/transformers component directory "
                                   f"(copy the {name} that came with the weights next to them)")
    return read_json_file(file, name)


def _read_header(file: str) -> tuple[dict, int]:
    """(tensor entries, data start) of one safetensors file, validated against the file size before any tensor
    is read: a truncated download, a corrupt header or inconsistent offsets are a WeightFileError naming the
    file and the tensor."""
    size = os.path.getsize(file)
    if size < 8:
        raise WeightFileError(f"{file} is {size} bytes, too short for a safetensors file; it is truncated: "
                              + _REDOWNLOAD)
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise WeightFileError(f"{file}: the header claims {n} bytes but the file holds {size} in all; it is "
                                  f"truncated or not a safetensors file: {_REDOWNLOAD}")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise WeightFileError(f"{file}: the safetensors header is not valid JSON ({e}); the file is corrupt: "
                              + _REDOWNLOAD) from None
    if not isinstance(header, dict):
        raise WeightFileError(f"{file}: the safetensors header is not a JSON object; the file is corrupt: "
                              + _REDOWNLOAD)
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightFileError(f"{file}: header entry {key!r} lacks dtype/shape/data_offsets ({info!r}); the "
                                  f"file is corrupt: {_REDOWNLOAD}") from None
        if dtype not in _DTYPES:
            raise WeightFileError(f"{file}: tensor {key!r} has dtype {dtype!r}, which this reader does not "
                                  f"support (supported: {', '.join(_DTYPES)}); convert the checkpoint to BF16/F32")
        need = int(np.prod(shape, dtype=np.int64)) * np.dtype(_DTYPES[dtype]).itemsize
        if not (0 <= start <= end) or end - start != need:
            raise WeightFileError(f"{file}: tensor {key!r} ({dtype}, shape {shape}) spans bytes [{start}, {end}) "
                                  f"but needs {need}; the header is corrupt: {_REDOWNLOAD}")
        if end > data_size:
            raise WeightFileError(f"{file}: tensor {key!r} ends at byte {end} of the data section but the file "
                                  f"holds only {data_size}; the file is truncated: {_REDOWNLOAD}")
    return header, 8 + n


def read_metadata(file: str) -> dict[str, str]:
    """The `__metadata__` string map of one safetensors file ({} when absent); the header is validated first."""
    _read_header(file)
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n)).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise WeightFileError(f"{file}: the safetensors __metadata__ is not a JSON object; the file is corrupt: "
                              + _REDOWNLOAD)
    return meta


def find_weight_files(path: str) -> list[str]:
    """All safetensors files of a component directory (sharded index honoured), or [path] for a file."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise WeightsNotFoundError(f"weights path {path!r} does not exist; pass the component directory "
                                   "(config.json + *.safetensors) or a .safetensors file")
    for stem in _STEMS:
        index = os.path.join(path, f"{stem}.safetensors.index.json")
        if os.path.exists(index):
            shards = sorted(set(_weight_map(index).values()))
            missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
            if missing:
                raise WeightsNotFoundError(f"{index} lists shard(s) that are not in {path}: {missing}; download the "
                                           "missing shard(s) (or the whole component) again")
            return [os.path.join(path, s) for s in shards]
        single = os.path.join(path, f"{stem}.safetensors")
        if os.path.exists(single):
            return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(path, f) for f in found]
    raise WeightsNotFoundError(f"no *.safetensors weights in {path!r} (looked for "
                               + ", ".join(f"{s}.safetensors[.index.json]" for s in _STEMS) + ")")


def _weight_map(index: str) -> dict[str, str]:
    data = read_json_file(index, "shard index")
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise WeightFileError(f"shard index {index} has no 'weight_map' object of tensor -> file; it is corrupt: "
                              + _REDOWNLOAD)
    return weight_map


def _index_file(path: str) -> str | None:
    for stem in _STEMS:
        index = os.path.join(path, f"{stem}.safetensors.index.json")
        if os.path.exists(index):
            return index
    return None


class SafetensorsReader:
    """Lazy `{key: np.ndarray}` view over one or more safetensors files."""

    def __init__(self, path: str):
        self.path = path
        self._where: dict[str, tuple[str, dict, int]] = {}
        for file in find_weight_files(path):
            header, offset = _read_header(file)
            for key, info in header.items():
                if key in self._where:
                    raise ValueError(f"tensor {key!r} appears in two shards of {path!r}")
                self._where[key] = (file, info, offset)
        index = _index_file(path) if os.path.isdir(path) else None
        if index is not None:
            wrong = [f"{k} (index says {v})" for k, v in _weight_map(index).items()
                     if k not in self._where or os.path.basename(self._where[k][0]) != v]
            if wrong:
                raise WeightFileError(f"{index} names {len(wrong)} tensor(s) that are not in the shard it points "
                                      f"to: {', '.join(wrong[:10])}{' ...' if len(wrong) > 10 else ''}; the index "
                                      f"and the shards come from different downloads: {_REDOWNLOAD}")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def __len__(self) -> int:
        return len(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._where[key][1]["shape"])

    def dtype(self, key: str):
        return _DTYPES[self._where[key][1]["dtype"]]

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._where:
            raise KeyError(f"tensor {key!r} not found in {self.path!r}")
        file, info, offset = self._where[key]
        start, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key!r} has unsupported dtype {info['dtype']}")
        # An anonymous mapping per tensor (not malloc): freed tensors go straight back to the OS instead of
        # fragmenting the heap, so resident memory tracks what the loader still holds.
        size = end - start
        raw = np.frombuffer(mmap.mmap(-1, size), np.uint8) if size else np.empty(0, np.uint8)
        with open(file, "rb") as f:
            f.seek(offset + start)
            if size and f.readinto(memoryview(raw)) != size:
                raise WeightFileError(f"{file}: tensor {key!r} could not be read in full; the file changed or was "
                                      f"truncated while loading: {_REDOWNLOAD}")
        return raw.view(dtype).reshape(info["shape"])

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self[key]


# ---------------------------------------------------------------------------------------------------------- writing
_ST_NAMES = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(ml_dtypes.bfloat16): "BF16",
             np.dtype(np.float64): "F64",
             # quantized weights (checkpoints.quantize.save_quantized; int4 is stored packed as U8)
             np.dtype(np.int8): "I8", np.dtype(np.uint8): "U8", np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3"}


def write_safetensors(file: str, tensors: list[tuple[str, np.ndarray]], metadata: dict | None = None) -> None:
    """One safetensors file (header + raw little-endian tensors), written here so bf16 needs no torch."""
    header, offset = {}, 0
    for key, array in tensors:
        if array.dtype not in _ST_NAMES:
            raise ValueError(f"tensor {key!r} has dtype {array.dtype}; export as float32, float16 or bfloat16 "
                             "(int8, uint8 and float8_e4m3fn hold quantized weights)")
        header[key] = {"dtype": _ST_NAMES[array.dtype], "shape": list(array.shape),
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


def write_weights(dst: str, tensors: Iterable[tuple[str, np.ndarray]], stem: str = "diffusion_pytorch_model",
                  max_shard_bytes: int = 5 * 2 ** 30) -> list[str]:
    """Writes `(key, array)` pairs as `dst/STEM.safetensors`, or numbered shards + `STEM.safetensors.index.json`
    past `max_shard_bytes` (the layout diffusers and transformers read); returns the files written. At most one
    shard is in host memory at a time. Refuses a destination that already holds safetensors weights."""
    os.makedirs(dst, exist_ok=True)
    if any(f.endswith(".safetensors") for f in os.listdir(dst)):
        raise FileExistsError(f"{dst} already holds safetensors weights; choose an empty destination")
    shard: list[tuple[str, np.ndarray]] = []
    shard_bytes, total = 0, 0
    tmp_files: list[str] = []
    shard_keys: list[list[str]] = []

    def flush():
        tmp_files.append(os.path.join(dst, f"_shard_{len(tmp_files):05d}.tmp"))
        write_safetensors(tmp_files[-1], shard)
        shard_keys.append([k for k, _ in shard])

    for key, array in tensors:
        if shard_bytes and shard_bytes + array.nbytes > max_shard_bytes:
            flush()
            shard, shard_bytes = [], 0
        shard.append((key, np.ascontiguousarray(array)))
        shard_bytes += array.nbytes
        total += array.nbytes
    if shard or not tmp_files:
        flush()
    if len(tmp_files) == 1:
        names = [f"{stem}.safetensors"]
    else:
        names = [f"{stem}-{i + 1:05d}-of-{len(tmp_files):05d}.safetensors" for i in range(len(tmp_files))]
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for keys, name in zip(shard_keys, names) for k in keys}}
        with open(os.path.join(dst, f"{stem}.safetensors.index.json"), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    for tmp, name in zip(tmp_files, names):
        os.replace(tmp, os.path.join(dst, name))
    return [os.path.join(dst, name) for name in names]
