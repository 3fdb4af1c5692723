"""Argument checks of the sampling pipeline: every hostile input becomes one ValueError naming the argument and the
fix (docs/reliability.md lists them), before any noise is drawn or any program compiled.

    check_prompts(prompt, "prompt")                  str or a non-empty list of str
    check_finite(latents, "latents")                 no NaN/Inf in caller-supplied arrays
    check_guidance(true_cfg_scale)                   a finite number
    resolve_steps(num_inference_steps, sigmas, model_grid) -> (num_steps | None, grid | None)
"""
from __future__ import annotations

import numbers
import warnings
from typing import Sequence

import numpy as np

MAX_STEPS = 1000     # one step per training timestep of the flow-matching schedule (num_train_timesteps)


def check_prompts(prompt, name: str = "prompt") -> None:
    """`prompt` is None, a string, or a non-empty list/tuple of strings."""
    if prompt is None or isinstance(prompt, str):
        return
    if not isinstance(prompt, (list, tuple)):
        raise ValueError(f"`{name}` must be a string or a list of strings, got {type(prompt).__name__}")
    if not prompt:
        raise ValueError(f"`{name}` is an empty list; pass at least one prompt (use \"\" for an empty prompt)")
    bad = [i for i, p in enumerate(prompt) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"`{name}`[{bad[0]}] is {prompt[bad[0]]!r}, not a string ({len(bad)} of {len(prompt)} "
                         "entries); use \"\" for an empty prompt")


def check_finite(x, name: str) -> None:
    """Raises when a caller-supplied array (numpy, jax or torch) holds NaN or Inf."""
    if x is None:
        return
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy()
    values = np.asarray(x)
    if values.dtype.kind not in "fc" and values.dtype.name != "bfloat16":
        return
    finite = np.isfinite(values.astype(np.float32))
    if not finite.all():
        first = np.unravel_index(int(np.argmin(finite)), finite.shape)
        raise ValueError(f"`{name}` holds {int(finite.size - finite.sum())} NaN/Inf value(s) (first at index "
                         f"{tuple(int(i) for i in first)}); sampling from them gives NaN images: pass finite values")


def check_guidance(true_cfg_scale) -> None:
    if not isinstance(true_cfg_scale, numbers.Real) or not np.isfinite(float(true_cfg_scale)):
        raise ValueError(f"true_cfg_scale={true_cfg_scale!r}; pass a finite number (1 = no guidance, ~4 typical)")


def resolve_steps(num_inference_steps, sigmas: Sequence[float] | None, model_grid: Sequence[float] | None):
    """(num_steps, grid) for `scheduler.flow_match_sigmas`: exactly one of them is not None.

    Order: explicit `sigmas`; else the model's own grid (model_index.json `sample_sigmas`, a distilled model) when
    `num_inference_steps` is None or equals its length; else `num_inference_steps` (default 40) on the generic
    schedule, with a warning when that departs from the model's own grid.
    """
    if num_inference_steps is not None:
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, numbers.Integral):
            raise ValueError(f"num_inference_steps={num_inference_steps!r}; pass a whole number of steps")
        n = int(num_inference_steps)
        if not 1 <= n <= MAX_STEPS:
            raise ValueError(f"num_inference_steps={n}; use 1 to {MAX_STEPS} steps (40 is the usual value; leave it "
                             "unset to run a distilled model's own grid)")
    if sigmas is not None:
        count = len(np.asarray(sigmas, dtype=np.float64).reshape(-1))
        if count > MAX_STEPS:
            raise ValueError(f"sigmas has {count} entries; use at most {MAX_STEPS}")
        if num_inference_steps is not None and int(num_inference_steps) != count:
            raise ValueError(f"num_inference_steps={num_inference_steps} but sigmas has {count} entries; pass one "
                             "of them (the sigma grid sets the step count)")
        return None, sigmas
    if model_grid is not None:
        if num_inference_steps is None or int(num_inference_steps) == len(model_grid):
            return None, model_grid
        warnings.warn(f"this model ships its own {len(model_grid)}-step grid (model_index.json sample_sigmas, a "
                      f"distilled model); running {num_inference_steps} steps of the generic schedule instead, "
                      "which the model was not trained for", stacklevel=3)
    return (40 if num_inference_steps is None else int(num_inference_steps)), None
