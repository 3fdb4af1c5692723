"""Named optax schedules built from config entries: learning rates, loss weights and margins driven by the step.

A schedule is given in a config either as a number (a constant) or as a dict with a `name` and that schedule's
fields, e.g. the VAE-2.0 "strict alignment early, relaxed later" weight:

    config.losses.align_weight = dict(name="hold_then_cosine", init_value=1.0, end_value=0.1,
                                      hold_steps=2000, transition_steps=8000)

Names: constant, linear, cosine, hold_then_linear, hold_then_cosine, warmup_cosine, warmup_linear,
warmup_constant. Every schedule is an `optax.Schedule` (step -> value), jittable, and may rise or fall
(margins loosen upwards, weights decay downwards).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax.numpy as jnp
import optax

Schedule = Callable[[Any], Any]


def cosine_interpolation(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0):
    """Half-cosine from `init_value` (at `transition_begin`) to `end_value` (after `transition_steps` more steps).

    Unlike `optax.cosine_decay_schedule` it accepts init_value == 0 and rising schedules (margins).
    """
    if transition_steps <= 0:
        raise ValueError(f"transition_steps must be positive, got {transition_steps}")

    def schedule(count):
        frac = jnp.clip((count - transition_begin) / transition_steps, 0.0, 1.0)
        return end_value + (init_value - end_value) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))

    return schedule


def _constant(value: float) -> Schedule:
    return optax.constant_schedule(value)


def _linear(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    return optax.linear_schedule(init_value, end_value, transition_steps, transition_begin)


def _cosine(init_value: float, end_value: float, transition_steps: int, transition_begin: int = 0) -> Schedule:
    return cosine_interpolation(init_value, end_value, transition_steps, transition_begin)


def _hold_then(kind: str):
    def build(init_value: float, end_value: float, hold_steps: int, transition_steps: int) -> Schedule:
        second = (_linear if kind == "linear" else _cosine)(init_value, end_value, transition_steps)
        return optax.join_schedules([optax.constant_schedule(init_value), second], [hold_steps])
    return build


def _warmup(kind: str):
    def build(peak_value: float, warmup_steps: int, decay_steps: int = 1, end_value: float = 0.0,
              init_value: float = 0.0) -> Schedule:
        warmup = optax.linear_schedule(init_value, peak_value, max(warmup_steps, 1))
        if kind == "constant":
            decay = optax.constant_schedule(peak_value)
        elif kind == "linear":
            decay = optax.linear_schedule(peak_value, end_value, max(decay_steps, 1))
        else:
            decay = cosine_interpolation(peak_value, end_value, max(decay_steps, 1))
        return optax.join_schedules([warmup, decay], [warmup_steps])
    return build


SCHEDULES: dict[str, Callable[..., Schedule]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
    "hold_then_linear": _hold_then("linear"),
    "hold_then_cosine": _hold_then("cosine"),
    "warmup_constant": _warmup("constant"),
    "warmup_linear": _warmup("linear"),
    "warmup_cosine": _warmup("cosine"),
}


def make_schedule(spec: Any) -> Schedule:
    """A number -> constant schedule; a mapping with `name` + fields -> the named schedule."""
    if isinstance(spec, (int, float)):
        return optax.constant_schedule(float(spec))
    if not isinstance(spec, Mapping) and hasattr(spec, "to_dict"):
        spec = spec.to_dict()
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ValueError(f"schedule spec {spec!r} is neither a number nor a dict with a 'name'; "
                         f"use e.g. dict(name='cosine', init_value=1.0, end_value=0.1, transition_steps=1000)")
    fields = {k: v for k, v in dict(spec).items() if k != "name"}
    name = spec["name"]
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; choose from {sorted(SCHEDULES)}")
    try:
        return SCHEDULES[name](**fields)
    except TypeError as e:
        raise ValueError(f"bad fields {sorted(fields)} for schedule {name!r}: {e}") from None


def make_schedules(specs: Mapping[str, Any]) -> dict[str, Schedule]:
    """{name: spec} -> {name: schedule}, e.g. for the alignment weight and the two margins."""
    return {name: make_schedule(spec) for name, spec in dict(specs).items()}


def schedule_values(schedules: Mapping[str, Schedule], step) -> dict[str, Any]:
    """{name: value at `step`}; used inside the train step so the logged value is the one the loss used."""
    return {name: jnp.asarray(fn(step), jnp.float32) for name, fn in schedules.items()}
