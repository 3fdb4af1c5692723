"""The prompt expander keeps what the short prompt states (issue 25, item 3): `data.prompts` reads attributes back
from hand-written captions and names every contradiction (a stated shape, colour, count, size, position or
background changed or dropped); `text.expand` copies stated attribute words while decoding (`constrain_attributes`
through the `constrain` hook of `text.generate`) and falls back to the prompt as written (`expand_checked`); the
`expand-prompt` and `eval-t2i --expand` commands turn both on by default and report them.

Decoding is tested with a scripted decoder (its logits at each new position prefer one word of a written script)
over a word-level tokenizer, so every expected text below is written by hand."""
import argparse

import jax.numpy as jnp
import numpy as np
import pytest

from qwenimage_jax.data import prompts, world
from qwenimage_jax.data.world import ObjectGroup, Scene
from qwenimage_jax.text import expand, generate

# ------------------------------------------------------------------------------------ reading prompts back by hand


def test_stated_objects_read_every_attribute_of_hand_written_phrases():
    text = ("An image of two small red circles on the left side, a big blue square up top, 3 tiny green crosses "
            "in the lower part and the white ring, with yellow triangles at the centre")
    assert prompts.stated_objects(text) == [
        ObjectGroup("circle", "red", count=2, position="left", size="small"),
        ObjectGroup("square", "blue", count=1, position="top", size="large"),
        ObjectGroup("cross", "green", count=3, position="bottom", size="small"),
        ObjectGroup("ring", "white", count=1),  # singular noun, no number word: one
        ObjectGroup("triangle", "yellow", count=None, position="centre"),  # plural, no number: open
    ]
    assert prompts.stated_objects("A pair of huge purple rings near the top") == [
        ObjectGroup("ring", "purple", count=2, position="top", size="large")]
    assert prompts.stated_groups("some orange squares down low and a couple of black crosses") == [
        ("orange", "square", None), ("black", "cross", 2)]
    assert prompts.stated_objects("a cat on a sofa") == []


def test_stated_backgrounds_and_records_of_hand_written_prompts():
    assert prompts.stated_backgrounds("Two red circles on a plain teal background") == ["teal"]
    assert prompts.stated_backgrounds("a blue square on gray") == ["gray"]
    assert prompts.stated_backgrounds("set against a speckled pink backdrop") == ["pink"]
    assert prompts.stated_backgrounds("red crosses on a purple bg") == ["purple"]  # an object colour as background
    assert prompts.stated_backgrounds("a pink background, later a brown one") == ["pink", "brown"]
    assert prompts.stated_backgrounds("a ring on a red square") == []  # "on" an object is no background
    assert prompts.stated_backgrounds("two white crosses") == []
    assert prompts.stated_record("pls draw 2 tiny red circles on the left & some blue squares, teal background :)") \
        == Scene(groups=(ObjectGroup("circle", "red", 2, "left", "small"), ObjectGroup("square", "blue")),
                 background="teal")
    assert prompts.stated_record("a cat") == Scene(groups=())


# ------------------------------------------------------------------------------------------------ contradictions
STATED = Scene(groups=(ObjectGroup("circle", "red", count=2, position="left", size="small"),
                       ObjectGroup("square", "blue")),  # count None: "blue squares", more than one
               background="teal")
KEPT = "Two small red circles at the left and three big blue squares at the top on a plain teal background."


@pytest.mark.parametrize("expanded, expected", [
    (KEPT, []),
    ("On a teal background: two tiny red circles on the left side and two blue squares.", []),
    # colour, shape, a whole group
    (KEPT.replace("red circles", "green circles"), ["colour of red circle"]),
    (KEPT.replace("red circles", "red rings"), ["shape of red circle"]),
    ("Three big blue squares at the top on a plain teal background.", ["dropped red circle"]),
    # count: changed, dropped, and one object where the prompt said "squares"
    (KEPT.replace("Two small", "Three small"), ["count of red circle"]),
    (KEPT.replace("Two small red", "Small red"), ["count of red circle"]),
    (KEPT.replace("three big blue squares", "one big blue square"), ["count of blue square"]),
    # size and position: changed and dropped
    (KEPT.replace("small red", "large red"), ["size of red circle"]),
    (KEPT.replace("Two small red", "Two red"), ["size of red circle"]),
    (KEPT.replace("circles at the left", "circles in the middle"), ["position of red circle"]),
    (KEPT.replace("circles at the left", "circles"), ["position of red circle"]),
    # background: changed, dropped, contradicted by a second one
    (KEPT.replace("teal", "pink"), ["background"]),
    (KEPT.replace(" on a plain teal background", ""), ["background"]),
    (KEPT + " The backdrop turns gray.", ["background"]),
    # several at once, in the stated groups' order
    ("A plain gray background with one large red ring.", ["shape of red circle", "dropped blue square",
                                                          "background"]),
])
def test_contradictions_name_each_changed_or_dropped_attribute(expanded, expected):
    assert prompts.contradictions(expanded, STATED) == expected


