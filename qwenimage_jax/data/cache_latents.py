"""Offline preprocessing for DiT training: images -> normalised VAE latents, captions -> Qwen3-VL prompt states,
written as ArrayRecord shards (`data/latent_records.py`). Multi-host: every host encodes the examples
`i % process_count == process_index` into its own shards; host 0 merges the metadata at the end.

Sources: the small world (`world:N[:split[:size]]`), or an image folder with `captions.jsonl` lines
`{"file": "x.png", "caption": "..."}` (`folder:DIR`); `A+B` concatenates sources (e.g. new-concept scenes plus
replayed training scenes for a LoRA).
"""
from __future__ import annotations

import json
import os
from typing import Iterator

import jax
import numpy as np
from PIL import Image

PROMPT_LENGTH_BUCKET = 64  # tokens


def iter_source(spec: str) -> Iterator[tuple[np.ndarray, str]]:
    """Yields (uint8 HWC RGB image, caption) pairs."""
    if "+" in spec:
        for part in spec.split("+"):
            yield from iter_source(part)
        return
    kind, _, rest = spec.partition(":")
    if kind == "world":
        from qwenimage_jax.data.world_source import WorldSource

        parts = rest.split(":")
        n = int(parts[0])
        split = parts[1] if len(parts) > 1 and parts[1] else "train"
        size = int(parts[2]) if len(parts) > 2 else 64
        source = WorldSource(n, seed=0, split=split, size=size)
        for i in range(len(source)):
            record = source[i]
            yield record["image"], record["caption"]
    elif kind == "folder":
        with open(os.path.join(rest, "captions.jsonl"), encoding="utf-8") as f:
            for line in f:
                item = json.loads(line)
                image = np.asarray(Image.open(os.path.join(rest, item["file"])).convert("RGB"))
                yield image, item["caption"]
    else:
        raise ValueError(f"unknown source {spec!r}; use world:N[:split[:size]] or folder:DIR")


def encode_examples(pairs, vae, text_encoder, batch_size: int = 16, process_index: int = 0,
                    process_count: int = 1) -> Iterator[dict]:
    """Batches this host's share of `pairs` through the VAE (normalised posterior mean) and the text encoder."""
    def flush(images, captions):
        x = np.stack(images).astype(np.float32) / 127.5 - 1.0
        if vae.module.config.in_channels == 4 and x.shape[-1] == 3:
            x = np.concatenate([x, np.ones(x.shape[:-1] + (1,), np.float32)], axis=-1)
        latents = np.asarray(vae.encode(x, normalize=True))
        # Bucket the encoder input length so batches of different caption lengths reuse one compiled program
        # (values move by float rounding only; the stored embeddings are float16 anyway).
        embeds, mask, _ = text_encoder.encode_prompt(list(captions), pad_to_multiple=PROMPT_LENGTH_BUCKET)
        embeds = np.asarray(embeds)
        lengths = embeds.shape[1] * np.ones(len(captions), int) if mask is None else np.asarray(mask).sum(1)
        for lat, emb, n, cap in zip(latents, embeds, lengths, captions):
            yield {"latents": lat, "text_embeds": emb[:n], "image_pad_mask": np.zeros(int(n), bool), "caption": cap}

    images, captions = [], []
    for i, (image, caption) in enumerate(pairs):
        if i % process_count != process_index:
            continue
        images.append(image)
        captions.append(caption)
        if len(images) == batch_size:
            yield from flush(images, captions)
            images, captions = [], []
    if images:
        yield from flush(images, captions)


def cache_latents(source: str, vae_path: str, text_encoder_path: str, out_dir: str, *, num_shards: int = 4,
                  batch_size: int = 16, tokenizer_path: str | None = None, progress: bool = True) -> dict:
    from tqdm import tqdm

    from qwenimage_jax.data import latent_records
    from qwenimage_jax.checkpoints import load_text_encoder
    from qwenimage_jax.checkpoints import load_vae

    vae = load_vae(vae_path)
    text_encoder = load_text_encoder(text_encoder_path, tokenizer_path=tokenizer_path)
    null_embeds, null_mask, _ = text_encoder.encode_prompt([" "])
    null = np.asarray(null_embeds)[0]
    if null_mask is not None:
        null = null[: int(np.asarray(null_mask)[0].sum())]
    hosts, host = jax.process_count(), jax.process_index()
    examples = encode_examples(tqdm(iter_source(source), desc="cache-latents", disable=not progress), vae,
                               text_encoder, batch_size, host, hosts)
    meta = latent_records.write_dataset(
        examples, out_dir, num_shards=num_shards, null_text_embeds=null if host == 0 else None,
        extra_meta={"source": source, "vae": os.path.abspath(vae_path),
                    "text_encoder": os.path.abspath(text_encoder_path)},
        shard_offset=host * num_shards, total_shards=hosts * num_shards)
    if hosts > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("cache_latents_done")
        if host == 0:
            meta = latent_records.merge_meta(out_dir)
    return meta
