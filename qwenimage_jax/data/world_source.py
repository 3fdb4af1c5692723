"""The small world as a grain data source, a batched grain pipeline over it, and a PNG + captions.jsonl dump.

`WorldSource(num_records, seed, split, size)` is a grain RandomAccessDataSource: record i is generated on the fly
from the seed sequence (seed, split, i), so any index is reproducible on any host without storing images.

    source = WorldSource(10_000, seed=0, split="train", size=128)
    iterator = iter(world_dataset(source, batch_size=8, seed=1))   # batch["image"]: (8, 128, 128, 3) in [-1, 1]
    state = iterator.get_state()  # ... iterator.set_state(state) resumes exactly

    python -m qwenimage_jax.data.world_source --out /tmp/world --num 64 --size 256
"""
from __future__ import annotations

import argparse
import json
import os
from typing import Any, Optional

import grain
import numpy as np
from PIL import Image

from qwenimage_jax.data import prompts, world

_SPLIT_CODES = {"train": 0, "heldout": 1, "all": 2, "novel": 3}


class WorldSource(grain.sources.RandomAccessDataSource):
    """`num_records` deterministic scenes of `split` ("train": no held-out composition; "heldout": each has one).

    Each record: {"image": uint8 (size, size, 3), "caption": rich caption, "short_caption": degraded prompt,
    "record_json": Scene as JSON, "short_record_json": the partial Scene the short caption states}.
    """

    def __init__(self, num_records: int, seed: int = 0, split: str = "train", size: int = 256,
                 word_prob: Optional[float] = None):
        if split not in _SPLIT_CODES:
            raise ValueError(f"split {split!r} is not one of {tuple(_SPLIT_CODES)}")
        if num_records < 1:
            raise ValueError(f"num_records must be positive; got {num_records}")
        self.num_records, self.seed, self.split, self.size, self.word_prob = num_records, seed, split, size, word_prob

    def __len__(self) -> int:
        return self.num_records

    def __getitem__(self, index) -> dict[str, Any]:
        index = int(index)
        if not 0 <= index < self.num_records:
            raise IndexError(f"index {index} out of range for a WorldSource of {self.num_records} records")
        rng = np.random.default_rng([self.seed, _SPLIT_CODES[self.split], index])
        image, caption, scene = world.generate_scene(rng, self.size, self.split, self.word_prob)
        short_caption, short_scene = prompts.degrade_record(scene, rng)
        return {
            "image": image,
            "caption": caption,
            "short_caption": short_caption,
            "record_json": scene.to_json(),
            "short_record_json": short_scene.to_json(),
        }

    def __repr__(self) -> str:
        return (f"WorldSource(num_records={self.num_records}, seed={self.seed}, split={self.split!r}, "
                f"size={self.size})")


def to_model_inputs(record: dict[str, Any]) -> dict[str, Any]:
    """uint8 image -> float32 in [-1, 1] (the VAE's input range); text fields pass through."""
    out = dict(record)
    out["image"] = record["image"].astype(np.float32) / 127.5 - 1.0
    return out


def world_dataset(source: WorldSource, batch_size: int, seed: int = 0, shuffle: bool = True,
                  num_epochs: Optional[int] = None, drop_remainder: bool = True,
                  num_threads: int = 2) -> grain.IterDataset:
    """shuffle -> repeat -> [-1, 1] floats -> batch, as an IterDataset whose iterator has get_state/set_state.

    num_epochs=None repeats forever. Batches: {"image": (batch, size, size, 3) float32, text fields: (batch,) str}.
    """
    dataset = grain.MapDataset.source(source)
    if shuffle:
        dataset = dataset.shuffle(seed=seed)
    dataset = dataset.repeat(num_epochs).map(to_model_inputs).batch(batch_size, drop_remainder=drop_remainder)
    return dataset.to_iter_dataset(grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))


def write_scene_folder(out_dir: str, source: WorldSource, count: Optional[int] = None) -> str:
    """Writes records 0..count-1 as out_dir/NNNNNN.png plus out_dir/captions.jsonl; returns the jsonl path."""
    count = len(source) if count is None else min(count, len(source))
    os.makedirs(out_dir, exist_ok=True)
    jsonl_path = os.path.join(out_dir, "captions.jsonl")
    with open(jsonl_path, "w", encoding="utf-8") as jsonl:
        for index in range(count):
            record = source[index]
            name = f"{index:06d}.png"
            Image.fromarray(record["image"]).save(os.path.join(out_dir, name))
            line = {"file": name, "caption": record["caption"], "short_caption": record["short_caption"],
                    "record": json.loads(record["record_json"]),
                    "short_record": json.loads(record["short_record_json"])}
            jsonl.write(json.dumps(line) + "\n")
    return jsonl_path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Dump small-world scenes as PNGs + captions.jsonl.")
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num", type=int, default=64, help="number of scenes")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (64, 128, 256, ...)")
    parser.add_argument("--split", default="train", choices=tuple(_SPLIT_CODES))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = write_scene_folder(args.out, WorldSource(args.num, args.seed, args.split, args.size))
    print(f"wrote {args.num} scenes to {args.out} ({path})")


if __name__ == "__main__":
    main()
