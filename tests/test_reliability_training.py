"""Reliability matrix, training rows (docs/reliability.md), on the tiny DiT trainer: kill -9 during an Orbax save,
a disk that fills during a save, NaN/Inf steps (stop or skip), two SIGTERMs, unknown config overrides, unreadable
training images."""
import errno
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from qwenimage_jax import cli
from qwenimage_jax.config_cli import load_config
from qwenimage_jax.errors import ConfigError
from qwenimage_jax.training import checkpoint as ckpt_lib
from qwenimage_jax.training import dit as dit_trainer
from qwenimage_jax.training.checkpoint import Checkpointer, CheckpointSaveError
from qwenimage_jax.training.guards import NonFiniteError
from tests.dit_train_fixtures import tiny_config, write

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
STEPS = 8


def _config(data, **overrides):
    overrides = {"steps": STEPS, "checkpoint.every": 4, "checkpoint.keep": 3, "export": False, **overrides}
    return tiny_config(data, **overrides)


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """Every run here compiles the same tiny train step: a module-local persistent compilation cache (shared with
    the kill -9 subprocess) makes the later runs load it instead of compiling it again."""
    import jax
    from jax._src import compilation_cache

    path = str(tmp_path_factory.mktemp("jax_cache"))
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()
    yield path
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write(tmp_path_factory.mktemp("latents"), n=32)


@pytest.fixture(scope="module")
def full(data, tmp_path_factory):
    """The uninterrupted run every interrupted one is compared with."""
    return dit_trainer.train(_config(data), str(tmp_path_factory.mktemp("full")))


def _fail_commit_of(step, action):
    """Patches Orbax's commit (the rename of a finished temporary step directory) to run `action` for `step`."""
    from orbax.checkpoint._src.path import atomicity

    original = atomicity.AtomicRenameTemporaryPath.finalize

    async def finalize(self, *args, **kwargs):
        if os.path.basename(str(self._final_path)) == str(step):
            action()
        return await original(self, *args, **kwargs)

    return atomicity.AtomicRenameTemporaryPath, "finalize", finalize


