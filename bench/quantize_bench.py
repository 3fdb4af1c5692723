"""Quantized vs unquantized DiT on this machine, side by side in one run: resident memory after loading and the
time of one jitted forward.

    python bench/quantize_bench.py --workdir /tmp/qbench          # writes bench/results/quantize_bench.json

A seeded random DiT at the release's head width (128) with 8 heads and 4 layers (hidden 1024, MLP 3072) is
written once as a diffusers-format safetensors checkpoint. Each mode (none, int8, fp8, int4) then runs in a fresh
process: baseline = VmRSS after the imports, the checkpoint is loaded with `load_transformer(quantize=mode)`
(each kernel quantized as it is read), and the figures are the resident bytes above the baseline after loading,
the peak while loading (VmHWM), the parameter bytes the model holds (`quantize.param_bytes`) and the median wall
time of 5 jitted forwards (after one warm-up) on a 256 x 256 target (256 image tokens) with 64 text tokens, batch 2.
Weight-only quantization dequantizes each kernel inside its matmul, so on a CPU it saves memory, not time.
A benchmark, not a timed test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from load_memory_bench import _status_kb  # noqa: E402 (the /proc/self/status reader both benches use)
MODES = ("none", "int8", "fp8", "int4")
MODEL = dict(in_channels=64, out_channels=64, num_layers=4, attention_head_dim=128, num_attention_heads=8,
             context_in_dim=1024, mlp_ratio=3, axes_dims_rope=(32, 48, 48))


def write_checkpoint(dst: str) -> None:
    import jax

    from qwenimage_jax import checkpoints
    from qwenimage_jax.models.dit import DiTConfig, init_transformer

    model = init_transformer(DiTConfig(**MODEL), jax.random.key(0))
    checkpoints.export("transformer", model.params, model.dit_config, dst)


def measure(path: str, mode: str) -> dict:
    """In the child process: load `path` quantized by `mode`, then time its forward."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwenimage_jax.checkpoints import load_transformer
    from qwenimage_jax.checkpoints.quantize import param_bytes

    baseline = _status_kb("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                                  # reset VmHWM to the current RSS
    model = load_transformer(path, jnp.float32, quantize=None if mode == "none" else mode)
    jax.block_until_ready(model.params)
    peak = _status_kb("VmHWM") * 1024
    resident = _status_kb("VmRSS") * 1024 - baseline
    held = sum(param_bytes(model.params).values()) if mode != "none" else sum(
        x.nbytes for x in jax.tree.leaves(model.params))
    k = jax.random.split(jax.random.key(1), 2)
    hidden = jax.random.normal(k[0], (2, 256, MODEL["in_channels"]))
    text = jax.random.normal(k[1], (2, 64, MODEL["context_in_dim"]))
    timestep = jnp.array([0.9, 0.4])
    shapes, mask = ((1, 16, 16),), (False,) * 64 + (True,) * 64   # one image slot per 2 x 2 latent patch

    def forward():
        return model(hidden, text, timestep, shapes, mask).sample

    jax.block_until_ready(forward())                  # compile + warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(forward())
        times.append(time.perf_counter() - t0)
    return dict(mode=mode, param_bytes=int(held), resident_bytes=int(resident), peak_load_bytes=int(peak - baseline),
                forward_ms=1000 * float(np.median(times)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="where the random checkpoint is written (once)")
    parser.add_argument("--json", default=os.path.join(REPO, "bench", "results", "quantize_bench.json"))
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="none", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.mode)))
        return 0
    sys.path.insert(0, REPO)
    dst = os.path.join(args.workdir, "dit_quantize_bench")
    if not os.path.exists(os.path.join(dst, "config.json")):
        write_checkpoint(dst)
    rows = []
    for mode in MODES:
        env = dict(os.environ, JAX_PLATFORMS="cpu")
        out = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--measure", dst, "--mode", mode],
                             cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]
    mib = 2 ** 20
    print(f"{'mode':>5} {'params MiB':>11} {'resident MiB':>13} {'peak load MiB':>14} {'forward ms':>11} "
          f"{'memory vs none':>15} {'time vs none':>13}")
    for r in rows:
        r["resident_vs_none"] = r["resident_bytes"] / base["resident_bytes"]
        r["forward_vs_none"] = r["forward_ms"] / base["forward_ms"]
        print(f"{r['mode']:>5} {r['param_bytes'] / mib:>11.1f} {r['resident_bytes'] / mib:>13.1f} "
              f"{r['peak_load_bytes'] / mib:>14.1f} {r['forward_ms']:>11.1f} {r['resident_vs_none']:>15.2f} "
              f"{r['forward_vs_none']:>13.2f}")
    from qwenimage_jax.io_utils import provenance, write_json

    prov = provenance()
    write_json(args.json, {"model": {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL.items()},
                           "rows": {r["mode"]: r for r in rows}, "provenance": prov, "commit": prov["commit"]},
               indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
