"""Short prompts for the prompt-expansion model: rich scene captions degraded the way users write.

Following the Qwen-Image-2 enhancer recipe (design/METHODS.md section 5), a (short prompt -> rich caption) pair
is made by deleting details from a scene's full description (counts, sizes, positions, word colour, background,
texture; sometimes whole object groups or the word) and colloquialising what remains ("pls draw red circles and
a blue square"). `degrade_record` also returns the partial `Scene` the short prompt still states (None fields),
so the judge can score an image generated from the short prompt on exactly what the prompt asked for.
"""
from __future__ import annotations

import dataclasses
import re

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
CASUAL_SIZES = {"small": ("small", "tiny", "little"), "large": ("big", "large", "huge")}
CASUAL_POSITIONS = {"left": ("on the left", "left side"), "right": ("on the right", "right side"),
                    "top": ("at the top", "up top"), "bottom": ("at the bottom", "down low"),
                    "centre": ("in the middle", "in the center")}


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
        words.append(_pick(rng, CASUAL_SIZES[group.size]))
    words += [group.colour, world.shape_noun(group.shape, group.count)]
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    if group.position is not None:
        words.append(_pick(rng, CASUAL_POSITIONS[group.position]))
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
# The words world captions (`world.group_phrase`) and short prompts (`_casual_group`) use for each attribute, plus a
# few spellings a rewriter may use ("centre", "to the left"): what `stated_objects` reads back.
_NUMBER = {"a": 1, "an": 1, "one": 1, "1": 1, "two": 2, "2": 2, "a couple of": 2, "a pair of": 2, "three": 3,
           "3": 3}
SIZE_OF = {word: size for table in (world.SIZE_WORDS, CASUAL_SIZES) for size, words in table.items()
            for word in words}
_SIZE_WORDS = tuple(SIZE_OF)
# position phrases: "<on|at|in|near|to> the <word> [side|part]" (the form of every world caption phrase and most
# short-prompt ones; a rewriter that swaps the word keeps it), and "left side", "right side", "up top", "down low"
POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom",
                  "lower": "bottom", "center": "centre", "centre": "centre", "middle": "centre"}
_POSITION_PHRASE = (r"(?:on|at|in|near|to)\s+the\s+(?:" + "|".join(POSITION_WORDS) + r")(?:\s+(?:side|part))?"
                    r"|left\s+side|right\s+side|up\s+top|down\s+low")
_TEXTURE_WORDS = tuple(w for words in world.TEXTURE_WORDS.values() for w in words if w)
ATTRIBUTES = ("colour", "shape", "group", "count", "size", "position", "background")


def _alternatives(words) -> str:
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))  # longest first: "on the left side"


def _nouns() -> dict[str, tuple[str, int | None]]:
    """Shape noun -> (shape, count it implies: 1 for a singular noun, None for a plural)."""
    return {world.shape_noun(s, n): (s, 1 if n == 1 else None) for s in world.SHAPES for n in (1, 2)}


def _group_pattern():
    return re.compile(r"(?:\b(?P<count>" + _alternatives(_NUMBER) + r"|some)\s+)?"
                      r"(?:\b(?P<size>" + _alternatives(_SIZE_WORDS) + r")\s+)?"
                      r"\b(?P<colour>" + _alternatives(world.COLOURS) + r")\s+(?P<noun>" + _alternatives(_nouns())
                      + r")\b(?:\s+(?P<position>" + _POSITION_PHRASE + r")\b)?")


def _position_of(phrase: str | None) -> str | None:
    """"on the left side" -> "left", "in the upper part" -> "top", "down low" -> "bottom"; None -> None."""
    if phrase is None:
        return None
    words = phrase.split()
    if words[-1] in ("side", "part"):
        words = words[:-1]
    return {"low": "bottom"}.get(words[-1], POSITION_WORDS.get(words[-1]))


def stated_objects(text: str) -> list[world.ObjectGroup]:
    """Every object group a world prompt or caption names, in order, as the phrase `[count] [size] colour shape
    [position]` states it ("two small red circles on the left", "a couple of blue squares up top", "white crosses"):
    count from its number word, else 1 for a singular noun ("the red circle") and None for a plural one ("some red
    circles"); size and position None when the phrase has none."""
    nouns = _nouns()
    out = []
    for m in _group_pattern().finditer(text.lower()):
        shape, implied = nouns[m.group("noun")]
        count = _NUMBER.get(m.group("count") or "", implied)
        size = SIZE_OF.get(m.group("size") or "")
        position = _position_of(m.group("position"))
        out.append(world.ObjectGroup(shape, m.group("colour"), count, position, size))
    return out


def stated_groups(text: str) -> list[tuple[str, str, int | None]]:
    """(colour, shape, count or None) of every object group a world prompt or caption names, in order (see
    `stated_objects`)."""
    return [(g.colour, g.shape, g.count) for g in stated_objects(text)]


