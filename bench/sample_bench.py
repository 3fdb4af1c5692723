"""Sampling benchmark: images/s of QwenImagePipeline (one jitted loop + jitted decode) vs diffusers'
QwenImage21Pipeline, same weights, same prompt embeddings, same noise.

    python bench/sample_bench.py              # CPU: a small (not trivial) random model; ratio after warm-up,
                                              # compile time reported separately, both sides on --threads threads
    python bench/sample_bench.py --gpu        # released shapes with random weights (7.1B DiT, f16c64 VAE) in bf16,
                                              # 1024x1024, 40 and 4 steps, batch 1 and 4: s/image and s/step,
                                              # plus diffusers on the same GPU when torch has CUDA
    python bench/sample_bench.py --gpu --dry-run   # the --gpu code path on a tiny model (checks the script on CPU)

Both sides start from prompt embeddings (the text encoder runs once per prompt and is benchmarked in
bench/text_encoder_bench.py); the timed region is the denoising loop plus the VAE decode to [0, 1] numpy.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CPU_DIT = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=4, attention_head_dim=64,
               num_attention_heads=4, context_in_dim=256, mlp_ratio=3, axes_dims_rope=(16, 24, 24), eps=1e-6,
               causal_condition=True)
CPU_VAE = dict(base_dim=16, decoder_base_dim=24, z_dim=64, dim_mult=[1, 2, 4, 4, 4], num_res_blocks=1, attn_scales=[],
               temperal_downsample=[False, True, True, True], is_residual=True, in_channels=4, out_channels=4,
               patch_size=None)


def _median(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu(args):
    import jax.numpy as jnp
    import numpy as np
    import torch

    from qwenimage_jax.sampling.pipeline import QwenImagePipeline
    from qwenimage_jax.testing.pipeline import build_reference_pipeline, reference_noise

    torch.set_num_threads(args.threads)
    size, steps, batch, text_len = args.cpu_resolution, args.cpu_steps, args.cpu_batch, 32
    with tempfile.TemporaryDirectory() as tmp:
        ref, path, _ = build_reference_pipeline(tmp, with_text_encoder=False, vae_config=CPU_VAE, dit_config=CPU_DIT)
        ours = QwenImagePipeline.from_pretrained(path, dtype=jnp.float32)
    embeds = torch.randn((batch, text_len, CPU_DIT["context_in_dim"]), generator=torch.Generator().manual_seed(0))
    latents = reference_noise(batch, size, size, CPU_DIT["in_channels"], seed=0)
    kwargs = dict(num_inference_steps=steps, height=size, width=size, output_type="np")

    def run_ref():
        with torch.no_grad():
            return ref(prompt_embeds=embeds, latents=latents.clone(), **kwargs).images

    def run_ours():
        return ours(prompt_embeds=embeds.numpy(), latents=latents.numpy(), progress=False, **kwargs).images

    start = time.perf_counter()
    got = run_ours()
    first = time.perf_counter() - start
    expected = run_ref()
    err = float(np.abs(got - expected).max() / np.abs(expected).max())
    ref_times, our_times = [], []
    for _ in range(args.repeats):  # interleaved, so both sides see the same background load
        ref_times.append(_median(run_ref, 1))
        our_times.append(_median(run_ours, 1))
    ref_s, our_s = statistics.median(ref_times), statistics.median(our_times)
    latent_kwargs = dict(kwargs, output_type="latent")

    def loop_ref():
        with torch.no_grad():
            return ref(prompt_embeds=embeds, latents=latents.clone(), **latent_kwargs).images

    def loop_ours():
        return ours(prompt_embeds=embeds.numpy(), latents=latents.numpy(), progress=False, **latent_kwargs).images

    loop_ours()
    ref_loop, our_loop = _median(loop_ref, args.repeats), _median(loop_ours, args.repeats)
    dit_params = sum(p.numel() for p in ref.transformer.parameters()) / 1e6
    vae_params = sum(p.numel() for p in ref.vae.parameters()) / 1e6
    print(f"[cpu] DiT {dit_params:.1f}M params ({CPU_DIT['num_layers']} layers, width "
          f"{CPU_DIT['num_attention_heads'] * CPU_DIT['attention_head_dim']}), VAE {vae_params:.1f}M; {size}x{size}, "
          f"{(size // 16) ** 2} image + {text_len} text tokens, {steps} steps, batch {batch}, fp32, "
          f"{args.threads} thread(s) each")
    print(f"[cpu] diffusers {batch / ref_s:.3f} img/s ({ref_s:.2f} s/call) | ours {batch / our_s:.3f} img/s "
          f"({our_s:.2f} s/call) | speed-up ours vs diffusers {ref_s / our_s:.2f}x | max rel err {err:.1e}")
    print(f"[cpu] denoising loop only: diffusers {ref_loop:.2f} s | ours {our_loop:.2f} s | speed-up "
          f"{ref_loop / our_loop:.2f}x; VAE decode: diffusers {ref_s - ref_loop:.2f} s | ours {our_s - our_loop:.2f} s")
    print(f"[cpu] ours first call (compile + run) {first:.2f} s -> compile ~{first - our_s:.2f} s; "
          f"sampler traces {ours.num_traces}")


def _released_pipeline(dry_run: bool, attention: str):
    import jax
    import jax.numpy as jnp

    from qwenimage_jax.models.dit import DiTConfig, init_transformer
    from qwenimage_jax.models.vae import init_vae
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    if dry_run:
        dit_cfg = DiTConfig(in_channels=64, out_channels=64, num_layers=2, attention_head_dim=16,
                            num_attention_heads=2, context_in_dim=4096, axes_dims_rope=(4, 6, 6),
                            dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=attention)
        vae_raw = dict(CPU_VAE, base_dim=8, decoder_base_dim=12)
    else:
        dit_cfg = DiTConfig(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, attention=attention)
        vae_raw = {}  # the class defaults = the released f16c64 VAE
    transformer = init_transformer(dit_cfg, jax.random.key(0))
    vae = init_vae(vae_raw, jax.random.key(1), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    return QwenImagePipeline(transformer, vae, None, None), dit_cfg, vae


def gpu(args):
    import jax
    import numpy as np

    print(f"[gpu] devices: {jax.devices()}")
    pipe, dit_cfg, vae = _released_pipeline(args.dry_run, args.attention)
    size = 128 if args.dry_run else args.resolution
    rng = np.random.default_rng(0)
    results = {}
    for batch in args.batches:
        embeds = rng.standard_normal((batch, args.text_tokens, dit_cfg.context_in_dim)).astype(np.float32)
        for steps in args.steps:
            def call():
                return pipe(prompt_embeds=embeds, height=size, width=size, num_inference_steps=steps, seed=0,
                            output_type="np", progress=False).images

            start = time.perf_counter()
            call()
            first = time.perf_counter() - start
            secs = _median(call, args.repeats)
            results[(batch, steps)] = secs
            print(f"[gpu] ours {size}x{size} batch {batch} steps {steps:2d}: {secs:.2f} s/call | "
                  f"{secs / batch:.3f} s/image | {secs / steps * 1e3:.1f} ms/step (incl. decode) | first call "
                  f"{first:.1f} s", flush=True)
    del pipe
    _diffusers_gpu(args, dit_cfg, size, results)


def _diffusers_gpu(args, dit_cfg, size, ours):
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print("[gpu] diffusers side skipped: torch has no CUDA here")
        return
    from diffusers import (AutoencoderKLQwenImage21, FlowMatchEulerDiscreteScheduler, QwenImage21Pipeline,
                           QwenImage21Transformer2DModel)

    from qwenimage_jax.sampling.scheduler import QWEN_IMAGE_SCHEDULER_CONFIG
    from qwenimage_jax.testing.tokenizer import build_tiny_processor, load_processor_without_torchvision

    with tempfile.TemporaryDirectory() as tmp:
        processor = load_processor_without_torchvision(build_tiny_processor(tmp))
    with torch.device("cuda"):
        transformer = QwenImage21Transformer2DModel(**{k: v for k, v in dit_cfg.to_diffusers().items()
                                                       if not k.startswith("_")}).to(torch.bfloat16).eval()
        vae = AutoencoderKLQwenImage21(**(dict(CPU_VAE, base_dim=8, decoder_base_dim=12) if args.dry_run
                                          else {})).to(torch.bfloat16).eval()
    ref = QwenImage21Pipeline(FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG), vae, None, processor,
                              transformer)
    ref.set_progress_bar_config(disable=True)
    for (batch, steps), our_s in ours.items():
        embeds = torch.randn(batch, args.text_tokens, dit_cfg.context_in_dim, device="cuda", dtype=torch.bfloat16)

        def call():
            with torch.no_grad():
                ref(prompt_embeds=embeds, height=size, width=size, num_inference_steps=steps, output_type="np")
            torch.cuda.synchronize()

        call()
        secs = _median(call, args.repeats)
        print(f"[gpu] diffusers batch {batch} steps {steps:2d}: {secs:.2f} s/call | {secs / batch:.3f} s/image | "
              f"speed-up ours vs diffusers {secs / our_s:.2f}x", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpu", action="store_true", help="released shapes, bf16, on the default accelerator")
    parser.add_argument("--dry-run", action="store_true", help="run the --gpu code path on a tiny model")
    parser.add_argument("--attention", default="cudnn", help="DiT attention backend for --gpu")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--text-tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, nargs="+", default=[40, 4])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpu-resolution", type=int, default=256)
    parser.add_argument("--cpu-steps", type=int, default=8)
    parser.add_argument("--cpu-batch", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads for both sides (1 = stable figures on a shared machine)")
    args = parser.parse_args()
    if args.gpu or args.dry_run:
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
        if args.dry_run:
            args.attention = "xla"
        gpu(args)
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        if args.threads == 1:
            os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                       + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
        cpu(args)


if __name__ == "__main__":
    main()