def test_what_the_prompt_leaves_open_may_be_added():
    partial = Scene(groups=(ObjectGroup("circle", "red", count=1),))
    assert prompts.contradictions("One big red circle in the middle and two green rings on a pink background.",
                                  partial) == []
    assert prompts.contradictions("A red circle", partial) == []


def test_contradiction_attributes_and_rates_by_hand():
    assert [prompts.contradiction_attribute(p) for p in
            ("colour of red circle", "shape of red circle", "dropped blue square", "count of red circle",
             "size of red circle", "position of blue square", "background")] == [
        "colour", "shape", "group", "count", "size", "position", "background"]
    with pytest.raises(ValueError, match="not a contradictions"):
        prompts.contradiction_attribute("hue of red circle")
    records = [STATED, Scene(groups=(ObjectGroup("ring", "white"),)), Scene(groups=(ObjectGroup("ring", "white"),)),
               Scene(groups=(ObjectGroup("ring", "white", count=3),))]
    found = [["count of red circle", "background"], [], ["shape of white ring"], []]
    rates = prompts.contradiction_rates(found, records)
    assert rates["rate"] == 0.5 and rates["num_prompts"] == 4
    assert rates["by_attribute"] == {"colour": 0.0, "shape": 0.25, "group": 0.0, "count": 0.25, "size": 0.0,
                                     "position": 0.0, "background": 0.25}
    # every group states a count (a number, or the plural), only record 0 a size, a position and a background
    assert rates["by_attribute_when_stated"] == {"colour": 0.0, "shape": 0.25, "group": 0.0, "count": 0.25,
                                                 "size": 0.0, "position": 0.0, "background": 1.0}
    assert prompts.stated_attributes(records[1]) == {"colour", "shape", "group", "count"}
    assert prompts.contradiction_rates([[]], [Scene(groups=())])["by_attribute_when_stated"]["count"] is None


# ---------------------------------------------------------------------- a word-level tokenizer, a scripted decoder
WORDS = ["<|endoftext|>", "<|im_end|>", "<s>", "A", " plain", " background", " with", " and", " at", " the", " on",
         " a", ".", " red", " blue", " green", " white", " gray", " pink", " teal", " one", " two", " three",
         " big", " small", " large", " circle", " circles", " square", " squares", " cross", " crosses", " left",
         " right", " top", " center", " middle"]
PAD, STOP, START = 0, 1, 2


class WordTokenizer:
    """Just what `text.expand` calls: one token per word of WORDS."""
    pad_token_id, eos_token_id, unk_token_id = PAD, STOP, None

    def __len__(self):
        return len(WORDS)

    def convert_tokens_to_ids(self, token):
        return WORDS.index(token) if token in WORDS else None

    def apply_chat_template(self, messages, **kwargs):
        return [START] * (3 + len(messages[-1]["content"]) % 3)  # prompts of different lengths: left padding

    def decode(self, ids, skip_special_tokens=True):
        return "".join(WORDS[i] for i in ids if not (skip_special_tokens and i in (PAD, STOP, START)))

    def batch_decode(self, rows):
        return [self.decode(r, skip_special_tokens=False) for r in rows]


def ids_of(text):
    """" two big red circles." -> token ids (words split before spaces and the full stop)."""
    import re

    return [WORDS.index(w) for w in re.findall(r" ?[^ .]+|\.", text)]


