"""Reliability matrix, training rows (docs/reliability.md), on the tiny DiT trainer: kill -9 during an Orbax save,
a disk that fills during a save, a damaged newest checkpoint, NaN/Inf steps (stop, skip, too many in a row), two
SIGTERMs, unknown config overrides, unreadable training images."""
import errno
import os
import shutil
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
    """The uninterrupted run every interrupted one is compared with (its checkpoints: steps 1, 4 and 8)."""
    workdir = str(tmp_path_factory.mktemp("full"))
    return dict(dit_trainer.train(_config(data), workdir), workdir=workdir)


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


def test_damaged_newest_checkpoint_is_named_and_the_run_resumes_from_the_previous_one(data, full, tmp_path,
                                                                                       caplog):
    workdir = str(tmp_path / "run")
    shutil.copytree(os.path.join(full["workdir"], "checkpoints"), os.path.join(workdir, "checkpoints"))
    # step 8 half-copied: its largest TensorStore data file cut in two
    step8 = os.path.join(workdir, "checkpoints", "8")
    files = [os.path.join(root, f) for root, _, names in os.walk(os.path.join(step8, "state"))
             if os.path.basename(root) == "d" for f in names]
    largest = max(files, key=os.path.getsize)
    os.truncate(largest, os.path.getsize(largest) // 2)

    with caplog.at_level("WARNING", logger="qwenimage_jax.training"):
        resumed = dit_trainer.train(_config(data), workdir)
    warned = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
    assert len(warned) == 1 and "checkpoint step 8 in" in warned[0] and "resuming from step 4" in warned[0], warned
    assert sorted(resumed["losses"]) == [5, 6, 7, 8], "must resume after step 4"
    for s in range(5, STEPS + 1):
        assert resumed["losses"][s] == pytest.approx(full["losses"][s], abs=1e-6), f"step {s}"
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.complete_steps() == [1, 4, 8], "step 8 is saved again, whole"
    assert os.path.isdir(step8 + ".damaged"), "the damaged step is kept aside, not deleted"
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


def _nan_batches_from(monkeypatch, first: int = 2):
    """Every global batch of the DiT trainer from the `first`-th (counted from 1) on has NaN latents."""
    original, calls = dit_trainer._global_batch, []

    def nan_from(batch, sharding):
        calls.append(1)
        if len(calls) >= first:
            batch = dict(batch, latents=np.full_like(batch["latents"], np.nan))
        return original(batch, sharding)

    monkeypatch.setattr(dit_trainer, "_global_batch", nan_from)


def test_too_many_non_finite_steps_in_a_row_stop_a_skipping_run(data, tmp_path, monkeypatch):
    _nan_batches_from(monkeypatch, first=2)
    with pytest.raises(NonFiniteError) as info:
        dit_trainer.train(_config(data, on_nonfinite="skip", nonfinite_in_a_row=3), str(tmp_path / "run"))
    message = str(info.value)
    for part in ("at step 4", "3 non-finite steps in a row (steps 2 to 4; 2 skipped in all)",
                 "Last good checkpoint: step 1 in", "step after step"):
        assert part in message, message


def test_nonfinite_in_a_row_config_key_sets_how_many_stop_a_skipping_run(data, tmp_path, monkeypatch):
    from qwenimage_jax.training import guards

    assert guards.MAX_IN_A_ROW == 10 and load_config(os.path.join(REPO, "configs", "dit_train_tiny.py"),
                                                    ["--config.nonfinite_in_a_row=2"]).nonfinite_in_a_row == 2
    _nan_batches_from(monkeypatch, first=2)
    with pytest.raises(NonFiniteError) as info:
        dit_trainer.train(_config(data, on_nonfinite="skip", nonfinite_in_a_row=2), str(tmp_path / "run"))
    message = str(info.value)
    for part in ("at step 3 (data batch 2", "2 non-finite steps in a row (steps 2 to 3; 1 skipped in all)",
                 "Last good checkpoint: step 1 in", "step after step"):
        assert part in message, message
    for bad in (0, -1):   # refused before the run starts (no checkpoint directory holds a step)
        with pytest.raises(ValueError, match=f"nonfinite_in_a_row={bad}; pass a whole number of steps >= 1"):
            dit_trainer.train(_config(data, on_nonfinite="skip", nonfinite_in_a_row=bad), str(tmp_path / "bad"))
        ckpt = Checkpointer(os.path.join(tmp_path, "bad", "checkpoints"))
        assert not ckpt.complete_steps()
        ckpt.close()
    for bad in (2.5, True):
        with pytest.raises(ValueError, match=f"nonfinite_in_a_row={bad!r}"):
            guards.NonFiniteMonitor("skip", max_in_a_row=bad)


def test_inf_loss_is_skipped_when_configured(data, full, tmp_path, monkeypatch):
    _poison_batch(monkeypatch, 6, np.inf)
    run = dit_trainer.train(_config(data, on_nonfinite="skip"), str(tmp_path / "run"))
    assert run["skipped_steps"] == [6] and run["final_step"] == STEPS
    assert 6 not in run["losses"]
    for s in range(1, 6):
        assert run["losses"][s] == pytest.approx(full["losses"][s], abs=1e-6)
    params = [np.asarray(x) for x in __import__("jax").tree.leaves(run["state"].params)]
    assert all(np.isfinite(p).all() for p in params), "a skipped step reached the parameters"


def _record_flag_reads(monkeypatch):
    """({step: how many steps had been dispatched when that step's finite flag was read}, [dispatch count])."""
    from qwenimage_jax.training.guards import NonFiniteMonitor

    original_make, original_check = dit_trainer.make_train_step, NonFiniteMonitor.check
    dispatched, reads = [0], {}

    def make(*args, **kwargs):
        step = original_make(*args, **kwargs)

        def run(*step_args):
            dispatched[0] += 1
            return step(*step_args)
        return run

    def check(self, step, batch_index, metrics):
        reads[step] = dispatched[0]
        return original_check(self, step, batch_index, metrics)

    monkeypatch.setattr(dit_trainer, "make_train_step", make)
    monkeypatch.setattr(NonFiniteMonitor, "check", check)
    return reads, dispatched


def test_the_finite_flag_is_read_one_step_late_except_at_log_and_checkpoint_steps(data, full, tmp_path,
                                                                                   monkeypatch):
    """log_every 8, checkpoints every 4: the host reads step N's flag after dispatching step N+1, except at the
    first step, the checkpoint steps and the last; `sync_every_step` with `prefetch_batches=0` (the old loop)
    reads each right after it. Both train the same steps as the run that logs every step."""
    reads, dispatched = _record_flag_reads(monkeypatch)
    new = dit_trainer.train(_config(data, log_every=8), str(tmp_path / "new"))
    assert reads == {1: 1, 2: 3, 3: 4, 4: 4, 5: 6, 6: 7, 7: 8, 8: 8}
    reads.clear()
    dispatched[0] = 0
    old = dit_trainer.train(_config(data, log_every=8, sync_every_step=True, prefetch_batches=0),
                            str(tmp_path / "old"))
    assert reads == {s: s for s in range(1, STEPS + 1)}
    assert list(new["losses"]) == list(old["losses"]) == [8]
    assert new["losses"][8] == pytest.approx(full["losses"][8], abs=1e-6)
    assert old["losses"][8] == pytest.approx(full["losses"][8], abs=1e-6)


def test_a_nan_read_one_step_late_stops_before_any_later_checkpoint_or_is_skipped(data, tmp_path, monkeypatch):
    _poison_batch(monkeypatch, 7, np.nan)   # step 7: neither logged nor checkpointed, so its flag is read late
    workdir = str(tmp_path / "stop")
    with pytest.raises(NonFiniteError) as info:
        dit_trainer.train(_config(data, log_every=8), workdir)
    message = str(info.value)
    for part in ("at step 7", "data batch 6", "Last good checkpoint: step 4 in"):
        assert part in message, message
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.complete_steps() == [1, 4], "a checkpoint was written after the non-finite step"
    ckpt.close()
    monkeypatch.undo()
    _poison_batch(monkeypatch, 6, np.inf)
    run = dit_trainer.train(_config(data, log_every=8, on_nonfinite="skip"), str(tmp_path / "skip"))
    assert run["skipped_steps"] == [6] and run["final_step"] == STEPS
    params = [np.asarray(x) for x in __import__("jax").tree.leaves(run["state"].params)]
    assert all(np.isfinite(p).all() for p in params), "a skipped step reached the parameters"
    # skipping, three in a row (5, 6, 7: each read one step late) still stop the run at the third
    monkeypatch.undo()
    _nan_batches_from(monkeypatch, first=5)
    workdir = str(tmp_path / "in_a_row")
    with pytest.raises(NonFiniteError) as info:
        dit_trainer.train(_config(data, log_every=8, on_nonfinite="skip", nonfinite_in_a_row=3), workdir)
    for part in ("at step 7", "3 non-finite steps in a row (steps 5 to 7; 2 skipped in all)",
                 "Last good checkpoint: step 4 in"):
        assert part in str(info.value), str(info.value)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    assert ckpt.complete_steps() == [1, 4]
    ckpt.close()


def test_two_sigterms_make_one_clean_save(data, tmp_path, monkeypatch):
    """Two SIGTERMs in a row at step 3, and a third one while the final save is being written. (The signals are
    sent from the step itself: the batches are made ahead on the loop's prefetch thread.)"""
    original_make, original_finish = dit_trainer.make_train_step, Checkpointer.finish
    calls, saves = [], []

    def step_then_signal(*args, **kwargs):
        step = original_make(*args, **kwargs)

        def run(*step_args):
            calls.append(1)
            if len(calls) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGTERM)
            return step(*step_args)
        return run

    def finish_under_signal(self, step, state, data_iterator=None):
        os.kill(os.getpid(), signal.SIGTERM)
        return original_finish(self, step, state, data_iterator)

    original_save = Checkpointer.save

    def counting_save(self, step, state, data_iterator=None, force=False):
        started = original_save(self, step, state, data_iterator, force)
        if started:
            saves.append(step)
        return started

    monkeypatch.setattr(dit_trainer, "make_train_step", step_then_signal)
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


