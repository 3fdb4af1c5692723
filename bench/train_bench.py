"""DiT train-step throughput: ours (one jitted step: forward, backward, AdamW, EMA) vs a PyTorch eager step of
diffusers' `QwenImage21Transformer2DModel` (forward, backward, torch AdamW) on the same config, same batch.

    python bench/train_bench.py                       # CPU: tiny and small configs, tokens/s and the ratio
    python bench/train_bench.py --gpu                 # ~1B config (configs/dit_1b_train.py) in bf16 on one GPU:
                                                      # step time, tokens/s, MFU (+ torch on the same GPU)

    python bench/train_bench.py --loop                # the whole training loop (training/loop.py) on cached latents
                                                      # read from disk: the old loop (a host sync on every step's
                                                      # finite flag, the next batch made after it) against the new
                                                      # one (flag read one step late, batches made ahead on a
                                                      # thread), interleaved old/new, steps/s and the ratio

MFU counts the analytic FLOPs of `qwenimage_jax.training.dit.train_flops_per_example` (3 x forward, remat
recompute excluded) against --peak-tflops (989 dense bf16 for H100/H200).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIGS = {
    "tiny": dict(num_layers=2, attention_head_dim=16, num_attention_heads=4, context_in_dim=32, in_channels=16,
                 out_channels=16, axes_dims_rope=[4, 6, 6], grid=4, text=16, batch=8),
    "small": dict(num_layers=4, attention_head_dim=32, num_attention_heads=8, context_in_dim=256, in_channels=64,
                  out_channels=64, axes_dims_rope=[8, 12, 12], grid=16, text=64, batch=4),
}


def _model_fields(spec):
    return {k: v for k, v in spec.items() if k not in ("grid", "text", "batch")}


def ours(spec, dtype="float32", repeats=5, peak=0.0, remat="none", attention="xla"):
    import flax.linen as nn
    import jax
    import ml_collections
    import numpy as np

    from qwenimage_jax.parallel.mesh import make_mesh
    from qwenimage_jax.parallel.rules import LOGICAL_RULES
    from qwenimage_jax.training import dit as trainer

    grid, text, batch = spec["grid"], spec["text"], spec["batch"]
    c = ml_collections.ConfigDict(dict(
        seed=0, model=dict(patch_size=1, mlp_ratio=3, eps=1e-6, causal_condition=True, **_model_fields(spec)),
        compute_dtype=dtype, remat=remat, attention=attention, batch_size=batch, grad_accum=1,
        optimizer=dict(learning_rate=1e-4, weight_decay=0.001, grad_clip_norm=1.0), ema_decay=0.999,
        flow=dict(distribution="logit_normal", mean=0.0, std=1.0, shift="tokens"), cfg_dropout=0.0))
    mesh = make_mesh(data=1, fsdp=-1, devices=jax.devices())
    rng = np.random.default_rng(0)
    batch_np = {"latents": rng.normal(size=(batch, grid, grid, spec["in_channels"])).astype(np.float32),
                "text_embeds": rng.normal(size=(batch, text, spec["context_in_dim"])).astype(np.float32),
                "text_mask": np.ones((batch, text), bool), "image_pad_mask": np.zeros((batch, text), bool)}
    t0 = time.perf_counter()
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state, shardings, module, tx, lr = trainer.init_state(c, mesh, jax.random.key(0))
        step = trainer.make_train_step(module, tx, lr, c, trainer.batch_layout(batch_np), None, shardings, mesh)
        data = trainer._global_batch(batch_np, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(trainer.BATCH_AXES)))
        state, metrics = step(state, data, jax.random.key(1), None)
        jax.block_until_ready(metrics)
        compile_s = time.perf_counter() - t0
        times = []
        for i in range(repeats):
            t = time.perf_counter()
            state, metrics = step(state, data, jax.random.key(i), None)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    tokens = batch * (grid * grid + text)
    out = {"step_s": dt, "tokens_per_s": tokens / dt, "compile_s": compile_s}
    if peak:
        flops = batch * trainer.train_flops_per_example(module.config, grid * grid + text, text)
        out["mfu"] = flops / dt / (peak * jax.device_count())
    return out


def torch_reference(spec, repeats=5, device="cpu", dtype="float32"):
    import torch
    from diffusers import QwenImage21Transformer2DModel

    grid, text, batch = spec["grid"], spec["text"], spec["batch"]
    torch.manual_seed(0)
    tdtype = getattr(torch, dtype)
    model = QwenImage21Transformer2DModel(patch_size=1, mlp_ratio=3, **_model_fields(spec)).to(device, tdtype)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.001)
    latents = torch.randn(batch, grid * grid, spec["in_channels"], device=device, dtype=tdtype)
    embeds = torch.randn(batch, text, spec["context_in_dim"], device=device, dtype=tdtype)
    img_mask = torch.tensor([[False] * text + [True] * (grid * grid // 4)] * batch, device=device)

    def step():
        sigma = torch.rand(batch, device=device, dtype=tdtype)
        noise = torch.randn_like(latents)
        x_t = (1 - sigma[:, None, None]) * latents + sigma[:, None, None] * noise
        out = model(hidden_states=x_t, encoder_hidden_states=embeds, timestep=sigma,
                    img_shapes=[[(1, grid, grid)]] * batch, img_mask=img_mask, return_dict=False)[0]
        loss = torch.mean((out[:, -grid * grid:].float() - (noise - latents).float()) ** 2)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if device != "cpu":
            torch.cuda.synchronize()

    step()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    dt = statistics.median(times)
    return {"step_s": dt, "tokens_per_s": batch * (grid * grid + text) / dt}


LOOP_MODES = {"old": dict(sync_every_step=True, prefetch_batches=0), "new": dict(sync_every_step=False)}


def loop_throughput(spec, steps=200, rounds=2, log_every=50, skip=3):
    """{mode: [steps/s per round]} of `training.loop.run` over a cached-latent dataset on disk for the two loop
    modes, interleaved old, new, old, new, ... One compiled step serves every run. steps/s counts the dispatches
    from step `skip` to the last (the first step compiles and Orbax saves it), so the final save is not in it."""
    import shutil
    import tempfile

    import flax.linen as nn
    import jax
    import ml_collections
    import numpy as np

    from qwenimage_jax.data import latent_records
    from qwenimage_jax.parallel.mesh import make_mesh
    from qwenimage_jax.parallel.rules import LOGICAL_RULES
    from qwenimage_jax.training import dit as trainer
    from qwenimage_jax.training import loop
    from qwenimage_jax.training.state import abstract_state

    grid, text, batch = spec["grid"], spec["text"], spec["batch"]
    root = tempfile.mkdtemp(prefix="train_bench_loop_")
    rng = np.random.default_rng(0)
    examples = []
    for i in range(batch * 16):
        n = text - (i % 4)   # a few prompt lengths, padded to `text` by the reader
        examples.append({"latents": rng.normal(size=(grid, grid, spec["in_channels"])).astype(np.float32),
                         "text_embeds": rng.normal(size=(n, spec["context_in_dim"])).astype(np.float32),
                         "image_pad_mask": np.zeros(n, bool), "caption": ""})
    data_dir = os.path.join(root, "data")
    latent_records.write_dataset(examples, data_dir, num_shards=2)
    c = ml_collections.ConfigDict(dict(
        seed=0, model=dict(patch_size=1, mlp_ratio=3, eps=1e-6, causal_condition=True, **_model_fields(spec)),
        compute_dtype="float32", remat="none", attention="xla", batch_size=batch, grad_accum=1,
        optimizer=dict(learning_rate=1e-4, weight_decay=0.001, grad_clip_norm=1.0), ema_decay=0.999,
        flow=dict(distribution="logit_normal", mean=0.0, std=1.0, shift="tokens"), cfg_dropout=0.0,
        data=dict(path=data_dir, max_text_tokens=text, seed=0, bucket_weights=None),
        steps=steps, log_every=log_every, progress=False, on_nonfinite="stop", export=False,
        checkpoint=dict(every=10 ** 9, keep=1, async_save=True), sync_every_step=False, prefetch_batches=2))
    mesh = make_mesh(data=1, fsdp=-1, devices=jax.devices())
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(trainer.BATCH_AXES))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        _, shardings, module, tx, lr = trainer.init_state(c, mesh, jax.random.key(0))
    compiled, dispatched = {}, []

    def step_for(layout):
        if layout not in compiled:
            compiled[layout] = trainer.make_train_step(module, tx, lr, c, layout, None, shardings, mesh)
        step = compiled[layout]

        def timed(*args):
            dispatched.append(time.perf_counter())
            return step(*args, None)  # no empty-prompt embedding: the step's last argument
        return timed

    def fresh_state():
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            return trainer.init_state(c, mesh, jax.random.key(0))[0]

    out = {mode: [] for mode in LOOP_MODES}
    try:
        for r in range(rounds + 1):          # round 0 compiles and warms up, unmeasured
            for mode, keys in LOOP_MODES.items():
                config = ml_collections.ConfigDict(c.to_dict())
                config.update(keys)
                dataset = trainer.latent_dataset(config, batch, 1, 0)
                task = loop.Task("bench", fresh_state, None, latent_records.iterate(dataset), step_for,
                                 trainer.batch_layout, lambda local: trainer._global_batch(local, sharding),
                                 jax.random.key(0))
                dispatched.clear()
                workdir = os.path.join(root, f"run_{mode}_{r}")
                loop.run(task, config, workdir, mesh, LOGICAL_RULES)
                shutil.rmtree(workdir, ignore_errors=True)
                if r:
                    out[mode].append((len(dispatched) - skip) / (dispatched[-1] - dispatched[skip - 1]))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main_loop(args):
    print(f"training loop, {args.loop_steps} steps per run, log_every {args.log_every}, {args.rounds} interleaved "
          f"round(s) per mode; {os.cpu_count()} CPU(s), load average {os.getloadavg()[0]:.1f} at start")
    print("| config | old loop steps/s (per round) | new loop steps/s (per round) | new / old (medians) |")
    print("|---|---|---|---|")
    for name in args.loop_configs.split(","):
        res = loop_throughput(CONFIGS[name], args.loop_steps, args.rounds, args.log_every)
        old, new = statistics.median(res["old"]), statistics.median(res["new"])
        fmt = lambda xs: ", ".join(f"{x:.2f}" for x in xs)
        print(f"| {name} | {old:.2f} ({fmt(res['old'])}) | {new:.2f} ({fmt(res['new'])}) | {new / old:.2f}x |",
              flush=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="~1B config in bf16 on the first GPU")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="per-device dense bf16 peak for MFU")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--loop", action="store_true",
                        help="time the whole training loop, old (sync every step, no prefetch) vs new, on CPU")
    parser.add_argument("--loop-configs", default="tiny,small", help="--loop: comma-separated configs")
    parser.add_argument("--loop-steps", type=int, default=200, help="--loop: steps per run")
    parser.add_argument("--log-every", type=int, default=50, help="--loop: the loop's log_every")
    parser.add_argument("--rounds", type=int, default=2, help="--loop: measured runs per mode, interleaved")
    args = parser.parse_args()
    if args.loop:
        return main_loop(args)
    rows = []
    if args.gpu:
        spec = dict(num_layers=18, attention_head_dim=128, num_attention_heads=16, context_in_dim=4096,
                    in_channels=64, out_channels=64, axes_dims_rope=[16, 56, 56], grid=64, text=128, batch=4)
        o = ours(spec, "bfloat16", args.repeats, args.peak_tflops * 1e12, remat="full", attention="cudnn")
        rows.append(("1B @ 1024px, bf16", o, None))
        try:
            import torch
            if torch.cuda.is_available():
                rows[-1] = ("1B @ 1024px, bf16", o, torch_reference(spec, args.repeats, "cuda", "bfloat16"))
        except ImportError:
            pass
    else:
        import torch
        torch.set_num_threads(os.cpu_count() or 1)
        for name, spec in CONFIGS.items():
            rows.append((name, ours(spec, repeats=args.repeats), torch_reference(spec, args.repeats)))
    print("| config | ours step (s) | ours tokens/s | torch step (s) | torch tokens/s | speed-up | ours compile (s) |"
          + (" MFU |" if args.gpu else ""))
    print("|---|---|---|---|---|---|---|" + ("---|" if args.gpu else ""))
    for name, o, t in rows:
        ts, tt = (f"{t['step_s']:.4f}", f"{t['tokens_per_s']:.0f}") if t else ("-", "-")
        ratio = f"{t['step_s'] / o['step_s']:.2f}x" if t else "-"
        line = (f"| {name} | {o['step_s']:.4f} | {o['tokens_per_s']:.0f} | {ts} | {tt} | {ratio} | "
                f"{o['compile_s']:.1f} |")
        if args.gpu:
            line += f" {o.get('mfu', 0) * 100:.1f}% |"
        print(line)


if __name__ == "__main__":
    main()
