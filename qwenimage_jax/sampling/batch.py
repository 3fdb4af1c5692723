"""Batch sampling from a prompt file, as `qwenimage-jax sample --prompts-file FILE.jsonl --out-dir DIR` runs it.

    {"prompt": "a red fox in snow", "seed": 7}
    {"prompt": "a lighthouse at dusk", "height": 768, "width": 1344, "negative_prompt": "blurry"}

One JSON object a line (blank lines are skipped): `prompt` (a string, required), `seed` (0 to 2**32 - 1; default
the command's --seed plus the line number minus 1, so each line differs), `height` / `width` (positive multiples of
32; default the command's size), `negative_prompt` (a string, or null for none; default the command's
--negative-prompt; used only when --cfg > 1). Any other key, a line that is not a JSON object, or a bad value is an
`InputValueError` naming the file, the line and the key, raised before the model is loaded (a prompt too long for
the largest bucket: after loading the tokenizer, before anything is sampled).

How it runs (`run`): lines are grouped by (prompt-length bucket, height, width, CFG or not), so every batch of a
group runs one compiled sampler; groups are sampled in the order they first appear, lines in file order, in
batches of `batch_size` (a multiple of the mesh's data x fsdp: the pipeline splits the batch over the
data-parallel devices); a short last batch is filled with copies of its last line (their images are dropped) so
it reuses the same program. Each image is the one `qwenimage-jax sample --prompt P --seed S` (same flags) gives
alone: its noise is drawn from its own seed, each prompt is encoded by itself (one text-encoder program per
bucket) and the pipeline keeps each row's RoPE frame after its own prompt (`prompt_lengths`), not the batch's
longest. Each image is written atomically as `DIR/<line>-<key>.png` (PNG text metadata as `sample` writes it)
when its batch finishes, then one line is appended to `DIR/manifest.jsonl`: the line, prompt, seed, height,
width, negative prompt, settings, file and `key`, a hash of everything that decides the image. A rerun skips every
line whose key the manifest lists with its file present, so a killed run continues where it stopped and a changed
line or setting is sampled again; lines with the same key are sampled once. Before the first batch runs, each
distinct (bucket, size, CFG) batch is checked against the device's free memory (`sampling/memory.py`; off with
`memory_check=False`, `--no-memory-check`): a batch that cannot fit is a `MemoryBudgetError` naming its first line.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from qwenimage_jax.errors import InputNotFoundError, InputValueError
from qwenimage_jax.io_utils import atomic_path
from qwenimage_jax.sampling import images as image_utils

FIELDS = ("prompt", "seed", "height", "width", "negative_prompt")
MAX_SEED = 2 ** 32 - 1          # jax.random.key keeps 32 bits of a seed: larger ones would repeat noise
MANIFEST = "manifest.jsonl"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One line of a prompt file with the command's defaults filled in. `negative_prompt` is the one in effect
    (None: no CFG branch, also when --cfg <= 1)."""
    line: int
    prompt: str
    seed: int
    height: int
    width: int
    negative_prompt: str | None
    key: str = ""

    @property
    def file(self) -> str:
        return f"{self.line:06d}-{self.key[:12]}.png"

    def record(self, settings: dict) -> dict:
        return {"line": self.line, "prompt": self.prompt, "seed": self.seed, "height": self.height,
                "width": self.width, "negative_prompt": self.negative_prompt, "settings": settings,
                "file": self.file, "key": self.key}


def _fail(path: str, line: int, key: str | None, message: str):
    where = f"{path}:{line}" + (f": key {key!r}" if key else "")
    raise InputValueError(f"{where}: {message}")


def _size(path, line, key, value):
    from qwenimage_jax.sampling import latents as latent_utils

    if isinstance(value, bool) or not isinstance(value, int):
        _fail(path, line, key, f"{value!r} is not an integer; use a positive multiple of 32")
    try:
        latent_utils.check_size(value, value)
        latent_utils.check_rope_range(value, value)
    except ValueError as e:
        _fail(path, line, key, str(e).replace("height ", "").replace("width ", ""))
    return value


