"""Reliability matrix, weights rows (docs/reliability.md): broken, mismatched or foreign component directories give
one error naming the file, the tensor or field, and the fix, and leave nothing loaded."""
import gc
import json
import os
import shutil

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

from qwenimage_jax.checkpoints.params import WeightKeyError
from qwenimage_jax.checkpoints.safetensors_io import SafetensorsReader, WeightFileError
from qwenimage_jax.checkpoints import load_transformer
from qwenimage_jax.checkpoints import load_vae

WEIGHTS = "diffusion_pytorch_model.safetensors"
TINY_WORLD = os.path.join(os.path.dirname(__file__), "..", "qwenimage_jax", "assets", "tiny_world")


def tiny_world_path():
    return os.path.abspath(TINY_WORLD)


@pytest.fixture(scope="module")
def tensors():
    reader = SafetensorsReader(os.path.join(tiny_world_path(), "transformer"))
    return {k: np.array(v) for k, v in reader.items()}


@pytest.fixture
def component(tmp_path):
    """A writable copy of the tiny world's transformer/ directory."""
    dst = tmp_path / "transformer"
    shutil.copytree(os.path.join(tiny_world_path(), "transformer"), dst)
    return dst


def _live():
    gc.collect()
    return len(jax.live_arrays())


def _fails(path, error, *patterns, loader=load_transformer):
    """Loading raises `error` whose message contains every pattern, and no array stays allocated."""
    before = _live()
    with pytest.raises(error) as info:
        loader(str(path))
    message = str(info.value)
    for pattern in patterns:
        assert pattern in message, f"{pattern!r} not in: {message}"
    del info
    assert _live() == before, "a failed load left arrays allocated"
    return message


def test_truncated_header(component):
    file = component / WEIGHTS
    file.write_bytes(file.read_bytes()[:200])
    _fails(component, WeightFileError, str(file), "truncated", "re-download")


def test_corrupt_header_json(component):
    file = component / WEIGHTS
    raw = bytearray(file.read_bytes())
    raw[8:40] = b"\xff" * 32
    file.write_bytes(bytes(raw))
    _fails(component, WeightFileError, str(file), "header is not valid JSON", "re-download")


def test_truncated_data_names_the_tensor(component):
    file = component / WEIGHTS
    file.write_bytes(file.read_bytes()[:-4096])
    message = _fails(component, WeightFileError, str(file), "truncated", "tensor '")
    assert "ends at byte" in message


def test_corrupt_data_nan_names_the_tensor(component, tensors):
    bad = dict(tensors)
    key = "transformer_blocks.3.img_mlp.proj.weight"
    bad[key] = bad[key].copy()
    bad[key][0, :5] = np.nan
    save_file(bad, str(component / WEIGHTS))
    _fails(component, WeightKeyError, key, "NaN/Inf", "corrupt")


