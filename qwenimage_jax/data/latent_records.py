"""Cached DiT training data: VAE latents + text-encoder states in ArrayRecord shards, read back with grain.

One record = one training example, serialised with msgpack (flax.serialization):
    latents        (h, w, C) float16   normalised VAE latents of the target image
    text_embeds    (L, D)   float16    pre-norm last-layer Qwen3-VL states, system turn dropped (L varies)
    image_pad_mask (L,)     bool       VLM image-slot positions (editing), all False for text-to-image
    cond_latents   (hc, wc, C) float16 normalised latents of the condition image (editing only; absent otherwise)
    caption        str
Other fields travel through unchanged (the distillation pairs of training/distill_pairs.py add `noise`); a writer
may keep named float fields in float32 (`float32_fields`) where float16 rounding would matter.
A dataset directory holds `shard-XXXXX-of-YYYYY.array_record` files and `meta.json` with the layout buckets and the
empty-prompt embedding used for classifier-free-guidance dropout (`null_text_embeds.npy`).

Batches are homogeneous in layout (same latent grid, same condition grid, same image-slot positions), so each
bucket compiles one train step; `bucketed_batches` mixes buckets by their share of the data (or configured
weights) deterministically, and its iterator state is checkpointable.
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
from typing import Any, Collection, Iterable, Iterator

import grain
import numpy as np
from flax import serialization

from qwenimage_jax.errors import InputNotFoundError

META = "meta.json"
NULL_EMBEDS = "null_text_embeds.npy"


def encode_record(example: dict, float32_fields: Collection[str] = ()) -> bytes:
    """msgpack bytes of one example; float arrays are stored as float16 except the `float32_fields`."""
    out = {}
    for k, v in example.items():
        if isinstance(v, str):
            out[k] = v
        elif v is not None:
            v = np.asarray(v)
            if v.dtype.kind == "f":
                v = v.astype(np.float32 if k in float32_fields else np.float16)
            out[k] = v
    return serialization.msgpack_serialize(out)


def decode_record(data: bytes) -> dict:
    return serialization.msgpack_restore(data)


def bucket_key(example: dict) -> str:
    """Examples with equal keys can share a batch (and a compiled step)."""
    h, w = np.shape(example["latents"])[:2]
    cond = example.get("cond_latents")
    slots = np.flatnonzero(np.asarray(example.get("image_pad_mask", np.zeros(0, bool))))
    cond_part = "none" if cond is None else "x".join(str(s) for s in np.shape(cond)[:2])
    slot_part = ",".join(str(int(s)) for s in slots)
    return f"{h}x{w}|{cond_part}|{slot_part}"


def write_dataset(examples: Iterable[dict], out_dir: str, *, num_shards: int = 1, null_text_embeds=None,
                  extra_meta: dict | None = None, shard_offset: int = 0, total_shards: int | None = None,
                  float32_fields: Collection[str] = ()) -> dict:
    """Writes examples round-robin into `num_shards` ArrayRecord files and returns the metadata written.

    Nothing half-written is ever taken for data: the shards are written under temporary names and renamed into
    place once all are complete, and the metadata (which makes the directory a dataset: `load_meta`) comes last, so
    an interrupted run leaves no meta.json, and a rerun writes it all again.
    Multi-host preprocessing: host i passes `shard_offset=i * num_shards, total_shards=hosts * num_shards`, and
    host 0 writes meta.json after all hosts finished (call `merge_meta`)."""
    from array_record.python.array_record_module import ArrayRecordWriter

    from qwenimage_jax.io_utils import atomic_path, write_json

    os.makedirs(out_dir, exist_ok=True)
    total = total_shards or num_shards
    paths = [os.path.join(out_dir, f"shard-{shard_offset + i:05d}-of-{total:05d}.array_record")
             for i in range(num_shards)]
    counts = [0] * num_shards
    buckets: dict[str, list[list[int]]] = {}
    with contextlib.ExitStack() as stack:
        tmps = [stack.enter_context(atomic_path(p)) for p in paths]   # renamed into place when all succeed
        writers = [ArrayRecordWriter(t, "group_size:1") for t in tmps]
        try:
            for n, example in enumerate(examples):
                shard = n % num_shards
                key = bucket_key(example)
                buckets.setdefault(key, [[] for _ in range(num_shards)])[shard].append(counts[shard])
                writers[shard].write(encode_record(example, float32_fields))
                counts[shard] += 1
        finally:
            for w in writers:
                w.close()
    meta = {"shards": {os.path.basename(p): c for p, c in zip(paths, counts)},
            "buckets": {k: {os.path.basename(p): idx for p, idx in zip(paths, v)} for k, v in buckets.items()},
            **(extra_meta or {})}
    if null_text_embeds is not None:
        with atomic_path(os.path.join(out_dir, NULL_EMBEDS)) as tmp, open(tmp, "wb") as f:
            np.save(f, np.asarray(null_text_embeds, np.float32))
    write_json(os.path.join(out_dir, META if total == num_shards else f"meta-{shard_offset:05d}.json"), meta)
    return meta


def merge_meta(out_dir: str) -> dict:
    """Combines the per-host meta-XXXXX.json files of a multi-host preprocessing run into meta.json."""
    merged = {"shards": {}, "buckets": {}}
    for path in sorted(glob.glob(os.path.join(out_dir, "meta-*.json"))):
        with open(path) as f:
            part = json.load(f)
        merged["shards"].update(part.pop("shards"))
        for key, per_shard in part.pop("buckets").items():
            merged["buckets"].setdefault(key, {}).update(per_shard)
        merged.update(part)
    from qwenimage_jax.io_utils import write_json

    write_json(os.path.join(out_dir, META), merged)
    return merged


def load_meta(data_dir: str) -> dict:
    path = os.path.join(data_dir, META)
    if not os.path.exists(path):
        raise InputNotFoundError(f"{path} not found: {data_dir!r} is not a latent dataset written by "
                                 "`qwenimage-jax cache-latents`; point data.path at one")
    with open(path) as f:
        return json.load(f)


def load_null_text_embeds(data_dir: str) -> np.ndarray | None:
    path = os.path.join(data_dir, NULL_EMBEDS)
    return np.load(path) if os.path.exists(path) else None


class _ShardedSource(grain.sources.RandomAccessDataSource):
    """Records of one bucket: a flat index over (shard, index-in-shard) pairs."""

    def __init__(self, data_dir: str, per_shard: dict[str, list[int]], shard_sizes: dict[str, int]):
        self._files = sorted(per_shard)
        self._source = grain.sources.ArrayRecordDataSource([os.path.join(data_dir, f) for f in self._files])
        offsets = np.cumsum([0] + [shard_sizes[f] for f in self._files])[:-1]
        self._index = np.concatenate([np.asarray(per_shard[f], np.int64) + o
                                      for f, o in zip(self._files, offsets)]) if self._files else np.zeros(0, int)

    def __len__(self) -> int:
        return len(self._index)

    def __getitem__(self, i: int) -> dict:
        return decode_record(self._source[int(self._index[i])])


def _pad_text(example: dict, max_text_tokens: int) -> dict:
    """The example padded to `max_text_tokens`, its float fields kept as stored (float16, or float32 for the
    `float32_fields`): batches travel to the device at half the bytes; the train steps cast them to float32
    (`training.dit.compute_batch`), which is exact."""
    embeds = np.asarray(example["text_embeds"])
    length = embeds.shape[0]
    if length > max_text_tokens:
        raise ValueError(f"a caption has {length} text tokens, more than data.max_text_tokens={max_text_tokens}; "
                         "raise max_text_tokens")
    out = dict(example)
    out["text_embeds"] = np.pad(embeds, ((0, max_text_tokens - length), (0, 0)))
    out["text_mask"] = np.arange(max_text_tokens) < length
    pad_mask = np.asarray(example.get("image_pad_mask", np.zeros(length, bool)), bool)
    out["image_pad_mask"] = np.pad(pad_mask, (0, max_text_tokens - length))
    out["latents"] = np.asarray(example["latents"])
    if example.get("cond_latents") is not None:
        out["cond_latents"] = np.asarray(example["cond_latents"])
    if example.get("noise") is not None:
        out["noise"] = np.asarray(example["noise"])
    out.pop("caption", None)
    return out


def bucketed_batches(data_dir: str, batch_size: int, *, max_text_tokens: int, seed: int = 0,
                     bucket_weights: dict[str, float] | None = None, process_index: int = 0,
                     process_count: int = 1) -> grain.MapDataset:
    """An infinite MapDataset of homogeneous batches; this host's share (records i % process_count == index).

    Each bucket is shuffled, padded to `max_text_tokens`, batched (drop_remainder) and repeated; buckets are
    mixed with weights proportional to their size unless `bucket_weights` (by bucket key, e.g. to set the
    text-to-image : editing ratio) says otherwise."""
    meta = load_meta(data_dir)
    datasets, weights, keys = [], [], []
    for key, per_shard in sorted(meta["buckets"].items()):
        source = _ShardedSource(data_dir, per_shard, meta["shards"])
        ds = grain.MapDataset.source(source)
        if process_count > 1:
            ds = ds[process_index::process_count]
        if not _bucket_kept(len(source), batch_size, process_count):
            continue
        ds = (ds.shuffle(seed=seed).map(lambda e, n=max_text_tokens: _pad_text(e, n))
              .batch(batch_size, drop_remainder=True).repeat())
        datasets.append(ds)
        keys.append(key)
        weights.append(bucket_weights.get(key, 0.0) if bucket_weights else float(len(source)))
    if not datasets:
        raise ValueError(f"no bucket in {data_dir!r} has at least {batch_size} examples for this host; "
                         "lower the batch size or cache more data")
    if sum(weights) <= 0:
        raise ValueError(f"bucket_weights {bucket_weights} give no weight to any bucket of {keys}")
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)


def _bucket_kept(records: int, batch_size: int, process_count: int) -> bool:
    """Whether a bucket of `records` (over all hosts) is trained on: decided from the global count, so every host
    keeps the same buckets (a host that skipped a bucket another trains would wait for it forever); the smallest
    host share, records // process_count, must fill a batch."""
    return records // process_count >= batch_size


def bucket_batches(data_dir: str, batch_size: int, *, max_text_tokens: int, process_index: int = 0,
                   process_count: int = 1) -> dict[str, dict[str, Any]]:
    """{bucket key: one batch of this host's records} for every bucket `bucketed_batches` trains on: what a trainer
    compiles its steps against at start-up (one per layout), instead of compiling mid-run when a bucket first
    comes up."""
    meta = load_meta(data_dir)
    out = {}
    for key, per_shard in sorted(meta["buckets"].items()):
        source = _ShardedSource(data_dir, per_shard, meta["shards"])
        if not _bucket_kept(len(source), batch_size, process_count):
            continue
        examples = [_pad_text(source[process_index + i * process_count], max_text_tokens) for i in range(batch_size)]
        out[key] = {k: np.stack([e[k] for e in examples]) for k in examples[0]
                    if isinstance(examples[0][k], np.ndarray)}
    return out


def iterate(dataset: grain.MapDataset) -> Iterator[dict[str, Any]]:
    """A checkpointable iterator (`get_state`/`set_state`) over the batches."""
    return iter(dataset.to_iter_dataset())
