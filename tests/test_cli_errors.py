"""The CLI's one error boundary (`qwenimage_jax.cli.main`, docs/reliability.md "Errors through the CLI"): an error
the user can fix is one stderr line and its kind's exit code, `--debug` adds the traceback, a bug names a saved
traceback file. Every case runs in-process and fails before any model is loaded, except `convert`'s own output rows
(a replaced destination, a write that fails half-way), which convert the shipped tiny world's VAE, and `sample`'s
memory check, which loads the tiny world and is refused before anything is sampled."""
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
TINY_WORLD = os.path.join(REPO, "qwenimage_jax", "assets", "tiny_world")


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


def test_sample_size_beyond_the_free_memory_is_an_input_error_before_sampling(tmp_path, capsys, monkeypatch):
    """16384 px is inside the RoPE range (32768) but far beyond any machine for the tiny world's XLA attention
    (about 10^6 target tokens): refused with the real free-memory figure, before the text encoder or the sampler run."""
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    def must_not_run(*args, **kwargs):
        raise AssertionError("the pipeline encoded the prompt before refusing the size")

    monkeypatch.setattr(QwenImagePipeline, "encode_prompt", must_not_run)
    out = tmp_path / "x.png"
    assert cli.main(["sample", "--model", TINY_WORLD, "--prompt", "a", "--out", str(out), "--height", "16384",
                     "--width", "16384", "--no-progress"]) == InputError.exit_code
    line = _error_line(capsys, "sample")
    for part in ("1 image(s) of 16384x16384", "is free in", "the largest square size that fits 1 image(s) is ",
                 "not even one image of 16384x16384 fits", "--no-memory-check"):
        assert part in line, line
    assert not out.exists()


def test_convert_with_a_missing_source(tmp_path, capsys):
    absent = str(tmp_path / "no-vae")
    assert cli.main(["convert", "--component", "vae", absent, str(tmp_path / "out")]) == 5
    line = _error_line(capsys, "convert")
    assert absent in line and "qwenimage-jax convert`" in line
    assert not os.path.exists(tmp_path / "out")


def _occupied(path) -> dict[str, bytes]:
    """Makes `path` a directory holding another component (a transformer's files); returns its contents."""
    os.makedirs(path)
    files = {"config.json": b'{"_class_name": "QwenImage21Transformer2DModel"}',
             "diffusion_pytorch_model.safetensors": b"not really weights"}
    for name, data in files.items():
        with open(os.path.join(path, name), "wb") as f:
            f.write(data)
    return files


def _contents(path) -> dict[str, bytes]:
    out = {}
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            out[name] = f.read()
    return out


def test_convert_refuses_a_destination_that_holds_something_before_reading_the_source(tmp_path, capsys,
                                                                                      monkeypatch):
    from qwenimage_jax import checkpoints

    dst = str(tmp_path / "transformer")
    files = _occupied(dst)

    def must_not_load(*args, **kwargs):
        raise AssertionError("the source was read although the destination is refused")

    monkeypatch.setattr(checkpoints, "load", must_not_load)
    assert cli.main(["convert", "--component", "vae", os.path.join(TINY_WORLD, "vae"), dst]) == 6
    line = _error_line(capsys, "convert")
    assert dst in line and "config.json, diffusion_pytorch_model.safetensors" in line and "--overwrite" in line
    assert _contents(dst) == files
    (tmp_path / "file.bin").write_bytes(b"x")   # a file where the directory should go is refused the same way
    assert cli.main(["convert", "--component", "vae", os.path.join(TINY_WORLD, "vae"),
                     str(tmp_path / "file.bin")]) == 6
    assert "--overwrite" in _error_line(capsys, "convert")


