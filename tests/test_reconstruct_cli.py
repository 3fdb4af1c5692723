"""`qwenimage-jax reconstruct` and `demo` end to end: a tiny random diffusers VAE, bundled photos, written PNGs,
printed PSNR/SSIM checked against scikit-image on the written pixels, reconstruction checked against diffusers."""
import contextlib
import io
import re

import numpy as np
import pytest
import torch
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from qwenimage_jax import cli
from qwenimage_jax.assets import photo_paths
from qwenimage_jax.commands import demo

ROW = re.compile(r"^(\S+)\s+(\d+)x(\d+)\s+PSNR\s+([\d.]+) dB\s+SSIM\s+([\d.]+)", re.M)
MEAN = re.compile(r"^mean\s+(\d+) img\s+PSNR\s+([\d.]+) dB\s+SSIM\s+([\d.]+)", re.M)


@pytest.fixture(scope="module")
def torch_vae(tmp_path_factory):
    """Tiny seeded RGBA f16 `AutoencoderKLQwenImage21` saved with save_pretrained: (model, path)."""
    from diffusers import AutoencoderKLQwenImage21

    torch.manual_seed(0)
    z_dim = 8
    model = AutoencoderKLQwenImage21(base_dim=8, decoder_base_dim=12, z_dim=z_dim, dim_mult=[1, 2, 4, 4, 4],
                                     num_res_blocks=1, attn_scales=[], temperal_downsample=[False, True, True, True],
                                     is_residual=True, in_channels=4, out_channels=4,
                                     latents_mean=[0.0] * z_dim, latents_std=[1.0] * z_dim).eval()
    path = tmp_path_factory.mktemp("tiny_vae")
    model.save_pretrained(str(path), safe_serialization=True)
    return model, str(path)


@pytest.fixture(scope="module")
def cli_run(torch_vae, tmp_path_factory):
    """Runs `reconstruct` on two bundled photos (--size 64); returns (stdout, out dir, photo names)."""
    _, vae_path = torch_vae
    out = tmp_path_factory.mktemp("recon_out")
    names = ["chelsea", "coffee"]
    images = [str(photo_paths()[n]) for n in names]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = cli.main(["reconstruct", "--vae", vae_path, *images, "--out", str(out), "--size", "64"])
    assert code == 0
    return buffer.getvalue(), out, names


def _halves(path):
    pixels = np.asarray(Image.open(path).convert("RGB"))
    width = pixels.shape[1] // 2
    return pixels[:, :width], pixels[:, width:]


def test_writes_side_by_side_pngs_of_the_cropped_size(cli_run):
    _, out, names = cli_run
    for name in names:
        pixels = np.asarray(Image.open(out / f"{name}_recon.png"))
        # 288x432 and 320x480 photos: shorter side -> 64, longer side cropped to a multiple of 16 (96).
        assert pixels.shape == (64, 2 * 96, 3), pixels.shape


def test_printed_metrics_equal_skimage_on_written_halves(cli_run):
    stdout, out, names = cli_run
    rows = {m.group(1): m for m in ROW.finditer(stdout)}
    assert sorted(rows) == sorted(f"{n}.png" for n in names), stdout
    psnrs, ssims = [], []
    for name in names:
        original, recon = _halves(out / f"{name}_recon.png")
        ref_psnr = peak_signal_noise_ratio(original, recon, data_range=255)
        ref_ssim = structural_similarity(original, recon, gaussian_weights=True, sigma=1.5,
                                         use_sample_covariance=False, data_range=255, channel_axis=-1)
        row = rows[f"{name}.png"]
        assert (int(row.group(2)), int(row.group(3))) == original.shape[:2]
        assert abs(float(row.group(4)) - ref_psnr) <= 1e-3, (row.group(0), ref_psnr)
        assert abs(float(row.group(5)) - ref_ssim) <= 1e-4, (row.group(0), ref_ssim)
        psnrs.append(ref_psnr)
        ssims.append(ref_ssim)
    mean = MEAN.search(stdout)
    assert mean is not None, stdout
    assert int(mean.group(1)) == 2
    assert abs(float(mean.group(2)) - np.mean(psnrs)) <= 1e-3
    assert abs(float(mean.group(3)) - np.mean(ssims)) <= 1e-4


