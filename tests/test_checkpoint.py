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
