"""Non-finite loss / gradient handling shared by the trainers (docs/reliability.md).

Inside the jitted step, `keep_finite(old, new, loss, grad_norm)` returns the old state when the loss or the gradient
norm is NaN/Inf, so a bad batch never reaches the parameters, the optimizer moments or a checkpoint. On the host,
`NonFiniteMonitor.check` reads the step's flag (one scalar per step) and, as `config.on_nonfinite` says, either
stops with an error naming the step, the batch index and the last complete checkpoint ("stop", the default) or
logs, counts and goes on ("skip"; the step's update was not applied) until `config.nonfinite_in_a_row` (default
`MAX_IN_A_ROW`, 10) steps in a row were non-finite: then the run stops the same way, naming that step (a run whose
every step is skipped trains nothing). `NonFiniteMonitor.from_config(config, checkpointer)` builds the monitor from
those two shared trainer keys; every trainer calls it.
"""
from __future__ import annotations

import logging
import numbers
from typing import Any

import jax
import jax.numpy as jnp

from qwenimage_jax.errors import TrainingError

log = logging.getLogger("qwenimage_jax.training")

MODES = ("stop", "skip")
# "skip" stops a run after this many non-finite steps in a row (the default of config.nonfinite_in_a_row): past a
# few, the cause is not one bad batch but the learning rate, the data or the weights, and skipping on would only
# burn the machine time.
MAX_IN_A_ROW = 10
IN_A_ROW_KEY = "nonfinite_in_a_row"


def keep_finite(old_state: Any, new_state: Any, loss, grad_norm) -> tuple[Any, jax.Array]:
    """(new_state if loss and grad_norm are finite else old_state, finite flag ()). Call inside the jitted step."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new_state, old_state), finite


class NonFiniteError(TrainingError, FloatingPointError):
    """The loss or the gradients became NaN/Inf and the run was configured to stop."""


class NonFiniteMonitor:
    """Host side: `check(step, batch_index, metrics)` after every step; `skipped` lists the skipped steps."""

    def __init__(self, mode: str, checkpointer=None, what: str = "loss", max_in_a_row: int | None = None):
        if mode not in MODES:
            raise ValueError(f"on_nonfinite={mode!r}; choose one of {MODES}")
        self.mode, self.checkpointer, self.what = mode, checkpointer, what
        limit = MAX_IN_A_ROW if max_in_a_row is None else max_in_a_row
        if isinstance(limit, bool) or not isinstance(limit, numbers.Integral) or limit < 1:
            raise ValueError(f"{IN_A_ROW_KEY}={limit!r}; pass a whole number of steps >= 1 (how many non-finite "
                             f"steps in a row stop a run with on_nonfinite=skip; default {MAX_IN_A_ROW})")
        self.max_in_a_row = int(limit)
        self.skipped: list[int] = []
        self.in_a_row = 0

    @classmethod
    def from_config(cls, config, checkpointer=None, what: str = "loss") -> "NonFiniteMonitor":
        """The monitor the shared trainer keys `on_nonfinite` (default "stop") and `nonfinite_in_a_row` (default
        MAX_IN_A_ROW) describe; configs without them keep the defaults."""
        return cls(config.get("on_nonfinite", "stop"), checkpointer, what, max_in_a_row=config.get(IN_A_ROW_KEY))

    def check(self, step: int, batch_index: int, metrics: dict) -> bool:
        """True when the step was finite. `metrics` holds device scalars `finite`, `loss` and `grad_norm`."""
        if bool(jax.device_get(metrics["finite"])):
            self.in_a_row = 0
            return True
        loss, grad = (float(jax.device_get(metrics[k])) for k in ("loss", "grad_norm"))
        where = f"step {step} (data batch {batch_index}, counted from 0 at the start of the data stream)"
        self.in_a_row += 1
        if self.mode == "skip" and self.in_a_row < self.max_in_a_row:
            self.skipped.append(step)
            log.warning("non-finite %s %s / gradient norm %s at %s: update skipped (%d skipped so far)", self.what,
                        loss, grad, where, len(self.skipped))
            return False
        if self.mode == "skip":
            where += (f", {self.in_a_row} non-finite steps in a row (steps {step - self.in_a_row + 1} to {step}; "
                      f"{len(self.skipped)} skipped in all)")
        last = "no checkpoint yet"
        if self.checkpointer is not None:
            self.checkpointer.wait()
            steps = self.checkpointer.complete_steps()
            if steps:
                last = f"step {steps[-1]} in {self.checkpointer.directory}"
        fix = ("pass --config.on_nonfinite=skip to skip such steps" if self.mode == "stop" else
               "skipping does not help when step after step is non-finite")
        raise NonFiniteError(f"non-finite {self.what} {loss} / gradient norm {grad} at {where}; the update was not "
                             f"applied. Last good checkpoint: {last}. Lower the learning rate or check that batch "
                             f"of the data for NaN/Inf; {fix}")
