"""Load a `get_config()` file and apply `--config.key=value` overrides (big_vision style, without absl).

    config = load_config("configs/dit_train_tiny.py", ["--config.steps=200", "--config.optimizer.learning_rate=3e-4"])

A config path may carry an argument after a colon (`configs/x.py:1b`), passed to `get_config(arg)`. Override values
are parsed with `ast.literal_eval` when possible (numbers, bools, tuples, lists, None) and otherwise kept as strings;
an override of an unknown key is an error that lists the close matches.
"""
from __future__ import annotations

import ast
import difflib
import importlib.util
import os
from typing import Sequence

import ml_collections


def _import_file(path: str):
    if not os.path.exists(path):
        raise FileNotFoundError(f"config file {path!r} not found")
    spec = importlib.util.spec_from_file_location(f"_qij_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{path} has no get_config() function")
    return module


def _flat_keys(config, prefix="") -> list[str]:
    keys = []
    for k, v in config.items():
        name = f"{prefix}{k}"
        keys.append(name)
        if isinstance(v, (ml_collections.ConfigDict, dict)):
            keys.extend(_flat_keys(v, name + "."))
    return keys


def parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        return text


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    known = _flat_keys(config)
    for item in overrides:
        if not item.startswith("--config."):
            raise ValueError(f"override {item!r} must look like --config.key=value")
        key, sep, value = item[len("--config."):].partition("=")
        if not sep:
            raise ValueError(f"override {item!r} has no '=value'")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            raise KeyError(f"unknown config key {key!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
        *parents, leaf = key.split(".")
        node = config
        for p in parents:
            node = node[p]
        new = parse_value(value)
        old = node[leaf]
        if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
            new = float(new)
        if isinstance(old, tuple) and isinstance(new, list):
            new = tuple(new)
        with config.unlocked() if hasattr(config, "unlocked") else _null():
            node[leaf] = new
    return config


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    path, _, arg = path.partition(":")
    module = _import_file(path)
    config = module.get_config(arg) if arg else module.get_config()
    return apply_overrides(config, overrides)


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.x=y` items from the other command-line arguments."""
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return overrides, rest
