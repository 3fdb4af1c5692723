"""Where training numbers go: TensorBoard (tensorboardX) scalars and image grids, a JSON-lines file of every
scalar (for plots and tests), and a short console line. Only process 0 writes; other hosts get a no-op writer.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Mapping

import numpy as np

log = logging.getLogger("qwenimage_jax.training")


def image_grid(rows: list[np.ndarray], pad: int = 2) -> np.ndarray:
    """Tiles rows of images, each (n, H, W, 3) in [-1, 1], into one uint8 (R*H', n*W', 3) grid."""
    tiles = []
    for row in rows:
        row = np.asarray(row, np.float32)
        row = np.pad(row, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=1.0)
        tiles.append(np.concatenate(list(row), axis=1))
    grid = np.concatenate(tiles, axis=0)
    return np.clip(np.round((grid + 1.0) * 127.5), 0, 255).astype(np.uint8)


class MetricsWriter:
    """write_scalars(step, {name: number}), write_images(step, {name: uint8 (H, W, 3)}), flush(), close()."""

    def __init__(self, logdir: str, enabled: bool | None = None, console_every: int = 10, tensorboard: bool = True):
        import jax

        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.console_every = max(1, int(console_every))
        self.logdir = logdir
        self._tb = None
        self._jsonl = None
        if not self.enabled:
            return
        os.makedirs(logdir, exist_ok=True)
        path = os.path.join(logdir, "metrics.jsonl")
        drop_partial_line(path)
        self._jsonl = open(path, "a", encoding="utf-8")
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
                self._tb = SummaryWriter(logdir, flush_secs=30)
            except ImportError:
                log.warning("tensorboardX is not installed; scalars go to %s/metrics.jsonl only "
                            "(pip install tensorboardX for TensorBoard)", logdir)

    def write_scalars(self, step: int, scalars: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": int(step), **values}) + "\n")
        if self._tb is not None:
            for name, value in values.items():
                self._tb.add_scalar(name, value, int(step))
        if int(step) % self.console_every == 0:
            shown = " ".join(f"{k}={v:.4g}" for k, v in sorted(values.items()))
            log.info("step %d: %s", int(step), shown)

    def write_images(self, step: int, images: Mapping[str, np.ndarray]) -> None:
        if not self.enabled:
            return
        for name, image in images.items():
            image = np.asarray(image)
            if self._tb is not None:
                self._tb.add_image(name, image, int(step), dataformats="HWC")
            from PIL import Image
            os.makedirs(os.path.join(self.logdir, "images"), exist_ok=True)
            Image.fromarray(image).save(os.path.join(self.logdir, "images", f"{name}_{int(step):07d}.png"))

    def flush(self) -> None:
        if self._jsonl is not None:
            self._jsonl.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self.flush()
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def drop_partial_line(path: str) -> None:
    """Cuts a last line without its newline (a run killed mid-write) from the append-only log at `path`, so the
    resumed run's records start on a line of their own instead of gluing onto half a record."""
    if not os.path.exists(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
        log.warning("%s ended in a partial record (the run was killed while writing it); dropped it", path)


def read_scalars(logdir: str) -> list[dict]:
    """All records of `logdir/metrics.jsonl` (later records for a step win, e.g. after a resume)."""
    path = os.path.join(logdir, "metrics.jsonl")
    by_step = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.endswith("\n"):   # a partial last record of a killed run: the next writer drops it
                break
            record = json.loads(line)
            by_step.setdefault(record["step"], {}).update(record)
    return [by_step[s] for s in sorted(by_step)]
