"""Does a world text encoder keep what a caption states? Three measurements on its output states (the pre-norm
last-layer states the DiT reads):

  * `swap_sensitivity`: change one attribute word of a caption (background, position, count, size, colour, shape;
    the rest of the caption, its phrasing included, unchanged) and measure how far the state at the first changed
    token moves, relative to its norm: ||h - h'|| / ||h||.
  * `linear_probe`: a ridge-regression classifier per attribute, fitted on the states of train-split captions and
    scored on held-out-composition captions: each group's colour, shape, count, size and position from the state at
    the group phrase's last token (the model must carry them there), the background from the state at the last
    token of the encoder prompt.
  * `embedding_cosines`: mean pairwise cosine of the input embeddings of each attribute's words (first token).

    from qwenimage_jax.checkpoints import load_text_encoder
    encoder = load_text_encoder("qwenimage_jax/assets/tiny_world/text_encoder", with_vision=False,
                                tokenizer_path="qwenimage_jax/assets/tiny_world/processor")
    print(report(encoder))
"""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np

from qwenimage_jax.data import world

GROUP_FIELDS = ("colour", "shape", "count", "size", "position")
ATTRIBUTES = ("background",) + GROUP_FIELDS
LENGTH_BUCKET = 16  # encoder inputs are left-padded to a multiple of this (few compiled shapes)


def field_value(scene: world.Scene, field: str, group: int = 0) -> int:
    """Class index of `field` (of group `group` for the group fields) in its vocabulary."""
    if field == "background":
        return world.BACKGROUNDS.index(scene.background)
    g = scene.groups[group]
    vocab = {"colour": world.COLOURS, "shape": world.SHAPES, "size": world.SIZES, "position": world.POSITIONS}
    return g.count - 1 if field == "count" else vocab[field].index(getattr(g, field))


def num_classes(field: str) -> int:
    return {"background": len(world.BACKGROUNDS), "colour": len(world.COLOURS), "shape": len(world.SHAPES),
            "count": 3, "size": len(world.SIZES), "position": len(world.POSITIONS)}[field]


def sample_scenes(num: int, split: str, seed: int) -> list[world.Scene]:
    """`num` fully specified scene contents of `split` (no rendering: captions depend on the content alone)."""
    rng = np.random.default_rng([seed, 4241, world.SPLITS.index(split)])
    return [world._sample_content(rng, split, 0.0) for _ in range(num)]


@dataclasses.dataclass
class Tokenized:
    """One caption in the encoder template: ids, and token indices of what the caption states."""

    ids: list[int]
    group_end: list[int]             # last token of each group phrase
    field_tokens: list[dict]         # per group: field -> last token of its words
    background_token: int            # last token of the background colour word


def locate_tokens(tokenizer, caption: str):
    """(ids of the caption in the Qwen-Image-2 encoder template, token_at(char_end) -> index of the token holding
    the caption's character char_end - 1)."""
    from qwenimage_jax.text import templates

    offset = templates.T2I_TEMPLATE.index("{}")
    enc = tokenizer(templates.build_prompt(caption), return_offsets_mapping=True)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]])

    def token_at(char_end: int) -> int:
        return int(np.nonzero(starts <= offset + char_end - 1)[0].max())

    return list(enc["input_ids"]), token_at


def tokenize(tokenizer, caption: str, spans: dict) -> Tokenized:
    """The caption in the Qwen-Image-2 encoder template, with the token index of each span's last character."""
    ids, token_at = locate_tokens(tokenizer, caption)
    return Tokenized(ids=ids,
                     group_end=[token_at(g["phrase"][1]) for g in spans["groups"]],
                     field_tokens=[{k: token_at(e) for k, (_, e) in g.items() if k != "phrase"}
                                   for g in spans["groups"]],
                     background_token=token_at(spans["background"][1]))


