"""The one training loop: restore -> per-layout compiled steps -> log, checkpoint, preemption -> export.

A trainer builds a `Task` (its initial state and the abstract state to restore into, a data iterator with
get_state/set_state, how to compile a step for a batch's layout, optionally an export) and calls `run`. The loop
owns what every trainer shares, configured by one schema (docs/configuration.md, "shared trainer keys"):

    steps, log_every, progress, on_nonfinite ("stop" | "skip"), nonfinite_in_a_row (default 10),
    checkpoint.every / checkpoint.keep / checkpoint.async_save, export (bool, or a dict with `enabled`)

so resuming, SIGTERM handling (save, then stop; the guard is held through the final save), the NaN/Inf guard
(a non-finite step never reaches the state; `training/guards.py`), the progress bar and metrics.jsonl /
TensorBoard work the same in every trainer.

No host stall per step: the loop dispatches step N, then reads step N-1's finite flag (by then the device has step
N queued), so the host waits on the device only at log steps, checkpoint steps, a stop request, the first step of
a call and the last step. Non-finite steps are handled as `NonFiniteMonitor` says (skipped and counted, too many
in a row or any one under "stop" ending the run with the step and its batch named), each at most one step later
and always before a checkpoint could be written after it. The
next global batches (`data_iter` -> `layout_of` -> `to_global`) are made on a background thread
(`training/prefetch.py`: bounded queue, the iterator's order, joined on any exit); checkpoints record the data
iterator's state after the last batch a step used, so batches read ahead are read again on resume. `to_global`
therefore runs on that thread and must not start collectives. Two optional config keys restore the old
behaviour, for measurements (bench/train_bench.py --loop): `prefetch_batches` (default 2; 0 = read each batch in
the loop) and `sync_every_step` (default False; True = read every step's flag right after it).
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
from qwenimage_jax.training.prefetch import BatchPrefetcher

log = logging.getLogger("qwenimage_jax.training")

PREFETCH_BATCHES = 2   # global batches made ahead on the prefetch thread (config key prefetch_batches)


@dataclasses.dataclass
class Task:
    """What a trainer plugs into `run`.

    state: the initial state, or a function returning it (called only when there is no checkpoint).
    step_for(layout) -> a compiled `(state, batch, key) -> (state, metrics)`; metrics hold "loss", "grad_norm" and
    "finite" (the step guards itself with `guards.keep_finite`). layout_of(local batch) -> a hashable layout key (one
    compiled step per key). to_global(local batch) -> the global (sharded) batch. export(state) -> a path or None.
    postfix(scalars) -> what the progress bar shows. warm_batches() -> one local batch per layout the data holds and
    compile_step(layout, local batch, state) -> the compiled step for it: given both, every layout is compiled
    before the first step (config key compile_at_start, default on) rather than when its bucket first comes up.
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
    warm_batches: Callable[[], list[dict]] | None = None
    compile_step: Callable[[Hashable, dict, Any], Callable] | None = None