def _scripted_forward(params, ids, positions, kv_mask, cache, cache_index, extra):
    """Logits at position p prefer script[p - first new position] (5.0); ties go to the lower token id."""
    table = params["table"]
    step = jnp.clip(positions - params["offset"][:, None], 0, table.shape[1] - 1)
    return jnp.take_along_axis(table, step[..., None], axis=1), cache


SCRIPTED = generate.Decoder(init_cache=lambda batch, length: jnp.zeros((batch, length)), forward=_scripted_forward)


def scripted_params(scripts, mask):
    """One script (text) per row -> the decoder's params for left-padded prompts with this attention mask."""
    length = max(len(ids_of(s)) for s in scripts) + 1
    table = np.tile(-1e-3 * np.arange(len(WORDS), dtype=np.float32), (len(scripts), length, 1))
    for b, script in enumerate(scripts):
        for k, token in enumerate(ids_of(script) + [STOP]):
            table[b, k, token] = 5.0
        table[b, len(ids_of(script)) + 1:, STOP] = 5.0
    # the first new token comes from the last prompt position (its row's valid length - 1)
    return {"table": jnp.asarray(table), "offset": jnp.asarray(np.asarray(mask).sum(1) - 1, jnp.int32)}


def decode_with(scripts, stated, max_new_tokens=24, stream=False):
    mask = np.ones((len(scripts), 3), np.int32)
    ids = np.full((len(scripts), 3), START, np.int32)
    params = scripted_params(scripts, mask)
    kwargs = dict(stop_token_ids=[STOP], pad_token_id=PAD)
    if stated is not None:
        kwargs.update(constrain=expand.constrain_attributes,
                      constrain_data=expand.attribute_constraint_data(WordTokenizer(), stated))
    if stream:
        out = np.concatenate(list(generate.stream(SCRIPTED, params, ids, mask, max_new_tokens, chunk=5, **kwargs)), 1)
    else:
        out = np.asarray(generate.generate(SCRIPTED, params, ids, mask, max_new_tokens, **kwargs))
    return [WordTokenizer().decode(expand.until_stop(row.tolist(), [STOP])) for row in out]


SCRIPT = "A plain pink background with two big red circles at the left and a small green square at the top."


def test_the_scripted_decoder_says_its_script_unconstrained():
    assert decode_with([SCRIPT], None) == [SCRIPT]


def test_constrained_decoding_copies_every_stated_attribute_word():
    stated = Scene(groups=(ObjectGroup("square", "blue", count=3, position="right", size="large"),
                           ObjectGroup("circle", "white", count=1)), background="gray")
    # the first group phrase is the first stated group, the second the second; "big" already means large, "a"
    # already means one, the second group's size and position are open
    expected = ("A plain gray background with three big blue squares at the right and a small white circle at the "
                "top.")
    assert decode_with([SCRIPT], [stated]) == [expected]
    assert prompts.contradictions(expected, stated) == []
    assert decode_with([SCRIPT], [stated], stream=True) == [expected]


def test_constrained_decoding_keeps_plurals_and_gives_added_groups_unstated_colours():
    stated = Scene(groups=(ObjectGroup("circle", "red"),))  # "red circles": more than one, the rest open
    script = "A plain pink background with one big red circle at the left and two small red squares at the top."
    expected = ("A plain pink background with two big red circles at the left and two small blue squares at the "
                "top.")
    assert decode_with([script], [stated]) == [expected]


def test_an_article_after_on_counts_nothing_and_rows_are_constrained_apart():
    script = " on a plain pink background with a big red circle."
    stated = [Scene(groups=(ObjectGroup("circle", "red", count=2),)), Scene(groups=()),
              Scene(groups=(ObjectGroup("cross", "green", count=1, position="centre"),), background="teal")]
    assert decode_with([script] * 3, stated) == [
        " on a plain pink background with two big red circles.",
        script,  # nothing stated: nothing forced
        " on a plain teal background with a big green cross.",  # no position phrase was written: none is forced in
    ]


def test_constrain_data_needs_a_constrain_function():
    with pytest.raises(ValueError, match="without a constrain function"):
        generate.generate(SCRIPTED, scripted_params([SCRIPT], np.ones((1, 3))), np.full((1, 3), START),
                          np.ones((1, 3)), 4, constrain_data={"x": np.zeros(2)})