def stated_backgrounds(text: str) -> list[str]:
    """The background colours `text` names, in order of first mention: every background-only colour (gray, brown,
    teal, pink), any colour followed by background/backdrop/bg ("a plain purple background"), and "on [a] colour"
    not followed by a shape ("... on purple")."""
    lower = text.lower()
    colours = _alternatives(world.PALETTE)
    textures = _alternatives(_TEXTURE_WORDS)
    found = []  # (offset, colour)
    for m in re.finditer(r"\b(" + _alternatives(world.BACKGROUNDS) + r")\b", lower):
        found.append((m.start(1), m.group(1)))
    for m in re.finditer(r"\b(" + colours + r")\s+(?:background|backdrop|bg)\b", lower):
        found.append((m.start(1), m.group(1)))
    not_an_object = r"(?!\s+(?:" + _alternatives(_nouns()) + "|" + _alternatives(_SIZE_WORDS) + r")\b)"
    for m in re.finditer(r"\bon\s+(?:an?\s+)?(?:(?:" + textures + r")\s+)?(" + colours + r")\b" + not_an_object,
                         lower):
        found.append((m.start(1), m.group(1)))
    out = []
    for _, colour in sorted(found):
        if colour not in out:
            out.append(colour)
    return out


def stated_record(text: str) -> world.Scene:
    """The partial `Scene` a short prompt states, read from its words (what `degrade_record` returns beside the
    prompt, minus the word): one group per (colour, shape) in order of first mention, each field from its first
    mention that states it; the first background named; None where the text states nothing."""
    groups: dict[tuple[str, str], world.ObjectGroup] = {}
    for g in stated_objects(text):
        key = (g.colour, g.shape)
        if key not in groups:
            groups[key] = g
        else:
            old = groups[key]
            groups[key] = dataclasses.replace(
                old, **{f: getattr(g, f) for f in ("count", "position", "size") if getattr(old, f) is None})
    backgrounds = stated_backgrounds(text)
    return world.Scene(groups=tuple(groups.values()), background=backgrounds[0] if backgrounds else None)


def contradictions(expanded: str, short_record: world.Scene) -> list[str]:
    """What `expanded` changes or drops of what the short prompt stated (its partial record), one entry each:

    - for a stated group named nowhere with its colour and shape: "colour of red circle" when the expansion names
      a circle of a colour the prompt did not pair with circles, else "shape of red circle" when it names a red
      object of another shape, else "dropped red circle";
    - for a group it names: "count of red circle", "size of ..." or "position of ..." when the stated value is
      not what its mentions state (dropped: none states one; changed: one states another); a group whose count
      the record leaves open (None: short prompts name it in the plural, "red circles") has its count changed
      when a mention names one object;
    - "background" when the stated background is not the one background the expansion names.

    Empty when the expansion keeps everything stated; what the prompt leaves open (None fields) may be added."""
    mentions = stated_objects(expanded)
    stated = {(g.colour, g.shape) for g in short_record.groups}
    others = [m for m in mentions if (m.colour, m.shape) not in stated]
    problems = []
    for group in short_record.groups:
        name = f"{group.colour} {group.shape}"
        same = [m for m in mentions if (m.colour, m.shape) == (group.colour, group.shape)]
        if not same:
            if any(m.shape == group.shape for m in others):
                problems.append(f"colour of {name}")
            elif any(m.colour == group.colour for m in others):
                problems.append(f"shape of {name}")
            else:
                problems.append(f"dropped {name}")
            continue
        for field in ("count", "size", "position"):
            want = getattr(group, field)
            said = {getattr(m, field) for m in same} - {None}
            if (want is not None and said != {want}) or (field == "count" and want is None and 1 in said):
                problems.append(f"{field} of {name}")
    if short_record.background is not None and stated_backgrounds(expanded) != [short_record.background]:
        problems.append("background")
    return problems


def contradiction_attribute(problem: str) -> str:
    """The attribute (one of `ATTRIBUTES`) a `contradictions` entry is about: "count of red circle" -> "count",
    "dropped red circle" -> "group", "background" -> "background"."""
    if problem == "background":
        return "background"
    if problem.startswith("dropped "):
        return "group"
    attribute = problem.split(" of ", 1)[0]
    if attribute not in ATTRIBUTES:
        raise ValueError(f"{problem!r} is not a contradictions() entry")
    return attribute


def stated_attributes(record: world.Scene) -> set[str]:
    """The attributes a partial record states: colour, shape, group and count whenever it has a group (a group
    without a count was named in the plural: more than one), size, position and background when set."""
    out = set()
    if record.groups:
        out |= {"colour", "shape", "group", "count"}
    for field in ("size", "position"):
        if any(getattr(g, field) is not None for g in record.groups):
            out.add(field)
    if record.background is not None:
        out.add("background")
    return out


def contradiction_rates(problems: list[list[str]], records: list[world.Scene]) -> dict:
    """Summary of `contradictions` over prompts: {"rate": fraction of prompts with any, "by_attribute": {attribute:
    fraction of all prompts with one about it}, "by_attribute_when_stated": {attribute: the same among the prompts
    that state the attribute (None when none does)}, "num_prompts"}."""
    if len(problems) != len(records):
        raise ValueError(f"{len(problems)} contradiction lists for {len(records)} records")
    n = len(problems)
    about = [{contradiction_attribute(p) for p in found} for found in problems]
    stated = [stated_attributes(r) for r in records]
    by_attribute, when_stated = {}, {}
    for a in ATTRIBUTES:
        hits = sum(a in x for x in about)
        num_stated = sum(a in s for s in stated)
        by_attribute[a] = hits / n if n else 0.0
        when_stated[a] = (sum(a in x for x, s in zip(about, stated) if a in s) / num_stated) if num_stated else None
    return {"rate": (sum(bool(p) for p in problems) / n) if n else 0.0, "by_attribute": by_attribute,
            "by_attribute_when_stated": when_stated, "num_prompts": n}
