"""The import directions of qwenimage_jax/ (docs/architecture.md, "Import directions"), read from the source with
`ast`: every `import` / `from ... import` anywhere in a file counts, function-level ones included.

    models  <-  checkpoints/convert  <-  sampling, text, data, evals, metrics  <-  training  <-  commands, recipes
    aot (ahead-of-time compiles of trainers, samplers, encoders) sits between training and commands: it imports
    sampling, text and training; only commands import it.
    parallel (meshes, rules) is beside models: anything may use it; it uses nothing of ours.
    errors (the exception classes) and io_utils (atomic writes) sit below everything, the same way.

Each rule is its own test and its failure message lists every offending import as `file:line module -> target`.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "qwenimage_jax"

# Layers that serve inference: they never reach training, the CLI, recipes or the test fixtures.
INFERENCE = ("sampling", "text", "data", "evals", "metrics", "assets")
# Commands that sample, evaluate or convert: inference never imports training.
INFERENCE_COMMANDS = ("sample", "demo", "eval_t2i", "eval_vae", "reconstruct", "expand_prompt", "convert")
ABOVE_TRAINING = ("aot", "commands", "recipes", "cli", "testing")
# Layers aot/ never imports: the CLI and what builds the shipped models (commands import aot, not the reverse).
ABOVE_AOT = ("commands", "recipes", "cli", "testing")
MODELS_THIRD_PARTY = ("jax", "flax", "numpy")
# Modules any layer may import; they import nothing of ours.
BELOW_ALL = ("parallel", "errors", "io_utils")


def _module_of(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def _resolve(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, imported module) for every import in the file; `from a.b import c` gives a.b.c when c is a module."""
    module = _module_of(path)
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(node, module, path.name == "__init__.py")
            if target == "__future__":
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                out.append((node.lineno, sub if target.startswith(PACKAGE) and _is_module(sub) else target))
    return sorted(set(out))


def _graph(root: str) -> dict[str, tuple[Path, list[tuple[int, str]]]]:
    return {_module_of(p): (p, imports_of(p)) for p in sorted((REPO / root).rglob("*.py"))}


GRAPH = _graph(PACKAGE)


def _layer(module: str) -> str:
    """qwenimage_jax.models.dit -> 'models'; qwenimage_jax.cli -> 'cli'; other packages ''."""
    parts = module.split(".")
    return parts[1] if parts[0] == PACKAGE and len(parts) > 1 else ""


def _violations(graph, source, forbidden) -> list[str]:
    """'file:line module -> target' for every import of a module satisfying source() that satisfies forbidden()."""
    found = []
    for module, (path, imports) in graph.items():
        if not source(module):
            continue
        for line, target in imports:
            if forbidden(module, target):
                found.append(f"{path.relative_to(REPO)}:{line} {module} -> {target}")
    return found


def _in(module: str, *layers: str) -> bool:
    return _layer(module) in layers


def _fail_on(found: list[str], rule: str) -> None:
    assert not found, f"{len(found)} import(s) break '{rule}':\n  " + "\n  ".join(found)


def test_graph_sees_function_level_and_relative_imports():
    """The reader itself: a function-level import (eval-t2i's run) and `from pkg import module` are edges."""
    _, imports = GRAPH["qwenimage_jax.commands.eval_t2i"]
    assert "qwenimage_jax.evals.t2i" in {target for _, target in imports}
    assert len(GRAPH) > 80 and all(path.suffix == ".py" for path, _ in GRAPH.values())


def test_inference_layers_import_no_training_commands_or_recipes():
    found = _violations(GRAPH, lambda m: _in(m, *INFERENCE),
                        lambda m, t: _in(t, "training", *ABOVE_TRAINING))
    _fail_on(found, "sampling/text/data/evals/metrics/assets -> not training, aot, commands, recipes")


def test_inference_commands_import_no_training():
    commands = {f"{PACKAGE}.commands.{name}" for name in INFERENCE_COMMANDS}
    found = _violations(GRAPH, lambda m: m in commands, lambda m, t: _in(t, "training", "aot"))
    _fail_on(found, "commands that sample, evaluate or convert -> not training, aot")