# ------------------------------------------------------------------------------------------- rejection / fallback
class ScriptedEncoder:
    """A stand-in for a loaded expander: answers the script of its seed (greedy), through `text.generate`."""

    def __init__(self, scripts_by_seed):
        self.tokenizer, self.scripts, self.seeds = WordTokenizer(), scripts_by_seed, []

    def generate(self, ids, mask, max_new_tokens, temperature=0.0, top_p=1.0, seed=0, stop_token_ids=None,
                 pad_token_id=None, **constraint):
        self.seeds.append(seed)
        params = scripted_params([self.scripts[seed]] * len(ids), mask)
        return generate.generate(SCRIPTED, params, ids, mask, max_new_tokens, stop_token_ids=stop_token_ids,
                                 pad_token_id=pad_token_id, **constraint)


ONE = "A plain pink background with one big red circle at the left."
TWO = " two big red circles at the left on a plain pink background."


def test_an_expansion_that_contradicts_falls_back_to_the_prompt_as_written():
    encoder = ScriptedEncoder({0: ONE})
    result = expand.expand_checked(encoder, ["red circles pls", "a cat"])
    assert result.first == [ONE.strip()] * 2
    assert result.first_contradictions == [["count of red circle"], []]  # "red circles" stated more than one
    assert result.texts == ["red circles pls", ONE.strip()] and result.fell_back == [True, False]
    assert result.tries == [1, 1] and result.fallback_rate == 0.5
    assert expand.expand_prompts(encoder, ["red circles pls", "a cat"], keep_stated=True) == result.texts
    assert expand.expand_prompts(encoder, ["red circles pls", "a cat"]) == result.first  # off by default


def test_sampled_expansions_are_retried_with_other_seeds_before_falling_back():
    encoder = ScriptedEncoder({0: ONE, 1: ONE, 2: TWO})
    result = expand.expand_checked(encoder, ["red circles pls", "a cat"], temperature=0.7, retries=3, seed=0)
    assert result.texts == [TWO.strip(), ONE.strip()] and result.fell_back == [False, False]
    assert result.tries == [3, 1] and encoder.seeds == [0, 1, 2]  # the kept one is not tried again
    greedy = ScriptedEncoder({0: ONE, 1: TWO})
    assert expand.expand_checked(greedy, ["red circles pls"], retries=3).fell_back == [True]  # greedy repeats
    assert greedy.seeds == [0]
    with pytest.raises(ValueError, match="retries"):
        expand.expand_checked(greedy, ["a"], retries=-1)


def test_constrained_expansion_needs_no_fallback_and_stated_records_can_be_given():
    encoder = ScriptedEncoder({0: ONE})
    result = expand.expand_checked(encoder, ["red circles pls"], constrain=True)
    assert result.texts == ["A plain pink background with two big red circles at the left."]
    assert result.fell_back == [False]
    stated = [Scene(groups=(ObjectGroup("cross", "green", count=1),), background="teal")]  # not what the text says
    assert expand.expand_prompts(encoder, ["red circles pls"], constrain=True, stated=stated) == [
        "A plain teal background with one big green cross at the left."]
    with pytest.raises(ValueError, match="1 stated records for 2 prompts"):
        expand.expand_checked(encoder, ["a", "b"], stated=stated)


def test_an_empty_expansion_falls_back():
    result = expand.expand_checked(ScriptedEncoder({0: ""}), ["a cat"])
    assert result.texts == ["a cat"] and result.fell_back == [True] and result.first_contradictions == [[]]


