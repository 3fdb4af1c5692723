"""Precomputed regression pairs for DMD distillation: (noise, the teacher's CFG Euler solution from that noise).

    qwenimage-jax distill-pairs --config configs/world_distill.py --out /tmp/world/distill_pairs \
        --config.teacher=/tmp/world/transformer --config.data.path=/tmp/world/latents
    qwenimage-jax distill --config configs/world_distill.py --workdir /tmp/world/distill_2 ... \
        --config.regression.pairs=/tmp/world/distill_pairs

Why: the regression term pulls the student's x0 to the teacher's ODE solution from the same noise. Solved online it
costs `regression.teacher_steps` teacher forwards (twice with CFG) in every update, which is why the online target
had to be short; DMD1 (arXiv 2311.18828) instead solves a fixed set of pairs once, offline, at the teacher's full
step count, and the trainer reads them as data (training/distill.py: a batch with `noise` is a pairs batch).

The store is a latent dataset (data/latent_records.py) that `latent_dataset` reads unchanged, one record per pair:
    latents      (h, w, C) float32   the teacher's solution x0 from `noise`, in the cache's latent layout
    noise        (N, C) float32      the start noise, N = h * w target tokens (what the trainer's step draws)
    text_embeds, image_pad_mask, cond_latents    the source row's (text unpadded again), copied
with the source's null_text_embeds.npy, meta.json (written once complete) and pairs.json: the settings that
determine the pairs (the teacher's and the source's paths with fingerprints of their files: a moved copy still
matches, a teacher trained further in place does not), `complete`, and `seconds` (wall time of the build, summed
over resumed runs).

Rows: the first `num_pairs` rows of the source cache's batch stream (`bucketed_batches` with data.seed and
data.bucket_weights: shuffled, homogeneous-layout batches of `batch_size`); a cache smaller than num_pairs repeats
rows, each time with new noise. Noise of row r: normal(fold_in(fold_in(key(config.seed), NOISE_STREAM), r)), so it
depends neither on the batch size nor on the chunking. The solution: `teacher_grid(config, N)`
(regression.teacher_steps Euler steps) with CFG regression.cfg_scale (else dmd.real_cfg_scale) against the source's
empty prompt on text-to-image layouts, scale 1 otherwise: the same function as the online target.

Resumable: rows are written in chunks of `chunk_size`, each one shard built in a temporary directory, moved in, and
then marked done by chunk-XXXXX.json; a rerun skips marked chunks and rewrites any other. Single host.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenimage_jax.data import latent_records
from qwenimage_jax.errors import InputNotFoundError
from qwenimage_jax.io_utils import write_json
from qwenimage_jax.models.dit import param_shardings
from qwenimage_jax.parallel.mesh import mesh_from_config
from qwenimage_jax.parallel.rules import LOGICAL_RULES
from qwenimage_jax.training import distill as dt
from qwenimage_jax.training.dit import BATCH_AXES, _global_batch, batch_layout

log = logging.getLogger("qwenimage_jax.training.distill_pairs")

MANIFEST = "pairs.json"
LOCATIONS = ("teacher", "source")  # recorded, not compared: their files' fingerprints say whether they changed
NOISE_STREAM = 0x50414952  # "PAIR": keeps the pairs' noise apart from the trainer's fold_in(key(seed), step) keys
DEFAULT_CHUNK_ROWS = 256
FLOAT32_FIELDS = ("latents", "noise")  # float16 rounding would move the target and the start point apart


# ----------------------------------------------------------------------------------------------------------------
# Settings and the manifest


def text_to_image_cfg_scale(config) -> float:
    """The CFG scale of the regression target on text-to-image layouts (other layouts solve without CFG)."""
    return float(config.regression.get("cfg_scale", None) or config.dmd.real_cfg_scale)


def _teacher_path(config) -> str:
    return os.path.abspath(config.teacher) if config.get("teacher") else ""


def files_fingerprint(root: str) -> str:
    """A digest of the files under `root` (relative path, size, whole-second mtime): a teacher trained further in
    place, or a cache written again, no longer matches pairs solved from it, while a moved copy that keeps mtimes
    (shutil.copytree, cp -p, rsync -t) still does. "" for no path (the random smoke-test teacher)."""
    if not root:
        return ""
    digest = hashlib.sha256()
    for folder, _, files in sorted(os.walk(root)):
        for name in sorted(files):
            info = os.stat(os.path.join(folder, name))
            rel = os.path.relpath(os.path.join(folder, name), root)
            digest.update(f"{rel}\0{info.st_size}\0{int(info.st_mtime)}\n".encode())
    return digest.hexdigest()[:16]


def pairs_settings(config, num_pairs: int, batch_size: int, chunk_size: int) -> dict:
    """Everything that determines the stored pairs: a store is resumed or reused only under equal settings."""
    if num_pairs <= 0 or batch_size <= 0:
        raise ValueError(f"num_pairs ({num_pairs}) and batch_size ({batch_size}) must be positive")
    if chunk_size <= 0 or chunk_size % batch_size:
        raise ValueError(f"chunk_size {chunk_size} must be a positive multiple of the batch size {batch_size}")
    source = os.path.abspath(config.data.path)
    settings = {"num_pairs": int(num_pairs), "batch_size": int(batch_size), "chunk_size": int(chunk_size),
                "seed": int(config.seed), "teacher": _teacher_path(config),
                "teacher_files": files_fingerprint(_teacher_path(config)),
                "teacher_steps": int(config.regression.teacher_steps), "cfg_scale": text_to_image_cfg_scale(config),
                "source": source, "source_files": files_fingerprint(source), "data_seed": int(config.data.seed),
                "bucket_weights": dict(config.data.get("bucket_weights", None) or {}),
                "max_text_tokens": int(config.data.max_text_tokens),
                "scheduler": dict(config.get("scheduler", None) or {}),
                "compute_dtype": config.get("compute_dtype", "float32"),
                "teacher_param_dtype": config.get("teacher_param_dtype", "float32")}
    return json.loads(json.dumps(settings))  # as pairs.json holds them (tuples are lists there), for comparing


def read_manifest(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _start_manifest(out_dir: str, settings: dict) -> dict:
    """The store's manifest: the existing one when its settings equal `settings`, else a new incomplete one;
    a store built under other settings is refused (resuming it would mix two sets of pairs)."""
    manifest = read_manifest(out_dir)
    if manifest is not None:
        differ = [f"{k}: {manifest.get(k)!r} there, {v!r} now" for k, v in settings.items()
                  if k not in LOCATIONS and manifest.get(k) != v]
        if differ:
            raise ValueError(f"{out_dir} holds pairs built with other settings ({'; '.join(differ)}); delete it or "
                             "choose another output directory")
        return manifest
    os.makedirs(out_dir, exist_ok=True)
    manifest = dict(settings, complete=False, seconds=0.0)
    write_json(os.path.join(out_dir, MANIFEST), manifest, indent=1)
    return manifest


def check_pairs_match(config, pairs_dir: str) -> dict:
    """The manifest of a complete store whose targets are the ones `config` regresses to (the same teacher files,
    teacher steps and CFG; the store and the teacher may have moved); raises otherwise."""
    manifest = read_manifest(pairs_dir)
    if manifest is None:
        raise InputNotFoundError(f"regression.pairs={pairs_dir!r} holds no {MANIFEST}; build the pairs with "
                                 "`qwenimage-jax distill-pairs --config ... --out DIR` first")
    if not manifest.get("complete"):
        raise ValueError(f"the pairs in {pairs_dir} are incomplete; re-run `qwenimage-jax distill-pairs` with the same "
                         "settings to finish them")
    wanted = {"teacher_files": files_fingerprint(_teacher_path(config)), "teacher_steps": int(config.regression.teacher_steps),
              "cfg_scale": text_to_image_cfg_scale(config)}
    differ = [f"{k}: {manifest.get(k)!r} there, {v!r} in the config" for k, v in wanted.items() if manifest.get(k) != v]
    if differ:
        raise ValueError(f"the pairs in {pairs_dir} are not this config's regression target ({'; '.join(differ)}); "
                         "rebuild them or point regression.pairs elsewhere")
    return manifest


# ----------------------------------------------------------------------------------------------------------------
# Rows, noise and the teacher's solution


def pair_noise(seed: int, rows: np.ndarray, n_target: int, channels: int) -> np.ndarray:
    """(len(rows), n_target, channels) float32: row r's start noise, a function of (seed, r) only."""
    stream = jax.random.fold_in(jax.random.key(seed), NOISE_STREAM)
    draw = lambda r: jax.random.normal(jax.random.fold_in(stream, r), (n_target, channels))  # noqa: E731
    return np.asarray(jax.vmap(draw)(np.asarray(rows, np.uint32)), np.float32)


