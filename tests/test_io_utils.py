"""Atomic writes (`qwenimage_jax.io_utils`): a write that fails half-way leaves the previous file and no partial one."""
from __future__ import annotations

import errno
import json
import os

import numpy as np
import pytest
from PIL import Image

from qwenimage_jax import io_utils


def test_json_write_failing_half_way_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "result.json"
    io_utils.write_json(target, {"accuracy": 0.5})
    assert json.loads(target.read_text()) == {"accuracy": 0.5} and oct(target.stat().st_mode & 0o777) == "0o644"

    real_dump = json.dump

    def dump_then_fill_the_disk(obj, f, **kwargs):
        f.write('{"accur')  # half of the new file is out when the disk fills
        f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", dump_then_fill_the_disk)
    with pytest.raises(OSError, match="No space left"):
        io_utils.write_json(target, {"accuracy": 0.9})
    monkeypatch.setattr(json, "dump", real_dump)
    assert json.loads(target.read_text()) == {"accuracy": 0.5}
    assert os.listdir(tmp_path) == ["result.json"]  # no .tmp left beside it


def test_image_write_interrupted_keeps_the_previous_file(tmp_path, monkeypatch):
    target = tmp_path / "grid.png"
    old = Image.fromarray(np.full((8, 8, 3), 7, np.uint8))
    io_utils.save_image(old, target)
    new = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))

    def save_half_then_interrupt(self, fp, format=None, **kwargs):
        assert format == "PNG"  # from grid.png, not from the temporary .tmp name
        with open(fp, "wb") as f:
            f.write(b"\x89PNG\r\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", save_half_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        io_utils.save_image(new, target)
    monkeypatch.undo()
    with Image.open(target) as back:
        assert np.asarray(back).max() == 7
    assert os.listdir(tmp_path) == ["grid.png"]
    io_utils.save_image(new, target)  # and a write that completes replaces it
    with Image.open(target) as back:
        assert np.asarray(back).min() == 200