def encode_states(encoder, id_lists: list[list[int]], batch_size: int = 64) -> list[np.ndarray]:
    """Output states (len_i, D) of each id list, through the encoder's jitted forward (left padding, bucketed)."""
    pad = encoder.tokenizer.pad_token_id or 0
    length = int(np.ceil(max(len(x) for x in id_lists) / LENGTH_BUCKET) * LENGTH_BUCKET)
    out = []
    for start in range(0, len(id_lists), batch_size):
        chunk = id_lists[start:start + batch_size]
        rows = len(chunk)
        ids = np.full((batch_size, length), pad, np.int32)
        mask = np.zeros((batch_size, length), np.int32)
        for i, seq in enumerate(chunk):
            ids[i, length - len(seq):], mask[i, length - len(seq):] = seq, 1
        states = np.asarray(encoder.encode(ids, mask), np.float32)
        out += [states[i, length - len(seq):] for i, seq in enumerate(chunk[:rows])]
    return out


def _swap(scene: world.Scene, field: str, rng: np.random.Generator) -> world.Scene | None:
    """`scene` with one attribute word changed (None when this scene cannot show that change)."""
    g0 = scene.groups[0]
    if field == "background":
        return dataclasses.replace(scene, background=_other(world.BACKGROUNDS, scene.background, rng))
    if field == "count":  # two <-> three keeps the noun's number (one -> two would change "circle" too)
        if g0.count == 1:
            return None
        new = dataclasses.replace(g0, count=5 - g0.count)
    elif field == "colour":
        used = {g.colour for g in scene.groups}
        new = dataclasses.replace(g0, colour=_other([c for c in world.COLOURS if c not in used], None, rng))
    elif field == "position":
        used = {g.position for g in scene.groups}
        new = dataclasses.replace(g0, position=_other([p for p in world.POSITIONS if p not in used], None, rng))
    elif field == "shape":
        new = dataclasses.replace(g0, shape=_other(world.SHAPES, g0.shape, rng))
    elif field == "size":
        new = dataclasses.replace(g0, size="large" if g0.size == "small" else "small")
    else:
        raise ValueError(f"unknown attribute {field!r}; one of {ATTRIBUTES}")
    return dataclasses.replace(scene, groups=(new,) + scene.groups[1:])


def _other(options, current, rng):
    choices = [o for o in options if o != current]
    return choices[int(rng.integers(len(choices)))]


def swap_sensitivity(encoder, num: int = 64, split: str = "heldout", seed: int = 11) -> dict[str, float]:
    """Mean over `num` captions of ||h - h'|| / ||h|| at the first token where a one-word swap changed the ids."""
    tokenizer = encoder.tokenizer
    from qwenimage_jax.text import templates

    result = {}
    for field in ATTRIBUTES:
        rng = np.random.default_rng([seed, ATTRIBUTES.index(field)])
        pairs = []
        for scene in sample_scenes(4 * num, split, seed + 1 + ATTRIBUTES.index(field)):
            swapped = _swap(scene, field, rng)
            if swapped is None:
                continue
            phrase_seed = int(rng.integers(1 << 31))  # the same phrasing draws for both captions
            a = world.rich_caption(scene, np.random.default_rng(phrase_seed))
            b = world.rich_caption(swapped, np.random.default_rng(phrase_seed))
            ia = tokenizer(templates.build_prompt(a))["input_ids"]
            ib = tokenizer(templates.build_prompt(b))["input_ids"]
            first = next(i for i, (x, y) in enumerate(zip(ia, ib)) if x != y)
            pairs.append((ia, ib, first))
            if len(pairs) == num:
                break
        states = encode_states(encoder, [p[0] for p in pairs] + [p[1] for p in pairs])
        changes = [np.linalg.norm(states[i][t] - states[len(pairs) + i][t]) / np.linalg.norm(states[i][t])
                   for i, (_, _, t) in enumerate(pairs)]
        result[field] = float(np.mean(changes))
    return result


