"""Prompt expansion: a short prompt -> a detailed one, by a decoder LM (a loaded `TextEncoder`) answering the
expansion chat of `templates.expand_messages`. The one place that builds the chat ids, left-pads a batch, picks the
stop tokens and decodes the answers; the CLI (`expand-prompt`), the evals, the demo and the notebooks call it.

    texts = expand_prompts(encoder, ["a red cube"], max_new_tokens=64)         # greedy, batched
    for piece in stream_expansion(encoder, "a red cube", temperature=0.7): print(piece, end="")

Keeping what the prompt states (small-world prompts; `data.prompts.contradictions` names what an expansion changes):

    texts = expand_prompts(encoder, shorts, keep_stated=True)   # an expansion that contradicts -> the prompt as written
    texts = expand_prompts(encoder, shorts, constrain=True)     # decoding copies the stated attribute words
    result = expand_checked(encoder, shorts, constrain=True, temperature=0.7, retries=3)  # + what fell back, and why

The stated attributes come from `data.prompts.stated_record(prompt)` unless given (`stated=`, e.g. the records
`degrade_record` returned with the prompts).
"""
from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from qwenimage_jax.data import prompts as world_prompts
from qwenimage_jax.data import world
from qwenimage_jax.text import templates

STOP_TOKENS = ("<|im_end|>", "<|endoftext|>")


def expansion_prompt_ids(tokenizer, prompt: str, system: Optional[str] = None) -> list[int]:
    """Token ids of the expansion chat (system instruction + short prompt) up to the assistant's turn."""
    messages = templates.expand_messages(prompt)
    if system is not None:
        messages[0]["content"] = system
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def stop_token_ids(tokenizer) -> list[int]:
    """<|im_end|>, <|endoftext|> (those the vocabulary has) and the tokenizer's eos, sorted."""
    ids = set()
    for token in STOP_TOKENS:
        tid = tokenizer.convert_tokens_to_ids(token)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id:
            ids.add(tid)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if not ids:
        raise ValueError("the tokenizer has none of <|im_end|>, <|endoftext|> nor an eos token; generation could "
                         "not stop")
    return sorted(ids)


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token id lists -> ids (N, longest) int32 and attention mask (N, longest) int32, padded on the left."""
    length = max(len(r) for r in rows)
    ids = np.full((len(rows), length), pad_id, np.int32)
    mask = np.zeros((len(rows), length), np.int32)
    for i, row in enumerate(rows):
        ids[i, length - len(row):] = row
        mask[i, length - len(row):] = 1
    return ids, mask


def until_stop(tokens: Sequence[int], stops: Sequence[int]) -> list[int]:
    """The tokens before the first stop token."""
    out = []
    for token in tokens:
        if token in stops:
            break
        out.append(int(token))
    return out


def _generate_texts(encoder, prompts: Sequence[str], max_new_tokens: int, temperature: float, top_p: float,
                    seed: int, system: Optional[str], stated: Optional[Sequence[world.Scene]]) -> list[str]:
    """One batched generation; constrained by `stated` (one partial record per prompt) unless it is None."""
    tokenizer = encoder.tokenizer
    pad = tokenizer.pad_token_id or 0
    ids, mask = left_pad([expansion_prompt_ids(tokenizer, p, system) for p in prompts], pad)
    stops = stop_token_ids(tokenizer)
    kwargs = {}
    if stated is not None:
        kwargs = dict(constrain=constrain_attributes, constrain_data=attribute_constraint_data(tokenizer, stated))
    out = np.asarray(encoder.generate(ids, mask, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                      stop_token_ids=stops, pad_token_id=pad, **kwargs))
    return [tokenizer.decode(until_stop(row.tolist(), stops), skip_special_tokens=True).strip() for row in out]


def _stated_records(prompts: Sequence[str], stated: Optional[Sequence[world.Scene]]) -> list[world.Scene]:
    if stated is None:
        return [world_prompts.stated_record(p) for p in prompts]
    stated = list(stated)
    if len(stated) != len(prompts):
        raise ValueError(f"{len(stated)} stated records for {len(prompts)} prompts")
    return stated


def expand_prompts(encoder, prompts: Sequence[str], max_new_tokens: int = 64, *, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, system: Optional[str] = None, keep_stated: bool = False,
                   constrain: bool = False, retries: int = 0,
                   stated: Optional[Sequence[world.Scene]] = None) -> list[str]:
    """Each short prompt expanded by `encoder` (a `load_text_encoder` result with its tokenizer), in one batch.

    Greedy by default (temperature 0); the answer stops at the first stop token and is stripped.
    keep_stated: an expansion that changes or drops what its prompt states (`data.prompts.contradictions`), or is
    empty, is retried with other seeds (up to `retries` times, when sampling) and then replaced by the prompt as
    written (`expand_checked` also tells which fell back). constrain: decoding copies the stated attribute words
    (`constrain_attributes`). stated: the partial record of each prompt (default: read from its words).
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt]")
    if not prompts:
        return []
    if keep_stated:
        return expand_checked(encoder, prompts, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                              system=system, constrain=constrain, retries=retries, stated=stated).texts
    records = _stated_records(prompts, stated) if constrain else None
    return _generate_texts(encoder, prompts, max_new_tokens, temperature, top_p, seed, system, records)