def test_a_partial_last_metrics_record_is_dropped_before_a_resumed_run_appends(tmp_path):
    """A run killed while writing metrics.jsonl leaves half a record without its newline: readers skip it and the
    next writer cuts it, so the resumed run's first record is a line of its own."""
    from qwenimage_jax.training.metrics_writer import MetricsWriter, read_scalars

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 0.5}\n{"step": 2, "train/lo')
    assert read_scalars(str(tmp_path)) == [{"step": 1, "train/loss": 0.5}]
    writer = MetricsWriter(str(tmp_path), enabled=True, tensorboard=False)
    writer.write_scalars(2, {"train/loss": 0.25})
    writer.close()
    assert path.read_text() == '{"step": 1, "train/loss": 0.5}\n{"step": 2, "train/loss": 0.25}\n'
    assert [r["step"] for r in read_scalars(str(tmp_path))] == [1, 2]


def test_an_export_that_fails_half_way_leaves_none_and_the_rerun_writes_it_whole(data, full, tmp_path, monkeypatch):
    """The DiT trainer's export is written beside `export/transformer` and swapped in: an export that fails after
    writing part of its files leaves no `export/transformer` (before, the half-written directory stayed and the
    next run, seeing it there, kept it), and the rerun (nothing left to train) writes the whole export, which
    loads as the trained weights."""
    import jax

    from qwenimage_jax.checkpoints import exporters
    from qwenimage_jax.checkpoints.loaders import load_transformer
    from tests.conftest import max_rel_err

    workdir = str(tmp_path / "run")
    shutil.copytree(full["workdir"], workdir)
    shutil.rmtree(os.path.join(workdir, "export"), ignore_errors=True)
    real = exporters.export_transformer

    def half_export(params, config, dst, *args, **kwargs):
        with open(os.path.join(dst, "config.json"), "w") as f:
            f.write("{}")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(exporters, "export_transformer", half_export)
    with pytest.raises(OSError, match="No space left"):
        dit_trainer.train(_config(data, export=True), workdir)
    assert sorted(os.listdir(os.path.join(workdir, "export"))) == []
    monkeypatch.setattr(exporters, "export_transformer", real)
    result = dit_trainer.train(_config(data, export=True), workdir)
    assert result["start_step"] == result["final_step"] == STEPS
    loaded = load_transformer(result["export_dir"])
    expected = jax.device_get(dit_trainer.export_params(full["state"]))
    assert jax.tree.structure(loaded.params) == jax.tree.structure(expected)
    assert max(max_rel_err(a, b) for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(expected))) <= 1e-6
