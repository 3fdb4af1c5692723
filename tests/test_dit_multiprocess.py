"""The DiT trainer as 2 CPU processes on localhost (gloo collectives): both see the same global batch, agree on
the losses, and their checkpoint restores in a single process on another mesh."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from tests.dit_train_fixtures import tiny_config, write

DRIVER = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    sys.path.insert(0, {root!r})
    from tests.dit_train_fixtures import tiny_config
    from qwenimage_jax.training.dit import train
    config = tiny_config({data!r}, steps=3, record_batch_checksums=True, ema_decay=0.0)
    config.checkpoint.async_save = False
    result = train(config, {workdir!r})
    params = result["state"].params
    from jax.experimental import multihost_utils
    total = float(sum(np.sum(multihost_utils.process_allgather(x, tiled=True)) for x in jax.tree.leaves(params)))
    with open({out!r} + str(jax.process_index()) + ".json", "w") as f:
        json.dump({{"losses": result["losses"], "checksums": result["batch_checksums"], "param_sum": total,
                   "devices": jax.device_count(), "processes": jax.process_count()}}, f)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_train_on_the_global_batch_and_restore_in_one(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    data = write(tmp_path / "data", n=64)
    workdir, out = str(tmp_path / "run"), str(tmp_path / "result")
    script = tmp_path / "driver.py"
    script.write_text(DRIVER.format(root=root, data=data, workdir=workdir, out=out))
    port = _free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                   QIJ_COORDINATOR=f"127.0.0.1:{port}", QIJ_NUM_PROCESSES="2", QIJ_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen([sys.executable, str(script)], env=env, cwd=root,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-8000:]
    results = [json.load(open(f"{out}{i}.json")) for i in range(2)]
    assert results[0]["devices"] == 4 and results[0]["processes"] == 2
    assert results[0]["losses"] == results[1]["losses"]
    for (g0, l0), (g1, l1) in zip(results[0]["checksums"], results[1]["checksums"]):
        assert g0 == g1, "processes disagree on the global batch"
        assert abs(g0 - (l0 + l1)) < 1e-3 * max(1.0, abs(g0)), "global batch is not the two host batches together"
        assert l0 != l1, "both hosts read the same examples"

    # restore the 2-process checkpoint in this single process, on an 8-device mesh with tensor parallelism
    import flax.linen as nn

    from qwenimage_jax.parallel.mesh import make_mesh
    from qwenimage_jax.parallel.rules import LOGICAL_RULES
    from qwenimage_jax.training import dit as dit_trainer
    from qwenimage_jax.training.checkpoint import Checkpointer
    from qwenimage_jax.training.state import abstract_state

    config = tiny_config(data, ema_decay=0.0, mesh=dict(data=2, fsdp=2, tensor=2))
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state, shardings, *_ = dit_trainer.init_state(config, mesh, jax.random.key(0))
    restored, step = Checkpointer(os.path.join(workdir, "checkpoints")).restore(abstract_state(state, shardings))
    assert step == 3
    total = float(sum(np.sum(np.asarray(x)) for x in jax.tree.leaves(restored.params)))
    np.testing.assert_allclose(total, results[0]["param_sum"], rtol=1e-6)
