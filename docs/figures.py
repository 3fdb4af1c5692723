"""Every figure in the docs, rewritten from the JSON artifact that a script wrote.

A figure in README.md or docs/*.md is written between two HTML comments (invisible on GitHub) that name its
artifact, the value inside it and the format:

    the teacher is judged <!-- fig world_build/figures.json {samplers.teacher_40.heldout.overall} .3f -->0.685<!-- /fig -->

`{a.b.0.c}` is a path into the JSON (keys and list indices joined by dots; `[key.with.dots]` for a key holding
dots); the expression may combine paths with + - * / and numbers, without spaces (`{x.short}-{x.long}`); the format
is a Python format spec (`.3f`, `+.3f`, `.0%`, `.2e`, `s`) and may be left out. Every artifact is listed in
ARTIFACTS with the command that writes it, so a missing one is named with its fix, and each records the commit
(and, written since `io_utils.provenance`, the versions, machine and command) that produced it.

    python docs/figures.py            # rewrite every figure in place (then review `git diff`)
    python docs/figures.py --check    # exit 1 listing each figure that differs from its artifact
    make figures                      # this, the AOT table (docs/gen_aot_table.py) and docs/configuration.md
"""
from __future__ import annotations

import argparse
import ast
import fnmatch
import glob
import json
import operator
import os
import re
import sys
from dataclasses import dataclass

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ("README.md", "docs/*.md", "qwenimage_jax/assets/*/README.md")

# artifact (glob, relative to the repository) -> the command that (re)writes it
ARTIFACTS = {
    "world_build/figures.json": "python -m qwenimage_jax.recipes.world --workdir /tmp/world --resume-from world_build "
                                "--stage figures --snapshot world_build",
    "qwenimage_jax/assets/tiny_world/figures.json": "python -m qwenimage_jax.recipes.world --workdir /tmp/world "
                                                    "--resume-from world_build --stage assemble --stage figures",
    "qwenimage_jax/assets/tiny_world/lora_figures.json": "python -m qwenimage_jax.recipes.world_lora",
    "world_build/times.json": "python -m qwenimage_jax.recipes.world --workdir /tmp/world (every stage records its "
                              "time)",
    "qwenimage_jax/assets/tiny_world/build_times.json": "python -m qwenimage_jax.recipes.world --stage assemble",
    "world_build/judge_validation_*.json": "python -m qwenimage_jax.recipes.world_validation",
    "world_build/levers/*/judge_validation_*.json": "python -m qwenimage_jax.recipes.world_validation",
    "world_build/vae_readout*.json": "python -m qwenimage_jax.evals.vae_readout",
    "world_build/shape_trace_*.json": "python -m qwenimage_jax.evals.shape_trace",
    "world_build/latent_signal.json": "python -m qwenimage_jax.evals.latent_signal",
    "world_build/text_probe.json": "python -m qwenimage_jax.evals.text_probe --text-encoder world_build/text_encoder "
                                   "--tokenizer world_build/tokenizer --out world_build/text_probe.json",
    "docs/quantize_quality.json": "python bench/quantize_quality.py",
    "docs/qlora_figures.json": "python -m qwenimage_jax.recipes.world_lora --workdir /tmp/world_qlora "
                               "--config.quantize=int8 (then copy WORKDIR/lora_figures.json here)",
    "docs/aot/*.json": "qwenimage-jax aot --config CONFIG --topology TOPOLOGY --json docs/aot/NAME.json "
                       "(the command is recorded in each)",
    "bench/results/*.json": "python bench/NAME.py (the script named in the file)",
}

_MARKER = re.compile(r"<!-- fig (?P<artifact>\S+) (?P<expr>\S+)(?: (?P<fmt>\S+))? -->(?P<text>.*?)<!-- /fig -->",
                     re.DOTALL)
_PATH = re.compile(r"\{([^{}]+)\}")
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class FigureError(Exception):
    """A figure whose artifact, path or expression cannot be read: the message names the doc line and the fix."""


@dataclass
class Figure:
    doc: str            # path relative to the repository
    line: int
    artifact: str
    expr: str
    fmt: str
    text: str           # what the doc says now
    span: tuple[int, int]


def command_for(artifact: str) -> str | None:
    for pattern, command in ARTIFACTS.items():
        if fnmatch.fnmatch(artifact, pattern):
            return command
    return None


def doc_paths(repo: str = REPO) -> list[str]:
    paths = []
    for pattern in DOCS:
        paths += sorted(glob.glob(os.path.join(repo, pattern)))
    return [os.path.relpath(p, repo) for p in paths]


def figures_in(doc: str, repo: str = REPO) -> list[Figure]:
    with open(os.path.join(repo, doc), encoding="utf-8") as f:
        text = f.read()
    return [Figure(doc, text.count("\n", 0, m.start()) + 1, m["artifact"], m["expr"], m["fmt"] or "", m["text"],
                   m.span("text")) for m in _MARKER.finditer(text)]


