"""Atomic writes for the files commands leave behind (PNGs, JSON results, converted components): each appears
complete or not at all.

A file (or a directory: `atomic_dir`) is written under a private temporary name in its own directory and renamed
into place with `os.replace` (atomic within one filesystem), so a reader never sees half of it, and a crash, Ctrl-C
or a full disk mid-write leaves the previous output as it was (the temporary is removed; only a hard kill can leave
a stray `.tmp`). Imports nothing of ours, so any layer may use it.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
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


def write_text(path: str | os.PathLike, text: str) -> None:
    """`text` to `path` (UTF-8), atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)


def save_image(image, path: str | os.PathLike, **save_kwargs) -> None:
    """`image.save(path)` (a PIL image), atomically; the format comes from `path`'s extension unless given."""
    from PIL import Image

    if "format" not in save_kwargs:  # the temporary name ends in .tmp, which PIL cannot map to a format
        ext = os.path.splitext(os.fspath(path))[1].lower()
        save_kwargs["format"] = Image.registered_extensions().get(ext, "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, **save_kwargs)


def dir_contents(path: str | os.PathLike) -> list[str] | None:
    """The sorted entries of `path` when it is a directory that holds something (or [path's name] when it is a
    file); None when there is nothing there to lose (absent, or an empty directory)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return sorted(os.listdir(path)) or None
    return [os.path.basename(path)] if os.path.lexists(path) else None


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[str]:
    """Yields a new empty directory beside `path` to write into; when the block ends without an exception it
    replaces `path`, otherwise it is removed. An existing `path` that holds something is replaced only with
    `overwrite` (else FileExistsError, checked again at the end: another process may have written it meanwhile);
    the old one is moved aside first and deleted only once the new one is in place."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)

    def refuse():
        if not overwrite and dir_contents(path) is not None:
            raise FileExistsError(errno.EEXIST, "already holds files; pass overwrite to replace them", path)

    refuse()
    tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=parent)
    aside = None   # where the previous `path` waits until the new one is in place
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it 0700; the result is an ordinary shared directory
        refuse()
        if os.path.lexists(path):
            aside = tempfile.mkdtemp(prefix=os.path.basename(path) + ".", suffix=".old", dir=parent)
            os.replace(path, os.path.join(aside, "previous"))
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None and not os.path.lexists(path):   # the new one did not land: the old one comes back
            os.replace(os.path.join(aside, "previous"), path)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


def swap_in_dir(staged: str | os.PathLike, path: str | os.PathLike) -> None:
    """Puts the finished directory `staged` at `path`, replacing what was there: the old one is moved aside and
    deleted only once the new one is in place, so a kill at any moment leaves `path` whole (old or new)."""
    staged, path = os.path.abspath(os.fspath(staged)), os.path.abspath(os.fspath(path))
    aside = path + ".old"
    shutil.rmtree(aside, ignore_errors=True)
    if os.path.lexists(path):
        os.replace(path, aside)
    try:
        os.replace(staged, path)
    except BaseException:
        if os.path.lexists(aside) and not os.path.lexists(path):
            os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(path: str | os.PathLike) -> Iterator[str]:
    """Yields `path` + ".partial", emptied, to write a directory into; when the block ends without an exception it
    replaces `path` (`swap_in_dir`). The name is fixed, not random, so every host of a multi-host job writes into
    the same place and a rerun clears what a killed one left; an interrupted write never touches `path`."""
    path = os.path.abspath(os.fspath(path))
    staged = path + ".partial"
    shutil.rmtree(staged, ignore_errors=True)
    os.makedirs(staged)
    try:
        yield staged
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    swap_in_dir(staged, path)


def git_commit(repo: str | None = None) -> str:
    """The checkout's short commit (+ "-dirty" with uncommitted changes to tracked files), or "unknown" outside a
    git checkout: what a written figure records so a reader can tell which code made it."""
    import subprocess

    repo = repo or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def provenance(command: str | None = None) -> dict:
    """What a written figure records about how it was made: the commit (`git_commit`), the versions of python, jax,
    jaxlib, flax and numpy that ran, the machine (platform, CPU count, jax's devices if jax is imported) and the
    command (`command`, else this process's argv), with the UTC time."""
    import datetime
    import platform
    import sys
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("jax", "jaxlib", "flax", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    machine = {"platform": platform.platform(), "cpus": os.cpu_count()}
    if "jax" in sys.modules:
        with contextlib.suppress(Exception):
            devices = sys.modules["jax"].devices()
            machine["devices"] = f"{len(devices)} x {devices[0].device_kind}"
    if command is None:
        argv = list(sys.argv)
        argv[0] = os.path.basename(argv[0]) if argv else ""
        command = " ".join(["python", "-m", sys.modules["__main__"].__spec__.name] + argv[1:]) \
            if getattr(sys.modules.get("__main__"), "__spec__", None) else " ".join(["python"] + argv)
    return {"commit": git_commit(), "versions": versions, "machine": machine, "command": command,
            "written": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
