"""How far swapping one attribute of a world scene moves a VAE's latents, beside how far two random scenes lie
apart: plainly, and under the partly whitening metric of `metrics.whitening.covariance_weights` (the one
`flow.whiten` / `flow.whiten_cap` put into the DiT's flow-matching loss, training/latent_metric.py), as one JSON.

    python -m qwenimage_jax.evals.latent_signal VAE_DIR OUT.json [--num 48] [--fit 256] [--alpha 1.0] [--cap 10.0]

For each attribute in ATTRIBUTES, `--num` train-split scenes (seed 7) are drawn at `--size` px and each is rendered
twice with the same rng (seed 1000 + its index): as drawn and with that attribute of its first object group (or the
scene's background) swapped to another valid value (seeded; shape and colour stay a train-split pair, the colour
stays distinct from the other groups' colours and the position from theirs); a scene where either render does not
fit is skipped. Both are encoded to the posterior mean, normalised with the VAE config's latents_mean /
latents_std, and the attribute's

    share = mean squared latent change / (2 x mean per-element variance of the originals' latents)

is reported (2 x the variance is the mean squared distance between two independent scenes, so a share of 1 moves the
latent as far as swapping the whole scene). `share_whitened` is the same ratio after every latent token is
multiplied by W = covariance_weights(per-token covariance of `--fit` fresh train scenes (seed 99), alpha, cap):
changes and variance in the same metric. Shape and colour swaps draw the same layout; size, count and position
change the placement draws, so the objects of later groups (and for size the first group's) can move too.
`spectrum` summarises that covariance's eigenvalues: the top 5 and the fraction of directions below 0.1 and 0.01 of
their mean (the directions the metric up-weights, at most by `cap`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np

from qwenimage_jax.data import world
from qwenimage_jax.metrics.whitening import covariance_weights

ATTRIBUTES = ("shape", "colour", "background", "size", "position", "count")
COUNTS = (1, 2, 3)
SCENE_SEED, RENDER_SEED, SWAP_SEED, FIT_SEED = 7, 1000, 2000, 99
SPLIT = "train"
BATCH = 16


def swap_options(scene: world.Scene, attribute: str) -> list:
    """The valid values `attribute` of `scene`'s first group (or its background) can be swapped to."""
    if attribute == "background":
        return [b for b in world.BACKGROUNDS if b != scene.background]
    first, others = scene.groups[0], scene.groups[1:]
    pairs = set(world.composition_pairs(SPLIT))
    if attribute == "shape":
        return [s for s in world.SHAPES if s != first.shape and (s, first.colour) in pairs]
    if attribute == "colour":
        taken = {g.colour for g in others} | {first.colour}
        return [c for c in world.COLOURS if c not in taken and (first.shape, c) in pairs]
    if attribute == "size":
        return [s for s in world.SIZES if s != first.size]
    if attribute == "position":
        return [p for p in world.POSITIONS if p != first.position and p not in {g.position for g in others}]
    if attribute == "count":
        return [c for c in COUNTS if c != first.count]
    raise ValueError(f"attribute {attribute!r} is not one of {ATTRIBUTES}")


def swapped(scene: world.Scene, attribute: str, rng: np.random.Generator) -> world.Scene:
    """`scene` with `attribute` of its first group (or its background) set to a random other valid value."""
    options = swap_options(scene, attribute)
    value = options[int(rng.integers(len(options)))]
    if attribute == "background":
        return dataclasses.replace(scene, background=value)
    first = dataclasses.replace(scene.groups[0], **{attribute: value})
    return dataclasses.replace(scene, groups=(first,) + scene.groups[1:])


def encode(vae, images) -> np.ndarray:
    """uint8 (N, H, W, 3) images -> float64 (N, h, w, C) posterior means, normalised with the VAE config's
    latents_mean / latents_std (fixed-size batches: one compile)."""
    images = np.asarray(images, np.float32) / 127.5 - 1.0
    out = []
    for i in range(0, len(images), BATCH):
        chunk = images[i:i + BATCH]
        padded = np.concatenate([chunk, np.zeros((BATCH - len(chunk),) + chunk.shape[1:], np.float32)])
        out.append(np.asarray(vae.encode(padded, normalize=True), np.float64)[:len(chunk)])
    return np.concatenate(out)