def test_kill_9_during_a_save_resumes_from_the_last_complete_checkpoint(data, full, tmp_path, compile_cache):
    workdir = str(tmp_path / "run")
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {REPO!r})
        import tests.conftest  # 8 CPU devices, as in the test process
        from tests.test_reliability_training import _config, _fail_commit_of
        from qwenimage_jax.training import dit
        target, name, fn = _fail_commit_of(4, lambda: os.kill(os.getpid(), signal.SIGKILL))
        setattr(target, name, fn)
        dit.train(_config({data!r}), {workdir!r})
    """)
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env=env)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    ckpt_dir = os.path.join(workdir, "checkpoints")
    # Orbax always saves the first step; the save of step 4 was killed before its commit
    assert Checkpointer(ckpt_dir).complete_steps() == [1], os.listdir(ckpt_dir)
    assert any(".orbax-checkpoint-tmp" in d for d in os.listdir(ckpt_dir)), "the killed save left no temporary dir"
    resumed = dit_trainer.train(_config(data), workdir)
    assert sorted(resumed["losses"]) == list(range(2, STEPS + 1)), "must resume after step 1"
    for s in range(2, STEPS + 1):
        assert resumed["losses"][s] == pytest.approx(full["losses"][s], abs=1e-6), f"step {s}"


def test_disk_full_during_a_save_is_a_clear_error_and_keeps_the_previous_checkpoint(data, tmp_path, monkeypatch):
    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(*_fail_commit_of(4, disk_full))
    workdir = str(tmp_path / "run")
    with pytest.raises(CheckpointSaveError) as info:
        dit_trainer.train(_config(data), workdir)
    message = str(info.value)
    for part in ("saving checkpoint step 4 failed", "No space left on device", "step 1 in", "is intact",
                 "Free disk space"):
        assert part in message, message
    monkeypatch.undo()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.complete_steps() == [1] and ckpt.latest_step() == 1      # the next run resumes from step 1
    ckpt.close()


def _poison_batch(monkeypatch, call, value):
    """Makes the `call`-th global batch (1-based) of the next run hold `value` in its latents."""
    original = dit_trainer._global_batch
    calls = []

    def poisoned(batch, sharding):
        calls.append(1)
        if len(calls) == call:
            batch = dict(batch, latents=np.full_like(batch["latents"], value))
        return original(batch, sharding)

    monkeypatch.setattr(dit_trainer, "_global_batch", poisoned)


def test_nan_loss_stops_naming_step_batch_and_last_good_checkpoint(data, tmp_path, monkeypatch):
    _poison_batch(monkeypatch, 6, np.nan)
    with pytest.raises(NonFiniteError) as info:
        dit_trainer.train(_config(data), str(tmp_path / "run"))
    message = str(info.value)
    for part in ("at step 6", "data batch 5", "Last good checkpoint: step 4 in", "on_nonfinite=skip"):
        assert part in message, message


def test_inf_loss_is_skipped_when_configured(data, full, tmp_path, monkeypatch):
    _poison_batch(monkeypatch, 6, np.inf)
    run = dit_trainer.train(_config(data, on_nonfinite="skip"), str(tmp_path / "run"))
    assert run["skipped_steps"] == [6] and run["final_step"] == STEPS
    assert 6 not in run["losses"]
    for s in range(1, 6):
        assert run["losses"][s] == pytest.approx(full["losses"][s], abs=1e-6)
    params = [np.asarray(x) for x in __import__("jax").tree.leaves(run["state"].params)]
    assert all(np.isfinite(p).all() for p in params), "a skipped step reached the parameters"


def test_two_sigterms_make_one_clean_save(data, tmp_path, monkeypatch):
    """Two SIGTERMs in a row at step 3, and a third one while the final save is being written."""
    original_batch, original_finish = dit_trainer._global_batch, Checkpointer.finish
    calls, saves = [], []

    def batch_then_signal(batch, sharding):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGTERM)
        return original_batch(batch, sharding)

    def finish_under_signal(self, step, state, data_iterator=None):
        os.kill(os.getpid(), signal.SIGTERM)
        return original_finish(self, step, state, data_iterator)

    original_save = Checkpointer.save

    def counting_save(self, step, state, data_iterator=None, force=False):
        started = original_save(self, step, state, data_iterator, force)
        if started:
            saves.append(step)
        return started

    monkeypatch.setattr(dit_trainer, "_global_batch", batch_then_signal)
    monkeypatch.setattr(Checkpointer, "finish", finish_under_signal)
    monkeypatch.setattr(Checkpointer, "save", counting_save)
    leaked = []
    previous = signal.signal(signal.SIGTERM, lambda *a: leaked.append(a))   # what a signal outside the guard hits
    try:
        run = dit_trainer.train(_config(data), str(tmp_path / "run"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert not leaked, "a SIGTERM arrived after the guard was removed"
    # Orbax's own first-step save, then exactly one for the three signals
    assert run["final_step"] == 3 and saves == [1, 3]
    ckpt = Checkpointer(str(tmp_path / "run" / "checkpoints"))
    assert ckpt.complete_steps() == [1, 3]
    ckpt.close()


def test_unknown_config_override_lists_near_matches(tmp_path, capsys):
    config = os.path.join(REPO, "configs", "dit_train_tiny.py")
    # the CLI prints the error as one line and exits with the config code (tests/test_cli_errors.py)
    assert cli.main(["train-dit", "--config", config, "--workdir", str(tmp_path),
                     "--config.optimizer.learnig_rate=1"]) == ConfigError.exit_code
    assert ("unknown config key 'optimizer.learnig_rate'; did you mean optimizer.learning_rate"
            in capsys.readouterr().err)
    with pytest.raises(KeyError, match="did you mean on_nonfinite"):
        load_config(config, ["--config.on_nonfinit=skip"])


def test_unreadable_training_images_error_or_are_skipped_and_counted(tmp_path):
    from PIL import Image

    from qwenimage_jax.data import images as image_data

    for i in range(4):
        Image.new("RGB", (40, 40), (60 * i, 0, 0)).save(tmp_path / f"ok{i}.png")
    good = (tmp_path / "ok0.png").read_bytes()
    (tmp_path / "b_truncated.png").write_bytes(good[:len(good) // 2])
    (tmp_path / "c_text.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*b_truncated.png.*on_bad_image='skip'"):
        [image_data.make_source(dict(name="folder", path=str(tmp_path)))[i] for i in range(6)]
    source = image_data.make_source(dict(name="folder", path=str(tmp_path), on_bad_image="skip"))
    images = [source[i] for i in range(len(source))]
    assert len(images) == 6 and all(im.shape == (40, 40, 3) for im in images)
    assert sorted(os.path.basename(p) for p in source.skipped) == ["b_truncated.png", "c_text.png"]
    # the skipped records are replaced by the next readable file, deterministically
    names = sorted(os.path.basename(p) for p in source.paths)
    assert names[:3] == ["b_truncated.png", "c_text.png", "ok0.png"]
    np.testing.assert_array_equal(images[0], images[2])
    np.testing.assert_array_equal(images[1], images[2])


def test_checkpointer_error_names_the_step_without_an_earlier_checkpoint(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "c"))
    error = ckpt._failed(OSError(errno.ENOSPC, "No space left on device"), 1)
    assert "saving checkpoint step 1 failed" in str(error) and "no earlier complete checkpoint" in str(error)
    ckpt.close()
    assert ckpt_lib.CheckpointSaveError is CheckpointSaveError
