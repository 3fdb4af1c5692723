"""Every figure written in the docs between `<!-- fig ... -->` markers equals what its JSON artifact says
(docs/figures.py), each artifact records the commit that wrote it, and the marker tool reports a changed figure, a
missing artifact (with the command that makes it) and a bad path."""
from __future__ import annotations

import importlib.util
import json
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _figures_module():
    spec = importlib.util.spec_from_file_location("doc_figures", os.path.join(REPO, "docs", "figures.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


figures = _figures_module()


def test_every_doc_figure_equals_its_artifact():
    problems = figures.check()
    assert problems == [], "\n".join(problems)
    counted = sum(len(figures.figures_in(doc)) for doc in figures.doc_paths())
    assert counted >= 20, counted  # the README and the docs quote their figures through markers


def _toy_repo(tmp_path, said: str):
    (tmp_path / "docs").mkdir()
    (tmp_path / "world_build").mkdir()
    artifact = {"commit": "abc1234", "samplers": [{"overall": 0.6854}, {"overall": 0.6041}],
                "gain": {"short": 0.529, "expanded": 0.635}, "odd": {"a.b": 2.5}}
    (tmp_path / "world_build" / "figures.json").write_text(json.dumps(artifact))
    (tmp_path / "README.md").write_text(
        "teacher <!-- fig world_build/figures.json {samplers.0.overall} .3f -->" + said + "<!-- /fig -->, gain "
        "<!-- fig world_build/figures.json {gain.expanded}-{gain.short} +.3f -->+0.106<!-- /fig -->, odd "
        "<!-- fig world_build/figures.json {odd.[a.b]}*2 -->5.0<!-- /fig -->.\n")
    return tmp_path


def test_a_changed_figure_is_reported_and_rewritten(tmp_path):
    repo = _toy_repo(tmp_path, "0.700")
    problems = figures.check(str(repo))
    assert len(problems) == 1 and "README.md:1" in problems[0] and "'0.700'" in problems[0] and "'0.685'" in problems[0]
    assert figures.rewrite(str(repo)) == 1
    assert figures.check(str(repo)) == []
    assert "teacher <!-- fig world_build/figures.json {samplers.0.overall} .3f -->0.685<!-- /fig -->" in \
        (repo / "README.md").read_text()


def test_a_missing_artifact_names_the_command_that_makes_it(tmp_path):
    repo = _toy_repo(tmp_path, "0.685")
    os.remove(repo / "world_build" / "figures.json")
    (problem,) = figures.check(str(repo))[:1]
    assert "world_build/figures.json is missing" in problem and "--stage figures" in problem


def test_a_bad_path_names_the_key_and_what_is_there(tmp_path):
    repo = _toy_repo(tmp_path, "0.685")
    text = (repo / "README.md").read_text().replace("{gain.short}", "{gain.shrot}")
    (repo / "README.md").write_text(text)
    (problem,) = figures.check(str(repo))
    assert "gain.shrot is not in the artifact" in problem and "'short'" in problem
    with pytest.raises(figures.FigureError):
        figures.rewrite(str(repo))


def test_an_artifact_without_a_commit_is_reported(tmp_path):
    repo = _toy_repo(tmp_path, "0.685")
    path = repo / "world_build" / "figures.json"
    data = json.loads(path.read_text())
    del data["commit"]
    path.write_text(json.dumps(data))
    (problem,) = figures.check(str(repo))
    assert problem.startswith("world_build/figures.json records no commit")


def test_provenance_records_commit_versions_machine_and_command():
    from qwenimage_jax.io_utils import provenance

    record = provenance("python bench/x.py --flag")
    assert record["command"] == "python bench/x.py --flag"
    assert record["commit"] not in ("", None) and record["versions"]["jax"] and record["versions"]["python"]
    assert record["machine"]["cpus"] >= 1 and record["written"].endswith("Z")


def test_the_shipped_model_readme_is_what_the_recipe_writes_from_its_artifacts(tmp_path):
    """qwenimage_jax/assets/tiny_world/README.md is generated (`recipes.world.ship.write_readme`) from the build's
    records (world_build/: times.json, the teacher's metrics) and the shipped figures.json: regenerated from them
    here, it must equal the shipped file, so a figure there cannot drift from its artifact."""
    from qwenimage_jax.recipes.world.ship import write_readme

    import shutil

    shipped = os.path.join(REPO, "qwenimage_jax", "assets", "tiny_world")
    out = tmp_path / "tiny_world"
    # the components too (~25 MB): the README lists their sizes
    shutil.copytree(shipped, out, ignore=shutil.ignore_patterns("README.md", "__pycache__"))
    with open(os.path.join(shipped, "figures.json"), encoding="utf-8") as f:
        shipped_figures = json.load(f)
    write_readme(os.path.join(REPO, "world_build"), str(out), shipped_figures["readme"])
    with open(os.path.join(shipped, "README.md"), encoding="utf-8") as f:
        assert (out / "README.md").read_text() == f.read()
