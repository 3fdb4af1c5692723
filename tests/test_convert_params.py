"""The generic importer: safetensors reading (incl. shards, bf16) and key/shape validation messages."""
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from qwenimage_jax.checkpoints import (SafetensorsReader, WeightKeyError, assemble_params, linear_kernel,
                                   stack_layers, unchanged)


def _abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.float32), tree)


def test_reader_reads_sharded_directory_and_bf16(tmp_path):
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.ones((4,), dtype=ml_dtypes.bfloat16)
    save_file({"a": a}, str(tmp_path / "model-00001-of-00002.safetensors"))
    # safetensors.numpy cannot write bf16; write it as raw bytes with the right header via our own writer.
    from qwenimage_jax.checkpoints.safetensors_io import _DTYPES  # noqa: F401
    header = {"b": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}
    blob = json.dumps(header).encode()
    with open(tmp_path / "model-00002-of-00002.safetensors", "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob + b.tobytes())
    with open(tmp_path / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"a": "model-00001-of-00002.safetensors",
                                  "b": "model-00002-of-00002.safetensors"}}, f)
    reader = SafetensorsReader(str(tmp_path))
    assert sorted(reader.keys()) == ["a", "b"]
    np.testing.assert_array_equal(reader["a"], a)
    assert reader["b"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(reader["b"].astype(np.float32), np.ones(4, np.float32))


def test_reader_missing_weights_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        SafetensorsReader(str(tmp_path))


def _plan():
    return {
        ("dense", "kernel"): linear_kernel("fc.weight"),
        ("norm", "scale"): unchanged("norm.weight"),
        ("layers", "kernel"): stack_layers([linear_kernel(f"blocks.{i}.w") for i in range(2)]),
    }


def _store():
    rng = np.random.default_rng(0)
    return {"fc.weight": rng.normal(size=(5, 3)).astype(np.float32),
            "norm.weight": rng.normal(size=(5,)).astype(np.float32),
            "blocks.0.w": rng.normal(size=(4, 5)).astype(np.float32),
            "blocks.1.w": rng.normal(size=(4, 5)).astype(np.float32)}


def _target():
    return _abstract({"dense": {"kernel": np.zeros((3, 5))}, "norm": {"scale": np.zeros(5)},
                      "layers": {"kernel": np.zeros((2, 5, 4))}})


def test_assemble_transposes_and_stacks():
    store = _store()
    params = assemble_params(store, _plan(), _target())
    np.testing.assert_array_equal(params["dense"]["kernel"], store["fc.weight"].T)
    np.testing.assert_array_equal(params["layers"]["kernel"][1], store["blocks.1.w"].T)


def test_assemble_reports_missing_extra_and_misshaped_keys():
    store = _store()
    store.pop("norm.weight")
    store["stray.weight"] = np.zeros(3, np.float32)
    with pytest.raises(WeightKeyError) as err:
        assemble_params(store, _plan(), _target())
    assert "missing" in str(err.value) and "norm.weight" in str(err.value)
    assert "unexpected" in str(err.value) and "stray.weight" in str(err.value)

    store = _store()
    store["fc.weight"] = np.zeros((6, 3), np.float32)
    with pytest.raises(WeightKeyError, match=r"dense/kernel .*checkpoint gives \(3, 6\), model expects \(3, 5\)"):
        assemble_params(store, _plan(), _target())


def test_assemble_places_leaves_on_shardings():
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("tensor",))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "tensor"))
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = {"dense": {"kernel": rep}, "norm": {"scale": rep}, "layers": {"kernel": spec}}
    params = assemble_params(_store(), _plan(), _target(), shardings=shardings)
    assert params["layers"]["kernel"].sharding == spec


def test_export_tensors_inverts_the_plan():
    store = _store()
    params = assemble_params(store, _plan(), _target())
    shapes = {k: v.shape for k, v in store.items()}
    exported = __import__("qwenimage_jax.checkpoints.params", fromlist=["export_tensors"]).export_tensors(
        params, _plan(), shapes)
    assert sorted(exported) == sorted(store)
    for k in store:
        np.testing.assert_array_equal(exported[k], store[k])