def read_prompts_file(path: str, *, seed: int, height: int, width: int, negative_prompt: str | None,
                      cfg: float) -> list[Entry]:
    """The lines of `path` as entries (without keys), every line checked; see the module docstring."""
    if not os.path.isfile(path):
        raise InputNotFoundError(f"prompts file {path!r} does not exist; pass a JSON-lines file, one "
                                 "{\"prompt\": ...} object a line")
    entries = []
    with open(path, encoding="utf-8") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                _fail(path, number, None, f"not valid JSON ({e.msg} at column {e.colno}); write one JSON object a "
                                          "line, e.g. {\"prompt\": \"a red fox\", \"seed\": 0}")
            if not isinstance(obj, dict):
                _fail(path, number, None, f"a JSON {type(obj).__name__}, not an object; write "
                                          "{\"prompt\": \"...\"}")
            unknown = sorted(set(obj) - set(FIELDS))
            if unknown:
                _fail(path, number, unknown[0], f"unknown key; a line may hold {', '.join(FIELDS)}")
            if "prompt" not in obj:
                _fail(path, number, "prompt", "missing; every line needs a prompt")
            prompt = obj["prompt"]
            if not isinstance(prompt, str):
                _fail(path, number, "prompt", f"{prompt!r} is not a string")
            line_seed = obj.get("seed", seed + number - 1)
            if isinstance(line_seed, bool) or not isinstance(line_seed, int) or not 0 <= line_seed <= MAX_SEED:
                what = "key 'seed'" if "seed" in obj else f"the default seed (--seed {seed} + line - 1)"
                raise InputValueError(f"{path}:{number}: {what}: {line_seed!r} is not an integer from 0 to "
                                      f"{MAX_SEED}")
            h = _size(path, number, "height", obj["height"]) if "height" in obj else height
            w = _size(path, number, "width", obj["width"]) if "width" in obj else width
            negative = obj.get("negative_prompt", negative_prompt)
            if negative is not None and not isinstance(negative, str):
                _fail(path, number, "negative_prompt", f"{negative!r} is neither a string nor null")
            entries.append(Entry(number, prompt, int(line_seed), h, w, negative if cfg > 1 else None))
    if not entries:
        raise InputValueError(f"{path}: no prompts (every line is blank); write one JSON object a line")
    return entries


def with_keys(entries: Sequence[Entry], settings: dict) -> list[Entry]:
    """Each entry with its key: a hash of the entry and the settings that decide its image."""
    out = []
    for e in entries:
        blob = json.dumps({"prompt": e.prompt, "seed": e.seed, "height": e.height, "width": e.width,
                           "negative_prompt": e.negative_prompt, "settings": settings}, sort_keys=True)
        out.append(dataclasses.replace(e, key=hashlib.sha256(blob.encode()).hexdigest()))
    return out


