"""The training loop's batch prefetcher: the next global batches are read and placed on the devices by a background
thread while the current step runs, and a checkpoint still records exactly the batches the loop consumed.

    batches = BatchPrefetcher(task.data_iter, prepare, depth=2)   # prepare(local) -> (layout, global batch)
    layout, batch = next(batches)                                 # in the order of data_iter, always
    ckpt.save(step, state, batches.checkpointable())              # the iterator's state after the last next()
    batches.close()                                               # stops and joins the thread (also on errors)

One worker thread reads `data_iter` in order and puts at most `depth` prepared batches in a bounded queue, so the
order is the iterator's and memory is bounded. After each batch it records the iterator's state; `next()` hands out
the batch with the state recorded after it, and `checkpointable()` wraps that state for the grain checkpoint
handler, which writes the same JSON as for the iterator itself. The batches the thread has read ahead but the loop
has not used are therefore not in any checkpoint: a resumed run reads them again (and old checkpoints restore as
before). An exception in the thread (a bad record, a failed transfer) is raised by the `next()` that would have
returned that batch, with its own traceback; `close()` (or leaving the `with` block) sets a stop flag, empties the
queue and joins the thread, so an exception or a SIGTERM in the loop never leaves a thread behind (it is a daemon
thread besides). `depth=0` prepares each batch in the caller's thread (the loop's old behaviour).

Restore the iterator (`set_state`) before the first `next()`: the thread starts there.
"""
from __future__ import annotations

import copy
import json
import logging
import queue
import threading
import time
from typing import Any, Callable, Iterator

log = logging.getLogger("qwenimage_jax.training")

_ITEM, _END, _ERROR = "item", "end", "error"


class IteratorState:
    """A frozen iterator state in the form grain's checkpoint handler saves (it calls `get_state()`; bytes are
    written as they are, so a DatasetIterator's dict is dumped as the handler itself would dump it)."""

    def __init__(self, state: Any):
        self._state = state

    def get_state(self) -> bytes:
        if isinstance(self._state, (bytes, bytearray)):
            return bytes(self._state)
        return json.dumps(self._state, indent=4).encode()

    def start_prefetch(self) -> None:  # the handler's restore calls it; a frozen state is never restored into
        pass


class BatchPrefetcher:
    """Iterates `prepare(local_batch)` over `iterator` with up to `depth` results made ahead on a background
    thread. See the module docstring."""

    def __init__(self, iterator: Iterator, prepare: Callable[[Any], Any], depth: int = 2,
                 name: str = "batch-prefetch"):
        if depth < 0:
            raise ValueError(f"prefetch depth {depth}; use 0 (no thread) or more")
        self._it, self._prepare, self.depth, self._name = iterator, prepare, int(depth), name
        self._has_state = callable(getattr(iterator, "get_state", None))
        self._state = None                    # the iterator's state after the last batch handed out
        self._queue: queue.Queue | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finished = False                # the thread reported the end of the data or an error
        self._closed = False

    # ----------------------------------------------------------------------------------------------- consumer
    def __iter__(self):
        return self

    def __next__(self):
        if self.depth == 0:
            local = next(self._it)
            self._state = self._snapshot()
            return self._prepare(local)
        if self._finished:
            raise StopIteration
        if self._closed:  # the iterator is ahead of what was handed out: restarting would skip batches
            raise RuntimeError(f"{self._name}: next() after close()")
        if self._thread is None:
            self._start()
        while True:
            try:
                kind, payload, state = self._queue.get(timeout=0.5)
                break
            except queue.Empty:
                if not self._thread.is_alive():
                    raise RuntimeError(f"{self._name}: the prefetch thread ended without a batch") from None
        if kind == _ERROR:
            self._finished = True
            self.close()
            raise payload
        if kind == _END:
            self._finished = True
            raise StopIteration
        self._state = state
        return payload

    def checkpointable(self):
        """What to hand the checkpointer as the data iterator: the iterator's state after the last batch handed
        out (before the first one: its state now). Without a thread this is the iterator itself."""
        if self.depth == 0 or not self._has_state:
            return self._it
        if self._state is None and self._thread is None:
            self._state = self._snapshot()
        return IteratorState(self._state)

    def close(self, timeout: float = 60.0) -> None:
        """Stops the thread (it finishes at most the batch it is preparing) and joins it; idempotent. A thread
        stuck longer than `timeout` seconds in the data iterator is left behind (a daemon: it ends with the
        process) with a warning."""
        self._stop.set()
        self._closed = True
        thread, self._thread = self._thread, None
        if thread is None:
            return
        deadline = time.monotonic() + timeout
        while thread.is_alive() and time.monotonic() < deadline:
            self._drain()
            thread.join(timeout=0.05)
        self._drain()
        if thread.is_alive():
            log.warning("%s: the prefetch thread did not stop within %.0f s (blocked in the data iterator?); left "
                        "running as a daemon", self._name, timeout)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------------------------------------- thread
    def _snapshot(self):
        return copy.deepcopy(self._it.get_state()) if self._has_state else None

    def _start(self):
        if self._state is None:
            self._state = self._snapshot()    # the position before anything is read ahead
        self._queue = queue.Queue(maxsize=self.depth)
        self._stop.clear()
        self._thread = threading.Thread(target=self._work, name=self._name, daemon=True)
        self._thread.start()

    def _work(self):
        try:
            while not self._stop.is_set():
                try:
                    local = next(self._it)
                except StopIteration:
                    self._put((_END, None, None))
                    return
                state = self._snapshot()
                if not self._put((_ITEM, self._prepare(local), state)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
            self._put((_ERROR, e, None))

    def _put(self, entry) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _drain(self):
        if self._queue is None:
            return
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                return