# ------------------------------------------------------------------------------------------------------ commands
def test_expand_prompt_command_falls_back_with_a_note(tmp_path, capsys):
    """The tiny random model cannot write "red circles": by default the command prints the prompt as written and
    says why on stderr; --no-keep-stated prints what the model wrote."""
    from qwenimage_jax.commands import expand_prompt
    from qwenimage_jax.testing.tokenizer import build_tiny_tokenizer, special_token_ids
    from tests.qwen3_vl_tiny import build_reference

    tok = build_tiny_tokenizer(str(tmp_path / "tokenizer"))
    _, path = build_reference(str(tmp_path), "tied_gqa2", special_token_ids(tok), seed=3, noise=0.3)
    parser = argparse.ArgumentParser()
    expand_prompt.add_arguments(parser)
    prompt = ["two", "red", "circles", "on", "a", "teal", "background"]
    common = ["--model", path, "--tokenizer", tok, "--max-new-tokens", "8", "--retries", "1"]
    assert expand_prompt.run(parser.parse_args(common + prompt)) == 0
    captured = capsys.readouterr()
    assert captured.out == "two red circles on a teal background\n"
    assert "2 tries changed what the prompt states" in captured.err and "printing the prompt as written" in captured.err
    assert expand_prompt.run(parser.parse_args(common + ["--no-keep-stated"] + prompt)) == 0
    streamed = capsys.readouterr().out
    assert streamed != "two red circles on a teal background\n" and streamed.endswith("\n")
    args = parser.parse_args(common + prompt)
    assert args.keep_stated and args.constrain and args.retries == 1
    from qwenimage_jax.errors import InputValueError

    with pytest.raises(InputValueError, match="--retries -1"):
        expand_prompt.run(parser.parse_args(common + ["--retries", "-1"] + prompt))


def test_eval_t2i_reports_contradictions_per_attribute_and_the_fallback_rate():
    from qwenimage_jax.commands import eval_t2i
    from qwenimage_jax.evals import t2i

    parser = argparse.ArgumentParser()
    eval_t2i.add_arguments(parser)
    args = parser.parse_args(["--model", "m", "--expand"])
    assert args.keep_stated and args.constrain  # both levers on by default
    args = parser.parse_args(["--model", "m", "--expand", "--no-keep-stated", "--no-constrain"])
    assert not args.keep_stated and not args.constrain

    shorts = ["red circles pls", "a cat", "one small red circle on gray"]
    records = [Scene(groups=(ObjectGroup("circle", "red"),)), Scene(groups=()),
               Scene(groups=(ObjectGroup("circle", "red", count=1, size="small"),), background="gray")]
    # ONE contradicts the first (count) and the third (size, background); the second states nothing
    used, report = t2i.expansion_report(ScriptedEncoder({0: ONE}), shorts, records, keep_stated=True,
                                        constrain=False)
    assert used == [shorts[0], ONE.strip(), shorts[2]]
    assert report["expansion_contradiction_rate"] == pytest.approx(2 / 3)
    assert report["expansion_contradictions_by_attribute"] == pytest.approx(
        {"colour": 0.0, "shape": 0.0, "group": 0.0, "count": 1 / 3, "size": 1 / 3, "position": 0.0,
         "background": 1 / 3})
    assert report["expansion_contradictions_when_stated"]["background"] == 1.0
    assert report["expansion_fallback_rate"] == pytest.approx(2 / 3)
    assert report["expansion_used_contradiction_rate"] == 0.0
    assert report["expansion_contradictions"][1] == [shorts[2], ONE.strip(), ["size of red circle", "background"]]
    result = {"split": "heldout", "num_prompts": 3, "steps": 2, "cfg": 1.0, "generated": {"overall": 0.5},
              "ground_truth": {"overall": 1.0}, "short": {"overall": 0.4}, "expanded": {"overall": 0.45}, **report}
    table = t2i.format_table(result)
    assert ("expansions that change or drop what the short prompt states (unconstrained decoding): 0.667 (colour "
            "0.000, shape 0.000, group 0.000, count 0.333, size 0.333, position 0.000, background 0.333)") in table
    assert "fell back to the prompt as written: 0.667; contradictions in the prompts drawn: 0.000" in table

    used, report = t2i.expansion_report(ScriptedEncoder({0: ONE}), shorts, records, keep_stated=False,
                                        constrain=True)
    # constrained: "one" -> "two"/"circles" for the first; "big" -> "small", "pink" -> "gray" for the third
    assert used == ["A plain pink background with two big red circles at the left.", ONE.strip(),
                    "A plain gray background with one small red circle at the left."]
    assert report["expansion_contradiction_rate"] == 0.0 and report["expansion_fallback_rate"] == 0.0
    assert "fell back" not in t2i.format_table({**result, **report})
