"""Persistent XLA compilation cache: compiled programs are written to a directory (a local path, or a bucket such
as gs://... that JAX's file cache can reach), so a later process with the same shapes loads them instead of
compiling again (minutes for the 7B sampler or a train step).

    qwenimage-jax sample --compilation-cache ~/.cache/qwenimage-jax/xla ...   # also train-dit/-vae/-lora, distill
    JAX_COMPILATION_CACHE_DIR=DIR qwenimage-jax sample ...                     # the same from the environment
    enable_compilation_cache("DIR")                                            # notebooks and scripts
"""
from __future__ import annotations

import os

import jax

ENV = "JAX_COMPILATION_CACHE_DIR"  # JAX's own variable: honoured here too, with our thresholds


def enable_compilation_cache(path: str | None = None, min_compile_secs: float = 0.0) -> str | None:
    """Caches every program compiled from now on under `path` (else $JAX_COMPILATION_CACHE_DIR); returns the
    directory, or None when neither names one. Call it before anything compiles.

    min_compile_secs: programs that compiled faster are not written. JAX's default (1 s) would skip the small
    programs of a tiny model or a CPU run, so the default here caches everything (entries of any size)."""
    path = path or os.environ.get(ENV) or None
    if path is None:
        return None
    if "://" not in path:
        path = os.path.abspath(os.path.expanduser(path))
        os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_secs))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)  # -1: no size limit, no override
    from jax.experimental.compilation_cache import compilation_cache

    # a program compiled before this call would have settled "no cache" for the whole process
    compilation_cache.reset_cache()
    return path