def _shard(component, tensors):
    """Rewrites the component as two shards + index; returns the shard names."""
    os.remove(component / WEIGHTS)
    keys = sorted(tensors)
    names = [f"diffusion_pytorch_model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    halves = [keys[:len(keys) // 2], keys[len(keys) // 2:]]
    weight_map = {}
    for name, part in zip(names, halves):
        save_file({k: tensors[k] for k in part}, str(component / name))
        weight_map.update({k: name for k in part})
    (component / f"{WEIGHTS}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return names, weight_map


def test_sharded_copy_loads(component, tensors):
    _shard(component, tensors)
    assert load_transformer(str(component)).dit_config.num_layers == 6


def test_missing_shard_listed_in_the_index(component, tensors):
    names, _ = _shard(component, tensors)
    os.remove(component / names[1])
    _fails(component, FileNotFoundError, f"{WEIGHTS}.index.json", names[1], "download the missing shard")


def test_index_naming_a_tensor_absent_from_its_shard(component, tensors):
    names, weight_map = _shard(component, tensors)
    key = next(k for k, v in weight_map.items() if v == names[0])
    weight_map[key] = names[1]                       # the index says shard 2, the tensor is in shard 1
    weight_map["transformer_blocks.9.attn.to_q.weight"] = names[0]    # and a tensor that exists nowhere
    (component / f"{WEIGHTS}.index.json").write_text(json.dumps({"weight_map": weight_map}))
    _fails(component, WeightFileError, "names 2 tensor(s) that are not in the shard", key,
           "transformer_blocks.9.attn.to_q.weight")


def test_malformed_index(component, tensors):
    _shard(component, tensors)
    (component / f"{WEIGHTS}.index.json").write_text('{"weight_map": {"a": ')
    _fails(component, WeightFileError, f"{WEIGHTS}.index.json", "not valid JSON", "line 1")


def test_integer_tensor_is_an_error_and_fp16_a_conversion(component, tensors):
    key = "img_in.weight"
    save_file(dict(tensors, **{key: tensors[key].astype(np.int32)}), str(component / WEIGHTS))
    _fails(component, WeightKeyError, key, "int32", "not floating point")
    save_file({k: v.astype(np.float16) for k, v in tensors.items()}, str(component / WEIGHTS))
    loaded = load_transformer(str(component))                 # documented: any float dtype is cast on load
    kernel = np.asarray(loaded.params["img_in"]["kernel"])
    assert kernel.dtype == np.float32
    np.testing.assert_allclose(kernel, tensors[key].astype(np.float16).astype(np.float32).T)


def test_missing_and_malformed_config(component):
    os.rename(component / "config.json", component / "config.bak")
    _fails(component, FileNotFoundError, "no config.json", str(component))
    (component / "config.json").write_text('{"num_layers": 6,\n "attention_head_dim": }')
    _fails(component, WeightFileError, str(component / "config.json"), "line 2", "not valid JSON")


def test_config_contradicting_the_tensors(component):
    config = json.loads((component / "config.json").read_text())
    (component / "config.json").write_text(json.dumps(dict(config, num_layers=5)))
    _fails(component, WeightKeyError, "unexpected key(s)", "transformer_blocks.5.", "config.json")
    (component / "config.json").write_text(json.dumps(dict(config, mlp_ratio=2)))
    _fails(component, WeightKeyError, "shape mismatch", "blocks/mlp/proj/kernel", "config.json")


def test_wrong_component():
    root = tiny_world_path()
    _fails(os.path.join(root, "vae"), ValueError, "AutoencoderKLQwenImage21", "transformer/")
    _fails(os.path.join(root, "text_encoder"), ValueError, "qwen3_vl", "transformer/")
    _fails(os.path.join(root, "transformer"), ValueError, "QwenImage21Transformer2DModel",
           "AutoencoderKLQwenImage21", loader=load_vae)


def test_orbax_directory_from_an_older_layout(tmp_path):
    from qwenimage_jax.checkpoints.orbax_io import MARKER, save_component

    loaded = load_transformer(os.path.join(tiny_world_path(), "transformer"))
    params = jax.device_get(loaded.params)
    # an older layout: per-layer blocks instead of one stacked `blocks` tree
    old = {k: v for k, v in params.items() if k != "blocks"}
    old.update({f"blocks_{i}": jax.tree.map(lambda a, i=i: a[i], params["blocks"]) for i in range(2)})
    save_component(str(tmp_path / "old"), old, loaded.config, "transformer")
    _fails(tmp_path / "old", ValueError, "does not match this model's parameter layout", "blocks_0",
           "blocks/attn/to_q/kernel", "qwenimage-jax convert")

    save_component(str(tmp_path / "v0"), params, loaded.config, "transformer")
    config = json.loads((tmp_path / "v0" / "config.json").read_text())
    config[MARKER]["format"] = 0
    (tmp_path / "v0" / "config.json").write_text(json.dumps(config))
    _fails(tmp_path / "v0", ValueError, f"{MARKER}.format is 0", "qwenimage-jax convert")
    config[MARKER] = {"component": "vae", "format": 1}
    (tmp_path / "v0" / "config.json").write_text(json.dumps(config))
    _fails(tmp_path / "v0", ValueError, "holds a 'vae' checkpoint", "transformer/")
