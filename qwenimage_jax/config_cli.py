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

from qwenimage_jax.errors import ConfigError


class ConfigNotFoundError(ConfigError, FileNotFoundError):
    """The config file given to --config does not exist."""


class ConfigKeyError(ConfigError, KeyError):
    """An override names a key the config does not have."""

    def __str__(self):  # KeyError's str() would wrap the whole sentence in quotes
        return str(self.args[0]) if self.args else ""


class ConfigValueError(ConfigError, ValueError):
    """An override that is malformed or whose value does not fit the field's type."""


def _import_file(path: str):
    if not os.path.exists(path):
        raise ConfigNotFoundError(f"config file {path!r} not found; pass a configs/<name>.py file (optionally "
                                  "configs/<name>.py:arg)")
    spec = importlib.util.spec_from_file_location(f"_qij_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's file, not our code: name it and what Python said about it
        raise ConfigError(f"config file {path} could not be run: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config() function; a config file defines get_config(arg=None) "
                          "returning an ml_collections.ConfigDict")
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
            raise ConfigValueError(f"override {item!r} must look like --config.key=value")
        key, sep, value = item[len("--config."):].partition("=")
        if not sep:
            raise ConfigValueError(f"override {item!r} has no '=value'; write {item}=VALUE")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            raise ConfigKeyError(f"unknown config key {key!r}"
                                 + (f"; did you mean {', '.join(close)}?" if close
                                    else "; check the field names in the config file"))
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
        try:
            with config.unlocked() if hasattr(config, "unlocked") else _null():
                node[leaf] = new
        except TypeError:  # ml_collections refuses a value of another type than the field's
            raise ConfigValueError(f"{item}: the field {key} takes a {type(old).__name__} (it is {old!r}), not "
                                   f"{value!r}") from None
    return config


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def load_config(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    path, _, arg = path.partition(":")
    module = _import_file(path)
    try:
        config = module.get_config(arg) if arg else module.get_config()
    except Exception as e:  # e.g. an unknown preset name after the colon: the user's file, so name it
        call = f"get_config({arg!r})" if arg else "get_config()"
        raise ConfigError(f"{path}: {call} failed: {type(e).__name__}: {e}") from e
    return apply_overrides(config, overrides)


def split_config_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """Separates `--config.x=y` items from the other command-line arguments."""
    overrides = [a for a in argv if a.startswith("--config.")]
    rest = [a for a in argv if not a.startswith("--config.")]
    return overrides, rest


def require_data_path(config: ml_collections.ConfigDict) -> None:
    """A trainer's cached-latent dataset must be named: ConfigError naming the key and the fix when it is empty."""
    if not config.data.path:
        raise ConfigError("config.data.path is empty: point it at a dataset written by `qwenimage-jax "
                          "cache-latents` (--config.data.path=DIR)")
