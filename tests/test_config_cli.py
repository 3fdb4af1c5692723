"""Config files + `--config.key=value` overrides, and the CLI's help/unknown-command behaviour."""
import pytest

from qwenimage_jax import cli
from qwenimage_jax.config_cli import load_config


def _write_config(tmp_path):
    path = tmp_path / "cfg.py"
    path.write_text(
        "import ml_collections\n"
        "def get_config(arg=None):\n"
        "    c = ml_collections.ConfigDict()\n"
        "    c.steps = 10\n"
        "    c.lr = 1e-3\n"
        "    c.name = arg or 'base'\n"
        "    c.model = ml_collections.ConfigDict({'layers': 2, 'axes': (1, 2)})\n"
        "    return c\n")
    return str(path)


def test_overrides_are_typed_and_nested(tmp_path):
    cfg = load_config(_write_config(tmp_path) + ":big", ["--config.steps=20", "--config.lr=1",
                                                         "--config.model.axes=[3,4]"])
    assert cfg.steps == 20 and cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.model.axes == (3, 4) and cfg.name == "big"


def test_unknown_override_suggests_close_keys(tmp_path):
    with pytest.raises(KeyError, match="did you mean steps"):
        load_config(_write_config(tmp_path), ["--config.stepz=3"])


def test_cli_help_and_unknown_command(capsys):
    assert cli.main(["--help"]) == 0
    assert "reconstruct" in capsys.readouterr().out
    assert cli.main(["no-such-command"]) == 2
    assert "unknown command" in capsys.readouterr().err
