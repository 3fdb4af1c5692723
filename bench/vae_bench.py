"""Encode+decode throughput of our jitted Flax VAE vs diffusers `AutoencoderKLQwenImage21` (eager, no_grad).

Both run the same random weights (the torch model is saved with `save_pretrained` and loaded through `load_vae`),
in fp32 on CPU, in this one process, timed alternately. Prints a markdown table: median wall time per batch, images/s, the speedup
(diffusers time / ours) and our one-off compile time, plus the max relative difference of the reconstructions.

    python bench/vae_bench.py                       # tiny + medium configs
    python bench/vae_bench.py --configs tiny --repeats 10 --threads 2
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

CONFIGS = {
    # name: (diffusers config, batch, height, width)
    "tiny": (dict(base_dim=8, decoder_base_dim=12, z_dim=8, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=1,
                  temperal_downsample=[False, True, True, True], in_channels=4, out_channels=4,
                  latents_mean=[0.0] * 8, latents_std=[1.0] * 8), 1, 64, 64),
    "medium": (dict(base_dim=32, decoder_base_dim=48, z_dim=16, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=2,
                    temperal_downsample=[False, True, True, True], in_channels=4, out_channels=4,
                    latents_mean=[0.0] * 16, latents_std=[1.0] * 16), 1, 256, 256),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny,medium", help=f"comma list from {sorted(CONFIGS)}")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per side (median reported)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    return parser.parse_args(argv)


def _interleaved_medians(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median seconds of each function, alternating a/b so that load changes hit both sides alike."""
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return sorted(times_a)[repeats // 2], sorted(times_b)[repeats // 2]


def bench_one(name: str, repeats: int) -> dict:
    import jax
    import numpy as np
    import torch
    from diffusers import AutoencoderKLQwenImage21

    from qwenimage_jax.checkpoints import load_vae

    config, batch, height, width = CONFIGS[name]
    torch.manual_seed(0)
    model = AutoencoderKLQwenImage21(**config).eval()
    n_params = sum(p.numel() for p in model.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        vae = load_vae(tmp)

    images = torch.rand(batch, config["in_channels"], 1, height, width) * 2 - 1
    images_nhwc = images[:, :, 0].permute(0, 2, 3, 1).numpy()

    def theirs():
        with torch.no_grad():
            latents = model.encode(images).latent_dist.mode()
            return model.decode(latents).sample

    @jax.jit
    def round_trip(params, x):
        mean, _ = vae.module.apply({"params": params}, x, method="encode")
        return vae.module.apply({"params": params}, mean, method="decode")

    def ours():
        return jax.block_until_ready(round_trip(vae.params, images_nhwc))

    start = time.perf_counter()
    ours()  # compile + first run
    first_s = time.perf_counter() - start
    ref = theirs()  # warm-up
    diff = np.abs(np.asarray(ours()) - ref[:, :, 0].permute(0, 2, 3, 1).numpy()).max() / ref.abs().max().item()
    t_ours, t_theirs = _interleaved_medians(ours, theirs, repeats)
    compile_s = first_s - t_ours
    return dict(name=name, params=n_params, shape=f"{batch}x{height}x{width}x{config['in_channels']}",
                ours=t_ours, theirs=t_theirs, compile=compile_s, diff=diff, batch=batch)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch

    torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"unknown config(s) {unknown}; choose from {sorted(CONFIGS)}", file=sys.stderr)
        return 2
    rows = [bench_one(n, args.repeats) for n in names]
    print(f"\nVAE encode+decode, fp32, {jax.devices()[0].platform.upper()}, torch threads {args.threads}, "
          f"median of {args.repeats}\n")
    print("| config | params | input (B,H,W,C) | ours ms | diffusers ms | ours img/s | diffusers img/s "
          "| speedup (diffusers/ours) | ours compile s | max rel diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['shape']} | {r['ours'] * 1e3:.1f} | "
              f"{r['theirs'] * 1e3:.1f} | {r['batch'] / r['ours']:.2f} | {r['batch'] / r['theirs']:.2f} | "
              f"{r['theirs'] / r['ours']:.2f}x | {r['compile']:.1f} | {r['diff']:.1e} |")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    sys.exit(main())
