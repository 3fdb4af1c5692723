"""Checkpointer: sharded TrainState + grain iterator round trip, restore onto other shardings, keep-N,
and the SIGTERM guard."""
import os
import signal

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from qwenimage_jax.parallel.mesh import make_mesh
from qwenimage_jax.training import checkpoint, state as train_state


class _Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.with_logical_partitioning(nn.initializers.normal(), ("embed", "mlp")),
                            (16, 8))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)), (8,))
        return x @ kernel + bias


def _iterator():
    return grain.MapDataset.range(100).shuffle(seed=3).batch(4).to_iter_dataset().__iter__()


@pytest.fixture(scope="module")
def setup():
    model = _Tiny()
    tx, _ = train_state.make_optimizer(ml_collections.ConfigDict(dict(learning_rate=1e-2)))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    init = lambda k: model.init(k, jnp.zeros((1, 16)))["params"]
    state, shardings = train_state.sharded_init(init, tx, mesh, jax.random.key(0))
    step = jax.jit(lambda s: train_state.apply_gradients(s, jax.tree.map(jnp.ones_like, s.params), tx, 0.9))
    for _ in range(3):
        state = step(state)
    return dict(model=model, tx=tx, mesh=mesh, init=init, state=state, shardings=shardings)


def _assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_state_and_data_iterator(setup, tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2, save_interval_steps=1, async_save=True)
    it = _iterator()
    for _ in range(5):
        next(it)
    assert ckpt.save(3, setup["state"], it)
    expected_next = [next(it) for _ in range(3)]
    ckpt.wait()

    abstract = train_state.abstract_state(setup["state"], setup["shardings"])
    it2 = _iterator()
    restored, step = ckpt.restore(abstract, it2)
    ckpt.close()
    assert step == 3
    _assert_trees_equal(restored, setup["state"])
    assert int(restored.step) == 3
    kernel = restored.params["kernel"]
    assert kernel.sharding.spec == setup["state"].params["kernel"].sharding.spec
    assert [np.asarray(next(it2)).tolist() for _ in range(3)] == [e.tolist() for e in expected_next]


def test_restore_onto_other_shardings_from_eval_shape(setup, tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), async_save=False, save_interval_steps=1)
    ckpt.save(3, setup["state"])
    ckpt.wait()
    # a different mesh (fsdp=8) and abstract state built without allocating anything
    mesh8 = make_mesh(data=1, fsdp=8)
    abstract_boxed = jax.eval_shape(lambda k: train_state.TrainState.create(setup["init"](k), setup["tx"]),
                                    jax.random.key(0))
    from qwenimage_jax.parallel.rules import logical_shardings
    shardings8 = logical_shardings(abstract_boxed, mesh8)
    restored, _ = ckpt.restore(train_state.abstract_state(abstract_boxed, shardings8))
    ckpt.close()
    _assert_trees_equal(restored, setup["state"])
    assert restored.params["kernel"].sharding.mesh.shape["fsdp"] == 8
    assert restored.opt_state[1][0].mu["kernel"].sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_keeps_last_n(setup, tmp_path):
    ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2, save_interval_steps=5)
    for step in range(0, 21):
        ckpt.save(step, setup["state"])
    ckpt.close()
    assert ckpt.all_steps() == [15, 20]
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        checkpoint.Checkpointer(str(tmp_path / "empty")).restore(setup["state"])


def test_sigterm_guard_raises_flag_and_restores_handler():
    before = signal.getsignal(signal.SIGTERM)
    with checkpoint.PreemptionGuard() as guard:
        assert not guard.requested
        os.kill(os.getpid(), signal.SIGTERM)
        assert guard.requested and guard.signal_received == signal.SIGTERM
        assert checkpoint.all_hosts_agree(guard.requested)
    assert signal.getsignal(signal.SIGTERM) == before


# ---------------------------------------------------------------------------------------------------------------
# Damaged steps and a save killed in flight (docs/reliability.md, training rows)


def _step_state(step: int, n: int = 4096) -> dict:
    """A state whose every value says which step wrote it."""
    rng = np.random.default_rng(step)
    return {"w": jnp.asarray(rng.standard_normal(n, dtype=np.float32)), "step": jnp.asarray(step, jnp.int32)}


def _abstract(n: int = 4096) -> dict:
    return {"w": jax.ShapeDtypeStruct((n,), jnp.float32), "step": jax.ShapeDtypeStruct((), jnp.int32)}


