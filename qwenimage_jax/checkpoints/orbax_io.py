"""Our own checkpoint format for a converted component: `config.json` + an Orbax params tree.

Layout of a converted directory:
    DST/config.json          the component's reference config, plus "_qwenimage_jax": {"component": ..., "format": 1}
    DST/params/              Orbax StandardCheckpointer tree (restores straight into target shardings)

`load_vae`, `load_transformer` and `load_text_encoder` accept either a diffusers/transformers directory or this.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax

from qwenimage_jax.checkpoints.safetensors_io import WeightFileError

MARKER = "_qwenimage_jax"


def is_orbax_component(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not (os.path.isdir(os.path.join(path, "params")) and os.path.exists(cfg)):
        return False
    from qwenimage_jax.checkpoints.safetensors_io import read_json_file

    return MARKER in read_json_file(cfg, "config.json")


def save_component(dst: str, params: Any, config: dict, component: str) -> str:
    """Writes config + params (any pytree of arrays) to `dst`; refuses to overwrite an existing params dir."""
    import orbax.checkpoint as ocp

    dst = os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    params_dir = os.path.join(dst, "params")
    if os.path.exists(params_dir):
        raise FileExistsError(f"{params_dir} already exists; choose an empty destination")
    config = dict(config)
    config[MARKER] = {"component": component, "format": FORMAT}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, params)
    checkpointer.wait_until_finished()
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return dst


FORMAT = 1


def load_component_config(path: str, component: str) -> dict:
    """The reference config of a converted directory, checked to be a `component` in our current format."""
    from qwenimage_jax.checkpoints.safetensors_io import read_json_file

    file = os.path.join(path, "config.json")
    config = read_json_file(file, "config.json")
    marker = config.pop(MARKER, None)
    if not isinstance(marker, dict):
        raise WeightFileError(f"{file}: field {MARKER!r} is {marker!r}, not an object; the directory was not "
                              "written by `qwenimage-jax convert`: convert the diffusers component again")
    found = marker.get("component")
    if found != component:
        raise WeightFileError(f"{file}: {MARKER}.component is {found!r}, so {path!r} holds a {found!r} "
                              f"checkpoint, not a {component!r} one; point at the model's {component}/ directory")
    if marker.get("format") != FORMAT:
        raise WeightFileError(f"{file}: {MARKER}.format is {marker.get('format')!r} but this version reads format "
                              f"{FORMAT}; convert the diffusers component again with this version's "
                              "`qwenimage-jax convert`")
    return config


def restore_params(path: str, abstract_params: Any, shardings: Any = None) -> Any:
    """Restores `path/params` into the structure (and shardings, if given) of `abstract_params`.

    The stored tree is checked against the target first: an Orbax directory written for another layout (leaf
    names or shapes of an older version of the model code) is one error listing the differences."""
    import orbax.checkpoint as ocp

    params_dir = os.path.join(os.path.abspath(path), "params")
    checkpointer = ocp.StandardCheckpointer()
    _check_stored_tree(params_dir, checkpointer, abstract_params)
    if shardings is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_params, shardings)
    else:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
    return checkpointer.restore(params_dir, target)


def _paths(tree) -> dict[str, tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


def _check_stored_tree(params_dir: str, checkpointer, abstract_params: Any) -> None:
    try:
        metadata = checkpointer.metadata(params_dir)
    except Exception as e:  # noqa: BLE001 - any unreadable metadata means the same thing to the user
        raise WeightFileError(f"{params_dir} is not a readable Orbax checkpoint ({type(e).__name__}: {e}); convert the "
                              "diffusers component again with `qwenimage-jax convert`") from None
    tree = getattr(getattr(metadata, "item_metadata", metadata), "tree", None)
    if tree is None:
        return
    stored, wanted = _paths(tree), _paths(abstract_params)
    problems = []
    missing, extra = sorted(set(wanted) - set(stored)), sorted(set(stored) - set(wanted))
    if missing:
        problems.append(f"{len(missing)} leaf/leaves the model needs are absent: {', '.join(missing[:10])}")
    if extra:
        problems.append(f"{len(extra)} stored leaf/leaves the model does not have: {', '.join(extra[:10])}")
    shapes = [f"{k}: stored {stored[k]}, model {wanted[k]}" for k in sorted(set(stored) & set(wanted))
              if stored[k] != wanted[k]]
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): {'; '.join(shapes[:10])}")
    if problems:
        raise WeightFileError(f"{params_dir} does not match this model's parameter layout (an Orbax directory from an "
                              "older version, or its config.json was edited):\n  - " + "\n  - ".join(problems)
                              + "\nconvert the diffusers component again with `qwenimage-jax convert`")
