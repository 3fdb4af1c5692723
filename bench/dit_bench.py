"""DiT benchmarks: ours (jit) vs diffusers eager on CPU, compile time vs depth, and the 7B shape on a GPU.

    python bench/dit_bench.py                 # CPU: forward latency ratio + compile time for 2 vs 32 scanned layers
    python bench/dit_bench.py --gpu           # 7B at 1024x1024 in bf16 (random weights): per-step latency, MFU,
                                              # and diffusers on the same GPU when torch has CUDA

FLOPs (analytic, forward, multiply-add = 2 FLOPs), width d, mlp width m = mlp_ratio * d, S joint tokens of which
Q are computed (S for a full step, N_tgt for a "cached" step), L text positions, A allowed (query, key) pairs of
the block-causal mask:
    per layer   2 * Q * (4 d^2 + 3 d m)            q, k, v, out projections + SwiGLU (3 matrices)
              + 4 * A * d                          q k^T and attention-weighted v over the allowed pairs
    once        2 * (L * (c_ctx d + d^2) + N_img * c_in * d + Q * (d^2 + d * c_out)) + modulation (tiny)
MFU = FLOPs / latency / peak (989 TFLOP/s dense bf16 for H100/H200 SXM; override with --peak-tflops).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def forward_flops(cfg, layout, mode=None) -> float:
    """Analytic forward FLOPs of one DiT call (see module docstring)."""
    d, m = cfg.inner_dim, cfg.mlp_dim
    if mode == "cached":
        queries = layout.n_target
        allowed = layout.n_target * layout.seq_len
    else:
        queries = layout.seq_len
        allowed = int(layout.mask.sum())
    text = layout.vlm_len - layout.n_target // 4
    per_layer = 2 * queries * (4 * d * d + 3 * d * m) + 4 * allowed * d
    once = 2 * (text * (cfg.context_in_dim * d + d * d) + layout.n_image * cfg.input_features * d
                + queries * (d * d + d * cfg.output_features))
    return cfg.num_layers * per_layer + once


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_latency(repeats: int = 7, threads: int = 1):
    import jax
    import numpy as np
    import torch
    from diffusers import QwenImage21Transformer2DModel

    from qwenimage_jax.checkpoints import load_transformer

    torch.set_num_threads(threads)   # XLA gets the same count through XLA_FLAGS (set in main)
    config = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=4, attention_head_dim=64,
                  num_attention_heads=4, context_in_dim=256, mlp_ratio=3, axes_dims_rope=[16, 24, 24], eps=1e-6,
                  causal_condition=True)
    torch.manual_seed(0)
    model = QwenImage21Transformer2DModel(**config).eval()
    text_len, grid = 32, (1, 16, 16)
    n_tgt = grid[1] * grid[2]
    hidden = torch.randn(1, n_tgt, 64)
    text = torch.randn(1, text_len, 256)
    t = torch.tensor([0.5])
    img_mask = torch.tensor([[False] * text_len + [True] * (n_tgt // 4)])
    shapes = [[grid]]
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        ours = load_transformer(tmp)
    args = (hidden.numpy(), text.numpy(), t.numpy(), shapes, img_mask.numpy())

    with torch.no_grad():
        ref = model(hidden, text, t, shapes, img_mask).sample.numpy()
    out = ours(*args).sample.block_until_ready()
    err = float(np.abs(np.asarray(out) - ref).max() / np.abs(ref).max())
    torch_times, jax_times = [], []
    for _ in range(repeats):  # interleaved, so both sides see the same background load
        with torch.no_grad():
            torch_times.append(_median_time(lambda: model(hidden, text, t, shapes, img_mask), 1))
        jax_times.append(_median_time(lambda: ours(*args).sample.block_until_ready(), 1))
    torch_s, jax_s = statistics.median(torch_times), statistics.median(jax_times)
    print(f"[cpu] config width {4 * 64}, 4 layers, {text_len} text + {n_tgt} image tokens, batch 1, fp32, "
          f"{threads} thread(s) each")
    print(f"[cpu] diffusers eager {torch_s * 1e3:.1f} ms | ours jit {jax_s * 1e3:.1f} ms | "
          f"ratio ours/diffusers {jax_s / torch_s:.2f} | max rel err {err:.1e}")


def compile_time_vs_depth():
    import jax
    import jax.numpy as jnp

    from qwenimage_jax.models.dit import DiT, DiTConfig, abstract_params

    results = {}
    for layers in (2, 32):
        cfg = DiTConfig(in_channels=16, out_channels=16, num_layers=layers, attention_head_dim=16,
                        num_attention_heads=2, context_in_dim=32, axes_dims_rope=(4, 6, 6))
        params = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                              __import__("flax").linen.meta.unbox(abstract_params(cfg)))
        shapes, mask = ((1, 4, 6),), (False,) * 7 + (True,) * 6
        fn = jax.jit(lambda p, h, e, t: DiT(cfg).apply({"params": p}, h, e, t, shapes, mask))
        start = time.perf_counter()
        fn.lower(params, jax.ShapeDtypeStruct((1, 24, 16), jnp.float32),
                 jax.ShapeDtypeStruct((1, 7, 32), jnp.float32), jax.ShapeDtypeStruct((1,), jnp.float32)).compile()
        results[layers] = time.perf_counter() - start
    print(f"[compile] width 32: 2 layers {results[2]:.2f} s | 32 layers {results[32]:.2f} s | "
          f"ratio {results[32] / results[2]:.2f} (scan: should stay ~1)")


def gpu(args):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwenimage_jax.models.dit import DiT, DiTConfig, init_transformer, joint_layout, layout_key

    print(f"[gpu] devices: {jax.devices()}")
    if args.dry_run:  # the same code path on a tiny model (checks the script itself on CPU)
        cfg = DiTConfig(in_channels=64, out_channels=64, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                        context_in_dim=4096, axes_dims_rope=(4, 6, 6), dtype=jnp.bfloat16,
                        param_dtype=jnp.bfloat16, attention=args.attention)
    else:
        cfg = DiTConfig(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=args.attention)
    text_len, grid = args.text_tokens, (1, args.resolution // 16, args.resolution // 16)
    n_tgt = grid[1] * grid[2]
    shapes, mask = layout_key([grid], [False] * text_len + [True] * (n_tgt // 4))
    layout = joint_layout(shapes, mask)
    model = init_transformer(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    hidden = jnp.asarray(rng.standard_normal((1, n_tgt, 64)), jnp.bfloat16)
    text = jnp.asarray(rng.standard_normal((1, text_len, 4096)), jnp.bfloat16)
    t = jnp.array([0.5], jnp.float32)
    module = DiT(cfg)
    full = jax.jit(lambda p, h, e, tt: module.apply({"params": p}, h, e, tt, shapes, mask))
    extract = jax.jit(lambda p, h, e, tt: module.apply({"params": p}, h, e, tt, shapes, mask,
                                                       kv_cache_mode="extract"))
    cached = jax.jit(lambda p, h, tt, kv: module.apply({"params": p}, h, None, tt, shapes, mask,
                                                       kv_cache_mode="cached", kv_cache=kv))
    peak = args.peak_tflops * 1e12
    start = time.perf_counter()
    full(model.params, hidden, text, t).block_until_ready()
    print(f"[gpu] compile + first step {time.perf_counter() - start:.1f} s")
    full_s = _median_time(lambda: full(model.params, hidden, text, t).block_until_ready(), args.repeats)
    _, kv = extract(model.params, hidden, text, t)
    cached(model.params, hidden, t, kv).block_until_ready()
    cached_s = _median_time(lambda: cached(model.params, hidden, t, kv).block_until_ready(), args.repeats)
    for name, secs, mode in (("full", full_s, None), ("cached", cached_s, "cached")):
        flops = forward_flops(cfg, layout, mode)
        print(f"[gpu] ours {name:6s} step {secs * 1e3:.1f} ms | {flops / 1e12:.1f} TFLOP | "
              f"MFU {flops / secs / peak:.1%} (attention={args.attention}, {text_len} text + {n_tgt} image tokens)")
    del model, kv

    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print("[gpu] diffusers side skipped: torch has no CUDA here")
        return
    from diffusers import QwenImage21Transformer2DModel

    with torch.device("cuda"):
        ref = QwenImage21Transformer2DModel(**{k: v for k, v in cfg.to_diffusers().items()
                                               if not k.startswith("_")}).to(torch.bfloat16).eval()
    th = torch.randn(1, n_tgt, 64, device="cuda", dtype=torch.bfloat16)
    te = torch.randn(1, text_len, 4096, device="cuda", dtype=torch.bfloat16)
    tt = torch.tensor([0.5], device="cuda")
    tm = torch.tensor([list(mask)], device="cuda")

    def step():
        with torch.no_grad():
            ref(th, te, tt, [[grid]], tm)
        torch.cuda.synchronize()

    step()
    ref_s = _median_time(step, args.repeats)
    flops = forward_flops(cfg, layout)
    print(f"[gpu] diffusers full step {ref_s * 1e3:.1f} ms | MFU {flops / ref_s / peak:.1%} | "
          f"ratio ours/diffusers {full_s / ref_s:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="run the 7B bf16 benchmark on the default GPU")
    parser.add_argument("--attention", default="cudnn", help="attention backend for --gpu")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for both sides (1 = stable figures on a shared machine; torch's OpenMP "
                             "threads degrade badly when cores are oversubscribed)")
    parser.add_argument("--dry-run", action="store_true", help="run the --gpu code path on a 2-layer model (CPU ok)")
    args = parser.parse_args()
    if args.gpu or args.dry_run:
        # leave room for the diffusers model on the same GPU
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
        gpu(args)
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if args.threads == 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
        cpu_latency(args.repeats, args.threads)
        compile_time_vs_depth()


if __name__ == "__main__":
    main()
