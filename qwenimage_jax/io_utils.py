"""Atomic writes for the files commands leave behind (PNGs, JSON results): each appears complete or not at all.

A file is written under a private temporary name in its own directory and renamed into place with `os.replace`
(atomic within one filesystem), so a reader never sees half of it, and a crash, Ctrl-C or a full disk mid-write
leaves the previous file as it was (the temporary file is removed; only a hard kill can leave a stray `.tmp`).
Imports nothing of ours, so any layer may use it.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path beside `path` to write to; when the block ends without an exception it is renamed
    onto `path`, otherwise removed."""
    path = os.fspath(path)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp",
                               dir=os.path.dirname(os.path.abspath(path)))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp creates it 0600; the result is an ordinary shared file
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_json(path: str | os.PathLike, obj: Any, **dump_kwargs) -> None:
    """`json.dump(obj)` to `path`, atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, **dump_kwargs)


def save_image(image, path: str | os.PathLike, **save_kwargs) -> None:
    """`image.save(path)` (a PIL image), atomically; the format comes from `path`'s extension unless given."""
    from PIL import Image

    if "format" not in save_kwargs:  # the temporary name ends in .tmp, which PIL cannot map to a format
        ext = os.path.splitext(os.fspath(path))[1].lower()
        save_kwargs["format"] = Image.registered_extensions().get(ext, "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, **save_kwargs)
