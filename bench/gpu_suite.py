"""The GPU suite: the released 7B DiT and the sampler on one GPU, ours vs diffusers in the same process.

    python bench/report.py --gpu              # what to run on a GPU machine (installs bench/wheels first)
    python bench/gpu_suite.py --out FILE      # this script alone (diffusers etc. already importable)
    python bench/gpu_suite.py --dry-run --out FILE   # the same code path at tiny shapes on CPU (CI)

Rows (random weights at the released shapes, bf16, 1024x1024, 128 prompt tokens, batch 1):
  * bf16 matmul peak: the best of square bf16 matmuls (8192^3) measured on this device: the MFU denominator;
  * DiT step: one full forward (text + image tokens) and one cached forward (image tokens over the cached text
    K/V), ours with cuDNN attention vs diffusers' forward, ms, analytic TFLOP (bench/dit_bench.forward_flops), MFU;
  * s/image at 4, 8 and 40 steps: the whole sampler (denoising loop + VAE decode to numpy) from prompt
    embeddings, ours (QwenImagePipeline) vs diffusers (QwenImage21Pipeline);
  * peak device memory of each side (jax: peak_bytes_in_use; torch: max_memory_allocated).
Setting up a GPU machine without registry access (Python 3.12, torch 2.11 cu130, jax 0.11.2 cuda13, no diffusers):
on a machine WITH access run `bench/fetch_gpu_wheels.sh` (cp312 wheels of bench/gpu_wheels.txt at our venv's
versions, ~45 MB, into the git-ignored bench/wheels/), carry bench/wheels/ with the work tree, then on the GPU
machine `python bench/report.py --gpu` installs the missing ones offline (`pip install --no-index --no-deps`) and
runs this script under an 8-minute limit (--timeout).
The device is named in every row. `--dry-run` shrinks every shape (2 layers, 64x64, 1 and 2 steps, 128^3 matmuls) and
uses the einsum attention, so it checks the script, not the GPU.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "bench"))

START, END = "<!-- gpu-suite:start -->", "<!-- gpu-suite:end -->"


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def device_name() -> str:
    import jax

    dev = jax.devices()[0]
    name = f"{dev.platform}: {getattr(dev, 'device_kind', str(dev))}"
    try:
        import torch
        if torch.cuda.is_available():
            name += f" (torch: {torch.cuda.get_device_name(0)})"
    except ImportError:
        pass
    return name


def matmul_peak(n: int, repeats: int) -> float:
    """Measured dense bf16 FLOP/s: n x n x n matmuls, 10 chained per timed call."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16) / n

    @jax.jit
    def chain(x):
        for _ in range(10):
            x = (x @ b).astype(jnp.bfloat16)
        return x

    chain(a).block_until_ready()
    secs = min(_median(lambda: chain(a).block_until_ready(), 1) for _ in range(repeats))
    return 10 * 2 * n ** 3 / secs