def test_convert_overwrite_replaces_the_destination_whole(tmp_path, capsys):
    from qwenimage_jax import checkpoints

    dst = str(tmp_path / "vae")
    _occupied(dst)
    assert cli.main(["convert", "--component", "vae", os.path.join(TINY_WORLD, "vae"), dst, "--overwrite"]) == 0
    assert sorted(os.listdir(dst)) == ["config.json", "params"], "the old files must be gone"
    assert os.listdir(tmp_path) == ["vae"], "no temporary or old directory may be left beside it"
    converted = checkpoints.load("vae", dst)
    original = checkpoints.load("vae", os.path.join(TINY_WORLD, "vae"))
    assert converted.vae_config == original.vae_config


@pytest.mark.parametrize("overwrite", [False, True])
def test_convert_failing_half_way_leaves_no_partial_destination(tmp_path, capsys, monkeypatch, overwrite):
    from qwenimage_jax.checkpoints import orbax_io

    def fill_the_disk(dst, params, config, component):
        os.makedirs(os.path.join(dst, "params"))
        with open(os.path.join(dst, "config.json"), "w") as f:
            f.write('{"_class_na')
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(dst, "config.json"))

    monkeypatch.setattr(orbax_io, "save_component", fill_the_disk)
    dst = str(tmp_path / "vae")
    files = _occupied(dst) if overwrite else None
    argv = ["convert", "--component", "vae", os.path.join(TINY_WORLD, "vae"), dst] + (["--overwrite"] * overwrite)
    assert cli.main(argv) == 6
    assert "No space left on device" in _error_line(capsys, "convert")
    if overwrite:
        assert _contents(dst) == files, "the previous destination must survive a failed --overwrite"
        assert os.listdir(tmp_path) == ["vae"]
    else:
        assert os.listdir(tmp_path) == [], "a failed convert must leave nothing behind"


def test_missing_optional_packages_name_what_to_install(tmp_path, capsys, monkeypatch):
    from qwenimage_jax.checkpoints import quantize
    from qwenimage_jax.data import images
    from qwenimage_jax.errors import MissingPackageError

    for module in ("qwix", "skimage", "skimage.data", "libtpu"):
        monkeypatch.setitem(sys.modules, module, None)   # `import module` now raises ImportError
    with pytest.raises(MissingPackageError, match=r"pip install 'qwenimage-jax\[quant\]'") as info:
        quantize._qwix()
    assert isinstance(info.value, ImportError) and info.value.exit_code == InputError.exit_code
    with pytest.raises(MissingPackageError, match="pip install scikit-image"):
        images.SkimageSource()
    # through the CLI: one line and the input code, not a bug report
    assert cli.main(["aot", "--config", TRAIN_CONFIG, "--topology", "v5e-4"]) == InputError.exit_code
    assert "needs libtpu on this host: pip install -e '.[aot]'" in _error_line(capsys, "aot")


def test_vae_config_errors_are_config_errors_and_still_value_errors(tmp_path, capsys):
    import json

    from qwenimage_jax.models.vae import VAEConfig, VAEConfigError

    with pytest.raises(ConfigError) as info:
        VAEConfig(z_dim=0)
    assert isinstance(info.value, VAEConfigError) and isinstance(info.value, ValueError)
    assert "unsupported VAE config: z_dim=0 must be positive" in str(info.value)
    # another component's config.json given as the VAE is a weights error (5), named before any tensor is read
    assert cli.main(["convert", "--component", "vae", os.path.join(TINY_WORLD, "transformer"),
                     str(tmp_path / "out")]) == WeightsError.exit_code
    assert "config is for 'QwenImage21Transformer2DModel'" in _error_line(capsys, "convert")
    bad = tmp_path / "vae"
    bad.mkdir()
    with open(os.path.join(TINY_WORLD, "vae", "config.json")) as f:
        config = json.load(f)
    (bad / "config.json").write_text(json.dumps(dict(config, frobnicate=1)))
    assert cli.main(["convert", "--component", "vae", str(bad), str(tmp_path / "out")]) == ConfigError.exit_code
    assert "unknown VAE config field(s) ['frobnicate']" in _error_line(capsys, "convert")
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