def compile_layouts(task: Task, state, steps_cache: dict) -> None:
    """Compiles `task`'s step for every layout of its warm batches into `steps_cache` (a multi-layout dataset then
    never stops mid-run for a compile, and every host compiles the same layouts in the same order)."""
    if task.warm_batches is None or task.compile_step is None:
        return
    started = time.perf_counter()
    for local in task.warm_batches():
        layout = task.layout_of(local)
        if layout not in steps_cache:
            steps_cache[layout] = task.compile_step(layout, local, state)
    log.info("%s: compiled the step for %d layout(s) in %.1f s", task.name, len(steps_cache),
             time.perf_counter() - started)


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
    "metrics": {step: scalars}, "start_step" (the step resumed from, 0 for a fresh run), "final_step", "state",
    "export_dir", "skipped_steps"}."""
    import contextlib

    import flax.linen as nn

    ckpt = checkpointer(config, workdir)
    monitor = NonFiniteMonitor.from_config(config, ckpt)   # a bad on_nonfinite / nonfinite_in_a_row: before any work
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
    steps_cache: dict[Hashable, Callable] = {}
    losses: dict[int, float] = {}
    all_metrics: dict[int, dict] = {}
    mesh_ctx = jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()
    rules_ctx = nn.logical_axis_rules(rules) if rules is not None else contextlib.nullcontext()
    # time_budget_s: stop at a checkpoint once this call has trained that long (a run that must fit a slot of
    # machine time; the next call resumes it exactly), as a SIGTERM would
    budget, started = float(config.get("time_budget_s", 0) or 0), time.monotonic()
    log_every = int(config.log_every)
    sync_every_step = bool(config.get("sync_every_step", False))
    save_every = int(config.checkpoint.get("every", 1000))   # Orbax saves these steps and the first one
    batches = BatchPrefetcher(task.data_iter, lambda local: (task.layout_of(local), task.to_global(local)),
                              depth=int(config.get("prefetch_batches", PREFETCH_BATCHES)), name=f"{task.name}-data")
    start_step = step
    first_step = step + 1
    # (step, time) when a step was last seen complete by waiting on it: a log's step_time_s is the wall time per
    # step since then (data, dispatch and checkpoints included)
    last_seen = [step, time.perf_counter()]

    def settle(done_step, metrics, layout, just_ran: bool) -> None:
        """Reads `done_step`'s finite flag (waits for it), then logs it if it is a log step. `just_ran`: it is the
        step dispatched last, so the time now is its completion time."""
        finite = monitor.check(done_step, done_step - 1, metrics)   # one batch per step: batch index = step - 1
        now = time.perf_counter()
        if finite and (done_step % log_every == 0 or done_step == total):
            scalars = {k: float(v) for k, v in jax.device_get(metrics).items() if k != "finite"}
            scalars["step_time_s"] = (now - last_seen[1]) / max(1, done_step - last_seen[0])
            if task.extra_scalars is not None:
                scalars.update(task.extra_scalars(layout, scalars))
            losses[done_step] = scalars["loss"]
            all_metrics[done_step] = scalars
            writer.write_scalars(done_step, scalars)
            progress.set_postfix(**(task.postfix(scalars) if task.postfix else {"loss": f"{scalars['loss']:.4f}"}))
        if just_ran:
            last_seen[:] = [done_step, now]

    pending = None   # (step, metrics, layout) of the step dispatched last, its flag not read yet
    # the guard stays installed through the final save: a second SIGTERM must not kill it half-written
    with PreemptionGuard() as guard, mesh_ctx, rules_ctx, batches:
        if step < total and config.get("compile_at_start", True):   # while the prefetch thread makes batches
            compile_layouts(task, state, steps_cache)
        while step < total:
            layout, batch = next(batches)
            if layout not in steps_cache:
                steps_cache[layout] = task.step_for(layout)
            state, metrics = steps_cache[layout](state, batch, jax.random.fold_in(task.key, step))
            step += 1
            if "finite" not in metrics:
                raise KeyError(f"{task.name}: the step's metrics lack 'finite'; guard it with "
                               "training.guards.keep_finite (a NaN/Inf step must not reach the state)")
            if pending is not None:   # the previous step, read while this one runs
                settle(*pending, just_ran=False)
            pending = (step, metrics, layout)
            out_of_time = budget > 0 and time.monotonic() - started > budget
            stop = guard.requested or out_of_time
            # wait for this step now when it is logged, about to be checkpointed (no checkpoint is written before
            # its step's flag was read), the last one or the first (its time includes the compile)
            if (sync_every_step or stop or step == first_step or step % log_every == 0 or step == total
                    or step % save_every == 0 or ckpt.latest_step() is None):
                settle(*pending, just_ran=True)
                pending = None
            progress.update(1)
            if ckpt.save_or_stop(step, state, batches.checkpointable(), stop):
                break
        if pending is not None:
            settle(*pending, just_ran=True)
        ckpt.finish(step, state, batches.checkpointable())
    writer.close()
    progress.close()
    export_dir = None
    if task.export is not None and export_enabled(config) and step >= total:
        export_dir = task.export(state)
    return {"losses": losses, "metrics": all_metrics, "start_step": start_step, "final_step": step, "state": state,
            "export_dir": export_dir, "skipped_steps": monitor.skipped}