def _truncate_largest_array_file(step_dir):
    files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step_dir, "state"))
             for f in names if os.sep + "d" + os.sep in os.path.join(root, f) + os.sep]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.truncate(os.path.getsize(largest) // 2)


def _delete_array_files(step_dir):
    for root, _, names in os.walk(os.path.join(step_dir, "state")):
        if os.path.basename(root) == "d":
            for f in names:
                os.remove(os.path.join(root, f))


def _break_metadata(step_dir):
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
        f.write('{"tree_metadata": {')


def _remove_state_item(step_dir):
    import shutil
    shutil.rmtree(os.path.join(step_dir, "state"))


def _write_steps(directory, steps=(1, 2, 3)):
    ckpt = checkpoint.Checkpointer(directory, save_interval_steps=1, async_save=True)
    it = _iterator()
    positions = {}
    for step in steps:
        next(it)
        positions[step] = np.asarray(next(_copy_iterator(it))).tolist()  # the batch a resume at `step` sees next
        ckpt.save(step, _step_state(step), it)
    ckpt.close()
    return positions


def _copy_iterator(it):
    fresh = _iterator()
    fresh.set_state(it.get_state())
    return fresh


@pytest.mark.parametrize("damage", [_truncate_largest_array_file, _delete_array_files, _break_metadata,
                                    _remove_state_item])
def test_damaged_newest_step_is_named_set_aside_and_the_previous_one_restored(tmp_path, caplog, damage):
    directory = str(tmp_path / "ckpt")
    positions = _write_steps(directory)
    damage(os.path.join(directory, "3"))

    ckpt = checkpoint.Checkpointer(directory, save_interval_steps=1)
    it = _iterator()
    with caplog.at_level("WARNING", logger="qwenimage_jax.training"):
        state, step = ckpt.restore(_abstract(), it)
    assert step == 2 and int(state["step"]) == 2
    np.testing.assert_array_equal(np.asarray(state["w"]), np.asarray(_step_state(2)["w"]))
    assert np.asarray(next(it)).tolist() == positions[2], "the data iterator must be where step 2 left it"
    lines = [r.getMessage() for r in caplog.records if "damaged" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "checkpoint step 3 in" in lines[0] and "resuming from step 2" in lines[0]
    # kept for inspection, out of Orbax's sight: the run saves step 3 again and a later resume takes it
    assert os.path.isdir(os.path.join(directory, "3.damaged"))
    assert ckpt.all_steps() == [1, 2] and ckpt.latest_step() == 2
    assert ckpt.save(3, _step_state(3))
    ckpt.close()
    again = checkpoint.Checkpointer(directory)
    state, step = again.restore(_abstract())
    again.close()
    assert step == 3 and int(state["step"]) == 3


def test_no_readable_step_is_one_checkpoint_error_listing_every_step(tmp_path):
    from qwenimage_jax.errors import CheckpointError

    directory = str(tmp_path / "ckpt")
    _write_steps(directory, steps=(1, 2))
    _truncate_largest_array_file(os.path.join(directory, "2"))
    _break_metadata(os.path.join(directory, "1"))
    ckpt = checkpoint.Checkpointer(directory)
    with pytest.raises(CheckpointError) as info:
        ckpt.restore(_abstract())
    message = str(info.value)
    assert isinstance(info.value, checkpoint.CheckpointRestoreError) and info.value.exit_code == 7
    for part in (f"no checkpoint step in {directory} can be restored", "steps found: 2, 1", "step 2: ",
                 "step 1: JSONDecodeError", "another --workdir"):
        assert part in message, message
    assert sorted(os.listdir(directory)) == ["1", "2"], "nothing is moved when nothing can be restored"
    # an explicit step that cannot be read is not swapped for another one
    with pytest.raises(checkpoint.CheckpointRestoreError, match=r"steps found: 2\)"):
        ckpt.restore(_abstract(), step=2)
    ckpt.close()


def test_a_config_that_no_longer_matches_is_not_taken_for_damage(tmp_path):
    directory = str(tmp_path / "ckpt")
    _write_steps(directory, steps=(1, 2))
    ckpt = checkpoint.Checkpointer(directory)
    with pytest.raises(checkpoint.CheckpointRestoreError, match="the config differs from the one that wrote them"):
        ckpt.restore(_abstract(n=512))   # every step fails the same way: another model shape
    ckpt.close()
    assert sorted(os.listdir(directory)) == ["1", "2"], "steps of another config must stay where they are"


KILL_CHILD = """
import os, sys
sys.path.insert(0, {repo!r})
import numpy as np
import jax.numpy as jnp
from qwenimage_jax.training.checkpoint import Checkpointer

def state(step):   # incompressible, so writing it takes a while
    return {{"w": jnp.asarray(np.random.default_rng(step).standard_normal({n}, dtype=np.float32)),
             "step": jnp.asarray(step, jnp.int32)}}

ckpt = Checkpointer({directory!r}, max_to_keep=2, save_interval_steps=1, async_save=True)
ckpt.save(1, state(1))
ckpt.wait()                                      # step 1 is complete on disk
step = 1
while True:                                      # from here on there is always a save in flight
    step += 1
    ckpt.save(step, state(step))
    if step == 2:
        open({marker!r}, "w").close()           # the save of step 2 has started (async: still writing)
"""


def test_sigkill_while_a_save_is_in_flight_resumes_from_the_last_complete_step(tmp_path):
    """A real SIGKILL, no patching: a process saving through `Checkpointer` in a loop is killed while the save
    of step 2 (8 MB, written asynchronously: Orbax takes seconds to write and commit it) is under way."""
    import subprocess
    import sys
    import time

    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    directory, marker, n = str(tmp_path / "ckpt"), str(tmp_path / "saving"), 2 * 1024 * 1024
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    child = subprocess.Popen([sys.executable, "-c", KILL_CHILD.format(repo=repo, n=n, directory=directory,
                                                                      marker=marker)],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not os.path.exists(marker):
            assert child.poll() is None, child.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the child never started its second save"
            time.sleep(0.005)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stderr.close()
    assert child.returncode == -signal.SIGKILL

    entries = os.listdir(directory)
    ckpt = checkpoint.Checkpointer(directory, save_interval_steps=1)
    complete = ckpt.complete_steps()
    assert complete and complete[0] >= 1, entries
    in_flight = [d for d in entries if ".orbax-checkpoint-tmp" in d]
    assert in_flight, f"no save was in flight when the process was killed: {entries}"
    assert all(int(d.split(".")[0]) > complete[-1] for d in in_flight), entries
    state, step = ckpt.restore(_abstract(n))
    assert step == complete[-1] and int(state["step"]) == step
    np.testing.assert_array_equal(np.asarray(state["w"]), np.random.default_rng(step).standard_normal(n, np.float32))
    # the run goes on from there: the step that was cut short is saved again, completely
    assert ckpt.save(step + 1, _step_state(step + 1))
    ckpt.close()
    assert step + 1 in checkpoint.Checkpointer(directory).complete_steps()
