"""The CLI's one error boundary (`qwenimage_jax.cli.main`, docs/reliability.md "Errors through the CLI"): an error
the user can fix is one stderr line and its kind's exit code, `--debug` adds the traceback, a bug names a saved
traceback file. Every case runs in-process and fails before any model is loaded."""
from __future__ import annotations

import errno
import os
import sys
import types

import pytest

from qwenimage_jax import cli
from qwenimage_jax.checkpoints.safetensors_io import WeightFileError
from qwenimage_jax.errors import CheckpointError, ConfigError, InputError, OutputError, TrainingError, WeightsError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIG = os.path.join(REPO, "configs", "dit_train_tiny.py")


def _error_line(capsys, command: str) -> str:
    """The single stderr line of a failed command (and no traceback)."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    assert lines[0].startswith(f"qwenimage-jax {command}: error: "), err
    return lines[0]


def _fake_command(monkeypatch, exc: BaseException):
    """Makes `qwenimage-jax sample` a command whose run raises `exc` (it takes one argument, --out)."""
    def add_arguments(parser):
        parser.add_argument("--out", default=None)

    def run(args):
        raise exc

    module = types.ModuleType("fake_command")
    module.add_arguments, module.run = add_arguments, run
    monkeypatch.setitem(sys.modules, "fake_command", module)
    monkeypatch.setitem(cli.COMMANDS, "sample", ("fake_command", "raises"))


def test_exit_codes_are_distinct_and_not_the_cli_own():
    codes = [c.exit_code for c in (ConfigError, InputError, WeightsError, OutputError, CheckpointError, TrainingError)]
    assert len(set(codes)) == len(codes) and not {0, 1, 2, 130} & set(codes)
    # the existing classes keep their builtin bases: callers catching ValueError / FloatingPointError still work
    from qwenimage_jax.checkpoints.lora import LoraKeyError
    from qwenimage_jax.checkpoints.params import WeightKeyError
    from qwenimage_jax.training.checkpoint import CheckpointSaveError
    from qwenimage_jax.training.guards import NonFiniteError
    for cls, builtin, kind in ((WeightFileError, ValueError, WeightsError), (WeightKeyError, ValueError, WeightsError),
                               (LoraKeyError, ValueError, WeightsError),
                               (CheckpointSaveError, RuntimeError, CheckpointError),
                               (NonFiniteError, FloatingPointError, TrainingError)):
        assert issubclass(cls, builtin) and issubclass(cls, kind), cls


def test_missing_model_directory_is_a_weights_error(tmp_path, capsys):
    absent = str(tmp_path / "no-model")
    assert cli.main(["sample", "--model", absent, "--prompt", "a", "--out", str(tmp_path / "x.png")]) == 5
    line = _error_line(capsys, "sample")
    assert absent in line and "does not exist; pass a diffusers-format Qwen-Image-2 directory" in line


def test_convert_with_a_missing_source(tmp_path, capsys):
    absent = str(tmp_path / "no-vae")
    assert cli.main(["convert", "--component", "vae", absent, str(tmp_path / "out")]) == 5
    line = _error_line(capsys, "convert")
    assert absent in line and "qwenimage-jax convert`" in line
    assert not os.path.exists(tmp_path / "out")


def test_reconstruct_with_an_unreadable_image(tmp_path, capsys):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    # --vae is absent too: the images are checked first, so that error is the one reported
    assert cli.main(["reconstruct", "--vae", str(tmp_path / "no-vae"), str(bad), "--out", str(tmp_path)]) == 4
    line = _error_line(capsys, "reconstruct")
    assert str(bad) in line and "pass images PIL reads" in line


@pytest.mark.parametrize("override, names", [
    ("--config.steps=abc", "the field steps takes a int"),
    ("--config.optimizer.learnig_rate=1", "unknown config key 'optimizer.learnig_rate'; did you mean "
                                          "optimizer.learning_rate"),
    ("--config.steps", "write --config.steps=VALUE"),
])
def test_bad_config_overrides(tmp_path, capsys, override, names):
    assert cli.main(["train-dit", "--config", TRAIN_CONFIG, "--workdir", str(tmp_path), override]) == 3
    assert names in _error_line(capsys, "train-dit")


def test_missing_config_file_and_unknown_preset(tmp_path, capsys):
    assert cli.main(["train-dit", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)]) == 3
    assert "nope.py' not found" in _error_line(capsys, "train-dit")
    preset = os.path.join(REPO, "configs", "sampling.py") + ":fast"
    assert cli.main(["sample", "--model", str(tmp_path), "--config", preset, "--prompt", "a", "--out", "x.png"]) == 3
    assert "get_config('fast') failed: ValueError: unknown sampling preset 'fast'" in _error_line(capsys, "sample")


def test_multi_line_message_is_printed_as_it_is(monkeypatch, capsys):
    _fake_command(monkeypatch, WeightFileError("dir/params does not match:\n  - 2 leaves absent\nconvert again"))
    assert cli.main(["sample"]) == 5
    err = capsys.readouterr().err
    assert err == "qwenimage-jax sample: error: dir/params does not match:\n  - 2 leaves absent\nconvert again\n"


@pytest.mark.parametrize("exc, code, shown", [
    (ValueError("--steps 0; use 1 to 1000"), 4, "ValueError: --steps 0; use 1 to 1000 (--debug shows where"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/in.png"), 4, "/data/in.png"),
    (OSError(errno.ENOSPC, "No space left on device", "/elsewhere/x"), 6, "No space left on device"),
    (FileExistsError("out.png already holds weights; choose an empty destination"), 6, "choose an empty"),
])
def test_builtin_errors_are_user_errors(monkeypatch, capsys, exc, code, shown):
    _fake_command(monkeypatch, exc)
    assert cli.main(["sample"]) == code
    assert shown in _error_line(capsys, "sample")


def test_oserror_on_an_output_path_is_an_output_error(monkeypatch, tmp_path, capsys):
    out = str(tmp_path / "out.png")
    _fake_command(monkeypatch, PermissionError(errno.EACCES, "Permission denied", out + ".a1b2.tmp"))
    assert cli.main(["sample", "--out", out]) == OutputError.exit_code
    assert "Permission denied" in _error_line(capsys, "sample")


def test_debug_flag_and_env_print_the_traceback(tmp_path, monkeypatch, capsys):
    argv = ["sample", "--model", str(tmp_path / "absent"), "--prompt", "a", "--out", str(tmp_path / "x.png")]
    assert cli.main(argv + ["--debug"]) == 5
    err = capsys.readouterr().err
    assert "Traceback" in err and "WeightsNotFoundError" in err
    assert err.strip().splitlines()[-1].startswith("qwenimage-jax sample: error: ")  # the line still ends it
    monkeypatch.setenv(cli.DEBUG_ENV, "1")
    assert cli.main(argv) == 5
    assert "Traceback" in capsys.readouterr().err


def test_unexpected_exception_is_a_bug_with_a_saved_traceback(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    _fake_command(monkeypatch, RuntimeError("shapes (3, 4) and (5,) do not broadcast\nsecond line"))
    assert cli.main(["sample", "--out", "x.png"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("qwenimage-jax sample: internal error (a bug): RuntimeError: shapes (3, 4) and (5,) do not "
                          "broadcast; traceback saved to ")
    crash = err.split("traceback saved to ")[1].split(";")[0]
    assert os.path.dirname(crash) == str(tmp_path) and os.path.basename(crash).startswith("qwenimage-jax-crash-")
    text = open(crash, encoding="utf-8").read()
    assert "command: qwenimage-jax sample --out x.png" in text and "Traceback" in text
    assert "RuntimeError: shapes (3, 4) and (5,) do not broadcast" in text


def test_ctrl_c_is_one_line_and_130(monkeypatch, capsys):
    _fake_command(monkeypatch, KeyboardInterrupt())
    assert cli.main(["sample"]) == 130
    assert capsys.readouterr().err == "qwenimage-jax sample: interrupted\n"


def test_usage_errors_and_help_are_argparse_own(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", "--component", "vae"])  # missing SRC DST
    assert info.value.code == 2
    with pytest.raises(SystemExit) as info:
        cli.main(["convert", "--help"])
    assert info.value.code == 0 and "--debug" in capsys.readouterr().out