def source_batches(config, batch_size: int):
    """The source cache's batch stream (random access by batch index), as the distill loader shuffles it."""
    return latent_records.bucketed_batches(
        config.data.path, batch_size, max_text_tokens=int(config.data.max_text_tokens), seed=int(config.data.seed),
        bucket_weights=dict(config.data.get("bucket_weights", None) or {}) or None)


def cache_records(batch: dict, solution: np.ndarray, noise: np.ndarray, count: int) -> list[dict]:
    """The first `count` rows of a padded batch as cache-format records with the pair's latents and noise."""
    records = []
    for i in range(count):
        length = int(np.sum(batch["text_mask"][i]))
        record = {"latents": solution[i].reshape(batch["latents"].shape[1:]), "noise": noise[i],
                  "text_embeds": batch["text_embeds"][i, :length],
                  "image_pad_mask": np.asarray(batch["image_pad_mask"][i, :length], bool)}
        if batch.get("cond_latents") is not None:
            record["cond_latents"] = batch["cond_latents"][i]
        records.append(record)
    return records


@functools.lru_cache(maxsize=16)
def _solver(config_json: str, layout, mesh):
    """Jitted (teacher params, z (B, N, C), batch, null_text) -> the teacher's solution (B, N, C), cached like the
    distill step (repeated builds and tests reuse the program)."""
    import ml_collections

    config = ml_collections.ConfigDict(json.loads(config_json))
    _, teacher_cfg = dt.model_configs(config)
    batch_sharding, replicated = NamedSharding(mesh, P(BATCH_AXES)), NamedSharding(mesh, P())
    return jax.jit(dt.regression_target_fn(config, layout),
                   in_shardings=(param_shardings(teacher_cfg, mesh), batch_sharding, batch_sharding, replicated),
                   out_shardings=batch_sharding)


