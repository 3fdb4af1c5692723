"""The one training loop: restore -> per-layout compiled steps -> log, checkpoint, preemption -> export.

A trainer builds a `Task` (its initial state and the abstract state to restore into, a data iterator with
get_state/set_state, how to compile a step for a batch's layout, optionally an export) and calls `run`. The loop
owns what every trainer shares, configured by one schema (docs/configuration.md, "shared trainer keys"):

    steps, log_every, progress, on_nonfinite ("stop" | "skip"),
    checkpoint.every / checkpoint.keep / checkpoint.async_save, export (bool, or a dict with `enabled`)

so resuming, SIGTERM handling (save, then stop; the guard is held through the final save), the NaN/Inf guard
(a non-finite step never reaches the state; `training/guards.py`), the progress bar and metrics.jsonl /
TensorBoard work the same in every trainer.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable, Hashable

import jax

from qwenimage_jax.training.checkpoint import Checkpointer, PreemptionGuard
from qwenimage_jax.training.guards import NonFiniteMonitor
from qwenimage_jax.training.metrics_writer import MetricsWriter

log = logging.getLogger("qwenimage_jax.training")


@dataclasses.dataclass
class Task:
    """What a trainer plugs into `run`.

    state: the initial state, or a function returning it (called only when there is no checkpoint).
    step_for(layout) -> a compiled `(state, batch, key) -> (state, metrics)`; metrics hold "loss", "grad_norm" and
    "finite" (the step guards itself with `guards.keep_finite`). layout_of(local batch) -> a hashable layout key (one
    compiled step per key). to_global(local batch) -> the global (sharded) batch. export(state) -> a path or None.
    postfix(scalars) -> what the progress bar shows.
    """
    name: str
    state: Any
    abstract_state: Any
    data_iter: Any
    step_for: Callable[[Hashable], Callable]
    layout_of: Callable[[dict], Hashable]
    to_global: Callable[[dict], dict]
    key: Any
    export: Callable[[Any], str | None] | None = None
    postfix: Callable[[dict], dict] | None = None
    extra_scalars: Callable[[int, dict], dict] | None = None   # e.g. step time -> tokens/s, MFU


def export_enabled(config) -> bool:
    export = config.get("export", True)
    if hasattr(export, "get"):
        return bool(export.get("enabled", True))
    return bool(export)


def checkpointer(config, workdir: str) -> Checkpointer:
    c = config.checkpoint
    return Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(c.get("keep", 3)),
                        save_interval_steps=int(c.get("every", 1000)), async_save=bool(c.get("async_save", True)))


def run(task: Task, config, workdir: str, mesh=None, rules=None, process_index: int = 0) -> dict[str, Any]:
    """Trains `task` to config.steps (resuming from workdir/checkpoints); returns {"losses": {step: loss},
    "metrics": {step: scalars}, "final_step", "state", "export_dir", "skipped_steps"}."""
    import contextlib

    import flax.linen as nn

    ckpt = checkpointer(config, workdir)
    if ckpt.latest_step() is not None:
        state, step = ckpt.restore(task.abstract_state, task.data_iter)
        log.info("%s: resumed from step %d", task.name, step)
    else:  # `state` may be a function, so a resumed run never pays for a fresh init
        state, step = (task.state() if callable(task.state) else task.state), 0
    writer = MetricsWriter(workdir, console_every=int(config.log_every))
    total = int(config.steps)
    from tqdm import tqdm

    progress = tqdm(total=total, initial=step, desc=task.name, dynamic_ncols=True,
                    disable=not (process_index == 0 and config.get("progress", True)))
    monitor = NonFiniteMonitor(config.get("on_nonfinite", "stop"), ckpt)
    steps_cache: dict[Hashable, Callable] = {}
    losses: dict[int, float] = {}
    all_metrics: dict[int, dict] = {}
    mesh_ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    rules_ctx = nn.logical_axis_rules(rules) if rules is not None else contextlib.nullcontext()
    # time_budget_s: stop at a checkpoint once this call has trained that long (a run that must fit a slot of
    # machine time; the next call resumes it exactly), as a SIGTERM would
    budget, started = float(config.get("time_budget_s", 0) or 0), time.monotonic()
    # the guard stays installed through the final save: a second SIGTERM must not kill it half-written
    with PreemptionGuard() as guard, mesh_ctx, rules_ctx:
        while step < total:
            local = next(task.data_iter)
            layout = task.layout_of(local)
            if layout not in steps_cache:
                steps_cache[layout] = task.step_for(layout)
            batch = task.to_global(local)
            t0 = time.perf_counter()
            state, metrics = steps_cache[layout](state, batch, jax.random.fold_in(task.key, step))
            step += 1
            if "finite" not in metrics:
                raise KeyError(f"{task.name}: the step's metrics lack 'finite'; guard it with "
                               "training.guards.keep_finite (a NaN/Inf step must not reach the state)")
            finite = monitor.check(step, step - 1, metrics)   # one batch per step: batch index = step - 1
            if finite and (step % int(config.log_every) == 0 or step == total):
                scalars = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
                scalars["step_time_s"] = time.perf_counter() - t0
                if task.extra_scalars is not None:
                    scalars.update(task.extra_scalars(layout, scalars))
                losses[step] = scalars["loss"]
                all_metrics[step] = scalars
                writer.write_scalars(step, scalars)
                progress.set_postfix(**(task.postfix(scalars) if task.postfix else {"loss": f"{scalars['loss']:.4f}"}))
            progress.update(1)
            out_of_time = budget > 0 and time.monotonic() - started > budget
            if ckpt.save_or_stop(step, state, task.data_iter, guard.requested or out_of_time):
                break
        ckpt.finish(step, state, task.data_iter)
    writer.close()
    progress.close()
    export_dir = None
    if task.export is not None and export_enabled(config) and step >= total:
        export_dir = task.export(state)
    return {"losses": losses, "metrics": all_metrics, "final_step": step, "state": state, "export_dir": export_dir,
            "skipped_steps": monitor.skipped}
