"""Streaming reader for safetensors files and sharded directories, without torch.

Reads the JSON header itself and memory-maps each tensor, so a 16 GB sharded checkpoint is touched one tensor at
a time (bf16 via ml_dtypes). Handles `*.safetensors` single files and `*.safetensors.index.json` shard indexes.
"""
from __future__ import annotations

import json
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}

# File-name stems tried in order: diffusers components, transformers models.
_STEMS = ("diffusion_pytorch_model", "model")


def load_json_config(path: str, name: str = "config.json") -> dict:
    """Reads `path/name` (or `path` itself if it is a file) with a clear error when missing."""
    file = path if os.path.isfile(path) else os.path.join(path, name)
    if not os.path.exists(file):
        raise FileNotFoundError(f"no {name} in {path!r}; expected a diffusers/transformers component directory")
    with open(file, encoding="utf-8") as f:
        return json.load(f)


def _read_header(file: str) -> tuple[dict, int]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def find_weight_files(path: str) -> list[str]:
    """All safetensors files of a component directory (sharded index honoured), or [path] for a file."""
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"weights path {path!r} does not exist")
    for stem in _STEMS:
        index = os.path.join(path, f"{stem}.safetensors.index.json")
        if os.path.exists(index):
            with open(index, encoding="utf-8") as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            missing = [s for s in shards if not os.path.exists(os.path.join(path, s))]
            if missing:
                raise FileNotFoundError(f"{index} lists shards that are missing: {missing}")
            return [os.path.join(path, s) for s in shards]
        single = os.path.join(path, f"{stem}.safetensors")
        if os.path.exists(single):
            return [single]
    found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if found:
        return [os.path.join(path, f) for f in found]
    raise FileNotFoundError(f"no *.safetensors weights in {path!r} (looked for "
                            + ", ".join(f"{s}.safetensors[.index.json]" for s in _STEMS) + ")")


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
        self._maps: dict[str, np.memmap] = {}

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
        if file not in self._maps:
            self._maps[file] = np.memmap(file, dtype=np.uint8, mode="r")
        start, end = info["data_offsets"]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise ValueError(f"tensor {key!r} has unsupported dtype {info['dtype']}")
        raw = self._maps[file][offset + start: offset + end]
        return np.frombuffer(raw, dtype=dtype).reshape(info["shape"])

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for key in self._where:
            yield key, self[key]
