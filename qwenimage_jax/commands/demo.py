"""`qwenimage-jax demo [--out out/demo]`: the bundled photos through a VAE, as a side-by-side grid + PSNR/SSIM.

The VAE is, in order: `--vae PATH`; the bundled `qwenimage_jax/assets/tiny_vae/` if the package ships one; else a
randomly initialised tiny VAE (f16, RGBA, like the released shape but ~0.6 M params), announced loudly: no trained
VAE is shipped yet, so its figures only show that the pipeline runs. Later milestones turn this into text-to-image.
Writes `OUT/reconstructions.png` (rows: photos; columns: original | reconstruction) and prints the metrics.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DEFAULT_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
TINY_VAE_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny_vae"

RANDOM_VAE_BANNER = """\
################################################################################################
#  NO TRAINED VAE IS SHIPPED YET: using a RANDOMLY INITIALISED tiny VAE (seed 0).              #
#  Its reconstructions are not images of the input and its PSNR/SSIM are NOT quality figures;  #
#  they only show that load -> encode -> decode -> metrics runs end to end.                    #
#  Pass --vae PATH (a diffusers AutoencoderKLQwenImage21 dir or a converted one) for real ones. #
################################################################################################"""


def add_arguments(parser):
    parser.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    parser.add_argument("--vae", default=None, help="VAE directory; default: bundled tiny VAE, else a random one")
    parser.add_argument("--size", type=int, default=256, help="square crop size of each photo (multiple of 16)")
    parser.add_argument("--photos", nargs="+", default=list(DEFAULT_PHOTOS),
                        help=f"bundled photo names (default: {' '.join(DEFAULT_PHOTOS)})")


def random_tiny_vae(seed: int = 0):
    """A seeded random f16 RGBA VAE with the released block structure at a tiny width (~0.6 M params).

    Weights are drawn in numpy from the abstract params (kernels uniform in +-1/sqrt(fan_in), biases 0, norm gains
    1), which avoids compiling the module's init (minutes on 2 CPU cores).
    """
    import flax
    import jax.numpy as jnp

    from qwenimage_jax.models.vae import VAE, QwenImageVAE, VAEConfig, abstract_params

    z_dim = 8
    config = VAEConfig(base_dim=8, decoder_base_dim=12, z_dim=z_dim, dim_mult=(1, 2, 4, 4, 4), num_res_blocks=1,
                       temperal_downsample=(False, True, True, True), in_channels=4, out_channels=4,
                       latents_mean=(0.0,) * z_dim, latents_std=(1.0,) * z_dim)
    rng = np.random.default_rng(seed)
    flat = flax.traverse_util.flatten_dict(flax.linen.meta.unbox(abstract_params(config)))
    params = {}
    for path in sorted(flat):
        shape = flat[path].shape
        if path[-1] == "kernel":
            limit = 1.0 / np.sqrt(np.prod(shape[:-1]))
            params[path] = jnp.asarray(rng.uniform(-limit, limit, shape), jnp.float32)
        elif path[-1] == "bias":
            params[path] = jnp.zeros(shape, jnp.float32)
        else:  # RMS-norm gains
            params[path] = jnp.ones(shape, jnp.float32)
    return VAE(QwenImageVAE(config), flax.traverse_util.unflatten_dict(params), config.to_diffusers())


def run(args):
    from PIL import Image
    from tqdm import tqdm

    from qwenimage_jax.assets import load_photo, photo_names
    from qwenimage_jax.commands.reconstruct import format_mean, format_row, image_metrics, reconstruct
    from qwenimage_jax.models.vae import load_vae

    if args.size % 16 or args.size <= 0:
        raise SystemExit(f"qwenimage-jax demo: --size {args.size} is not a positive multiple of 16; "
                         f"use {max(16, args.size // 16 * 16)} or {args.size // 16 * 16 + 16}")
    unknown = sorted(set(args.photos) - set(photo_names()))
    if unknown:
        raise SystemExit(f"qwenimage-jax demo: unknown photo(s) {', '.join(unknown)}; "
                         f"bundled: {', '.join(photo_names())}")
    if args.vae is not None:
        vae, source = load_vae(args.vae), args.vae
    elif TINY_VAE_DIR.is_dir():
        vae, source = load_vae(str(TINY_VAE_DIR)), f"bundled tiny VAE ({TINY_VAE_DIR})"
    else:
        print(RANDOM_VAE_BANNER, flush=True)
        vae, source = random_tiny_vae(), "random tiny VAE (untrained, seed 0)"
    if args.size % vae.spatial_compression:
        raise SystemExit(f"qwenimage-jax demo: --size {args.size} is not a multiple of the VAE's compression "
                         f"{vae.spatial_compression}")
    print(f"VAE: {source}; {len(args.photos)} photos at {args.size}x{args.size}")

    rows, lines, grid_rows = [], [], []
    for name in tqdm(args.photos, desc="demo", unit="img"):
        original = load_photo(name, args.size)
        recon = reconstruct(vae, original[None])[0]
        metrics = image_metrics(original, recon)
        rows.append(metrics)
        lines.append(format_row(name, original.shape, metrics))
        grid_rows.append(np.concatenate([original, recon], axis=1))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / "reconstructions.png"
    Image.fromarray(np.concatenate(grid_rows, axis=0)).save(target)
    print("\n".join(lines))
    print(format_mean(rows))
    print(f"wrote {target} (rows: {', '.join(args.photos)}; columns: original | reconstruction)")
    if args.vae is None and not TINY_VAE_DIR.is_dir():
        print("reminder: the VAE above is RANDOM (no trained VAE shipped yet); the figures are not quality figures.")
    return 0
