"""Runs every benchmark in bench/ with small settings and writes ONE markdown report, docs/benchmarks.md.

    python bench/report.py                     # CPU: all five scripts, small settings (~10-20 min on 2 loaded cores)
    python bench/report.py --only vae dit      # a subset (the other rows are marked "not run")
    python bench/report.py --gpu               # THE GPU suite (bench/gpu_suite.py, <= 8 min on one H200): installs
                                               # bench/wheels offline, writes its section of docs/benchmarks.md
    python bench/report.py --gpu --dry-run --out FILE   # the same at tiny shapes on CPU (CI)
    python bench/report.py --script-gpu-modes  # the CPU rows plus each script's own --gpu mode

Each script runs in its own subprocess and measures ours AND the PyTorch reference (diffusers / transformers) in that
same process, so every ratio compares two measurements taken minutes apart on the same machine. The table gives the
reference's time, ours, the speed-up (reference time / our time: > 1 means ours is faster) and our one-off compile
time. A script that fails or times out gets a row saying so, with its last error line; nothing is filled in by hand.
The full stdout of every script is kept in the report's appendix. The report names the commit it measured, and the
same rows go to a JSON artifact, bench/results/report.json (`--json`), with the commit, versions, machine and command
(`io_utils.provenance`).
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # qwenimage_jax.io_utils (commit, provenance, write_json) without an install
DEFAULT_OUT = os.path.join(REPO, "docs", "benchmarks.md")
DEFAULT_JSON = os.path.join(REPO, "bench", "results", "report.json")

# name -> (script, small CPU arguments, --gpu arguments or None)
BENCHES = {
    "vae": ("vae_bench.py", ["--configs", "tiny,medium", "--repeats", "3"], None),
    "dit": ("dit_bench.py", ["--repeats", "3"], ["--gpu", "--repeats", "3"]),
    "text_encoder": ("text_encoder_bench.py", ["--batch", "2", "--prompt-len", "64", "--new-tokens", "16",
                                                "--repeats", "3"], ["--gpu", "--repeats", "3"]),
    "sample": ("sample_bench.py", ["--cpu-resolution", "128", "--cpu-steps", "4", "--cpu-batch", "1",
                                   "--repeats", "2"], ["--gpu", "--repeats", "2"]),
    "train": ("train_bench.py", ["--repeats", "3"], ["--gpu", "--repeats", "3"]),
}
NUM = r"([0-9]+(?:\.[0-9]+)?(?:e[-+]?[0-9]+)?)"


def machine() -> str:
    """One line naming the machine: CPU model, cores, load, accelerator, library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    versions = []
    for mod in ("jax", "flax", "torch", "diffusers", "transformers"):
        try:
            versions.append(f"{mod} {__import__(mod).__version__}")
        except Exception:  # noqa: BLE001 - a missing library is reported, not fatal
            versions.append(f"{mod} missing")
    return (f"{cpu}, {os.cpu_count()} logical cores, 1-min load average {load:.1f} at start "
            f"({platform.system()} {platform.release()}, Python {platform.python_version()}; {', '.join(versions)})")


def run_script(script: str, args: list[str], timeout: int) -> dict:
    cmd = [sys.executable, os.path.join("bench", script)] + args
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
        rc, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or ""), \
            f"timed out after {timeout} s"
    return dict(cmd="python " + " ".join(["bench/" + script] + args), rc=rc, stdout=out, stderr=err or "",
                wall_s=time.perf_counter() - start)