class Manifest:
    """DIR/manifest.jsonl: one JSON record per written image, appended (and flushed to disk) after the image."""

    def __init__(self, out_dir: str):
        self.out_dir = out_dir
        self.path = os.path.join(out_dir, MANIFEST)
        self.records: dict[str, dict] = {}
        self.unreadable = 0
        if os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                for text in f:
                    if not text.strip():
                        continue
                    try:
                        record = json.loads(text)
                        self.records[record["key"]] = record
                    except (json.JSONDecodeError, KeyError, TypeError):
                        self.unreadable += 1   # e.g. the torn last line of a killed run: that image is redone

    def done(self, entry: Entry) -> bool:
        record = self.records.get(entry.key)
        return record is not None and os.path.isfile(os.path.join(self.out_dir, record["file"]))

    def append(self, record: dict) -> None:
        with open(self.path, "ab+") as f:
            size = f.seek(0, os.SEEK_END)
            prefix = b""
            if size:
                f.seek(size - 1)
                if f.read(1) != b"\n":   # a torn line left by a kill: start a fresh one
                    prefix = b"\n"
            f.write(prefix + (json.dumps(record, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        self.records[record["key"]] = record


def plan(entries: Sequence[Entry], lengths: dict[str, int], bucket: Callable[[int], int],
         batch_size: int) -> list[list[Entry]]:
    """Batches of at most `batch_size` entries sharing (bucket, height, width, CFG or not); groups in order of
    first appearance, entries in file order. `lengths`: each prompt's (and negative prompt's) states length
    alone; `bucket(length)` -> the padded length a call runs at."""
    groups: dict[tuple, list[Entry]] = {}
    for e in entries:
        longest = lengths[e.prompt] if e.negative_prompt is None else max(lengths[e.prompt],
                                                                           lengths[e.negative_prompt])
        groups.setdefault((bucket(longest), e.height, e.width, e.negative_prompt is not None), []).append(e)
    return [group[i:i + batch_size] for group in groups.values() for i in range(0, len(group), batch_size)]


class _Encoder:
    """Each prompt encoded by itself, as a call with it alone encodes it (negative prompts are cached)."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.cache: dict[str, tuple] = {}

    def one(self, prompt: str, cache: bool = False):
        if cache and prompt in self.cache:
            return self.cache[prompt]
        import jax.numpy as jnp

        embeds, mask, _ = self.pipe.encode_prompt(prompt)
        mask = jnp.ones(embeds.shape[:2], jnp.int32) if mask is None else jnp.asarray(mask, jnp.int32)
        out = (embeds, mask)
        if cache:
            if len(self.cache) >= 16:
                self.cache.pop(next(iter(self.cache)))
            self.cache[prompt] = out
        return out

    def batch(self, prompts: Sequence[str], cache: bool = False):
        """(states (B, L, D), mask (B, L), own lengths (B,)) with each row's states as it has them alone."""
        import jax.numpy as jnp

        rows = [self.one(p, cache) for p in prompts]
        length = max(e.shape[1] for e, _ in rows)
        embeds = jnp.concatenate([jnp.pad(e, ((0, 0), (0, length - e.shape[1]), (0, 0))) for e, _ in rows])
        mask = jnp.concatenate([jnp.pad(m, ((0, 0), (0, length - m.shape[1]))) for _, m in rows])
        return embeds, mask, [e.shape[1] for e, _ in rows]


def sample_batch(pipe, encoder: _Encoder, batch: Sequence[Entry], batch_size: int, *, cfg: float,
                 steps: int | None, sigmas, resolution: int) -> list[Any]:
    """PIL images of `batch` (filled to `batch_size` with copies of its last entry, whose images are dropped)."""
    import jax
    import jax.numpy as jnp

    from qwenimage_jax.sampling import latents as latent_utils

    rows = list(batch) + [batch[-1]] * (batch_size - len(batch))
    first = rows[0]
    embeds, mask, own = encoder.batch([e.prompt for e in rows])
    kwargs = {}
    if first.negative_prompt is not None:
        neg, neg_mask, neg_own = encoder.batch([e.negative_prompt for e in rows], cache=True)
        kwargs = dict(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask,
                      negative_prompt_lengths=neg_own)
    noise = jnp.concatenate([latent_utils.initial_noise(jax.random.key(e.seed), 1, first.height, first.width,
                                                        pipe.latent_channels, jnp.float32) for e in rows])
    result = pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, prompt_lengths=own,
                  true_cfg_scale=cfg if first.negative_prompt is not None else 1.0, height=first.height,
                  width=first.width, num_inference_steps=steps, sigmas=sigmas, latents=noise,
                  output_resolution=resolution, output_type="pil", progress=False, memory_check=False, **kwargs)
    return result.images[:len(batch)]


def _check_memory(pipe, batches, lengths: dict[str, int], batch_size: int, prompts_file: str) -> None:
    """`pipe.check_memory` once per distinct (bucket, height, width, CFG) of `batches`, naming the first line of a
    batch that cannot fit."""
    from qwenimage_jax.sampling.memory import MemoryBudgetError

    seen = set()
    for batch in batches:
        first = batch[0]
        texts = [t for e in batch for t in (e.prompt, e.negative_prompt) if t is not None]
        key = (pipe.prompt_bucket(max(lengths[t] for t in texts)), first.height, first.width,
               first.negative_prompt is not None)
        if key in seen:
            continue
        seen.add(key)
        try:
            pipe.check_memory(batch_size, first.height, first.width, cfg=key[3], text_tokens=key[0])
        except MemoryBudgetError as err:
            raise MemoryBudgetError(f"{prompts_file}:{first.line}: {err}") from None


def run(pipe, entries: Sequence[Entry], manifest: Manifest, *, prompts_file: str, batch_size: int, cfg: float,
        steps: int | None, sigmas, resolution: int, settings: dict, metadata: dict, progress: bool = True,
        log: Callable[[str], None] = print, memory_check: bool = True) -> int:
    """Samples every entry `manifest` does not list as done; returns how many images were written. With
    `memory_check`, every batch's size is checked against the device's free memory before the first one runs
    (the per-call check is then skipped: memory the earlier batches leave cached must not refuse a later one)."""
    from tqdm.auto import tqdm


    texts = sorted({e.prompt for e in entries} | {e.negative_prompt for e in entries if e.negative_prompt is not None})
    lengths = dict(zip(texts, pipe.text_state_lengths(texts)))
    for e in entries:   # a prompt longer than the largest bucket: named before anything is sampled
        for key, text in (("prompt", e.prompt), ("negative_prompt", e.negative_prompt)):
            if text is not None:
                try:
                    pipe.prompt_bucket(lengths[text])
                except ValueError as err:
                    raise InputValueError(f"{prompts_file}:{e.line}: key {key!r}: {err}") from None
    batches = plan(entries, lengths, pipe.prompt_bucket, batch_size)
    if memory_check:
        _check_memory(pipe, batches, lengths, batch_size, prompts_file)
    log(f"{len(entries)} image(s) to sample in {len(batches)} batch(es) of up to {batch_size}")
    encoder = _Encoder(pipe)
    bar = tqdm(total=len(entries), desc="sampling", unit="img", dynamic_ncols=True, disable=not progress)
    written, start = 0, time.perf_counter()
    try:
        for batch in batches:
            images = sample_batch(pipe, encoder, batch, batch_size, cfg=cfg, steps=steps, sigmas=sigmas,
                                  resolution=resolution)
            for entry, image in zip(batch, images):
                meta = dict(metadata, prompt=entry.prompt, negative_prompt=entry.negative_prompt or "",
                            seed=entry.seed, size=f"{image.size[0]}x{image.size[1]}", images=1,
                            prompts_file=os.path.abspath(prompts_file), line=entry.line)
                with atomic_path(os.path.join(manifest.out_dir, entry.file)) as tmp:
                    image_utils.save_png(image, tmp, meta)
                manifest.append(entry.record(settings))
                written += 1
                bar.update(1)
            bar.set_postfix_str(f"{written / (time.perf_counter() - start):.3g} img/s")
    finally:
        bar.close()
    return written
