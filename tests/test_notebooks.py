"""Executes every notebook in notebooks/ top to bottom on CPU (tiny assets) with nbclient, so they cannot rot.

Each notebook runs in its own temporary working directory with the repository on PYTHONPATH, under a kernel spec
written to a temporary JUPYTER_PATH that points at this interpreter (no user-level `ipykernel install` needed).
Checks: no cell raised, every code cell ran, the notebook's key outputs exist (images displayed, the tables and
figures each notebook promises printed) and it wrote nothing into the directory it ran from.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
KERNEL = "qwenimage-jax-test"
CELL_TIMEOUT_S = 900

# notebook -> (minimum number of images it displays, strings that must appear in its text outputs)
EXPECTED = {
    "01_quickstart.ipynb": (3, ["model:", "40 steps, batch 4", "seed 1 twice identical: True"]),
    "02_vae.ipynb": (2, ["PSNR", "bicubic", "latent channels", "VAE training steps done"]),
    "03_dit_and_sharding.ipynb": (0, ["mesh", "PartitionSpec", "DiT training", "prefix cache", "max |cached - uncached|"]),
    "04_distillation_and_prompt_expansion.ipynb": (1, ["expanded:", "judge", "overall"]),
}


def _kernel_spec(root: Path) -> Path:
    """A kernel spec for this interpreter under root/kernels/KERNEL (the venv may have none registered)."""
    spec_dir = root / "kernels" / KERNEL
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "qwenimage-jax test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return root


def _outputs(nb):
    for cell in nb.cells:
        if cell.cell_type == "code":
            yield from cell.get("outputs", [])


def _text(output) -> str:
    if output.get("output_type") == "stream":
        return output.get("text", "")
    data = output.get("data", {})
    return data.get("text/plain", "") + data.get("text/markdown", "")


def test_every_notebook_is_covered():
    names = sorted(p.name for p in NOTEBOOKS.glob("*.ipynb"))
    assert names == sorted(EXPECTED), f"notebooks {names} vs the ones this test checks {sorted(EXPECTED)}"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs(name, tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    jupyter_path = _kernel_spec(tmp_path / "jupyter")
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    # the kernel must see CPU only and pick its own fake-device count (notebook 03 sets XLA_FLAGS itself)
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    workdir = tmp_path / "work"
    workdir.mkdir()
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name=KERNEL,
                            resources={"metadata": {"path": str(workdir)}})
    t0 = time.time()
    client.execute()   # raises CellExecutionError (with the traceback) if any cell fails
    print(f"{name}: {time.time() - t0:.0f}s")

    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code_cells), f"{name}: some code cells did not run"
    errors = [o for o in _outputs(nb) if o.get("output_type") == "error"]
    assert not errors, f"{name}: error outputs {errors}"
    min_images, needles = EXPECTED[name]
    images = [o for o in _outputs(nb) if "image/png" in o.get("data", {})]
    assert len(images) >= min_images, f"{name}: displayed {len(images)} images, expected >= {min_images}"
    text = "".join(_text(o) for o in _outputs(nb))
    missing = [s for s in needles if s not in text]
    assert not missing, f"{name}: outputs lack {missing}"
    # run from any directory (the repo root included), a notebook leaves nothing behind in it
    leftovers = sorted(p.name for p in workdir.iterdir())
    assert leftovers == [], f"{name}: wrote {leftovers} into the directory it was run from; use a temp dir"