def _lookup(data, path: str, where: str):
    keys = [k[1:-1] if k.startswith("[") else k for k in re.findall(r"\[[^\]]*\]|[^.\[\]]+", path)]
    value = data
    for i, key in enumerate(keys):
        if isinstance(value, list) and re.fullmatch(r"-?\d+", key) and -len(value) <= int(key) < len(value):
            value = value[int(key)]
        elif isinstance(value, dict) and key in value:
            value = value[key]
        else:
            have = sorted(value)[:12] if isinstance(value, dict) else f"a {type(value).__name__}"
            raise FigureError(f"{where}: {'.'.join(keys[:i + 1])} is not in the artifact (there: {have})")
    return value


def _evaluate(node, values: dict, where: str):
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, values, where)
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
        return node.value
    if isinstance(node, ast.Name) and node.id in values:
        return values[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, values, where), _evaluate(node.right, values, where))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        return -_evaluate(node.operand, values, where)
    raise FigureError(f"{where}: the expression may only combine {{paths}} and numbers with + - * /")


def render(figure: Figure, repo: str = REPO, cache: dict | None = None) -> str:
    """What the doc should say for `figure`, from its artifact."""
    where = f"{figure.doc}:{figure.line}"
    cache = {} if cache is None else cache
    path = os.path.join(repo, figure.artifact)
    if figure.artifact not in cache:
        command = command_for(figure.artifact)
        if command is None:
            raise FigureError(f"{where}: {figure.artifact} is not a known artifact: add it with the command that "
                              "writes it to ARTIFACTS in docs/figures.py")
        if not os.path.exists(path):
            raise FigureError(f"{where}: {figure.artifact} is missing: make it with `{command}`")
        with open(path, encoding="utf-8") as f:
            cache[figure.artifact] = json.load(f)
    data = cache[figure.artifact]
    values = {}

    def name(match):
        values[f"v{len(values)}"] = _lookup(data, match[1], where)
        return f"v{len(values) - 1}"

    expr = _PATH.sub(name, figure.expr)
    if expr == "v0":
        value = values["v0"]
    else:
        try:
            tree = ast.parse(expr, mode="eval")
        except SyntaxError as e:
            raise FigureError(f"{where}: cannot read the expression {figure.expr!r} ({e.msg})") from None
        value = _evaluate(tree, values, where)
    try:
        return format(value, figure.fmt)
    except (TypeError, ValueError) as e:
        raise FigureError(f"{where}: cannot format {value!r} with {figure.fmt!r} ({e})") from None


def provenance_of(artifact: str, repo: str = REPO) -> dict:
    """The artifact's record of what made it: at least "commit"; {} when it records nothing."""
    with open(os.path.join(repo, artifact), encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        return {}
    record = dict(data.get("provenance") or {})
    if "commit" in data:
        record.setdefault("commit", data["commit"])
    return record


def check(repo: str = REPO) -> list[str]:
    """One line per figure that differs from (or cannot be read from) its artifact, and per artifact that records no
    commit."""
    problems, cache, artifacts = [], {}, set()
    for doc in doc_paths(repo):
        for figure in figures_in(doc, repo):
            try:
                want = render(figure, repo, cache)
            except FigureError as e:
                problems.append(str(e))
                continue
            artifacts.add(figure.artifact)
            if figure.text != want:
                problems.append(f"{figure.doc}:{figure.line}: says {figure.text!r}, {figure.artifact} gives "
                                f"{want!r} (run `python docs/figures.py`)")
    for artifact in sorted(artifacts):
        if not provenance_of(artifact, repo).get("commit"):
            problems.append(f"{artifact} records no commit: rewrite it with `{command_for(artifact)}`")
    return problems


def rewrite(repo: str = REPO) -> int:
    """Rewrite every figure from its artifact; returns how many changed. Raises FigureError on the first that
    cannot be read."""
    changed, cache = 0, {}
    for doc in doc_paths(repo):
        figures = figures_in(doc, repo)
        if not figures:
            continue
        with open(os.path.join(repo, doc), encoding="utf-8") as f:
            text = f.read()
        for figure in reversed(figures):  # from the end, so earlier spans stay valid
            want = render(figure, repo, cache)
            if want != figure.text:
                text = text[:figure.span[0]] + want + text[figure.span[1]:]
                changed += 1
        from qwenimage_jax.io_utils import write_text

        write_text(os.path.join(repo, doc), text)
    return changed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--check", action="store_true", help="report figures that differ; change nothing")
    args = parser.parse_args(argv)
    if args.check:
        problems = check()
        for line in problems:
            print(line)
        count = sum(len(figures_in(d)) for d in doc_paths())
        print(f"{count} figures, {len(problems)} problems")
        return 1 if problems else 0
    try:
        changed = rewrite()
    except FigureError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"rewrote {changed} figures")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, REPO)
    raise SystemExit(main())