def test_training_imports_no_commands_or_recipes():
    found = _violations(GRAPH, lambda m: _in(m, "training"), lambda m, t: _in(t, *ABOVE_TRAINING))
    _fail_on(found, "training -> not aot, commands, recipes")


def test_aot_imports_no_commands_or_recipes():
    found = _violations(GRAPH, lambda m: _in(m, "aot"), lambda m, t: _in(t, *ABOVE_AOT))
    _fail_on(found, "aot -> not commands, recipes")


def test_only_commands_import_aot():
    found = _violations(GRAPH, lambda m: not _in(m, "aot", "commands"), lambda m, t: _in(t, "aot"))
    _fail_on(found, "aot <- only commands")


def _cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle of imports."""
    edges = {m: sorted({t for _, t in imports if t in graph and t != m}) for m, (_, imports) in graph.items()}
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(module):
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in edges[module]:
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for module in edges:
        if module not in index:
            visit(module)
    return found


def test_aot_is_in_no_import_cycle():
    found = ["cycle among " + ", ".join(c) for c in _cycles(GRAPH) if any(_in(m, "aot") for m in c)]
    _fail_on(found, "aot: no import cycles")


def test_commands_import_no_other_command():
    def other_command(module, target):
        return (_in(target, "commands") and target != f"{PACKAGE}.commands"
                and target.split(".")[:3] != module.split(".")[:3])

    found = _violations(GRAPH, lambda m: _in(m, "commands") and m != f"{PACKAGE}.commands", other_command)
    _fail_on(found, "commands -> no other command")


def test_parallel_imports_nothing_of_ours():
    found = _violations(GRAPH, lambda m: _in(m, "parallel"),
                        lambda m, t: t.startswith(PACKAGE) and not _in(t, "parallel"))
    _fail_on(found, "parallel -> nothing of ours")


def test_errors_and_io_utils_import_nothing_of_ours():
    found = _violations(GRAPH, lambda m: _in(m, "errors", "io_utils"), lambda m, t: t.startswith(PACKAGE))
    _fail_on(found, "errors, io_utils -> nothing of ours")


def test_bench_imports_no_tests():
    found = _violations(_graph("bench"), lambda m: True,
                        lambda m, t: t == "tests" or t.startswith("tests.") or t == "conftest")
    _fail_on(found, "bench -> not tests")


# ---- the loader registry's directions ----
def _third_party_or_ours(target: str) -> bool:
    top = target.split(".")[0]
    return top not in sys.stdlib_module_names


def test_models_import_only_jax_flax_numpy_and_models():
    """models/ are pure Linen: jax, flax, numpy, the standard library, models/ itself and parallel/ (rules)
    (and errors / io_utils, which import nothing)."""
    def forbidden(module, target):
        if target.startswith(PACKAGE):
            return not _in(target, "models", *BELOW_ALL)
        return _third_party_or_ours(target) and target.split(".")[0] not in MODELS_THIRD_PARTY

    _fail_on(_violations(GRAPH, lambda m: _in(m, "models"), forbidden),
             "models -> only jax/flax/numpy/stdlib, models, parallel")


# The one upward import left, named so nothing else can join it: `load("text_encoder")` returns the loaded
# `text.encoder.TextEncoder` (module + params + tokenizer + generation). Splitting the weights object from its
# tokenizer/generation wrapper, so checkpoints/ returns the former, is open work (issue 19's closing note).
KNOWN_UPWARD = {(f"{PACKAGE}.checkpoints.loaders", f"{PACKAGE}.text.encoder")}


def test_checkpoints_import_only_models():
    """The loaders / exporters (checkpoints/) know formats and models, nothing above them."""
    found = _violations(GRAPH, lambda m: _in(m, "convert", "checkpoints"),
                        lambda m, t: t.startswith(PACKAGE) and not _in(t, "models", "convert", "checkpoints",
                                                                         *BELOW_ALL)
                        and (m, t) not in KNOWN_UPWARD)
    _fail_on(found, "checkpoints -> only models (and parallel)")


def test_models_import_no_loader():
    """No cycle between models/ and the loaders: convert/ (checkpoints/) import models, never the reverse."""
    found = _violations(GRAPH, lambda m: _in(m, "models"), lambda m, t: _in(t, "convert", "checkpoints"))
    _fail_on(found, "models -> not convert/checkpoints")
