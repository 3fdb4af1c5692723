"""Peak host memory of loading a transformer: a random bf16 DiT at the 1B shape (configs/dit_1b_train.py, 2.06 GB of
tensors) written by diffusers' `save_pretrained`, loaded by `load_transformer` onto one device and onto an 8-device
fsdp mesh. The loader must never hold two full copies: peak RSS above the pre-load baseline <= 1.3x the tensors.

    python bench/load_memory_bench.py --workdir /tmp/load_mem              # writes the checkpoint once, then measures
    python bench/load_memory_bench.py --workdir /tmp/load_mem --layers 4   # a smaller DiT (quick check)
    python bench/load_memory_bench.py --workdir /tmp/load_mem --quantize int8   # quantized while read

With --quantize the bound is on the quantized model instead: peak RSS above the baseline <= 1.3x (the quantized
weights + the largest float tensor), the most a loader that quantizes each tensor as it reads it should hold.

Each measurement runs in a fresh process (8 fake CPU devices for the mesh case): baseline = VmRSS after the imports,
the kernel's high-water mark is reset (/proc/self/clear_refs), the component is loaded and blocked on, and the
peak is VmHWM. Figures go to docs/reliability.md. A benchmark, not a timed test.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def dit_1b_fields(layers: int | None = None) -> dict:
    sys.path.insert(0, REPO)
    from qwenimage_jax.config_cli import load_config

    fields = dict(load_config(os.path.join(REPO, "configs", "dit_1b_train.py")).model)
    if layers:
        fields["num_layers"] = layers
    fields["axes_dims_rope"] = list(fields["axes_dims_rope"])
    return fields


def write_checkpoint(dst: str, fields: dict) -> int:
    """A random bf16 QwenImage21Transformer2DModel saved with save_pretrained; returns the tensors' bytes."""
    import torch
    from diffusers import QwenImage21Transformer2DModel

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("meta"):
        model = QwenImage21Transformer2DModel(**fields)
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
        for b in model.buffers():
            b.zero_()
    model.save_pretrained(dst, safe_serialization=True, max_shard_size="1GB")
    return sum(p.numel() * p.element_size() for p in model.state_dict().values())


def measure(path: str, devices: int, quantize: str | None = None) -> dict:
    """Runs in the child process: load `path` with the requested device count, report RSS figures (bytes)."""
    import jax
    import jax.numpy as jnp

    from qwenimage_jax.checkpoints.safetensors_io import SafetensorsReader
    from qwenimage_jax.checkpoints import load_transformer
    from qwenimage_jax.parallel.mesh import make_mesh

    reader = SafetensorsReader(path)
    tensor_bytes = sum(_nbytes(reader, k) for k in reader.keys())
    largest = max(_nbytes(reader, k) for k in reader.keys())
    del reader
    mesh = make_mesh(data=1, fsdp=devices) if devices > 1 else None
    baseline = _status_kb("VmRSS") * 1024
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                              # reset VmHWM to the current RSS
    loaded = load_transformer(path, jnp.bfloat16, mesh=mesh, quantize=quantize)
    jax.block_until_ready(loaded.params)
    peak = _status_kb("VmHWM") * 1024
    after = _status_kb("VmRSS") * 1024
    shards = {len(x.sharding.device_set) for x in jax.tree.leaves(loaded.params)}
    # the bound's denominator: the float tensors, or (quantized) what the loaded model holds + one float tensor
    target = tensor_bytes
    if quantize:
        from qwenimage_jax.checkpoints.quantize import param_bytes

        # the scanned stacks are what a quantizer holds in float at once (largest is one safetensors tensor, one
        # layer's; a stacked kernel is num_layers of them)
        target = sum(param_bytes(loaded.params).values()) + largest * loaded.dit_config.num_layers
    return dict(devices=devices, quantize=quantize or "none", tensor_bytes=tensor_bytes, target_bytes=target,
                baseline_rss=baseline, peak_rss=peak, after_rss=after,
                peak_over_tensors=(peak - baseline) / tensor_bytes, peak_over_target=(peak - baseline) / target,
                resident_over_tensors=(after - baseline) / tensor_bytes, devices_per_leaf=sorted(shards))


def _nbytes(reader, key) -> int:
    import numpy as np

    return int(np.prod(reader.shape(key), dtype=np.int64)) * np.dtype(reader.dtype(key)).itemsize


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--layers", type=int, default=None, help="override num_layers (default: the 1B's 18)")
    parser.add_argument("--quantize", default=None, choices=["int8", "fp8", "int4"],
                        help="load with weight-only quantization while reading (bound: the quantized model)")
    parser.add_argument("--json", default=None, help="also write the rows (with provenance) to this JSON file")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.devices, args.quantize)))
        return 0
    dst = os.path.join(args.workdir, f"dit_1b_bf16{'_l%d' % args.layers if args.layers else ''}")
    if not os.path.exists(os.path.join(dst, "config.json")):
        print(f"writing a random bf16 DiT to {dst} ...", flush=True)
        write_checkpoint(dst, dit_1b_fields(args.layers))
    results = []
    for devices in (1, 8):
        env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
        out = subprocess.run([sys.executable, __file__, "--workdir", args.workdir, "--measure", dst, "--devices",
                              str(devices)] + (["--quantize", args.quantize] if args.quantize else []),
                             cwd=REPO, env=env, capture_output=True, text=True, check=False)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    gib = 2 ** 30
    print(f"{'devices':>8} {'tensors GiB':>12} {'bound GiB':>10} {'baseline GiB':>13} {'peak GiB':>9} "
          f"{'peak-base / bound':>18} {'resident-base / tensors':>24}")
    for r in results:
        print(f"{r['devices']:>8} {r['tensor_bytes'] / gib:>12.2f} {r['target_bytes'] / gib:>10.2f} "
              f"{r['baseline_rss'] / gib:>13.2f} {r['peak_rss'] / gib:>9.2f} {r['peak_over_target']:>18.2f} "
              f"{r['resident_over_tensors']:>24.2f}")
    ok = all(r["peak_over_target"] <= 1.3 for r in results)
    bound = "the quantized model + one float stack" if args.quantize else "the tensors"
    print("PASS" if ok else "FAIL", f"(peak RSS above baseline <= 1.3x {bound})")
    print(json.dumps(results))
    if args.json:
        sys.path.insert(0, REPO)
        from qwenimage_jax.io_utils import provenance, write_json

        prov = provenance()
        write_json(args.json, {"layers": args.layers, "quantize": args.quantize or "none", "passed": ok,
                               "rows": {str(r["devices"]): r for r in results}, "provenance": prov,
                               "commit": prov["commit"]}, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