class _Teacher:
    """The frozen teacher on the config's mesh and the empty prompt its CFG uses; solves batches of rows."""

    def __init__(self, config, batch_size: int):
        if jax.process_count() > 1:
            raise ValueError("distill-pairs runs on a single host; run it on one process and share the store")
        self.mesh = mesh_from_config(config.mesh)
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        if batch_size % shards:
            raise ValueError(f"batch size {batch_size} is not divisible by the mesh's {shards} batch shards "
                             f"(mesh {dict(self.mesh.shape)}); change the batch size or config.mesh")
        _, teacher_cfg = dt.model_configs(config)
        with nn.logical_axis_rules(LOGICAL_RULES):
            self.params = dt.load_teacher(config, self.mesh, param_shardings(teacher_cfg, self.mesh))
        self.null_text = dt.null_text_for(config)
        self.key = dt._step_key(config)

    def solve(self, batch: dict, noise: np.ndarray) -> np.ndarray:
        layout = batch_layout(batch)
        solver = _solver(self.key, layout, self.mesh)
        sharding = NamedSharding(self.mesh, P(BATCH_AXES))
        with jax.set_mesh(self.mesh):
            z = jax.make_array_from_process_local_data(sharding, noise)
            out = solver(self.params, z, _global_batch(batch, sharding), self.null_text)
        return np.asarray(jax.device_get(out), np.float32)


