"""Where a world text-to-image model loses an attribute: in the DiT's latents, in its late or early steps, or in
the VAE's decoder. Three judge runs on the same validation prompts, as one JSON:

    python -m qwenimage_jax.evals.shape_trace MODEL_DIR OUT.json [--num 64] [--transformer SUBFOLDER]

- `generated`: the judge on the model's own 40-step CFG-4 images (as eval-t2i);
- `generated_readout`: the judge on the linear per-cell read-out (`evals.vae.cell_readout_images`, fitted on VAE
  posterior means of train scenes) of the same generated latents. Beside `vae_readout`'s figure on the encoder's
  latents of real scenes, it says whether the DiT's latents hold the attribute at all, whatever the decoder draws;
- `from_real`: SDEdit from the VAE latents of the prompts' own ground-truth scenes, noised to each starting sigma
  of the 40-step grid's tail and denoised by the model (Euler, CFG 4). Where an attribute falls as the start
  sigma rises is the noise range in which the DiT fails to form it; at the lowest sigma it is bounded by the
  VAE's own reconstructions.
Prompts: held-out compositions of the validation seed (t2i.VALIDATION_SEED), never the reported test prompts.
"""
from __future__ import annotations

import argparse

import numpy as np

from qwenimage_jax.data import judge
from qwenimage_jax.evals import t2i
from qwenimage_jax.evals import vae as vae_evals
from qwenimage_jax.evals.vae_readout import FIT_SEED, world_images, write_result

# how many of the 40 grid steps are skipped for each SDEdit start (0: from pure noise)
SKIPPED_STEPS = (0, 8, 16, 24, 32, 36)
GRID_STEPS = 40


def _encode_means(vae, images: np.ndarray, batch: int = 32) -> np.ndarray:
    """Posterior means (N, h, w, C) of images in [-1, 1], not normalised."""
    out = [np.asarray(vae.module.apply({"params": vae.params}, images[i:i + batch], method="encode")[0])
           for i in range(0, len(images), batch)]
    means = np.concatenate(out)
    return means.reshape(means.shape[0], *means.shape[-3:])  # drop a frame axis of size 1 when the VAE has one


def _sample(pipe, prompts, size, cfg, seed, sigmas=None, latents=None, output_type="np", batch=16):
    out = []
    for start in range(0, len(prompts), batch):
        chunk = list(prompts[start:start + batch])
        embeds, mask = t2i.padded_prompt_embeds(pipe, chunk)
        neg, neg_mask = t2i.padded_prompt_embeds(pipe, [" "] * len(chunk))
        kwargs = dict(sigmas=sigmas, latents=None if latents is None else latents[start:start + batch])
        if sigmas is None:
            kwargs["num_inference_steps"] = GRID_STEPS
        out.append(np.asarray(pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, true_cfg_scale=cfg,
                                   negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask, height=size,
                                   width=size, seed=seed + start, output_type=output_type, progress=False,
                                   **kwargs).images))
    return np.concatenate(out)


def trace(pipe, num: int = 64, size: int = 128, cfg: float = 4.0, seed: int = 0, num_fit: int = 512,
          skipped_steps=SKIPPED_STEPS) -> dict:
    import jax

    from qwenimage_jax.sampling import latents as latent_utils
    from qwenimage_jax.sampling import scheduler as sched

    items = t2i.world_prompts("heldout", num, size, seed=t2i.VALIDATION_SEED)
    prompts, records = [r["caption"] for r in items], [r["record"] for r in items]
    mean = np.asarray(pipe.vae.latents_mean, np.float32).reshape(-1)
    std = np.asarray(pipe.vae.latents_std, np.float32).reshape(-1)
    result = {"num_prompts": num, "split": "heldout", "prompt_seed": t2i.VALIDATION_SEED, "cfg": cfg,
              "steps": GRID_STEPS}

    # 1. the model's own samples, through the decoder and through the linear read-out of their latents
    packed = _sample(pipe, prompts, size, cfg, seed, output_type="latent")
    latents = np.asarray(latent_utils.unpack(packed, size, size), np.float32) * std + mean
    result["generated"] = judge.evaluate(pipe.decode_latents(packed, size, size) * 2.0 - 1.0, records)
    fit = world_images("train", num_fit, size, FIT_SEED)
    readout = vae_evals.cell_readout_images(_encode_means(pipe.vae, fit), fit, latents)
    result["generated_readout"] = judge.evaluate(np.clip(readout, -1.0, 1.0), records)

    # 2. SDEdit from the ground-truth scenes' latents at rising start sigmas
    real = np.stack([r["image"] for r in items]).astype(np.float32) / 127.5 - 1.0
    clean = np.asarray(latent_utils.pack((_encode_means(pipe.vae, real) - mean) / std))
    noise = np.asarray(jax.random.normal(jax.random.key(seed + 1), clean.shape, np.float32))
    grid = np.linspace(1.0, 1.0 / GRID_STEPS, GRID_STEPS)
    result["from_real"] = []
    for skipped in skipped_steps:
        tail = [float(s) for s in grid[skipped:]]
        start = float(sched.flow_match_sigmas(None, clean.shape[1], pipe.scheduler_config, sigmas=tail)[0][0])
        images = _sample(pipe, prompts, size, cfg, seed, sigmas=tail, latents=(1.0 - start) * clean + start * noise)
        result["from_real"].append({"start_sigma": round(start, 4), "steps": len(tail),
                                    "judge": judge.evaluate(images * 2.0 - 1.0, records)})
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a world pipeline directory (e.g. qwenimage_jax/assets/tiny_world)")
    parser.add_argument("out", help="where to write the JSON")
    parser.add_argument("--transformer", default="transformer", help="transformer subfolder (teacher/transformer)")
    parser.add_argument("--num", type=int, default=64, help="validation prompts (held-out compositions)")
    args = parser.parse_args(argv)
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(args.model, transformer_subfolder=args.transformer)
    result = trace(pipe, args.num, t2i.model_size(args.model))
    result["model"] = args.model
    write_result(result, args.out)
    for row in result["from_real"]:
        print(f"from real latents at sigma {row['start_sigma']:.3f} ({row['steps']} steps): "
              + " ".join(f"{k} {row['judge'][k]:.3f}" for k in ("shape", "count", "size", "overall")))
    for name in ("generated", "generated_readout"):
        print(f"{name}: " + " ".join(f"{k} {result[name][k]:.3f}" for k in ("shape", "count", "size", "overall")))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
