"""`python bench/report.py --gpu --dry-run`: the GPU suite's whole code path (setup check, matmul peak, our DiT
steps and sampler, diffusers' forward and pipeline, the markdown section) at tiny shapes on CPU, so the command
works the first time a GPU appears. The section replaces only its own part of an existing report."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gpu_suite_dry_run_writes_its_rows(tmp_path):
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nCPU rows stay.\n")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    # ~1 min of CPU (eight small compiles); the generous limit is for a loaded shared machine
    proc = subprocess.run([sys.executable, "bench/report.py", "--gpu", "--dry-run", "--out", str(out),
                           "--timeout", "1500"], cwd=REPO, env=env, capture_output=True, text=True, timeout=1600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nCPU rows stay.")
    assert "DRY RUN" in text and "Device: cpu" in text and "Measured bf16 matmul peak" in text
    for row in ("DiT full step, ours (xla)", "DiT cached step, ours", "DiT full step, diffusers",
                "sampler 1 steps, ours", "sampler 2 steps, ours", "sampler 2 steps, diffusers",
                "peak device memory, ours", "peak device memory, diffusers"):
        assert f"| {row}" in text, row
    # every attention backend on the same forward, each against xla (the cuDNN code path emulated on CPU)
    for backend in ("xla", "dot_product_attention", "cudnn_emulated"):
        line = next(l for l in text.splitlines() if f"| DiT full step 64², attention {backend} |" in l)
        assert "failed" not in line and "max rel err vs xla" in line, line


def test_section_replaces_only_its_own_part(tmp_path):
    sys.path.insert(0, os.path.join(REPO, "bench"))
    import gpu_suite

    path = tmp_path / "b.md"
    path.write_text("head\n")
    gpu_suite.write_section(str(path), f"{gpu_suite.START}\nfirst\n{gpu_suite.END}\n")
    path.write_text(path.read_text() + "tail\n")
    gpu_suite.write_section(str(path), f"{gpu_suite.START}\nsecond\n{gpu_suite.END}\n")
    text = path.read_text()
    assert text.count(gpu_suite.START) == 1 and "second" in text and "first" not in text
    assert text.startswith("head") and text.rstrip().endswith("tail")
