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


class _DiskFillsAfter:
    """A writable file that takes `room` bytes, writes them to the real file, then fails as a full disk does."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data):
        if len(data) > self._room:
            self._f.write(data[:self._room])
            self._f.flush()
            self._room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_filling_mid_file_keeps_the_previous_json_and_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "scores.json"
    previous = {"prompt": list(range(10))}
    io_utils.write_json(target, previous)
    written = []

    def open_on_a_full_disk(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        written.append(path)
        return _DiskFillsAfter(f, room=1000) if "w" in mode else f

    # io_utils' own `open`: json.dump really writes chunk after chunk until the 1000th byte
    monkeypatch.setattr(io_utils, "open", open_on_a_full_disk, raising=False)
    with pytest.raises(OSError) as info:
        io_utils.write_json(target, {"prompt": list(range(5000))})
    assert info.value.errno == errno.ENOSPC
    assert len(written) == 1 and written[0] != str(target)      # the bytes went to a temporary file
    assert json.loads(target.read_text()) == previous
    assert os.listdir(tmp_path) == ["scores.json"]


FILE_SIZE_LIMIT_CHILD = """
import os, resource, signal, sys
import numpy as np
from PIL import Image
sys.path.insert(0, {repo!r})
from qwenimage_jax import io_utils

out = {out!r}
io_utils.save_image(Image.fromarray(np.zeros((8, 8, 3), np.uint8)), os.path.join(out, "grid.png"))
os.makedirs(os.path.join(out, "component"))
with open(os.path.join(out, "component", "config.json"), "w") as f:
    f.write("{{}}")
noise = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)   # ~770 KB as a PNG


def write_png():
    io_utils.save_image(Image.fromarray(noise), os.path.join(out, "grid.png"))


def write_dir():
    with io_utils.atomic_dir(os.path.join(out, "component"), overwrite=True) as tmp:
        with open(os.path.join(tmp, "params.bin"), "wb") as f:
            f.write(noise.tobytes())


# from here on no file may grow past 64 KiB: the kernel fails the write that crosses it (EFBIG), mid-file
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, resource.RLIM_INFINITY))
for name, write in (("png", write_png), ("dir", write_dir)):
    try:
        write()
        print(name, "written")
    except OSError as e:
        print(name, "errno", e.errno)
"""


def test_a_write_cut_off_by_the_kernel_keeps_the_previous_outputs(tmp_path):
    """A real mid-file failure: RLIMIT_FSIZE makes the kernel refuse the write that crosses 64 KiB (EFBIG, the
    same path as ENOSPC: a short write, then an error), in a child process so the limit stays there."""
    import subprocess
    import sys

    repo = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
    proc = subprocess.run([sys.executable, "-c", FILE_SIZE_LIMIT_CHILD.format(repo=repo, out=str(tmp_path))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.splitlines() == [f"png errno {errno.EFBIG}", f"dir errno {errno.EFBIG}"], proc.stdout
    with Image.open(tmp_path / "grid.png") as back:
        assert back.size == (8, 8) and np.asarray(back).max() == 0
    assert sorted(os.listdir(tmp_path)) == ["component", "grid.png"], "a partial file or directory was left"
    assert os.listdir(tmp_path / "component") == ["config.json"]


def test_atomic_dir_refuses_a_directory_that_holds_something_and_replaces_it_only_when_asked(tmp_path):
    target = tmp_path / "vae"
    with io_utils.atomic_dir(target) as tmp:          # absent: written
        (open(os.path.join(tmp, "a.txt"), "w")).close()
    assert os.listdir(target) == ["a.txt"] and oct(target.stat().st_mode & 0o777) == "0o755"
    with pytest.raises(FileExistsError) as info:
        with io_utils.atomic_dir(target):
            pass
    assert info.value.filename == str(target)
    with pytest.raises(RuntimeError):                 # a failure half-way with overwrite: the old one stays
        with io_utils.atomic_dir(target, overwrite=True) as tmp:
            (open(os.path.join(tmp, "b.txt"), "w")).close()
            raise RuntimeError("interrupted")
    assert os.listdir(target) == ["a.txt"] and sorted(os.listdir(tmp_path)) == ["vae"]
    with io_utils.atomic_dir(target, overwrite=True) as tmp:
        (open(os.path.join(tmp, "b.txt"), "w")).close()
    assert os.listdir(target) == ["b.txt"] and sorted(os.listdir(tmp_path)) == ["vae"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with io_utils.atomic_dir(empty) as tmp:           # an empty directory holds nothing to lose
        (open(os.path.join(tmp, "c.txt"), "w")).close()
    assert os.listdir(empty) == ["c.txt"]


def test_staged_dir_keeps_the_previous_directory_until_the_new_one_is_whole(tmp_path):
    """A trainer's export goes through `staged_dir`: a write that fails half-way leaves the previous export as it
    was and no staging directory; a staging directory a killed run left behind is cleared by the next write; a
    finished write replaces the old directory whole (no file of it survives)."""
    dst = tmp_path / "export"
    with io_utils.staged_dir(dst) as staged:
        (tmp_path / "export.partial" / "weights").write_text("old")
        assert staged == str(tmp_path / "export.partial")
        assert not dst.exists()                          # nothing at the destination until the block ends
    assert (dst / "weights").read_text() == "old"
    with pytest.raises(RuntimeError, match="disk went away"):
        with io_utils.staged_dir(dst) as staged:
            (tmp_path / "export.partial" / "weights").write_text("half")
            raise RuntimeError("disk went away")
    assert sorted(os.listdir(tmp_path)) == ["export"] and (dst / "weights").read_text() == "old"
    (tmp_path / "export.partial").mkdir()                 # what SIGKILL mid-write leaves
    (tmp_path / "export.partial" / "stale").write_text("from a killed run")
    with io_utils.staged_dir(dst) as staged:
        assert os.listdir(staged) == []
        (tmp_path / "export.partial" / "config.json").write_text("new")
    assert sorted(os.listdir(dst)) == ["config.json"] and sorted(os.listdir(tmp_path)) == ["export"]


def test_swap_in_dir_puts_the_old_directory_back_when_the_rename_fails(tmp_path, monkeypatch):
    dst, staged = tmp_path / "export", tmp_path / "new"
    dst.mkdir(); (dst / "w").write_text("old")
    staged.mkdir(); (staged / "w").write_text("new")
    real_replace = os.replace

    def failing_replace(src, target):
        if os.fspath(src) == str(staged):
            raise OSError(errno.EXDEV, "cross-device link")
        return real_replace(src, target)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError):
        io_utils.swap_in_dir(staged, dst)
    assert (dst / "w").read_text() == "old" and not (tmp_path / "export.old").exists()
