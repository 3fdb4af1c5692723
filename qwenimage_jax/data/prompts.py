"""Short prompts for the prompt-expansion model: rich scene captions degraded the way users write.

Following the Qwen-Image-2 enhancer recipe (design/METHODS.md section 5), a (short prompt -> rich caption) pair
is made by deleting details from a scene's full description (counts, sizes, positions, word colour, background,
texture; sometimes whole object groups or the word) and colloquialising what remains ("pls draw red circles and
a blue square"). `degrade_record` also returns the partial `Scene` the short prompt still states (None fields),
so the judge can score an image generated from the short prompt on exactly what the prompt asked for.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from qwenimage_jax.data import world

# Probability that each detail survives the degradation.
KEEP_GROUP = 0.8  # each object group after the first (the first always stays)
KEEP_COUNT = 0.3
KEEP_SIZE = 0.15
KEEP_POSITION = 0.2
KEEP_WORD = 0.7
KEEP_WORD_COLOUR = 0.1
KEEP_BACKGROUND = 0.2

_OPENERS = ("", "", "", "draw ", "pls draw ", "i want ", "a picture of ", "make ", "can you make ", "show me ",
            "an image with ", "generate ")
_CLOSERS = ("", "", "", " pls", " please", "!", " thx", " :)")
_COUNT_WORDS = {1: ("a", "one", "1"), 2: ("two", "2", "a couple of", "a pair of"), 3: ("three", "3")}


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _keep(rng: np.random.Generator, probability: float) -> bool:
    return bool(rng.random() < probability)


def _casual_group(group: world.ObjectGroup, rng: np.random.Generator) -> str:
    words = []
    if group.count is not None:
        words.append(_pick(rng, _COUNT_WORDS[group.count]))
    elif _keep(rng, 0.3):
        words.append("some")
    if group.size is not None:
        words.append(_pick(rng, {"small": ("small", "tiny", "little"), "large": ("big", "large", "huge")}[group.size]))
    words += [group.colour, world.shape_noun(group.shape, group.count)]
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    if group.position is not None:
        words.append(_pick(rng, {"left": ("on the left", "left side"), "right": ("on the right", "right side"),
                                 "top": ("at the top", "up top"), "bottom": ("at the bottom", "down low"),
                                 "centre": ("in the middle", "in the center")}[group.position]))
    return " ".join(words)


def degrade_record(record: world.Scene, rng: np.random.Generator) -> tuple[str, world.Scene]:
    """(short prompt, partial Scene it states) from a fully specified scene record."""
    groups = [record.groups[0]] + [g for g in record.groups[1:] if _keep(rng, KEEP_GROUP)]
    groups = [
        dataclasses.replace(
            g,
            count=g.count if g.count == 1 or _keep(rng, KEEP_COUNT) else None,  # "a cross" states one
            size=g.size if _keep(rng, KEEP_SIZE) else None,
            position=g.position if _keep(rng, KEEP_POSITION) else None,
        )
        for g in groups
    ]
    order = rng.permutation(len(groups))  # users do not list things in the caption's order
    groups = [groups[i] for i in order]
    word = word_colour = None
    if record.word is not None and _keep(rng, KEEP_WORD):
        word = record.word
        word_colour = record.word_colour if _keep(rng, KEEP_WORD_COLOUR) else None
    background = record.background if _keep(rng, KEEP_BACKGROUND) else None
    partial = world.Scene(groups=tuple(groups), word=word, word_colour=word_colour, background=background)

    text = world.join_phrases([_casual_group(g, rng) for g in groups])
    if rng.random() < 0.3:
        text = text.replace(" and ", _pick(rng, (" + ", " & ", ", ")))
    if word is not None:
        w = word if rng.random() < 0.5 else word.lower()
        said = _pick(rng, (" that says {w}", " with the word {w}", ", text {w}", " + \"{w}\"", " saying {w}"))
        text += said.format(w=w)
        if word_colour is not None:
            text += f" in {word_colour}"
    if background is not None:
        text += _pick(rng, (" on {b}", ", {b} background", " on a {b} bg")).format(b=background)
    opener = _pick(rng, _OPENERS)
    closers = [c for c in _CLOSERS if not (opener.startswith("pls") and c.strip() in ("pls", "please"))]
    text = opener + text + _pick(rng, closers)
    if rng.random() < 0.2:
        text = text[0].upper() + text[1:]
    return text, partial


def degrade_caption(record: world.Scene, rng: np.random.Generator) -> str:
    """A short, casual prompt for the scene `record`, dropping most details (see `degrade_record`)."""
    return degrade_record(record, rng)[0]


# ------------------------------------------------------------------------------------------- reading prompts back
_NUMBER = {"a": 1, "an": 1, "one": 1, "1": 1, "two": 2, "2": 2, "a couple of": 2, "a pair of": 2, "three": 3,
           "3": 3}
_SIZE_WORDS = ("small", "little", "tiny", "large", "big", "huge")


def _group_pattern():
    import re

    nouns = sorted({world.shape_noun(s, n) for s in world.SHAPES for n in (1, 2)}, key=len, reverse=True)
    counts = sorted(_NUMBER, key=len, reverse=True)
    return re.compile(r"(?:\b(?P<count>" + "|".join(re.escape(c) for c in counts) + r"|some)\s+)?"
                      r"(?:(?:" + "|".join(_SIZE_WORDS) + r")\s+)?"
                      r"\b(?P<colour>" + "|".join(world.COLOURS) + r")\s+(?P<noun>" + "|".join(nouns) + r")\b")


def stated_groups(text: str) -> list[tuple[str, str, int | None]]:
    """(colour, shape, count or None) of every object group a world prompt or caption names, in order: the
    phrases `[count] [size] colour shape` ("two small red circles", "a couple of blue squares", "white crosses")."""
    singular = {world.shape_noun(s, 2): s for s in world.SHAPES} | {s: s for s in world.SHAPES}
    out = []
    for m in _group_pattern().finditer(text.lower()):
        count = m.group("count")
        out.append((m.group("colour"), singular[m.group("noun")], _NUMBER.get(count) if count else None))
    return out


def contradictions(expanded: str, short_record: world.Scene) -> list[str]:
    """What `expanded` changes of what the short prompt stated (its partial record): for each stated group,
    "colour shape" when no group of that colour and shape is named, "count" when it is named with another
    count, and "background" when the stated background is not named. Empty when the expansion keeps them all."""
    groups = stated_groups(expanded)
    problems = []
    for group in short_record.groups:
        same = [count for colour, shape, count in groups if colour == group.colour and shape == group.shape]
        if not same:
            problems.append(f"{group.colour} {group.shape}")
        elif group.count is not None and all(c is not None and c != group.count for c in same):
            problems.append(f"count of {group.colour} {group.shape}")
    if short_record.background is not None and short_record.background not in expanded.lower():
        problems.append("background")
    return problems
