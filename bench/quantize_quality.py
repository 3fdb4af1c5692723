"""Quality of weight-only quantization (checkpoints/quantize.py) against the unquantized model, per mode:

  1. seeded tiny DiT (random weights, the release's head width; qwenimage_jax/testing/quantize.py): PSNR of the
     velocity, and of the image decoded after 4 steps from the same noise and random prompt states (the shipped
     tiny world VAE decodes; the DiT has its z_dim);
  2. the shipped tiny world (trained): PSNR of the text encoder's prompt states, of the sampled images (student,
     its own 4-step grid) and the judge's accuracy on held-out world prompts (`evals.t2i`, as `eval-t2i`);
  3. bytes of the DiT and text-encoder params.

    python bench/quantize_quality.py                                  # -> docs/quantize_quality.json
    python bench/quantize_quality.py --num-prompts 16 --out /tmp/q.json   # quicker

PSNR = 10 log10(peak^2 / MSE) with the float result's peak magnitude (images: peak 1). A benchmark, not a test;
tests/test_quantize.py asserts floors below these figures.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, REPO)


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def random_dit_figures(modes) -> dict:
    """Velocity and decoded-image PSNR of the seeded tiny DiT, per mode."""
    import numpy as np

    from qwenimage_jax import checkpoints
    from qwenimage_jax.checkpoints import quantize as quant
    from qwenimage_jax.commands.demo import TINY_WORLD_DIR
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline
    from qwenimage_jax.testing.quantize import MASK, SHAPES, dit_inputs, psnr, seeded_dit

    import dataclasses

    from qwenimage_jax.testing.quantize import DIT

    vae = checkpoints.load("vae", os.path.join(TINY_WORLD_DIR, "vae"))
    # the seeded DiT reads and writes the shipped VAE's latent channels, so its samples decode with that VAE
    z_dim = int(vae.vae_config.z_dim)
    config = dataclasses.replace(DIT, in_channels=z_dim, out_channels=z_dim)
    text = np.asarray(dit_inputs(config)[1])

    def run(mode):
        transformer = quant.quantize_transformer(seeded_dit(config=config), mode)
        velocity = np.asarray(transformer(*dit_inputs(config), SHAPES, MASK).sample)
        pipe = QwenImagePipeline(transformer, vae)
        images = pipe(prompt_embeds=text, height=64, width=64, num_inference_steps=4, seed=0, output_type="np",
                      progress=False).images
        return velocity, np.asarray(images), quant.param_bytes(transformer.params)

    ref_velocity, ref_images, ref_bytes = run(None)
    out = {"config": f"qwenimage_jax/testing/quantize.py DIT (2 layers, 2 heads x 128, mlp 768), {z_dim} latent "
                     "channels (the shipped tiny world VAE's)",
           "float_param_bytes": ref_bytes["float"], "modes": {}}
    for mode in modes:
        velocity, images, sizes = run(mode)
        out["modes"][mode] = {"velocity_psnr_db": round(psnr(ref_velocity, velocity), 2),
                              "image_psnr_db": round(_image_psnr(ref_images, images), 2),
                              "param_bytes": sizes}
        print(mode, out["modes"][mode], flush=True)
    return out


def _image_psnr(reference, x) -> float:
    import numpy as np

    mse = float(np.mean((np.asarray(reference, np.float64) - np.asarray(x, np.float64)) ** 2))
    return float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))


def tiny_world_figures(modes, num_prompts: int, split: str) -> dict:
    """Text-state / image PSNR and the judge of the shipped tiny world, unquantized and per mode."""
    import numpy as np

    from qwenimage_jax.checkpoints import quantize as quant
    from qwenimage_jax.commands.demo import TINY_WORLD_DIR
    from qwenimage_jax.evals import t2i
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline
    from qwenimage_jax.testing.quantize import psnr

    model = str(TINY_WORLD_DIR)
    size = t2i.model_size(model)
    captions = [r["caption"] for r in t2i.world_prompts(split, 8, size)]
    out = {"model": "qwenimage_jax/assets/tiny_world (student, its sample_sigmas grid)", "split": split,
           "num_prompts": num_prompts, "modes": {}}
    reference = None
    for mode in ("none",) + tuple(modes):
        start = time.time()
        pipe = QwenImagePipeline.from_pretrained(model, quantize=mode)
        steps, cfg = t2i.sampling_defaults(pipe, None, None)
        states = np.asarray(pipe.text_encoder.encode_prompt(captions)[0])
        images = t2i.generate(pipe, captions, steps, size, cfg, seed=0).astype(np.float32) / 255.0
        judged = t2i.evaluate(pipe, model, split, num_prompts, steps, size, cfg)
        row = {"judge_overall": round(float(judged["generated"]["overall"]), 4),
               "judge": {k: round(float(v), 4) for k, v in judged["generated"].items()},
               "dit_param_bytes": quant.param_bytes(pipe.transformer.params),
               "text_encoder_param_bytes": quant.param_bytes(pipe.text_encoder.params),
               "seconds": round(time.time() - start, 1)}
        if reference is None:
            reference = (states, images, row["judge_overall"])
            row["judge_ground_truth"] = round(float(judged["ground_truth"]["overall"]), 4)
        else:
            row.update(text_state_psnr_db=round(psnr(reference[0], states), 2),
                       image_psnr_db=round(_image_psnr(reference[1], images), 2),
                       judge_delta=round(row["judge_overall"] - reference[2], 4))
        out["modes"][mode] = row
        print(mode, {k: v for k, v in row.items() if k != "judge"}, flush=True)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.path.join(REPO, "docs", "quantize_quality.json"))
    parser.add_argument("--modes", nargs="+", default=["int8", "fp8", "int4"])
    parser.add_argument("--num-prompts", type=int, default=64, help="held-out world prompts the judge scores")
    parser.add_argument("--split", default="heldout")
    args = parser.parse_args(argv)

    import jax
    import qwix

    from qwenimage_jax.io_utils import provenance, write_json

    start = time.time()
    result = {"command": "python bench/quantize_quality.py" + (f" --num-prompts {args.num_prompts}"
                                                                if args.num_prompts != 64 else ""),
              "commit": _git("rev-parse", "--short", "HEAD"), "worktree_dirty": bool(_git("status", "--porcelain")),
              "device": f"{jax.devices()[0].platform} x{jax.device_count()}", "jax": jax.__version__,
              "qwix": qwix.__version__,
              "random_dit": random_dit_figures(args.modes),
              "tiny_world": tiny_world_figures(args.modes, args.num_prompts, args.split),
              "provenance": provenance()}
    result["seconds"] = round(time.time() - start, 1)
    write_json(args.out, result, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