def render_pairs(scenes, changed, size: int):
    """(originals, changed renders, kept indices): scene i and changed[i] drawn with the same rng (seed
    RENDER_SEED + i); pairs where either does not fit are skipped."""
    first, second, kept = [], [], []
    for i, (scene, other) in enumerate(zip(scenes, changed)):
        a = world.render_scene(np.random.default_rng(RENDER_SEED + i), scene, size)
        b = world.render_scene(np.random.default_rng(RENDER_SEED + i), other, size)
        if a is None or b is None:
            continue
        first.append(a)
        second.append(b)
        kept.append(i)
    return first, second, kept


def latent_changes(vae, scenes, changed, size: int) -> np.ndarray:
    """(pairs, h, w, C) normalised-latent change from each scene to changed[i] (the pairs `render_pairs` keeps)."""
    first, second, _ = render_pairs(scenes, changed, size)
    if not first:
        raise RuntimeError("no scene pair fitted")
    return encode(vae, second) - encode(vae, first)


def per_element_variance(latents: np.ndarray, matrix=None) -> float:
    """Mean over elements of the variance across scenes of (N, h, w, C) latents (each token @ `matrix` if given)."""
    latents = latents if matrix is None else latents @ matrix
    return float(np.mean(latents.var(axis=0)))


def share(changes: np.ndarray, reference: np.ndarray, matrix=None) -> float:
    """mean squared change / (2 x mean per-element variance of `reference`), both tokens @ `matrix` if given."""
    changes = changes if matrix is None else changes @ matrix
    return float(np.mean(np.square(changes)) / (2.0 * per_element_variance(reference, matrix)))


def spectrum(eigvals: np.ndarray) -> dict:
    eigvals = np.sort(np.asarray(eigvals, np.float64))[::-1]
    mean = float(eigvals.mean())
    return {"channels": len(eigvals), "mean": mean, "top5": [float(v) for v in eigvals[:5]],
            "fraction_below_0.1_mean": float(np.mean(eigvals < 0.1 * mean)),
            "fraction_below_0.01_mean": float(np.mean(eigvals < 0.01 * mean))}


def report(vae, num: int = 48, num_fit: int = 256, alpha: float = 1.0, cap: float = 10.0, size: int = 128) -> dict:
    rng = np.random.default_rng(SCENE_SEED)
    scenes = [world.generate_scene(rng, size, SPLIT)[2] for _ in range(num)]
    originals, _, _ = render_pairs(scenes, scenes, size)
    reference = encode(vae, originals)

    fit_rng = np.random.default_rng(FIT_SEED)
    fit = encode(vae, [world.generate_scene(fit_rng, size, SPLIT)[0] for _ in range(num_fit)])
    covariance = np.cov(fit.reshape(-1, fit.shape[-1]).T)
    matrix = covariance_weights(covariance, alpha, cap)

    shares, whitened, pairs = {}, {}, {}
    for attribute in ATTRIBUTES:
        changed = [swapped(s, attribute, np.random.default_rng((SWAP_SEED, i))) for i, s in enumerate(scenes)]
        changes = latent_changes(vae, scenes, changed, size)
        shares[attribute] = share(changes, reference)
        whitened[attribute] = share(changes, reference, matrix)
        pairs[attribute] = len(changes)
    return {"share": shares, "share_whitened": whitened, "pairs": pairs,
            "latent_variance": per_element_variance(reference),
            "latent_variance_whitened": per_element_variance(reference, matrix),
            "spectrum": spectrum(np.linalg.eigvalsh(covariance)),
            "metric": dict(alpha=alpha, cap=cap),
            "scenes": dict(split=SPLIT, num=num, seed=SCENE_SEED, render_seed=RENDER_SEED, swap_seed=SWAP_SEED,
                           size=size, originals=len(originals)),
            "fit": dict(split=SPLIT, num=num_fit, seed=FIT_SEED, size=size)}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("vae", help="a VAE directory (diffusers component or our Orbax export)")
    parser.add_argument("out", help="where to write the JSON")
    parser.add_argument("--num", type=int, default=48, help="train scenes per attribute swap")
    parser.add_argument("--fit", type=int, default=256, help="train scenes the per-token covariance is fitted on")
    parser.add_argument("--alpha", type=float, default=1.0, help="metric weights (variance / mean)^-alpha")
    parser.add_argument("--cap", type=float, default=10.0, help="weights clipped to [1/cap, cap]")
    parser.add_argument("--size", type=int, default=128, help="scene size in px (the world VAE's: 128)")
    args = parser.parse_args(argv)
    from qwenimage_jax import checkpoints
    from qwenimage_jax.evals.vae_readout import write_result

    result = report(checkpoints.load("vae", args.vae), args.num, args.fit, args.alpha, args.cap, args.size)
    write_result(dict(result, vae=args.vae), args.out)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
