"""Does a world DiT take each attribute from the prompt? The swapped-prompt test: the flow-matching loss on world
scenes with the true caption, and with one attribute of the caption changed (background, colour, shape, count,
size or position of the first group; `text_probe`'s one-word swaps), from the same noise at the same noise levels.
A DiT that reads the attribute predicts worse from the wrong caption: gap = loss(swapped) - loss(true) > 0; a DiT
that ignores it gives 0.

    from qwenimage_jax.evals import conditioning
    gaps = conditioning.prompt_gaps(transformer, vae, text_encoder, num=64)   # {attribute: gap}

    python -m qwenimage_jax.evals.conditioning MODEL_DIR OUT.json [--sigmas 0.1 0.3 0.5 0.7 0.9] [--num 64]

The command writes the gaps at each noise level alone, relative to the true caption's loss there: where in the
noise range the DiT reads each attribute (held-out compositions, scene seed 11, not the reported test prompts).
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.evals import text_probe

SIGMAS = (0.5, 0.8, 0.95)   # noise levels the loss is averaged over (fixed, so gaps compare across models)
TEXT_TOKENS = 64            # the padded prompt length the world DiT trains on (configs/world_dit.py)


def scene_batch(num: int, split: str, seed: int, size: int):
    """`num` rendered world scenes: (images uint8 (N, size, size, 3), Scenes, phrasing seeds)."""
    from qwenimage_jax.data import world

    rng = np.random.default_rng([seed, 733])
    images, scenes = [], []
    while len(scenes) < num:
        scene = text_probe.sample_scenes(1, split, int(rng.integers(1 << 31)))[0]
        image = world.render_scene(rng, scene, size)
        if image is not None:
            images.append(image)
            scenes.append(scene)
    return np.stack(images), scenes, [int(s) for s in rng.integers(1 << 31, size=num)]


def prompt_states(text_encoder, captions: list[str], length: int = TEXT_TOKENS):
    """Text states right-padded to `length` tokens with their mask, as cache-latents + the DiT trainer lay them out."""
    from qwenimage_jax.evals.t2i import pad_states

    embeds, mask, _ = text_encoder.encode_prompt(list(captions), pad_to_multiple=length)
    return pad_states(embeds, mask, length)


def flow_losses(transformer, latents, text, text_mask, seed: int = 0, sigmas=SIGMAS, batch_size: int = 32):
    """Per-example flow-matching loss (N,) of `transformer` (a loaded Component: .module, .params) on normalised
    `latents` (N, h, w, C), averaged over `sigmas`, from noise seeded by `seed`."""
    module = transformer.module
    n, h, w, c = latents.shape
    img_shapes = ((1, h, w),)
    img_mask = (False,) * text.shape[1] + (True,) * (h * w // 4)

    @jax.jit
    def losses(params, x0, enc, enc_mask, noise, sigma):
        s = jnp.full((x0.shape[0],), sigma, jnp.float32)
        x_t = ((1 - sigma) * x0 + sigma * noise).reshape(x0.shape[0], h * w, c)
        pred = module.apply({"params": params}, x_t, enc, s, img_shapes, img_mask, encoder_hidden_states_mask=enc_mask)
        target = (noise - x0).reshape(x0.shape[0], h * w, c)
        return jnp.mean((pred[:, -h * w:].astype(jnp.float32) - target) ** 2, axis=(1, 2))

    noise = np.asarray(jax.random.normal(jax.random.PRNGKey(seed), latents.shape, jnp.float32))
    total = np.zeros((n,), np.float64)
    for sigma in sigmas:
        for start in range(0, n, batch_size):
            sl = slice(start, start + batch_size)
            total[sl] += np.asarray(losses(transformer.params, jnp.asarray(latents[sl]), jnp.asarray(text[sl]),
                                           jnp.asarray(text_mask[sl]), jnp.asarray(noise[sl]), float(sigma)))
    return total / len(sigmas)


def prompt_gaps(transformer, vae, text_encoder, num: int = 64, split: str = "heldout", seed: int = 5,
                size: int = 128, sigmas=SIGMAS) -> dict[str, float]:
    """{"loss": loss with the true captions, attribute: mean loss(swapped) - loss(true)} on `num` scenes."""
    from qwenimage_jax.data import world

    images, scenes, phrase_seeds = scene_batch(num, split, seed, size)
    latents = np.concatenate([np.asarray(vae.encode(images[i:i + 16].astype(np.float32) / 127.5 - 1.0,
                                                    normalize=True)) for i in range(0, num, 16)])
    captions = [world.rich_caption(s, np.random.default_rng(p)) for s, p in zip(scenes, phrase_seeds)]
    base = flow_losses(transformer, latents, *prompt_states(text_encoder, captions), seed=seed, sigmas=sigmas)
    result = {"loss": float(base.mean())}
    rng = np.random.default_rng([seed, 1])
    for field in text_probe.ATTRIBUTES:
        rows, swapped = [], []
        for i, (scene, p) in enumerate(zip(scenes, phrase_seeds)):
            other = text_probe._swap(scene, field, rng)
            if other is not None:
                rows.append(i)
                swapped.append(world.rich_caption(other, np.random.default_rng(p)))
        rows = np.asarray(rows)
        loss = flow_losses(transformer, latents[rows], *prompt_states(text_encoder, swapped), seed=seed,
                           sigmas=sigmas)
        # the same noise rows as the base run: flow_losses seeds the whole batch, so recompute base on the subset
        ref = flow_losses(transformer, latents[rows], *prompt_states(text_encoder, [captions[i] for i in rows]),
                          seed=seed, sigmas=sigmas)
        result[field] = float((loss - ref).mean())
    return result


def gaps_by_sigma(transformer, vae, text_encoder, sigmas, num: int = 64, seed: int = 11) -> dict:
    """{sigma: {"loss": loss with the true captions, attribute: gap / loss}} at each noise level alone."""
    out = {}
    for sigma in sigmas:
        gaps = prompt_gaps(transformer, vae, text_encoder, num=num, split="heldout", seed=seed, sigmas=(sigma,))
        out[f"{sigma:g}"] = {k: round(v if k == "loss" else v / gaps["loss"], 4) for k, v in gaps.items()}
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a world pipeline directory (vae/, text_encoder/, transformer/)")
    parser.add_argument("out", help="where to write the JSON")
    parser.add_argument("--transformer", default="transformer", help="transformer subfolder (default transformer)")
    parser.add_argument("--sigmas", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--num", type=int, default=64, help="held-out scenes")
    args = parser.parse_args(argv)
    import os

    from qwenimage_jax import checkpoints
    from qwenimage_jax.evals.vae_readout import write_result

    parts = {k: checkpoints.load(k, os.path.join(args.model, sub)) for k, sub in
             (("vae", "vae"), ("text_encoder", "text_encoder"), ("transformer", args.transformer))}
    result = {"relative_gaps": gaps_by_sigma(parts["transformer"], parts["vae"], parts["text_encoder"],
                                             args.sigmas, args.num),
              "model": args.model, "transformer": args.transformer, "num": args.num, "scene_seed": 11}
    write_result(result, args.out)
    for sigma, row in result["relative_gaps"].items():
        print(f"sigma {sigma}: " + " ".join(f"{k} {v:.3f}" for k, v in row.items()))


if __name__ == "__main__":
    main()