def _solve_chunk(teacher: _Teacher, batches, settings: dict, index: int) -> list[dict]:
    """The records of chunk `index`: its rows' noise and the teacher's solutions, batch by batch."""
    bs, num_pairs = settings["batch_size"], settings["num_pairs"]
    first_row = index * settings["chunk_size"]
    last_row = min(first_row + settings["chunk_size"], num_pairs)
    records = []
    for b in range(first_row // bs, math.ceil(last_row / bs)):
        batch = batches[b]
        rows = b * bs + np.arange(bs)
        latents = batch["latents"]
        noise = pair_noise(settings["seed"], rows, latents.shape[1] * latents.shape[2], latents.shape[-1])
        solution = teacher.solve(batch, noise)
        records += cache_records(batch, solution, noise, int(np.sum(rows < num_pairs)))
    return records


# ----------------------------------------------------------------------------------------------------------------
# Chunks on disk


def _chunk_marker(out_dir: str, index: int) -> str:
    return os.path.join(out_dir, f"chunk-{index:05d}.json")


def _chunk_done(out_dir: str, index: int) -> bool:
    marker = _chunk_marker(out_dir, index)
    if not os.path.exists(marker):
        return False
    with open(marker) as f:
        shards = json.load(f)["meta"]["shards"]
    return all(os.path.exists(os.path.join(out_dir, name)) for name in shards)


def _write_chunk(out_dir: str, index: int, num_chunks: int, records: list[dict], seconds: float) -> None:
    """Chunk `index` as shard-INDEX-of-NUM_CHUNKS, written aside and moved in, then its marker (the meta part)."""
    tmp = tempfile.mkdtemp(prefix=f".chunk-{index:05d}.", suffix=".tmp", dir=out_dir)
    try:
        meta = latent_records.write_dataset(records, tmp, num_shards=1, shard_offset=index, total_shards=num_chunks,
                                            float32_fields=FLOAT32_FIELDS)
        for name in meta["shards"]:
            os.replace(os.path.join(tmp, name), os.path.join(out_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(_chunk_marker(out_dir, index), {"meta": meta, "seconds": round(seconds, 2)})


def _finish(out_dir: str, num_chunks: int) -> None:
    """meta.json from the chunks' parts (what `latent_dataset` reads) and the source's empty-prompt embedding."""
    merged = {"shards": {}, "buckets": {}}
    for index in range(num_chunks):
        with open(_chunk_marker(out_dir, index)) as f:
            part = json.load(f)["meta"]
        merged["shards"].update(part["shards"])
        for key, per_shard in part["buckets"].items():
            merged["buckets"].setdefault(key, {}).update(per_shard)
    write_json(os.path.join(out_dir, latent_records.META), merged)


def _copy_null_text(source: str, out_dir: str) -> None:
    null = latent_records.load_null_text_embeds(source)
    if null is not None:
        np.save(os.path.join(out_dir, latent_records.NULL_EMBEDS), null)


# ----------------------------------------------------------------------------------------------------------------
# The build


def make_pairs(config, out_dir: str, num_pairs: int | None = None, batch_size: int | None = None,
               chunk_size: int | None = None, progress: bool = True) -> dict:
    """Builds (or resumes, or finds complete) the pairs store in `out_dir`; returns its manifest.

    num_pairs defaults to regression.num_pairs, batch_size (rows per teacher call) to config.batch_size, chunk_size
    (rows per resumable chunk) to DEFAULT_CHUNK_ROWS rounded up to a multiple of batch_size."""
    num_pairs = int(num_pairs or config.regression.num_pairs)
    batch_size = int(batch_size or config.batch_size)
    chunk_size = int(chunk_size or math.ceil(DEFAULT_CHUNK_ROWS / batch_size) * batch_size)
    settings = pairs_settings(config, num_pairs, batch_size, chunk_size)
    manifest = _start_manifest(out_dir, settings)
    if manifest["complete"]:
        log.info("%s already holds the %d pairs", out_dir, num_pairs)
        return manifest
    started, seconds_before = time.time(), float(manifest["seconds"])
    for stray in glob.glob(os.path.join(out_dir, ".chunk-*.tmp")):  # left by a killed build
        shutil.rmtree(stray, ignore_errors=True)
    num_chunks = math.ceil(num_pairs / chunk_size)
    todo = [i for i in range(num_chunks) if not _chunk_done(out_dir, i)]
    if todo:
        from tqdm import tqdm

        teacher, batches = _Teacher(config, batch_size), source_batches(config, batch_size)
        done_rows = sum(min(chunk_size, num_pairs - i * chunk_size) for i in range(num_chunks) if i not in todo)
        log.info("solving %d of %d pairs (%d teacher steps, CFG %g) into %s", num_pairs - done_rows, num_pairs,
                 settings["teacher_steps"], settings["cfg_scale"], out_dir)
        with tqdm(total=num_pairs, initial=done_rows, desc="distill-pairs", unit="pair", dynamic_ncols=True,
                  disable=not progress) as bar:
            for index in todo:
                t0 = time.time()
                records = _solve_chunk(teacher, batches, settings, index)
                _write_chunk(out_dir, index, num_chunks, records, time.time() - t0)
                manifest["seconds"] = round(seconds_before + time.time() - started, 1)
                write_json(os.path.join(out_dir, MANIFEST), manifest, indent=1)
                bar.update(len(records))
    _copy_null_text(config.data.path, out_dir)
    _finish(out_dir, num_chunks)
    manifest.update(complete=True, seconds=round(seconds_before + time.time() - started, 1))
    write_json(os.path.join(out_dir, MANIFEST), manifest, indent=1)
    return manifest