@dataclasses.dataclass
class Expansions:
    """`expand_checked`'s answer, one entry per prompt.

    texts: what to use: the first try that keeps everything stated, else the prompt as written.
    first: the first try's expansion (what the expander says without rejection).
    first_contradictions: `data.prompts.contradictions(first[i], stated[i])`.
    fell_back: True where every try contradicted the prompt (or was empty), so texts[i] is the prompt itself.
    tries: generations made for the prompt (1 + the retries it used).
    """
    texts: list[str]
    first: list[str]
    first_contradictions: list[list[str]]
    fell_back: list[bool]
    tries: list[int]

    @property
    def fallback_rate(self) -> float:
        return float(np.mean(self.fell_back)) if self.fell_back else 0.0


def expand_checked(encoder, prompts: Sequence[str], max_new_tokens: int = 64, *, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, system: Optional[str] = None, constrain: bool = False,
                   retries: int = 0, stated: Optional[Sequence[world.Scene]] = None) -> Expansions:
    """`expand_prompts` with rejection: each expansion is checked against what its prompt states (`stated`, default
    `data.prompts.stated_record(prompt)`); one that contradicts it or is empty is generated again with seed + k
    (k = 1..retries; only when sampling: greedy decoding would repeat itself) and, if none passes, replaced by the
    prompt as written."""
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt]")
    if retries < 0:
        raise ValueError(f"retries={retries} must be >= 0")
    prompts = list(prompts)
    records = _stated_records(prompts, stated)
    if not prompts:
        return Expansions([], [], [], [], [])

    def attempt(rows, k):
        texts = _generate_texts(encoder, [prompts[i] for i in rows], max_new_tokens, temperature, top_p, seed + k,
                                system, [records[i] for i in rows] if constrain else None)
        return [(t, world_prompts.contradictions(t, records[i])) for i, t in zip(rows, texts)]

    first = attempt(range(len(prompts)), 0)
    texts = [t for t, _ in first]
    ok = [bool(t) and not found for t, found in first]
    tries = [1] * len(prompts)
    for k in range(1, retries + 1 if temperature > 0 else 1):
        todo = [i for i in range(len(prompts)) if not ok[i]]
        if not todo:
            break
        for i, (text, found) in zip(todo, attempt(todo, k)):
            tries[i] += 1
            if text and not found:
                texts[i], ok[i] = text, True
    return Expansions(texts=[t if good else p for t, good, p in zip(texts, ok, prompts)], first=[t for t, _ in first],
                      first_contradictions=[found for _, found in first], fell_back=[not good for good in ok],
                      tries=tries)


# ------------------------------------------------------------------------------ constrained decoding of attributes
# Token classes of the vocabulary (one table per class, -1 = not in the class), read from each token's text: the
# words world captions and short prompts use for colours, shapes, counts, sizes and positions. Only words that are
# one token are seen (every attribute word of the small world's tokenizer is).
_NUMBER_WORDS = {"one": 1, "two": 2, "three": 3, "1": 1, "2": 2, "3": 3}
_ARTICLES = ("a", "an")
_NOT_COUNT_BEFORE_ARTICLE = ("on", "against")  # "on a plain gray background": that "a" counts nothing
_PALETTE = tuple(world.PALETTE)  # object colours first, then the background-only ones
_NUM_OBJECT_COLOURS = len(world.OBJECT_COLOURS)


