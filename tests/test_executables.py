"""A saved executable runs in place of the trainer's compile (`--config.executable`, what `aot --save` writes), and
one that cannot run here is one clear error before training: other arguments (another batch), other versions,
other devices, not an executable at all."""
import os
import pickle

import jax
import pytest

from qwenimage_jax.errors import InputValueError
from qwenimage_jax.checkpoints import executables
from qwenimage_jax.training import dit as dit_trainer
from tests.dit_train_fixtures import tiny_config, write


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 3-step run whose compiled step is captured and saved (as `aot --save` would save it)."""
    root = tmp_path_factory.mktemp("exe")
    data = write(root / "data", n=16)
    captured = []

    def spy(step, state, batch, key, *trailing, executable=""):
        exe = step.lower(state, batch, key, *trailing).compile()
        captured.append(exe)
        return dit_trainer.bind(exe, *trailing)

    mp = pytest.MonkeyPatch()
    mp.setattr(dit_trainer, "compiled", spy)
    # compiled fresh even where another test left a persistent compilation cache on: what the cache hands back
    # does not serialize whole (see `executables.uncached_compiles`)
    with executables.uncached_compiles():
        run = dit_trainer.train(tiny_config(data, steps=3, export=False), str(root / "compiled"))
    mp.undo()
    assert len(captured) == 1                           # one layout, compiled once at start
    path = str(root / "step.xla")
    assert f"{jax.device_count()} x cpu" in executables.save_executable(captured[0], path)
    return data, path, run


def test_a_saved_step_trains_like_the_compiled_one(saved, tmp_path):
    data, path, run = saved
    loaded = dit_trainer.train(tiny_config(data, steps=3, export=False, executable=path), str(tmp_path / "run"))
    for step in (1, 2, 3):
        assert loaded["losses"][step] == pytest.approx(run["losses"][step], abs=1e-6), step


def test_an_executable_for_other_arguments_is_refused_before_training(saved, tmp_path):
    data, path, _ = saved
    config = tiny_config(data, steps=3, export=False, executable=path, batch_size=16)
    with pytest.raises(InputValueError, match="was compiled for other arguments.*first that differs"):
        dit_trainer.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["versions"].update(jax="0.0.1"), r"was compiled by jax 0\.0\.1 \(here " + jax.__version__),
    (lambda d: d["target"].update(device_kind="TPU v5", num_devices=128, topology="v5p-256"),
     r"was compiled for 128 x TPU v5 \(v5p-256\), this process has " + f"{jax.device_count()} x cpu"),
])
def test_an_executable_from_other_versions_or_devices_names_the_difference(saved, tmp_path, change, message):
    _, path, _ = saved
    data = pickle.load(open(path, "rb"))
    change(data)
    other = str(tmp_path / "other.xla")
    pickle.dump(data, open(other, "wb"))
    with pytest.raises(InputValueError, match=message):
        executables.load_executable(other)


def test_a_file_that_is_no_executable_is_one_error(tmp_path):
    bad = tmp_path / "bad.xla"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(InputValueError, match="not an executable saved by `aot --save`"):
        executables.load_executable(str(bad))
    with pytest.raises(InputValueError, match="does not exist"):
        executables.load_executable(str(tmp_path / "missing.xla"))
