"""The persistent compilation cache: `--compilation-cache DIR` on the sampler and the trainers, and a second process
that loads what the first one wrote."""
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = """
import sys
import jax, jax.numpy as jnp
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(event) if event.endswith("cache_hits") else 0)
from qwenimage_jax.parallel.compile_cache import enable_compilation_cache
enable_compilation_cache(sys.argv[1])
print(float(jax.jit(lambda x: jnp.sin(x) * 2.0 + 1.0)(jnp.arange(4.0)).sum()), len(hits))
"""


def _run(cache_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", SCRIPT, cache_dir], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    value, hits = out.stdout.split()
    return float(value), int(hits)


def test_a_second_process_loads_the_programs_of_the_first(tmp_path):
    cache = str(tmp_path / "xla")
    value, hits = _run(cache)
    assert hits == 0 and os.listdir(cache), "the first process wrote nothing to the cache"
    again, hits = _run(cache)
    assert again == value and hits >= 1, "the second process compiled instead of loading the cached program"


@pytest.mark.parametrize("argv", [
    ["sample", "--model", "M", "--prompt", "p", "--out", "o.png"],
    ["train-dit", "--config", "c.py", "--workdir", "w"],
    ["train-vae", "--config", "c.py", "--workdir", "w"],
    ["train-lora", "--config", "c.py", "--workdir", "w"],
    ["distill", "--config", "c.py", "--workdir", "w"],
])
def test_sampler_and_trainers_take_the_flag_before_they_run(argv, monkeypatch):
    import importlib

    from qwenimage_jax import cli
    from qwenimage_jax.parallel import compile_cache

    calls = []
    monkeypatch.setattr(compile_cache, "enable_compilation_cache", lambda path: calls.append(("cache", path)))
    module = importlib.import_module(cli.COMMANDS[argv[0]][0])
    monkeypatch.setattr(module, "run", lambda args: calls.append(("run", None)) or 0)
    assert cli.main(argv + ["--compilation-cache", "/tmp/xla"]) == 0
    assert calls == [("cache", "/tmp/xla"), ("run", None)]
