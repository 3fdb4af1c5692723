"""What a world VAE's latents hold, whatever its decoder draws: `evals.vae.cell_readout_mse` of its posterior means
beside the references (block means, per-cell PCA with as many floats as the latent), as one JSON.

    python -m qwenimage_jax.evals.vae_readout VAE_DIR OUT.json [--fit 512] [--test 32]

The read-out is fitted on train-split scenes (seed 11) and scored on held-out-composition scenes (seed 7), the sets
configs/world_vae.py logs as eval/cell_readout_mse. A latent that keeps no more than each cell's mean colour reads
out at about `ref_block_mean_cell`; the judge reads shapes from 4 px block means (`ref_block_mean_4px`).
`judge_on_readout` (the world judge on the read-out's images) beside `judge_on_reconstructions` (on the decoder's)
tells which half of the VAE loses an attribute: what the first keeps and the second does not, the decoder drops.
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from qwenimage_jax.data import judge
from qwenimage_jax.evals import vae as vae_evals
from qwenimage_jax.evals.t2i import world_prompts

FIT_SEED, TEST_SEED = 11, 7


def world_images(split: str, num: int, size: int, seed: int) -> np.ndarray:
    return np.stack([r["image"] for r in world_prompts(split, num, size, seed=seed)]).astype(np.float32) / 127.5 - 1.0


def report(vae, num_fit: int = 512, num_test: int = 32, size: int = 128) -> dict:
    fit = world_images("train", num_fit, size, FIT_SEED)
    test = world_images("heldout", num_test, size, TEST_SEED)

    def means(images):
        return np.concatenate([np.asarray(vae.module.apply({"params": vae.params}, images[i:i + 32],
                                                           method="encode")[0]) for i in range(0, len(images), 32)])
    fit_latents, test_latents = means(fit), means(test)
    r = size // test_latents.shape[1]
    readout = vae_evals.cell_readout_images(fit_latents, fit, test_latents)
    recons = np.concatenate([np.asarray(vae.module.apply({"params": vae.params}, test_latents[i:i + 32],
                                                         method="decode")) for i in range(0, len(test), 32)])
    records = [item["record"] for item in world_prompts("heldout", num_test, size, seed=TEST_SEED)]
    return {"cell_readout_mse": float(np.mean((readout - test) ** 2)),
            **vae_evals.readout_references(fit, test, r, vae.vae_config.z_dim),
            "judge_on_readout": judge.evaluate(np.clip(readout, -1, 1), records),
            "judge_on_reconstructions": judge.evaluate(np.clip(recons, -1, 1), records),
            "fit": dict(split="train", num=num_fit, seed=FIT_SEED, size=size),
            "test": dict(split="heldout", num=num_test, seed=TEST_SEED, size=size)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae", help="a VAE directory (diffusers component or our Orbax export)")
    parser.add_argument("out", help="where to write the JSON")
    parser.add_argument("--fit", type=int, default=512, help="train scenes the read-out is fitted on")
    parser.add_argument("--test", type=int, default=32, help="held-out scenes it is scored on")
    args = parser.parse_args(argv)
    from qwenimage_jax import checkpoints

    result = report(checkpoints.load("vae", args.vae), args.fit, args.test)
    write_result(dict(result, vae=args.vae), args.out)
    print(json.dumps(result, indent=1))


def write_result(result: dict, out: str) -> None:
    """`result` + the checkout's commit (so a reader can tell a stale figure) and the rest of its provenance
    (versions, machine, command) -> OUT as JSON, written atomically."""
    from qwenimage_jax.io_utils import provenance, write_json

    result["provenance"] = provenance()
    result["commit"] = result["provenance"]["commit"]
    write_json(out, result, indent=1)


if __name__ == "__main__":
    main()
