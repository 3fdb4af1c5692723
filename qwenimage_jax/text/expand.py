"""Prompt expansion: a short prompt -> a detailed one, by a decoder LM (a loaded `TextEncoder`) answering the
expansion chat of `templates.expand_messages`. The one place that builds the chat ids, left-pads a batch, picks the
stop tokens and decodes the answers; the CLI (`expand-prompt`), the evals, the demo and the notebooks call it.

    texts = expand_prompts(encoder, ["a red cube"], max_new_tokens=64)         # greedy, batched
    for piece in stream_expansion(encoder, "a red cube", temperature=0.7): print(piece, end="")
"""
from __future__ import annotations

from typing import Iterator, Optional, Sequence

import numpy as np

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


def expand_prompts(encoder, prompts: Sequence[str], max_new_tokens: int = 64, *, temperature: float = 0.0,
                   top_p: float = 1.0, seed: int = 0, system: Optional[str] = None) -> list[str]:
    """Each short prompt expanded by `encoder` (a `load_text_encoder` result with its tokenizer), in one batch.

    Greedy by default (temperature 0); the answer stops at the first stop token and is stripped.
    """
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not one string; wrap it: [prompt]")
    if not prompts:
        return []
    tokenizer = encoder.tokenizer
    pad = tokenizer.pad_token_id or 0
    ids, mask = left_pad([expansion_prompt_ids(tokenizer, p, system) for p in prompts], pad)
    stops = stop_token_ids(tokenizer)
    out = np.asarray(encoder.generate(ids, mask, max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
                                      stop_token_ids=stops, pad_token_id=pad))
    return [tokenizer.decode(until_stop(row.tolist(), stops), skip_special_tokens=True).strip() for row in out]


def stream_expansion(encoder, prompt: str, max_new_tokens: int = 256, *, chunk: int = 8, temperature: float = 0.0,
                     top_p: float = 1.0, seed: int = 0, system: Optional[str] = None) -> Iterator[str]:
    """The expansion of one prompt as text pieces, yielded as the jitted decode chunks come back (their
    concatenation is the decoded answer; pieces never end inside a multi-byte character)."""
    tokenizer = encoder.tokenizer
    ids = np.asarray([expansion_prompt_ids(tokenizer, prompt, system)], np.int32)
    stops = stop_token_ids(tokenizer)
    generated: list[int] = []
    printed = ""
    for block in encoder.stream(ids, np.ones_like(ids), max_new_tokens, chunk=chunk, temperature=temperature,
                                top_p=top_p, seed=seed, stop_token_ids=stops):
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