def _last_error(run: dict) -> str:
    lines = [line.strip() for line in (run["stderr"] + "\n" + run["stdout"]).splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line or "error" in line or "timed out" in line:
            return line[:200]
    return lines[-1][:200] if lines else "no output"


def _row(bench, what, ref, ours, speedup, compile_s, note=""):
    return dict(bench=bench, what=what, ref=ref, ours=ours, speedup=speedup, compile=compile_s, note=note)


def parse_vae(out: str) -> list[dict]:
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 10 and cells[0] not in ("config",) and not cells[0].startswith("---"):
            rows.append(_row("VAE encode+decode", f"{cells[0]} ({cells[1]} params), input {cells[2]}",
                             f"{cells[4]} ms", f"{cells[3]} ms", cells[7], f"{cells[8]} s",
                             f"max rel diff {cells[9]}"))
    return rows


def parse_dit(out: str) -> list[dict]:
    rows = []
    m = re.search(rf"diffusers eager {NUM} ms \| ours jit {NUM} ms .*max rel err {NUM}", out)
    c = re.search(rf"2 layers {NUM} s \| 32 layers {NUM} s", out)
    cfg = re.search(r"\[cpu\] config (.*)", out)
    if m:
        ref, ours, err = float(m.group(1)), float(m.group(2)), m.group(3)
        rows.append(_row("DiT forward", cfg.group(1).strip() if cfg else "CPU config", f"{ref:.1f} ms",
                         f"{ours:.1f} ms", f"{ref / ours:.2f}x",
                         f"{float(c.group(1)):.1f} s (2 layers) / {float(c.group(2)):.1f} s (32 layers)" if c else "-",
                         f"max rel err {err}"))
    for g in re.finditer(r"\[gpu\] ours (\S+)\s+step ([0-9.]+) ms \| .*", out):
        rows.append(_row("DiT forward (GPU, 7B, bf16)", g.group(1), "-", f"{g.group(2)} ms", "-", "-",
                         g.group(0).split("|", 1)[-1].strip()))
    return rows


def parse_text_encoder(out: str) -> list[dict]:
    rows = []
    comp = re.search(rf"first call \(compile\) ours: encode {NUM}s, generate {NUM}s", out)
    enc = re.search(rf"encode latency \(ms\)\s+{NUM}\s+{NUM}\s+{NUM}x", out)
    gen = re.search(rf"greedy decode \(tok/s\)\s+{NUM}\s+{NUM}\s+{NUM}x", out)
    same = re.search(r"greedy tokens identical to transformers: (\S+)", out)
    cfg = re.search(r"batch=(\d+) prompt=(\d+) new_tokens=(\d+)", out)
    setting = f"batch {cfg.group(1)}, prompt {cfg.group(2)}, {cfg.group(3)} new tokens" if cfg else "CPU config"
    if enc:
        rows.append(_row("Text encoder: encode", setting, f"{enc.group(1)} ms", f"{enc.group(2)} ms",
                         f"{enc.group(3)}x", f"{comp.group(1)} s" if comp else "-"))
    if gen:
        rows.append(_row("Text encoder: greedy decode", setting, f"{gen.group(1)} tok/s", f"{gen.group(2)} tok/s",
                         f"{gen.group(3)}x", f"{comp.group(2)} s" if comp else "-",
                         f"tokens identical: {same.group(1)}" if same else ""))
    for line in out.splitlines():
        if line.startswith(("encode latency:", "generate:")) and "transformers" not in line:
            rows.append(_row("Text encoder (GPU, 8B shape)", line.split(":")[0], "-", line.split(":", 1)[1].strip(),
                             "-", "-"))
    return rows


def parse_sample(out: str) -> list[dict]:
    rows = []
    full = re.search(rf"diffusers {NUM} img/s \({NUM} s/call\) \| ours {NUM} img/s \({NUM} s/call\) \| "
                     rf"speed-up ours vs diffusers {NUM}x \| max rel err {NUM}", out)
    loop = re.search(rf"denoising loop only: diffusers {NUM} s \| ours {NUM} s \| speed-up {NUM}x", out)
    comp = re.search(rf"compile ~{NUM} s", out)
    cfg = re.search(r"\[cpu\] DiT (.*)", out)
    setting = cfg.group(1).split(";")[-1].strip() if cfg else "CPU config"
    if full:
        rows.append(_row("Sampling (loop + VAE decode)", setting, f"{full.group(2)} s/call", f"{full.group(4)} s/call",
                         f"{full.group(5)}x", f"{comp.group(1)} s" if comp else "-", f"max rel err {full.group(6)}"))
    if loop:
        rows.append(_row("Sampling: denoising loop only", setting, f"{loop.group(1)} s", f"{loop.group(2)} s",
                         f"{loop.group(3)}x", "-"))
    for g in re.finditer(r"\[gpu\] ours (.*?): (.*)", out):
        rows.append(_row("Sampling (GPU, released shapes, bf16)", g.group(1), "-", g.group(2), "-", "-"))
    return rows


def parse_train(out: str) -> list[dict]:
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 7 and cells[0] not in ("config",) and not cells[0].startswith("---"):
            rows.append(_row("DiT train step (fwd+bwd+AdamW)", f"{cells[0]} config",
                             f"{cells[3]} s/step ({cells[4]} tok/s)", f"{cells[1]} s/step ({cells[2]} tok/s)",
                             cells[5], f"{cells[6]} s", f"MFU {cells[7]}" if len(cells) > 7 else ""))
    return rows


PARSERS = dict(vae=parse_vae, dit=parse_dit, text_encoder=parse_text_encoder, sample=parse_sample, train=parse_train)


def rows_of(name: str, run: dict) -> list[dict]:
    """The table rows parsed from one script's run ([] when it failed or printed nothing parsable)."""
    return PARSERS[name](run["stdout"]) if run["rc"] == 0 else []


def record(machine_line: str, runs: dict, started: str, gpu_runs: dict, commit: str, command: str) -> dict:
    """The JSON artifact of a report: every run's command, exit status, wall time and parsed rows (the strings the
    markdown table shows), with the commit and `io_utils.provenance`."""
    from qwenimage_jax.io_utils import provenance

    def one(name, run):
        if run is None:
            return None
        return {"command": run["cmd"], "rc": run["rc"], "wall_s": round(run["wall_s"], 1),
                "rows": rows_of(name, run), "error": _last_error(run) if run["rc"] != 0 else ""}

    record_ = provenance(command)
    record_["commit"] = commit
    return {"commit": commit, "started": started, "machine": machine_line,
            "runs": {name: one(name, run) for name, run in runs.items()},
            "gpu_runs": {name: one(name, run) for name, run in gpu_runs.items()},
            "provenance": record_}


def render(machine_line: str, runs: dict, started: str, gpu_runs: dict, commit: str = "unknown",
           json_path: str = "bench/results/report.json") -> str:
    lines = [
        "# Benchmarks: qwenimage-jax vs the PyTorch reference",
        "",
        "Generated by `python bench/report.py` (do not edit by hand; re-run it). Every row's reference and ours were",
        "measured in the same process, one after the other, on the same machine and the same random weights.",
        "**Speed-up = reference time / our time (> 1: ours faster).** Compile time is our one-off `jit` compile.",
        "",
        f"- Run: {started}, commit {commit} (rows also in `{json_path}`)",
        f"- Machine: {machine_line}",
        "- Reference: diffusers (VAE, DiT, pipeline) and transformers (Qwen3-VL) in PyTorch eager, CPU build, fp32;",
        "  ours: jitted JAX on CPU, fp32, the same thread budget where the script sets one (see each command).",
        "",
        "Reading the numbers: on the tiny configs most of the reference's time is PyTorch eager per-op overhead,",
        "which one jitted XLA program removes, so those speed-ups are large and say little about big models; the",
        "larger CPU configs (VAE medium, DiT train small, the DiT forward at width 256) are closer to compute-bound.",
        "The machine is shared (see the load average), so absolute times are noisy; the ratios compare",
        "measurements taken seconds apart in one process. `max rel err/diff` is the parity of the two outputs.",
        "",
        "| benchmark | setting | reference | ours | speed-up | ours compile | notes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        if run is None:
            lines.append(f"| {name} | not run in this report | - | - | - | - | - |")
            continue
        rows = rows_of(name, run)
        if run["rc"] != 0:
            lines.append(f"| {name} | **FAILED** (exit {run['rc']}) | - | - | - | - | `{_last_error(run)}` |")
        elif not rows:
            lines.append(f"| {name} | ran, but its output had no parsable figures (see appendix) | - | - | - | - | - |")
        for r in rows:
            lines.append(f"| {r['bench']} | {r['what']} | {r['ref']} | {r['ours']} | {r['speedup']} | {r['compile']} "
                         f"| {r['note']} |")
    if not gpu_runs:
        lines += ["", "Accelerator rows (released shapes, random weights: s/image at 1024 x 1024 for 40 and 4 steps, DiT MFU):",
                  "not run in this report (no GPU/TPU was available); `python bench/report.py --gpu` on one adds them."]
    if gpu_runs:
        lines += ["", "## Accelerator (released shapes, random weights)", ""]
        lines += ["| benchmark | setting | reference | ours | speed-up | ours compile | notes |", "|---|---|---|---|---|---|---|"]
        for name, run in gpu_runs.items():
            rows = rows_of(name, run)
            if run["rc"] != 0:
                lines.append(f"| {name} --gpu | **FAILED** (exit {run['rc']}) | - | - | - | - | `{_last_error(run)}` |")
            for r in rows:
                lines.append(f"| {r['bench']} | {r['what']} | {r['ref']} | {r['ours']} | {r['speedup']} | "
                             f"{r['compile']} | {r['note']} |")
    lines += ["", "## Commands and raw output", ""]
    for name, run in list(runs.items()) + [(f"{k} --gpu", v) for k, v in gpu_runs.items()]:
        if run is None:
            continue
        lines += [f"### {name}: `{run['cmd']}` (exit {run['rc']}, {run['wall_s']:.0f} s wall)", "", "```"]
        body = run["stdout"].strip().splitlines()
        if run["rc"] != 0:
            body += ["--- stderr (last 15 lines) ---"] + run["stderr"].strip().splitlines()[-15:]
        lines += body[-60:] + ["```", ""]
    return "\n".join(lines) + "\n"


WHEELS = os.path.join(REPO, "bench", "wheels")
GPU_SUITE_NEEDS = ("diffusers", "transformers", "tokenizers", "flax", "safetensors")


def _dist_name(wheel: str) -> str:
    return re.sub(r"[-_.]+", "-", os.path.basename(wheel).split("-")[0]).lower()


def gpu_setup(dry_run: bool) -> list[str]:
    """Installs, offline and without dependency resolution, every wheel of bench/wheels (bench/fetch_gpu_wheels.sh)
    whose distribution is missing here; returns those wheels. Fails clearly when a needed module stays missing."""
    import glob
    import importlib.metadata as md
    import importlib.util

    missing = []
    for wheel in sorted(glob.glob(os.path.join(WHEELS, "*.whl"))):
        try:
            md.version(_dist_name(wheel))
        except md.PackageNotFoundError:
            missing.append(wheel)
    if missing and not dry_run:
        print(f"[report] installing {len(missing)} wheels from bench/wheels (offline, --no-deps)", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", *missing],
                       check=True)
        importlib.invalidate_caches()
    absent = [m for m in GPU_SUITE_NEEDS if importlib.util.find_spec(m) is None]
    if absent:
        raise SystemExit(f"[report] the GPU suite needs {', '.join(absent)}, which bench/wheels does not provide; run "
                         "bench/fetch_gpu_wheels.sh on a machine with registry access and carry bench/wheels along")
    return missing


def gpu_suite(args) -> int:
    """bench/report.py --gpu: setup + bench/gpu_suite.py in one subprocess, bounded by --timeout."""
    start = time.perf_counter()
    installed = gpu_setup(args.dry_run)
    print(f"[report] setup {time.perf_counter() - start:.0f} s ({len(installed)} wheels "
          f"{'would be ' if args.dry_run else ''}installed)", flush=True)
    cmd = [sys.executable, os.path.join(REPO, "bench", "gpu_suite.py"), "--out", args.out]
    if args.dry_run:
        cmd.append("--dry-run")
    proc = subprocess.run(cmd, cwd=REPO, timeout=args.timeout)
    print(f"[report] GPU suite exit {proc.returncode} in {time.perf_counter() - start:.0f} s", flush=True)
    return proc.returncode


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHES), help="run only these benchmarks")
    parser.add_argument("--gpu", action="store_true", help="run the GPU suite only (see bench/gpu_suite.py)")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: tiny shapes on CPU, installs nothing")
    parser.add_argument("--script-gpu-modes", action="store_true",
                        help="the CPU report plus each script's own --gpu mode (needs an accelerator)")
    parser.add_argument("--timeout", type=int, default=None,
                        help="seconds per script (default 1200) / for the whole GPU suite (default 480)")
    parser.add_argument("--out", default=DEFAULT_OUT)
    parser.add_argument("--json", default=DEFAULT_JSON, help="the CPU report's rows as JSON, with the commit")
    args = parser.parse_args(argv)
    if args.gpu:
        args.timeout = args.timeout or 480
        return gpu_suite(args)
    args.timeout = args.timeout or 1200
    args.gpu = args.script_gpu_modes
    from qwenimage_jax.io_utils import git_commit, write_json

    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    commit = git_commit(REPO)
    command = " ".join(["python", "bench/report.py"] + list(sys.argv[1:] if argv is None else argv))
    machine_line = machine()
    runs, gpu_runs = {}, {}
    for name, (script, cpu_args, gpu_args) in BENCHES.items():
        if args.only and name not in args.only:
            runs[name] = None
            continue
        print(f"[report] {name}: python bench/{script} {' '.join(cpu_args)}", flush=True)
        runs[name] = run_script(script, cpu_args, args.timeout)
        print(f"[report] {name}: exit {runs[name]['rc']} in {runs[name]['wall_s']:.0f} s", flush=True)
        if args.gpu and gpu_args is not None:
            gpu_runs[name] = run_script(script, gpu_args, args.timeout)
            print(f"[report] {name} --gpu: exit {gpu_runs[name]['rc']}", flush=True)
    text = render(machine_line, runs, started, gpu_runs, commit, os.path.relpath(os.path.abspath(args.json), REPO))
    start, end = "<!-- gpu-suite:start -->", "<!-- gpu-suite:end -->"
    if os.path.exists(args.out):  # keep the GPU suite's section (bench/gpu_suite.py) across CPU reports
        with open(args.out, encoding="utf-8") as f:
            old = f.read()
        if start in old and end in old:
            text += "\n" + start + old.split(start, 1)[1].split(end, 1)[0] + end + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    write_json(args.json, record(machine_line, runs, started, gpu_runs, commit, command), indent=1)
    print(f"[report] wrote {args.out} and {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
