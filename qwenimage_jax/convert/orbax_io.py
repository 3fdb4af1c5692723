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

MARKER = "_qwenimage_jax"


def is_orbax_component(path: str) -> bool:
    cfg = os.path.join(path, "config.json")
    if not (os.path.isdir(os.path.join(path, "params")) and os.path.exists(cfg)):
        return False
    with open(cfg, encoding="utf-8") as f:
        return MARKER in json.load(f)


def save_component(dst: str, params: Any, config: dict, component: str) -> str:
    """Writes config + params (any pytree of arrays) to `dst`; refuses to overwrite an existing params dir."""
    import orbax.checkpoint as ocp

    dst = os.path.abspath(dst)
    os.makedirs(dst, exist_ok=True)
    params_dir = os.path.join(dst, "params")
    if os.path.exists(params_dir):
        raise FileExistsError(f"{params_dir} already exists; choose an empty destination")
    config = dict(config)
    config[MARKER] = {"component": component, "format": 1}
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(params_dir, params)
    checkpointer.wait_until_finished()
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    return dst


def load_component_config(path: str, component: str) -> dict:
    with open(os.path.join(path, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    found = config.pop(MARKER, {}).get("component")
    if found != component:
        raise ValueError(f"{path!r} holds a {found!r} checkpoint, not a {component!r} one")
    return config


def restore_params(path: str, abstract_params: Any, shardings: Any = None) -> Any:
    """Restores `path/params` into the structure (and shardings, if given) of `abstract_params`."""
    import orbax.checkpoint as ocp

    if shardings is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              abstract_params, shardings)
    else:
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), abstract_params)
    return ocp.StandardCheckpointer().restore(os.path.join(os.path.abspath(path), "params"), target)
