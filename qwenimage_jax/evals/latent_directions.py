"""Which latent directions a world VAE's decoder reads each attribute from: the judge on decoded real latents after
one group of principal directions has its content replaced by fresh noise of the same variance, as one JSON.

    python -m qwenimage_jax.evals.latent_directions VAE_DIR OUT.json [--num 64] [--group 8]

Principal directions of the per-token (normalised) latent covariance, largest first, measured on train scenes
(seed 5, the seed `export_vae_diffusers` measures latent statistics on); judged on held-out scenes (seed 6, the
VAE stage's reported split). An attribute that falls when a group is replaced is drawn from that group: a DiT must
generate that group's content for the attribute to appear. `extra_noise` adds noise of each direction's own
variance on top of the content (as a sampler that stops short of sigma 0 leaves it), group by group.
"""
from __future__ import annotations

import argparse

import numpy as np

from qwenimage_jax.data import judge
from qwenimage_jax.evals.t2i import world_prompts
from qwenimage_jax.evals.vae_readout import world_images, write_result

FIT_SEED, TEST_SEED = 5, 6


def principal_directions(latents: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean (C,), eigenvalues (C,) largest first, eigenvectors (C, C) as columns) of (..., C) latents."""
    flat = latents.reshape(-1, latents.shape[-1]).astype(np.float64)
    eigvals, eigvecs = np.linalg.eigh(np.cov(flat.T))
    order = np.argsort(eigvals)[::-1]
    return flat.mean(0), eigvals[order], eigvecs[:, order]


def report(vae, num: int = 64, group: int = 8, num_fit: int = 256, size: int = 128, seed: int = 0) -> dict:
    def encode(images):
        return np.concatenate([np.asarray(vae.encode(images[i:i + 32], normalize=True))
                               for i in range(0, len(images), 32)])

    def judged(latents):
        decoded = np.concatenate([np.asarray(vae.decode(latents[i:i + 32], normalized=True))
                                  for i in range(0, len(latents), 32)])
        return {k: round(float(v), 4) for k, v in judge.evaluate(np.clip(decoded, -1, 1), records).items()}

    mean, eigvals, eigvecs = principal_directions(encode(world_images("train", num_fit, size, FIT_SEED)))
    test = encode(world_images("heldout", num, size, TEST_SEED))
    records = [item["record"] for item in world_prompts("heldout", num, size, seed=TEST_SEED)]
    coords = (test.reshape(-1, test.shape[-1]) - mean) @ eigvecs
    rng = np.random.default_rng(seed)

    def back(c):
        return (c @ eigvecs.T + mean).reshape(test.shape).astype(np.float32)

    result = {"eigenvalues": [round(float(v), 6) for v in eigvals], "group": group, "clean": judged(test),
              "replaced": [], "extra_noise": []}
    for start in range(0, len(eigvals), group):
        span = slice(start, start + group)
        std = np.sqrt(np.maximum(eigvals[span], 0.0))
        replaced = coords.copy()
        replaced[:, span] = rng.standard_normal((len(coords), std.size)) * std
        noisy = coords.copy()
        noisy[:, span] += rng.standard_normal((len(coords), std.size)) * std
        info = {"directions": [start, start + std.size], "eigenvalues": [round(float(eigvals[start]), 6),
                                                                       round(float(eigvals[span][-1]), 6)]}
        result["replaced"].append({**info, "judge": judged(back(replaced))})
        result["extra_noise"].append({**info, "judge": judged(back(noisy))})
    result.update(fit=dict(split="train", num=num_fit, seed=FIT_SEED), test=dict(split="heldout", num=num,
                                                                               seed=TEST_SEED, size=size))
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae", help="a VAE directory (diffusers component or our Orbax export)")
    parser.add_argument("out", help="where to write the JSON")
    parser.add_argument("--num", type=int, default=64, help="held-out scenes judged")
    parser.add_argument("--group", type=int, default=8, help="principal directions replaced at a time")
    args = parser.parse_args(argv)
    from qwenimage_jax import checkpoints

    result = report(checkpoints.load("vae", args.vae), args.num, args.group)
    write_result(result, args.out)
    print("clean: " + " ".join(f"{k} {v:.3f}" for k, v in result["clean"].items()))
    for row in result["replaced"]:
        lo, hi = row["directions"]
        print(f"directions {lo}-{hi - 1} replaced: " + " ".join(f"{k} {v:.3f}" for k, v in row["judge"].items()))


if __name__ == "__main__":
    main()
