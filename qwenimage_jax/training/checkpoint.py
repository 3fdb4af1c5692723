"""Training checkpoints: an Orbax `CheckpointManager` holding the train state and, beside it, the grain data
iterator's state, so a resumed run sees exactly the batches the interrupted one would have seen.

Layout: WORKDIR/checkpoints/<step>/{state, data}. Saves are asynchronous (training continues while the
arrays are written); `max_to_keep` old steps are kept. Restores go straight into the target shardings given
by an abstract state (`state.abstract_state(...)`). `PreemptionGuard` turns SIGTERM into "save now, then stop";
further signals while that save runs are logged and ignored.

Failures (docs/reliability.md): a save is committed by an atomic rename of its temporary directory, so a process
killed mid-save leaves the earlier steps as they were and the next run resumes from the last complete one. A save
that fails (disk full, permissions) raises `CheckpointSaveError` naming the step, the cause and the last complete
step, which stays intact; with async saves it surfaces at the next save or at the end of the run. A restore reads
the newest step and, if it cannot (truncated or missing TensorStore files, broken metadata), logs one line naming
it, moves it aside to `<step>.damaged` and takes the next older step; when no step can be read it raises
`CheckpointRestoreError` listing each step and why.
"""
from __future__ import annotations

import logging
import os
import signal
from typing import Any

import jax

from qwenimage_jax.errors import CheckpointError

log = logging.getLogger("qwenimage_jax.training")


class CheckpointSaveError(CheckpointError, RuntimeError):
    """A checkpoint could not be written; the previous complete checkpoint is untouched."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A restore was asked of a directory that holds no complete checkpoint."""


class CheckpointRestoreError(CheckpointError, ValueError):
    """No checkpoint step in the directory could be read back (damaged files, or another config's state)."""


