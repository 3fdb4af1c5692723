"""The training loop's batch prefetcher (training/prefetch.py): the iterator's order, a checkpointed state that
counts only the batches handed out (read-ahead ones come again on resume, in the file the checkpoint handler writes
for the iterator itself), errors raised where the batch would have been, and a thread that always stops."""
import json
import threading
import time

import grain
import pytest

from qwenimage_jax.training.prefetch import BatchPrefetcher


def _iterator(n=50):
    return iter(grain.MapDataset.range(n).shuffle(seed=3).to_iter_dataset())


def _saved_text(item) -> str:
    """What grain's checkpoint handler writes for `item` (the iterator itself or our frozen state)."""
    import tempfile

    from etils import epath
    from grain._src.python.checkpoint.handler import CheckpointHandler

    with tempfile.TemporaryDirectory() as d:
        CheckpointHandler().save(epath.Path(d), item)
        return next(epath.Path(d).glob("*.json")).read_text()


def test_order_and_the_checkpointed_state_count_only_batches_handed_out():
    prepared = []
    batches = BatchPrefetcher(_iterator(), lambda x: (prepared.append(int(x)), int(x) * 10)[1], depth=3)
    reference = _iterator()
    with batches:
        for _ in range(5):
            assert next(batches) == int(next(reference)) * 10
        deadline = time.monotonic() + 30
        while len(prepared) < 8 and time.monotonic() < deadline:   # the thread fills the queue: 3 ahead
            time.sleep(0.01)
        assert len(prepared) == 8, prepared
        saved = _saved_text(batches.checkpointable())
    # the same file the handler writes for an iterator that has read exactly those 5 batches
    assert saved == _saved_text(reference)
    resumed = _iterator()
    resumed.set_state(json.loads(saved))
    again = [int(next(resumed)) for _ in range(4)]
    assert again[:3] == prepared[5:8]              # the three read ahead and never handed out come again
    assert again == [int(x) for x in list(_iterator())[5:9]]


def test_state_before_the_first_batch_and_without_a_thread():
    batches = BatchPrefetcher(_iterator(), int, depth=2)
    assert _saved_text(batches.checkpointable()) == _saved_text(_iterator())
    inline_it = _iterator()
    inline = BatchPrefetcher(inline_it, int, depth=0)
    assert [next(inline) for _ in range(3)] == [int(x) for x in list(_iterator())[:3]]
    assert inline.checkpointable() is inline_it


def test_an_error_in_the_thread_is_raised_at_its_batch_and_the_thread_ends():
    def prepare(x):
        if len(seen) == 2:
            raise ValueError("record 3 is corrupt")
        seen.append(x)
        return x

    seen = []
    batches = BatchPrefetcher(_iterator(), prepare, depth=2, name="t-error")
    first = [next(batches), next(batches)]
    assert first == seen
    with pytest.raises(ValueError, match="record 3 is corrupt"):
        next(batches)
    assert not any(t.name == "t-error" and t.is_alive() for t in threading.enumerate())


def test_end_of_data_is_stop_iteration():
    batches = BatchPrefetcher(iter(grain.MapDataset.range(3).to_iter_dataset()), int, depth=2)
    assert list(batches) == [0, 1, 2]


def test_close_stops_a_thread_blocked_on_a_full_queue_and_next_then_refuses():
    batches = BatchPrefetcher(_iterator(1000), int, depth=1, name="t-close")
    next(batches)
    time.sleep(0.2)   # the thread has filled the queue and waits to put the next one
    batches.close()
    assert not any(t.name == "t-close" and t.is_alive() for t in threading.enumerate())
    with pytest.raises(RuntimeError, match="after close"):
        next(batches)
    batches.close()   # idempotent
