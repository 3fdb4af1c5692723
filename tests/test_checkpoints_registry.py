"""The component registry (`qwenimage_jax.checkpoints`): one `load` / `export` for every kind, export derived from
the key plans, and models/ importing no checkpoint code."""
import ast
import json
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenimage_jax import checkpoints
from qwenimage_jax.checkpoints.dit import dit_plan
from qwenimage_jax.checkpoints.params import WeightKeyError, WeightSpec, export_tensors, iter_export_tensors
from qwenimage_jax.models.component import Component
from qwenimage_jax.models.dit import Transformer, init_transformer

PACKAGE = pathlib.Path(checkpoints.__file__).resolve().parents[1]
CONFIG = dict(patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16,
              num_attention_heads=2, context_in_dim=24, mlp_ratio=3, axes_dims_rope=(4, 6, 6))


@pytest.fixture(scope="module")
def dit():
    model = init_transformer(CONFIG, jax.random.key(0))
    leaves, tree = jax.tree.flatten(model.params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    # away from init (norm scales are all ones there), so a transposed or swapped leaf would show
    model.params = jax.tree.unflatten(tree, [x + jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    return model


def _imports(file: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_models_import_no_checkpoint_code():
    offenders = {str(f.relative_to(PACKAGE)): sorted(n for n in _imports(f)
                                                       if n.startswith(("qwenimage_jax.checkpoints",
                                                                        "qwenimage_jax.convert")))
                 for f in (PACKAGE / "models").rglob("*.py")}
    assert {f: names for f, names in offenders.items() if names} == {}
    assert not (PACKAGE / "convert").exists()


def test_unknown_kind_and_format_name_the_choices(tmp_path):
    with pytest.raises(ValueError, match="unknown component kind 'unet'; choose one of vae, transformer"):
        checkpoints.load("unet", str(tmp_path))
    with pytest.raises(ValueError, match="format='safetensors'; use one of reference, orbax"):
        checkpoints.export("vae", {}, {}, str(tmp_path), format="safetensors")
    with pytest.raises(ValueError, match="dinov2 has no reference-format exporter.*format='orbax'"):
        checkpoints.export("dinov2", {}, {}, str(tmp_path))


def test_transformer_round_trips_through_both_formats(dit, tmp_path):
    reference = checkpoints.export("transformer", dit.params, dit.dit_config, str(tmp_path / "diffusers"))
    orbax = checkpoints.export("transformer", dit.params, dit.dit_config, str(tmp_path / "orbax"), format="orbax")
    assert os.path.exists(os.path.join(reference, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(orbax, "config.json")) as f:
        assert json.load(f)["_qwenimage_jax"]["component"] == "transformer"
    for path in (reference, orbax):
        back = checkpoints.load("transformer", path)
        assert isinstance(back, Transformer) and isinstance(back, Component)
        assert back.model_config == dit.dit_config
        for (key, a), b in zip(jax.tree_util.tree_flatten_with_path(dit.params)[0], jax.tree.leaves(back.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=f"{path}: {jax.tree_util.keystr(key)}")


def test_plan_reference_shapes_agree_with_the_torch_layout(dit):
    """Exporting with the plan's own reference shapes gives what exporting with explicit torch shapes gives:
    torch Linear (out, in) for every kernel, heads merged back into one axis, one tensor per block."""
    plan = dit_plan(dit.dit_config)
    derived = export_tensors(dit.params, plan)
    inner, embed = 2 * 16, dit.dit_config.inner_dim
    assert derived["transformer_blocks.1.attn.to_q.weight"].shape == (inner, embed)
    assert derived["transformer_blocks.0.attn.to_out.0.weight"].shape == (embed, inner)
    assert derived["img_in.weight"].shape == (embed, 8)
    explicit = export_tensors(dit.params, plan, {k: v.shape for k, v in derived.items()})
    assert derived.keys() == explicit.keys() == {k for spec in plan.values() for k in spec.keys}
    for key in derived:
        np.testing.assert_array_equal(derived[key], explicit[key], err_msg=key)
    q = np.asarray(dit.params["blocks"]["attn"]["to_q"]["kernel"][1]).reshape(embed, inner).T
    np.testing.assert_array_equal(derived["transformer_blocks.1.attn.to_q.weight"], q)


def test_export_casts_floats_on_the_way_out(dit):
    tensors = dict(iter_export_tensors(dit.params, dit_plan(dit.dit_config), dtype=jnp.bfloat16))
    assert {v.dtype for v in tensors.values()} == {np.dtype(jnp.bfloat16)}


def test_a_spec_without_reference_shapes_needs_torch_shapes():
    plan = {("w",): WeightSpec(("w.weight",), lambda a: a[0] * 1)}
    with pytest.raises(WeightKeyError, match="cannot tell the reference shapes of w.weight"):
        export_tensors({"w": np.zeros((2, 3), np.float32)}, plan)
    out = export_tensors({"w": np.arange(6, dtype=np.float32).reshape(2, 3)}, plan, {"w.weight": (2, 3)})
    np.testing.assert_array_equal(out["w.weight"], np.arange(6).reshape(2, 3))


def test_load_under_a_mesh_places_every_kind_by_the_rules(dit, tmp_path):
    from qwenimage_jax.models.dit import param_shardings
    from qwenimage_jax.parallel.mesh import make_mesh

    mesh = make_mesh(fsdp=4, tensor=2)
    path = checkpoints.export("transformer", dit.params, dit.dit_config, str(tmp_path / "orbax"), format="orbax")
    loaded = checkpoints.load("transformer", path, mesh=mesh)
    want = param_shardings(dit.dit_config, mesh)
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(want)):
        assert a.sharding == b