class Checkpointer:
    """Wraps `ocp.CheckpointManager` for (train state, data iterator) pairs."""

    def __init__(self, directory: str, max_to_keep: int = 3, save_interval_steps: int = 1000,
                 async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, save_interval_steps=save_interval_steps,
                                               enable_async_checkpointing=async_save, create=True)
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None      # step of the last save started (async: maybe still writing)

    def complete_steps(self) -> list[int]:
        """Steps whose save was committed (their directory renamed into place), from the disk."""
        if not os.path.isdir(self.directory):
            return []
        return sorted(int(d) for d in os.listdir(self.directory)
                      if d.isdigit() and os.path.isdir(os.path.join(self.directory, d)))

    def _failed(self, error: BaseException, step: int | None):
        good = [s for s in self.complete_steps() if s != step]
        last = f"step {good[-1]} in {self.directory} is intact and a rerun resumes from it" if good else \
            f"there is no earlier complete checkpoint in {self.directory}"
        return CheckpointSaveError(f"saving checkpoint step {step} failed: {type(error).__name__}: {error}; {last}. "
                                   "Free disk space (or point --workdir at a larger disk) and rerun")

    def _guarded(self, fn, step):
        try:
            return fn()
        except CheckpointSaveError:
            raise
        except Exception as e:  # noqa: BLE001 - an async save surfaces any error of its writer thread here
            raise self._failed(e, step) from e

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: Any = None, force: bool = False) -> bool:
        """Saves at `step` if the interval says so (or `force`); returns whether a save was started."""
        import grain

        items = {"state": self._ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
        # an error here may belong to the previous (async) save, which this call waits for first
        started = self._guarded(lambda: self.manager.save(step, args=self._ocp.args.Composite(**items), force=force),
                                self._pending if self._pending is not None else step)
        if started:
            self._pending = step
        return started

    def restore(self, abstract_state: Any, data_iterator: Any = None, step: int | None = None) -> tuple[Any, int]:
        """Restores (state, step) into `abstract_state`'s shapes/dtypes/shardings; sets `data_iterator`'s
        position in place. `step` defaults to the newest step that can be read: a damaged newer one is logged,
        moved aside and skipped."""
        import grain

        steps = sorted(self.all_steps(), reverse=True) if step is None else [step]
        if not steps:
            raise CheckpointNotFoundError(f"no checkpoint in {self.directory}; train from scratch or pass another "
                                          "workdir")
        failed: list[tuple[int, BaseException]] = []
        for candidate in steps:
            items = {"state": self._ocp.args.StandardRestore(abstract_state)}
            if data_iterator is not None:   # a failed attempt may have moved it; the next one sets it again
                items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
            try:
                restored = self.manager.restore(candidate, args=self._ocp.args.Composite(**items))
            except Exception as e:  # noqa: BLE001 - TensorStore, JSON and missing-item errors all mean "unreadable"
                failed.append((candidate, e))
                continue
            if failed:
                self._set_aside(failed, candidate)
            return restored["state"], candidate
        raise self._unreadable(failed)

    def _set_aside(self, failed: list[tuple[int, BaseException]], good: int) -> None:
        """Renames each unreadable step to `<step>.damaged`: left in place it would stay the latest step, so Orbax
        would refuse to save any step up to it and the next run would meet it again. Renamed, nothing is lost."""
        for bad, error in failed:
            src = os.path.join(self.directory, str(bad))
            dst = src + ".damaged"
            n = 1
            while os.path.exists(dst):
                n += 1
                dst = f"{src}.damaged{n}"
            if jax.process_index() == 0:   # one shared directory: one host renames
                os.rename(src, dst)
            log.warning("checkpoint step %d in %s is damaged (%s); moved it to %s, resuming from step %d", bad,
                        self.directory, _first_line(error), dst, good)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices("checkpoint_set_aside")
        self.manager.reload()   # forget the renamed steps

    def _unreadable(self, failed: list[tuple[int, BaseException]]) -> CheckpointRestoreError:
        reasons = "\n".join(f"  - step {s}: {_first_line(e)}" for s, e in failed)
        return CheckpointRestoreError(
            f"no checkpoint step in {self.directory} can be restored (steps found: "
            f"{', '.join(str(s) for s, _ in failed)}):\n{reasons}\nIf every step fails the same way, the config "
            "differs from the one that wrote them: rerun with that config. Otherwise they are damaged: move the "
            "directory aside (or pass another --workdir) to train from scratch")

    def reached_preemption(self, step: int) -> bool:
        """True when a multi-host preemption notice says every host must save at `step` (jax.distributed)."""
        return bool(self.manager.reached_preemption(step))

    def save_or_stop(self, step: int, state: Any, data_iterator: Any, stop_requested: bool) -> bool:
        """The per-step bookkeeping every trainer shares: save on the interval, and when any host got SIGTERM
        (or Orbax saw a preemption notice) save now and return True so the loop stops."""
        self.save(step, state, data_iterator)
        if all_hosts_agree(stop_requested) or self.reached_preemption(step):
            log.warning("preemption requested: saving step %d and stopping", step)
            if self.latest_step() != step:
                self.save(step, state, data_iterator, force=True)
            return True
        return False

    def finish(self, step: int, state: Any, data_iterator: Any = None) -> None:
        """Makes sure the last step is saved, waits for async writes and closes the manager."""
        if self.latest_step() != step:
            self.save(step, state, data_iterator, force=True)
        self.close()

    def wait(self) -> None:
        self._guarded(self.manager.wait_until_finished, self._pending)

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


class PreemptionGuard:
    """Installs a SIGTERM (and optionally SIGINT) handler that only raises a flag; the training loop checks
    `guard.requested` after each step, saves, and exits cleanly. The previous handlers come back on `restore()`.
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.requested = False
        self.signal_received: int | None = None
        self.count = 0
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handler, the loop still works
                pass

    def _handle(self, signum, frame):  # noqa: ARG002
        self.count += 1
        if self.requested:
            log.warning("signal %d received again: already saving and stopping; ignored", signum)
        self.requested = True
        self.signal_received = signum

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()


def _first_line(error: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters (TensorStore errors run to kilobytes)."""
    text = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {text[:limit]}{'...' if len(text) > limit else ''}"


def all_hosts_agree(flag: bool) -> bool:
    """True on every host if it is True on any host (so all hosts save at the same step)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils
    import numpy as np
    return bool(np.any(multihost_utils.process_allgather(np.asarray(flag))))