def jax_peak_bytes() -> float | None:
    import jax

    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def _dit_inputs(cfg, size: int, text_len: int, seed: int):
    """(shapes, mask, layout, hidden, text, t): one text-to-image DiT call at size² with random bf16 inputs."""
    import jax.numpy as jnp
    import numpy as np

    from qwenimage_jax.models.dit import joint_layout, layout_key

    grid = (1, size // 16, size // 16)
    n_tgt = grid[1] * grid[2]
    shapes, mask = layout_key([grid], [False] * text_len + [True] * (n_tgt // 4))
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((1, n_tgt, cfg.in_channels)), jnp.bfloat16)
    text = jnp.asarray(rng.standard_normal((1, text_len, cfg.context_in_dim)), jnp.bfloat16)
    return shapes, mask, joint_layout(shapes, mask), hidden, text, jnp.array([0.5], jnp.float32)


def ours(args, peak: float) -> tuple[list[dict], object]:
    """DiT step latencies + sampler s/image with our code; returns (rows, the pipeline's DiT config)."""
    import jax
    import numpy as np

    from dit_bench import forward_flops
    from qwenimage_jax.models.dit import DiT
    from sample_bench import _released_pipeline

    pipe, cfg, _ = _released_pipeline(args.dry_run, args.attention)
    size, text_len = args.resolution, args.text_tokens
    shapes, mask, layout, hidden, text, t = _dit_inputs(cfg, size, text_len, seed=0)
    rng = np.random.default_rng(0)
    module, params = DiT(cfg), pipe.transformer.params
    full = jax.jit(lambda p, h, e, tt: module.apply({"params": p}, h, e, tt, shapes, mask))
    extract = jax.jit(lambda p, h, e, tt: module.apply({"params": p}, h, e, tt, shapes, mask,
                                                       kv_cache_mode="extract"))
    cached = jax.jit(lambda p, h, tt, kv: module.apply({"params": p}, h, None, tt, shapes, mask,
                                                       kv_cache_mode="cached", kv_cache=kv))
    rows = []
    start = time.perf_counter()
    full(params, hidden, text, t).block_until_ready()
    compile_s = time.perf_counter() - start
    full_s = _median(lambda: full(params, hidden, text, t).block_until_ready(), args.repeats)
    _, kv = extract(params, hidden, text, t)
    cached(params, hidden, t, kv).block_until_ready()
    cached_s = _median(lambda: cached(params, hidden, t, kv).block_until_ready(), args.repeats)
    for name, secs, mode in (("full", full_s, None), ("cached", cached_s, "cached")):
        flops = forward_flops(cfg, layout, mode)
        rows.append(dict(what=f"DiT {name} step, ours ({args.attention})", value=f"{secs * 1e3:.1f} ms",
                         flops=f"{flops / 1e12:.2f}", mfu=f"{flops / secs / peak:.1%}",
                         note=f"compile + first call {compile_s:.1f} s" if mode is None else ""))
    del kv
    embeds = rng.standard_normal((1, text_len, cfg.context_in_dim)).astype(np.float32)
    for steps in args.steps:
        def call():
            return pipe(prompt_embeds=embeds, height=size, width=size, num_inference_steps=steps, seed=0,
                        output_type="np", progress=False).images

        start = time.perf_counter()
        call()
        first = time.perf_counter() - start
        secs = _median(call, args.sample_repeats)
        rows.append(dict(what=f"sampler {steps} steps, ours", value=f"{secs:.3f} s/image", flops="", mfu="",
                         note=f"{secs / steps * 1e3:.1f} ms/step incl. decode; first call {first:.1f} s"))
    peak_bytes = jax_peak_bytes()
    rows.append(dict(what="peak device memory, ours", value=_gib(peak_bytes), flops="", mfu="",
                     note="jax peak_bytes_in_use (DiT + VAE, all rows above)"))
    return rows, cfg


def backends(args, peak: float) -> tuple[list[dict], list[str]]:
    """Every attention backend on one DiT forward at `--backend-resolution`² (full, uncached): median ms and the max
    relative error against the einsum path (`xla`) from the same weights and inputs. A backend that fails is a row
    saying so (the first GPU run must not lose the whole suite to one kernel). Returns (rows, the backends that ran)."""
    import dataclasses

    import jax
    import jax.numpy as jnp
    import numpy as np

    from dit_bench import forward_flops
    from qwenimage_jax.models.dit import DiT
    from sample_bench import _released_pipeline

    names = ("xla", "dot_product_attention", "cudnn_emulated") if args.dry_run else \
        ("xla", "dot_product_attention", "cudnn")
    pipe, cfg, _ = _released_pipeline(args.dry_run, "xla")
    size = args.backend_resolution
    shapes, mask, layout, hidden, text, t = _dit_inputs(cfg, size, args.text_tokens, seed=1)
    params = pipe.transformer.params
    flops = forward_flops(cfg, layout, None)
    rows, ran, reference = [], [], None
    for name in names:
        module = DiT(dataclasses.replace(cfg, attention=name))
        forward = jax.jit(lambda p, h, e, tt, m=module: m.apply({"params": p}, h, e, tt, shapes, mask))
        try:
            out = np.asarray(forward(params, hidden, text, t).astype(jnp.float32))
            secs = _median(lambda: forward(params, hidden, text, t).block_until_ready(), args.repeats)
        except Exception as e:  # noqa: BLE001 - reported as a row, the suite goes on
            rows.append(dict(what=f"DiT full step {size}², attention {name}", value="failed", flops="", mfu="",
                             note=f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
            continue
        reference = out if reference is None else reference
        err = float(np.abs(out - reference).max() / (np.abs(reference).max() + 1e-12))
        rows.append(dict(what=f"DiT full step {size}², attention {name}", value=f"{secs * 1e3:.1f} ms",
                         flops=f"{flops / 1e12:.2f}", mfu=f"{flops / secs / peak:.1%}",
                         note=f"max rel err vs xla {err:.1e} (bf16)"))
        ran.append(name)
    del pipe
    return rows, ran


def _gib(b) -> str:
    return "n/a (no device memory stats)" if b is None else f"{b / 1024 ** 3:.2f} GiB"


def diffusers_side(args, cfg, peak: float) -> list[dict]:
    """The same rows with diffusers on the same device (torch CUDA; CPU in the dry run)."""
    import torch
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)

    from dit_bench import forward_flops
    from qwenimage_jax.models.dit import joint_layout, layout_key
    from qwenimage_jax.sampling.scheduler import QWEN_IMAGE_SCHEDULER_CONFIG
    from sample_bench import CPU_VAE
    from qwenimage_jax.testing.tokenizer import build_tiny_processor, load_processor_without_torchvision

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not args.dry_run:
        return [dict(what="diffusers", value="not run: torch has no CUDA here", flops="", mfu="", note="")]
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    with torch.device(device):
        transformer = QwenImage21Transformer2DModel(**{k: v for k, v in cfg.to_diffusers().items()
                                                       if not k.startswith("_")}).to(torch.bfloat16).eval()
        vae = AutoencoderKLQwenImage21(**(dict(CPU_VAE, base_dim=8, decoder_base_dim=12) if args.dry_run
                                          else {})).to(torch.bfloat16).eval()
    size, text_len = args.resolution, args.text_tokens
    grid = (1, size // 16, size // 16)
    n_tgt = grid[1] * grid[2]
    mask = [False] * text_len + [True] * (n_tgt // 4)
    th = torch.randn(1, n_tgt, cfg.in_channels, device=device, dtype=torch.bfloat16)
    te = torch.randn(1, text_len, cfg.context_in_dim, device=device, dtype=torch.bfloat16)
    tt = torch.tensor([0.5], device=device)
    tm = torch.tensor([mask], device=device)

    def step():
        with torch.no_grad():
            transformer(th, te, tt, [[grid]], tm)
        sync()

    step()
    secs = _median(step, args.repeats)
    flops = forward_flops(cfg, joint_layout(*layout_key([grid], mask)))
    rows = [dict(what="DiT full step, diffusers", value=f"{secs * 1e3:.1f} ms", flops=f"{flops / 1e12:.2f}",
                 mfu=f"{flops / secs / peak:.1%}", note="torch SDPA, eager")]
    with tempfile.TemporaryDirectory() as tmp:
        processor = load_processor_without_torchvision(build_tiny_processor(tmp))
    ref = QwenImage21Pipeline(FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG), vae, None, processor,
                              transformer)
    ref.set_progress_bar_config(disable=True)
    embeds = torch.randn(1, text_len, cfg.context_in_dim, device=device, dtype=torch.bfloat16)
    for steps in args.steps:
        def call():
            with torch.no_grad():
                ref(prompt_embeds=embeds, height=size, width=size, num_inference_steps=steps, output_type="np")
            sync()

        call()
        secs = _median(call, args.sample_repeats)
        rows.append(dict(what=f"sampler {steps} steps, diffusers", value=f"{secs:.3f} s/image", flops="", mfu="",
                         note=f"{secs / steps * 1e3:.1f} ms/step incl. decode"))
    peak_bytes = torch.cuda.max_memory_allocated() if device == "cuda" else None
    rows.append(dict(what="peak device memory, diffusers", value=_gib(peak_bytes), flops="", mfu="",
                     note="torch max_memory_allocated"))
    return rows


def render(rows: list[dict], device: str, peak: float, args, wall: float) -> str:
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mode = "DRY RUN at tiny shapes on CPU (checks the script; not a GPU figure)" if args.dry_run else \
        "released 7B DiT + f16c64 VAE shapes, random weights, bf16"
    lines = [START, "## GPU suite (`python bench/report.py --gpu`)", "",
             f"- Run: {when}, {wall:.0f} s; {mode}", f"- Device: {device}",
             f"- Measured bf16 matmul peak: {peak / 1e12:.1f} TFLOP/s (MFU denominator)",
             f"- Shapes: {args.resolution}x{args.resolution}, {args.text_tokens} prompt tokens, batch 1; "
             f"ours attention={args.attention}", "",
             "| device | measurement | value | TFLOP | MFU (measured peak) | notes |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {device} | {r['what']} | {r['value']} | {r['flops']} | {r['mfu']} | {r['note']} |")
    lines.append(END)
    return "\n".join(lines) + "\n"


def write_section(path: str, section: str) -> None:
    """Replaces the GPU-suite section of `path` (appends it when absent); the rest of the file is kept."""
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    if START in text and END in text:
        head, rest = text.split(START, 1)
        text = head + section.rstrip("\n") + rest.split(END, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + section
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="tiny shapes on CPU: checks the code path")
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "benchmarks.md"))
    parser.add_argument("--attention", default=None, help="ours: cudnn on GPU (default), xla in the dry run")
    parser.add_argument("--resolution", type=int, default=None, help="1024 (128 in the dry run)")
    parser.add_argument("--backend-resolution", type=int, default=None,
                        help="side of the every-backend rows (512; 64 in the dry run): xla materialises the logits")
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, nargs="+", default=[4, 8, 40])
    parser.add_argument("--repeats", type=int, default=5, help="timed DiT steps (median)")
    parser.add_argument("--sample-repeats", type=int, default=2, help="timed sampler calls (median)")
    parser.add_argument("--matmul", type=int, default=None, help="matmul side for the peak (8192; 256 dry run)")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    else:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")  # room for diffusers on the same GPU
    args.attention = args.attention or ("xla" if args.dry_run else "cudnn")
    args.resolution = args.resolution or (64 if args.dry_run else 1024)
    args.backend_resolution = args.backend_resolution or (64 if args.dry_run else 512)
    if args.dry_run:  # the smallest shapes that still run every branch (two step counts sharing one program)
        args.repeats, args.sample_repeats, args.text_tokens = 1, 1, min(args.text_tokens, 8)
        args.steps = [1, 2] if args.steps == [4, 8, 40] else args.steps
    start = time.perf_counter()
    device = device_name()
    print(f"[gpu-suite] device {device}", flush=True)
    peak = matmul_peak(args.matmul or (128 if args.dry_run else 8192), 3)
    print(f"[gpu-suite] measured bf16 matmul peak {peak / 1e12:.1f} TFLOP/s", flush=True)
    backend_rows, ran = backends(args, peak)   # printed with the rest below
    if args.attention not in ran and not args.dry_run:  # e.g. cuDNN failed above: the rest of the suite on xla
        print(f"[gpu-suite] attention {args.attention} failed above; the sampler rows use xla", flush=True)
        args.attention = "xla"
    rows, cfg = ours(args, peak)
    rows = backend_rows + rows
    for r in rows:
        print(f"[gpu-suite] {r['what']}: {r['value']} {r['mfu']} {r['note']}", flush=True)
    ref_rows = diffusers_side(args, cfg, peak)
    for r in ref_rows:
        print(f"[gpu-suite] {r['what']}: {r['value']} {r['mfu']} {r['note']}", flush=True)
    section = render(rows + ref_rows, device, peak, args, time.perf_counter() - start)
    write_section(args.out, section)
    print(f"[gpu-suite] wrote {args.out} in {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