def test_reconstruction_half_matches_diffusers(torch_vae, cli_run):
    model, _ = torch_vae
    _, out, names = cli_run
    original, recon = _halves(out / f"{names[0]}_recon.png")
    rgba = np.concatenate([original.astype(np.float32) / 127.5 - 1.0, np.ones(original.shape[:2] + (1,), np.float32)],
                          axis=-1)
    with torch.no_grad():
        x = torch.from_numpy(rgba.transpose(2, 0, 1)[None, :, None])  # (1, 4, 1, H, W)
        decoded = model.decode(model.encode(x).latent_dist.mean).sample[0, :3, 0].numpy().transpose(1, 2, 0)
    expected = np.clip(np.round((decoded + 1.0) * 127.5), 0, 255)
    assert np.max(np.abs(expected - recon.astype(np.float64))) <= 1  # rounding boundary at most


def test_rejects_missing_image(torch_vae, tmp_path, capsys):
    _, vae_path = torch_vae
    assert cli.main(["reconstruct", "--vae", vae_path, str(tmp_path / "nope.png"), "--out", str(tmp_path)]) == 4
    assert "nope.png" in capsys.readouterr().err


def test_photo_demo_uses_the_shipped_world_vae_by_default(tmp_path, capsys):
    """Without --vae the photo demo reconstructs through the shipped tiny world VAE: the grid's right halves are
    diffusers' reconstructions (AutoencoderKLQwenImage21 from the same directory) of its left halves."""
    from diffusers import AutoencoderKLQwenImage21

    assert cli.main(["demo", "--out", str(tmp_path), "--size", "32", "--photos", "chelsea", "brick"]) == 0
    stdout = capsys.readouterr().out
    assert f"shipped tiny world VAE ({demo.WORLD_VAE_DIR}" in stdout and "RANDOM" not in stdout
    grid = np.asarray(Image.open(tmp_path / "reconstructions.png"))
    assert grid.shape == (64, 64, 3)
    assert len(ROW.findall(stdout)) == 2 and MEAN.search(stdout)
    model = AutoencoderKLQwenImage21.from_pretrained(str(demo.WORLD_VAE_DIR)).eval()
    for row in (grid[:32], grid[32:]):
        original, recon = row[:, :32], row[:, 32:]
        pixels = original.astype(np.float32) / 127.5 - 1.0
        if model.config.in_channels == 4:
            pixels = np.concatenate([pixels, np.ones(pixels.shape[:2] + (1,), np.float32)], axis=-1)
        with torch.no_grad():
            x = torch.from_numpy(pixels.transpose(2, 0, 1)[None, :, None])
            decoded = model.decode(model.encode(x).latent_dist.mean).sample[0, :3, 0].numpy().transpose(1, 2, 0)
        expected = np.clip(np.round((decoded + 1.0) * 127.5), 0, 255)
        assert np.max(np.abs(expected - recon.astype(np.float64))) <= 1  # rounding boundary at most


def test_photo_demo_without_a_trained_vae_says_its_vae_is_random(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(demo, "WORLD_VAE_DIR", tmp_path / "no_vae_here")
    assert cli.main(["demo", "--out", str(tmp_path), "--size", "32", "--photos", "chelsea"]) == 0
    stdout = capsys.readouterr().out
    assert "NO TRAINED VAE FOUND" in stdout and "the VAE above is RANDOM" in stdout
    assert np.asarray(Image.open(tmp_path / "reconstructions.png")).shape == (32, 64, 3)


def test_bundled_photos_are_small_attributed_rgb():
    from qwenimage_jax.assets import PHOTO_DIR, load_photo

    paths = photo_paths()
    assert 6 <= len(paths) <= 8
    attribution = (PHOTO_DIR / "ATTRIBUTION.md").read_text(encoding="utf-8")
    assert sum(p.stat().st_size for p in paths.values()) < 2 * 1024 * 1024
    for name, path in paths.items():
        assert f"`{path.name}`" in attribution, f"{path.name} has no attribution row"
        image = load_photo(name)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
        assert max(image.shape[:2]) <= 512 and image.shape[0] % 16 == 0 and image.shape[1] % 16 == 0
    assert load_photo("chelsea", (48, 80)).shape == (48, 80, 3)
    with pytest.raises(KeyError, match="no bundled photo named 'lena'"):
        load_photo("lena")
