"""`qwenimage-jax sample --prompts-file FILE --out-dir DIR` (sampling/batch.py) on a tiny random pipeline: every
image equals `sample --prompt P --seed S` alone, the manifest records each image, a rerun skips what is done, and a
bad line is one error naming the file, line and key before the model is loaded."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from qwenimage_jax import cli
from qwenimage_jax.errors import InputError
from qwenimage_jax.testing.pipeline import build_reference_pipeline

FLAGS = ["--steps", "2", "--resolution", "32", "--dtype", "float32", "--cfg", "3"]


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    _, path, _ = build_reference_pipeline(str(tmp_path_factory.mktemp("qwenimage21")), with_text_encoder=True)
    return path


def _write(path, lines):
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return str(path)


def _manifest(out):
    with open(os.path.join(out, "manifest.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _pixels(path):
    return np.asarray(Image.open(path)).astype(np.int16)


def test_bad_lines_are_named_before_the_model_is_loaded(tmp_path, capsys):
    cases = [
        (['{"prompt": "a", "seed": 1}', '{"prompt": "b", "seed": "7"}'], ":2: key 'seed': '7' is not an integer"),
        (['{"prompt": "a"}', "", "{prompt: b}"], ":3: not valid JSON"),
        (['["a red fox"]'], ":1: a JSON list, not an object"),
        (['{"seed": 1}'], ":1: key 'prompt': missing"),
        (['{"prompt": 5}'], ":1: key 'prompt': 5 is not a string"),
        (['{"prompt": "a", "negative": "b"}'], ":1: key 'negative': unknown key; a line may hold prompt, seed"),
        (['{"prompt": "a", "height": 33}'], ":1: key 'height': 33 is not a positive multiple of 32"),
        (['{"prompt": "a", "width": true}'], ":1: key 'width': True is not an integer"),
        (['{"prompt": "a", "seed": -1}'], ":1: key 'seed': -1 is not an integer from 0 to 4294967295"),
        (['{"prompt": "a", "negative_prompt": 0}'], ":1: key 'negative_prompt': 0 is neither a string nor null"),
    ]
    out = tmp_path / "out"
    for lines, part in cases:
        path = _write(tmp_path / "prompts.jsonl", lines)
        code = cli.main(["sample", "--model", str(tmp_path / "absent"), "--prompts-file", path, "--out-dir",
                         str(out)])
        err = capsys.readouterr().err
        assert code == InputError.exit_code and path + part in err, err
        assert "absent" not in err and not out.exists()     # nothing was loaded or written
    path = _write(tmp_path / "prompts.jsonl", ['{"prompt": "a"}'])
    for flags, part in ((["--out-dir", str(out), "--prompt", "b"], "--prompt cannot be combined with --prompts-file"),
                        ([], "--prompts-file needs --out-dir"),
                        (["--out-dir", str(out), "--batch", "2"], "--batch 2 with --prompts-file"),
                        (["--out-dir", str(out), "--batch-size", "0"], "--batch-size 0")):
        assert cli.main(["sample", "--model", str(tmp_path / "absent"), "--prompts-file", path, *flags]) == 4
        assert part in capsys.readouterr().err
    assert cli.main(["sample", "--model", str(tmp_path / "absent"), "--prompt", "a"]) == 4
    assert "--out missing" in capsys.readouterr().err


def test_each_image_is_its_prompt_alone_and_a_rerun_skips_what_is_done(pipe_dir, tmp_path, capsys):
    lines = [
        {"prompt": "a red fox standing in deep snow under a pale winter sky", "seed": 11},
        {"prompt": "a lighthouse", "seed": 12},            # shorter: batched with line 1, its frame its own
        {"prompt": "a cat", "seed": 13, "negative_prompt": "blurry, dark"},     # the CFG group (a padded batch)
        {"prompt": "a boat on a river", "height": 64},     # another size; seed 0 + line 4 - 1 = 3
        {"prompt": "a lighthouse", "seed": 12},            # the same as line 2: sampled once
    ]
    prompts = _write(tmp_path / "prompts.jsonl", lines)
    out = str(tmp_path / "out")
    assert cli.main(["sample", "--model", pipe_dir, "--prompts-file", prompts, "--out-dir", out, "--batch-size",
                     "2", *FLAGS]) == 0
    captured = capsys.readouterr()
    assert "img/s" in captured.err and "1 duplicate(s) sampled once" in captured.out
    records = _manifest(out)
    assert [r["line"] for r in records] == [1, 2, 3, 4]
    assert [r["seed"] for r in records] == [11, 12, 13, 3]
    assert [(r["height"], r["width"]) for r in records] == [(32, 32)] * 3 + [(64, 32)]
    assert [r["negative_prompt"] for r in records] == [None, None, "blurry, dark", None]
    assert all(r["settings"]["cfg"] == 3.0 and r["settings"]["steps"] == 2 for r in records)
    files = [os.path.join(out, r["file"]) for r in records]
    assert sorted(os.listdir(out)) == sorted([os.path.basename(f) for f in files] + ["manifest.jsonl"])
    assert Image.open(files[1]).text["seed"] == "12" and Image.open(files[3]).size == (32, 64)

    # the image `sample --prompt P --seed S` gives alone, up to the float rounding of a larger batch's matmuls
    for index, extra in ((1, []), (2, ["--negative-prompt", "blurry, dark"])):
        alone = str(tmp_path / f"alone{index}.png")
        line = lines[index]
        assert cli.main(["sample", "--model", pipe_dir, "--prompt", line["prompt"], "--seed", str(line["seed"]),
                         "--out", alone, "--no-progress", *FLAGS, *extra]) == 0
        assert np.abs(_pixels(alone) - _pixels(files[index])).max() <= 1, index
    assert np.abs(_pixels(files[0]) - _pixels(files[1])).mean() > 10      # different prompts and seeds differ

    capsys.readouterr()
    assert cli.main(["sample", "--model", pipe_dir, "--prompts-file", prompts, "--out-dir", out, *FLAGS]) == 0
    assert "nothing to sample" in capsys.readouterr().out and len(_manifest(out)) == 4

    # a killed run: one image gone, a torn manifest line; and a new line: those two are sampled, nothing else,
    # now split over two data-parallel devices (the same images)
    before = _pixels(files[0])
    os.remove(files[0])
    with open(os.path.join(out, "manifest.jsonl"), "a") as f:
        f.write('{"file": "000009-')
    _write(tmp_path / "prompts.jsonl", lines + [{"prompt": "a lighthouse", "seed": 99}])
    assert cli.main(["sample", "--model", pipe_dir, "--prompts-file", prompts, "--out-dir", out, "--no-progress",
                     "--mesh", "data=2", "--batch-size", "3", *FLAGS]) == 4
    assert "--batch-size 3 is not a multiple of the mesh's data x fsdp = 2" in capsys.readouterr().err
    assert cli.main(["sample", "--model", pipe_dir, "--prompts-file", prompts, "--out-dir", out, "--no-progress",
                     "--mesh", "data=2", *FLAGS]) == 0
    assert "1 unreadable manifest line(s) ignored" in capsys.readouterr().out
    with open(os.path.join(out, "manifest.jsonl")) as f:
        text = f.read().splitlines()
    assert text[4] == '{"file": "000009-' and [json.loads(t)["line"] for t in text[5:]] == [1, 6]
    assert np.abs(_pixels(files[0]) - before).max() <= 1


def test_a_line_too_large_for_the_free_memory_is_named_before_any_batch_runs(pipe_dir, tmp_path, capsys):
    prompts = _write(tmp_path / "prompts.jsonl", [{"prompt": "a red fox", "seed": 1},
                                                  {"prompt": "a lighthouse", "height": 16384, "width": 16384}])
    out = str(tmp_path / "out")
    assert cli.main(["sample", "--model", pipe_dir, "--prompts-file", prompts, "--out-dir", out, "--no-progress",
                     *FLAGS]) == InputError.exit_code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{prompts}:2: sampling 1 image(s) of 16384x16384 needs about" in err[0], err
    assert "the largest square size that fits 1 image(s) is" in err[0] and "--no-memory-check" in err[0], err
    assert not [f for f in os.listdir(out) if f.endswith(".png")], "line 1 was sampled before line 2 was refused"