def _vocabulary_tables(tokenizer) -> dict[str, np.ndarray]:
    size = len(tokenizer)
    words = [w.strip().lower() for w in tokenizer.batch_decode([[i] for i in range(size)])]
    sizes = {w: world.SIZES.index(s) for w, s in world_prompts.SIZE_OF.items()}
    positions = {w: world.POSITIONS.index(p) for w, p in world_prompts.POSITION_WORDS.items()}
    nouns = {world.shape_noun(s, n): (world.SHAPES.index(s), int(n > 1)) for s in world.SHAPES for n in (1, 2)}
    tables = {name: np.full(size, -1, np.int32) for name in ("colour", "shape", "plural", "number", "size",
                                                             "position")}
    tables["article"] = np.zeros(size, bool)
    tables["not_count_before_article"] = np.zeros(size, bool)
    for i, w in enumerate(words):
        if w in _PALETTE:
            tables["colour"][i] = _PALETTE.index(w)
        elif w in nouns:
            tables["shape"][i], tables["plural"][i] = nouns[w]
        elif w in _NUMBER_WORDS:
            tables["number"][i] = _NUMBER_WORDS[w]
        elif w in sizes:
            tables["size"][i] = sizes[w]
        elif w in positions:
            tables["position"][i] = positions[w]
        tables["article"][i] = w in _ARTICLES
        tables["not_count_before_article"][i] = w in _NOT_COUNT_BEFORE_ARTICLE
    return tables


def attribute_constraint_data(tokenizer, stated: Sequence[world.Scene]) -> dict:
    """The arrays `constrain_attributes` reads: the vocabulary's token classes and, per prompt, its stated groups
    (colour, shape, count, size, position; -1 where unstated or absent; count 0: unstated, named in the plural)
    and background (-1: unstated)."""
    num_groups = max(1, max(len(r.groups) for r in stated))
    fields = {name: np.full((len(stated), num_groups), -1, np.int32)
              for name in ("colour", "shape", "count", "size", "position")}
    background = np.full(len(stated), -1, np.int32)
    for b, record in enumerate(stated):
        for g, group in enumerate(record.groups):
            fields["colour"][b, g] = _PALETTE.index(group.colour)
            fields["shape"][b, g] = world.SHAPES.index(group.shape)
            fields["count"][b, g] = 0 if group.count is None else group.count
            fields["size"][b, g] = -1 if group.size is None else world.SIZES.index(group.size)
            fields["position"][b, g] = -1 if group.position is None else world.POSITIONS.index(group.position)
        if record.background in _PALETTE:
            background[b] = _PALETTE.index(record.background)
    return {"vocab": _vocabulary_tables(tokenizer), "groups": fields, "background": background}


