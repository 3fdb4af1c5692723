"""Draws VAE training curves of one or more train-vae workdirs side by side into one small PNG (PIL only).

    python docs/plot_vae_curves.py --run "alignment on=/tmp/vae_tiny" --run "alignment off=/tmp/vae_tiny_noalign" \
        --out docs/images/vae_tiny_curves.png

Panels: train/l1, train/lpips, train/align_cosine (the latent-feature cosine the ablation compares) and
eval/ema_psnr with the run's eval/bicubic_baseline_psnr as a dashed line. Reads WORKDIR/metrics.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os

from PIL import Image, ImageDraw, ImageFont

PANELS = (("train/l1", "train L1"), ("train/lpips", "train LPIPS"), ("train/align_cosine", "latent-feature cosine"),
          ("eval/ema_psnr", "held-out PSNR, EMA weights (dB)"))
COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))
PANEL_W, PANEL_H, MARGIN = 330, 220, 44


def read_metrics(workdir: str) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            step = int(row.get("step", 0))
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    series.setdefault(key, []).append((step, float(value)))
    return series


def smooth(points: list[tuple[int, float]], window: int) -> list[tuple[int, float]]:
    if window <= 1 or len(points) < window:
        return points
    out = []
    for i in range(len(points)):
        chunk = points[max(0, i - window + 1):i + 1]
        out.append((points[i][0], sum(v for _, v in chunk) / len(chunk)))
    return out


def draw_panel(draw, font, box, title, curves, baseline=None):
    x0, y0 = box
    values = [v for _, pts in curves for _, v in pts] + ([baseline] if baseline is not None else [])
    steps = [s for _, pts in curves for s, _ in pts]
    if not values:
        draw.text((x0 + MARGIN, y0 + PANEL_H // 2), f"{title}: no data", fill=(0, 0, 0), font=font)
        return
    lo, hi = min(values), max(values)
    lo, hi = (lo - 0.5, hi + 0.5) if hi - lo < 1e-9 else (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    s_lo, s_hi = min(steps), max(max(steps), min(steps) + 1)
    left, top, right, bottom = x0 + MARGIN, y0 + 24, x0 + PANEL_W - 10, y0 + PANEL_H - 24

    def xy(step, value):
        return (left + (step - s_lo) / (s_hi - s_lo) * (right - left),
                bottom - (value - lo) / (hi - lo) * (bottom - top))

    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    draw.text((left, y0 + 6), title, fill=(0, 0, 0), font=font)
    for value in (lo, hi):
        draw.text((x0 + 2, xy(s_lo, value)[1] - 6), f"{value:.3g}", fill=(80, 80, 80), font=font)
    draw.text((left, bottom + 4), str(s_lo), fill=(80, 80, 80), font=font)
    draw.text((right - 30, bottom + 4), str(s_hi), fill=(80, 80, 80), font=font)
    if baseline is not None:
        y = xy(s_lo, baseline)[1]
        for x in range(int(left), int(right), 8):
            draw.line([(x, y), (min(x + 4, right), y)], fill=(0, 0, 0))
        draw.text((left + 4, y - 12), f"bicubic {baseline:.2f}", fill=(0, 0, 0), font=font)
    for colour, pts in curves:
        if len(pts) == 1:
            x, y = xy(*pts[0])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        elif pts:
            draw.line([xy(s, v) for s, v in pts], fill=colour, width=2)


def plot(runs: list[tuple[str, str]], out: str, window: int = 10, panels=PANELS) -> str:
    data = [(name, read_metrics(path)) for name, path in runs]
    font = ImageFont.load_default()
    image = Image.new("RGB", (PANEL_W * len(panels), PANEL_H + 22 * len(runs)), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    for p, (key, title) in enumerate(panels):
        curves = []
        for r, (_, series) in enumerate(data):
            pts = sorted(series.get(key, []))
            if key.startswith("eval/"):
                pts = [(s, v) for s, v in pts if s > 0]
            curves.append((COLOURS[r % len(COLOURS)], pts if key.startswith("eval/") else smooth(pts, window)))
        baseline = None
        if key == "eval/ema_psnr":
            base = [v for _, series in data for _, v in series.get("eval/bicubic_baseline_psnr", [])]
            baseline = base[0] if base and abs(base[0]) < float("inf") else None
        draw_panel(draw, font, (p * PANEL_W, 0), title, curves, baseline)
    for r, (name, _) in enumerate(data):
        y = PANEL_H + 4 + 22 * r
        draw.rectangle([MARGIN, y + 4, MARGIN + 18, y + 10], fill=COLOURS[r % len(COLOURS)])
        draw.text((MARGIN + 26, y), name, fill=(0, 0, 0), font=font)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    image.save(out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", action="append", required=True, help="NAME=WORKDIR (repeatable)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--smooth", type=int, default=10, help="moving-average window of the train curves")
    parser.add_argument("--panel", action="append", default=None,
                        help="KEY=TITLE of a metrics.jsonl series to draw instead of the default panels (repeatable), "
                             "e.g. train/salient_l1='object-pixel L1'")
    args = parser.parse_args(argv)
    panels = PANELS if not args.panel else tuple(tuple(p.partition("=")[::2]) for p in args.panel)
    runs = []
    for spec in args.run:
        name, sep, path = spec.partition("=")
        if not sep or not os.path.exists(os.path.join(path, "metrics.jsonl")):
            parser.error(f"--run {spec!r}: expected NAME=WORKDIR with WORKDIR/metrics.jsonl")
        runs.append((name, path))
    print(plot(runs, args.out, args.smooth, panels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