def probe_features(encoder, scenes: list[world.Scene], seed: int) -> tuple[dict, dict]:
    """(features, labels) per attribute: group fields at each group phrase's last token, background at the
    prompt's last token."""
    rng = np.random.default_rng(seed)
    tokenized, captions = [], []
    for scene in scenes:
        caption, spans = world.rich_caption_spans(scene, rng)
        captions.append(caption)
        tokenized.append(tokenize(encoder.tokenizer, caption, spans))
    states = encode_states(encoder, [t.ids for t in tokenized])
    feats = {k: [] for k in ATTRIBUTES}
    labels = {k: [] for k in ATTRIBUTES}
    for scene, tok, h in zip(scenes, tokenized, states):
        feats["background"].append(h[-1])
        labels["background"].append(field_value(scene, "background"))
        for g, end in enumerate(tok.group_end):
            for field in GROUP_FIELDS:
                feats[field].append(h[end])
                labels[field].append(field_value(scene, field, g))
    return ({k: np.stack(v) for k, v in feats.items()}, {k: np.asarray(v) for k, v in labels.items()})


def fit_ridge(x: np.ndarray, y: np.ndarray, classes: int, l2: float = 1e-2):
    """Standardise, then ridge regression onto one-hot targets (closed form); returns predict(x) -> classes."""
    mean, std = x.mean(0), x.std(0) + 1e-6
    z = np.concatenate([(x - mean) / std, np.ones((len(x), 1))], axis=1)
    targets = np.eye(classes)[y]
    weights = np.linalg.solve(z.T @ z + l2 * len(x) * np.eye(z.shape[1]), z.T @ targets)
    return lambda q: np.argmax(np.concatenate([(q - mean) / std, np.ones((len(q), 1))], axis=1) @ weights, axis=1)


def linear_probe(encoder, num_train: int = 1024, num_test: int = 256, seed: int = 21) -> dict[str, float]:
    """Held-out accuracy of a linear probe per attribute (fitted on train-split captions, scored on held-out
    compositions with fresh phrasing)."""
    fx, fy = probe_features(encoder, sample_scenes(num_train, "train", seed), seed)
    tx, ty = probe_features(encoder, sample_scenes(num_test, "heldout", seed + 1), seed + 1)
    return {k: float(np.mean(fit_ridge(fx[k], fy[k], num_classes(k))(tx[k]) == ty[k])) for k in ATTRIBUTES}


def embedding_cosines(encoder) -> dict[str, float]:
    """Mean pairwise cosine of the input embeddings (first token, with a leading space) of each attribute's words."""
    import jax

    table = np.asarray(jax.device_get(encoder.params["language_model"]["embed_tokens"]["embedding"]), np.float32)
    words = {"background": world.BACKGROUNDS, "colour": world.COLOURS, "shape": world.SHAPES,
             "count": ("one", "two", "three"), "size": ("small", "large"), "position": world.POSITIONS}
    out = {}
    for field, names in words.items():
        rows = np.stack([table[encoder.tokenizer(" " + n)["input_ids"][0]] for n in names])
        rows = rows / np.linalg.norm(rows, axis=1, keepdims=True)
        out[field] = float(np.mean([rows[i] @ rows[j] for i, j in itertools.combinations(range(len(rows)), 2)]))
    return out


def report(encoder, num_swaps: int = 64, num_train: int = 1024, num_test: int = 256) -> dict:
    """All three measurements: {"swap": ..., "probe": ..., "embedding_cosine": ...}."""
    return {"swap": swap_sensitivity(encoder, num_swaps), "probe": linear_probe(encoder, num_train, num_test),
            "embedding_cosine": embedding_cosines(encoder)}


def main(argv=None) -> int:
    """`python -m qwenimage_jax.evals.text_probe`: the report of a world text encoder -> JSON (with its provenance)."""
    import argparse

    from qwenimage_jax.checkpoints import load_text_encoder
    from qwenimage_jax.evals.vae_readout import write_result

    parser = argparse.ArgumentParser(description="Does a world text encoder keep what a caption states? One-word "
                                                 "swaps, linear probes and embedding cosines (module docstring).")
    parser.add_argument("--text-encoder", default="qwenimage_jax/assets/tiny_world/text_encoder")
    parser.add_argument("--tokenizer", default="qwenimage_jax/assets/tiny_world/processor")
    parser.add_argument("--out", required=True, help="JSON file to write")
    args = parser.parse_args(argv)
    encoder = load_text_encoder(args.text_encoder, with_vision=False, tokenizer_path=args.tokenizer)
    result = report(encoder)
    print(result)
    write_result(dict(result, text_encoder=args.text_encoder), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