def constrain_attributes(data, tokens, step, logits, token):
    """A `text.generate` constraint that copies the stated attribute words (data: `attribute_constraint_data`).

    The k-th group phrase the expansion writes describes the prompt's k-th stated group (k counts the object-colour
    words emitted so far); later phrases describe groups the prompt left open, in colours it did not state. When
    the chosen token names an attribute the prompt stated otherwise, it is replaced by the most likely token that
    names the stated value:
      colour word -> the next stated group's colour (an unstated colour once every stated group is written);
      count word (one/two/three, or "a"/"an" unless after "on"/"against") or size word -> those of the next
        stated group (they come before its colour; a group the prompt names in the plural gets two or three);
      shape noun -> the shape of the group whose colour was written last, singular or plural as its stated count;
      position word (left, upper, middle, ...) -> that group's stated position;
      background-only colour (gray, brown, teal, pink) -> the stated background.
    A stated group the expansion never writes is not forced in (banning the stop token until it is written made
    the small world's expander ramble, "at the bottom.. left.: three big blue triangles"): `expand_checked`
    rejects such an expansion.
    """
    vocab_size = logits.shape[-1]

    def table(name, fill=-1):
        t = data["vocab"][name]
        return jnp.pad(t[:vocab_size], (0, max(0, vocab_size - t.shape[0])), constant_values=fill)

    colour, shape, plural = table("colour"), table("shape"), table("plural")
    number, size, position = table("number"), table("size"), table("position")
    article, no_count = table("article", False), table("not_count_before_article", False)
    groups, background = data["groups"], data["background"]
    batch, length = tokens.shape

    def at(values, index):  # values (B, G), index (B,) -> (B,)
        return jnp.take_along_axis(values, index[:, None], axis=1)[:, 0]

    emitted = jnp.arange(length)[None, :] < step
    history = jnp.where(emitted, colour[jnp.clip(tokens, 0, vocab_size - 1)], -1)  # colour class of each token
    stated = groups["colour"] >= 0
    written = jnp.any(history[:, :, None] == groups["colour"][:, None, :], axis=1) & stated
    pending = stated & ~written
    has_next = jnp.any(pending, axis=1)
    nxt = jnp.argmax(pending, axis=1)  # the next stated group to write
    last = jnp.max(jnp.where(history >= 0, jnp.arange(length)[None, :], -1), axis=1)
    last_colour = jnp.where(last >= 0, at(history, jnp.maximum(last, 0)), -1)
    current = (groups["colour"] == last_colour[:, None]) & stated
    has_current = jnp.any(current, axis=1)
    cur = jnp.argmax(current, axis=1)  # the stated group whose colour was written last
    previous = jnp.where(step > 0, jnp.take(tokens, jnp.maximum(step - 1, 0), axis=1), 0)

    def want(field, index, valid):
        return jnp.where(valid, at(groups[field], index), -1)

    t_colour, t_shape, t_plural = colour[token], shape[token], plural[token]
    t_number, t_size, t_position = number[token], size[token], position[token]
    # colours
    is_object = (t_colour >= 0) & (t_colour < _NUM_OBJECT_COLOURS)
    next_colour = want("colour", nxt, has_next)
    stated_colour = jnp.any(groups["colour"] == t_colour[:, None], axis=1)
    v_object = (colour >= 0) & (colour < _NUM_OBJECT_COLOURS)
    v_stated = jnp.any(colour[None, :, None] == groups["colour"][:, None, :], axis=2)
    conflicts = [(is_object & jnp.where(has_next, t_colour != next_colour, stated_colour),
                  jnp.where(has_next[:, None], colour[None, :] == next_colour[:, None], v_object[None, :] & ~v_stated))]
    conflicts.append(((t_colour >= _NUM_OBJECT_COLOURS) & (background >= 0) & (t_colour != background),
                      colour[None, :] == background[:, None]))
    # count and size (before the colour: the next stated group's)
    is_count = (t_number > 0) | (article[token] & (step > 0) & ~no_count[previous])
    next_count = want("count", nxt, has_next)
    value = jnp.where(t_number > 0, t_number, 1)
    conflicts.append((is_count & jnp.where(next_count > 0, value != next_count, (next_count == 0) & (value == 1)),
                      jnp.where(next_count[:, None] > 0, (number[None, :] == next_count[:, None])
                                | ((next_count[:, None] == 1) & article[None, :]), number[None, :] > 1)))
    next_size = want("size", nxt, has_next)
    conflicts.append(((t_size >= 0) & (next_size >= 0) & (t_size != next_size), size[None, :] == next_size[:, None]))
    # shape and position (after the colour: the current group's)
    cur_shape, cur_count = want("shape", cur, has_current), want("count", cur, has_current)
    plural_wanted = jnp.where(cur_count >= 0, (cur_count != 1).astype(jnp.int32), t_plural)
    conflicts.append(((t_shape >= 0) & (cur_shape >= 0) & ((t_shape != cur_shape) | (t_plural != plural_wanted)),
                      (shape[None, :] == cur_shape[:, None]) & (plural[None, :] == plural_wanted[:, None])))
    cur_position = want("position", cur, has_current)
    conflicts.append(((t_position >= 0) & (cur_position >= 0) & (t_position != cur_position),
                      position[None, :] == cur_position[:, None]))
    for conflict, allowed in conflicts:  # the classes are disjoint: at most one applies to a token
        forced = jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1).astype(token.dtype)
        token = jnp.where(conflict & jnp.any(allowed, axis=-1), forced, token)
    return token


def stream_expansion(encoder, prompt: str, max_new_tokens: int = 256, *, chunk: int = 8, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, system: Optional[str] = None, constrain: bool = False,
                     stated: Optional[world.Scene] = None) -> Iterator[str]:
    """The expansion of one prompt as text pieces, yielded as the jitted decode chunks come back (their
    concatenation is the decoded answer; pieces never end inside a multi-byte character). constrain / stated: as
    in `expand_prompts` (no rejection: the pieces are out before the answer is whole)."""
    tokenizer = encoder.tokenizer
    ids = np.asarray([expansion_prompt_ids(tokenizer, prompt, system)], np.int32)
    stops = stop_token_ids(tokenizer)
    kwargs = {}
    if constrain:
        record = world_prompts.stated_record(prompt) if stated is None else stated
        kwargs = dict(constrain=constrain_attributes, constrain_data=attribute_constraint_data(tokenizer, [record]))
    generated: list[int] = []
    printed = ""
    for block in encoder.stream(ids, np.ones_like(ids), max_new_tokens, chunk=chunk, temperature=temperature,
                                top_p=top_p, seed=seed, stop_token_ids=stops, **kwargs):
        row = block[0].tolist()
        kept = until_stop(row, stops)
        generated.extend(kept)
        text = tokenizer.decode(generated, skip_special_tokens=True)
        stopped = len(kept) < len(row)
        if "\ufffd" not in text[len(printed):]:  # else an incomplete multi-byte character: wait for more
            yield text[len(printed):]
            printed = text
        if stopped:
            break
    text = tokenizer.decode(generated, skip_special_tokens=True)
    if text[len(printed):]:
        yield text[len(printed):]
