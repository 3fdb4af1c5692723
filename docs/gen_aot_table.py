"""Rewrites the ahead-of-time table of docs/tpu_training.md from the JSON reports in docs/aot/.

    qwenimage-jax aot --config configs/dit_7b_train.py --topology v5p-128 --json docs/aot/dit7b_v5p-128.json
    python docs/gen_aot_table.py

Every row is one real `qwenimage-jax aot` compile (the JSON keeps the command's config and overrides); nothing is
typed by hand. Step times are predictions (FLOPs / (MFU x bf16 peak)), labelled as such.
"""
from __future__ import annotations

import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))
DOC = os.path.join(HERE, "tpu_training.md")
START, END = "<!-- aot-table:start -->", "<!-- aot-table:end -->"
ORDER = ("train-dit", "distill", "train-vae", "sample", "encode-prompt")


def _gib(b) -> str:
    return f"{b / 1024 ** 3:.1f}"


def row(r: dict) -> str:
    overrides = " ".join(r.get("overrides") or [])
    config = f"`{os.path.basename(r['config'])}`" + (f" `{overrides}`" if overrides else "")
    topo = r["topology"].split(",")[0]
    mesh = "x".join(str(v) for k, v in r["mesh"].items() if k != "context")
    if r["fits"]:
        hbm = (f"{_gib(r['total_bytes'])} ({_gib(r['argument_bytes'])} / {_gib(r['output_bytes'] - r['alias_bytes'])}"
               f" / {_gib(r['temp_bytes'])})")
        fits = f"yes ({100 * r['total_bytes'] / r['capacity_bytes']:.0f}% of {_gib(r['capacity_bytes'])})"
    else:
        need = f"needs {_gib(r['needed_bytes'])}" if r.get("needed_bytes") else "refused"
        hbm, fits = "-", f"**no**: {need} of {_gib(r['capacity_bytes'])}"
    unit = r.get("unit") or {"sample": "sampling call", "encode-prompt": "call"}.get(r["kind"], "step")
    per = "" if unit == "step" else f" per {unit}"
    flops = f"{r['flops_per_chip'] / 1e12:.1f}{per}"
    t40, t60 = r["predicted_step_s_at_40pct_mfu"], r["predicted_step_s_at_60pct_mfu"]
    return (f"| {r['kind']} | {config} | {r['description']} | {topo} ({r['chips']}) | {mesh} | {hbm} | {fits} | "
            f"{flops} | {t40:.3g} / {t60:.3g}{per} | {r['compile_s']:.0f} |")


def table(reports: list[dict]) -> str:
    reports = sorted(reports, key=lambda r: (ORDER.index(r["kind"]) if r["kind"] in ORDER else 9, r["config"],
                                             r["description"], r["chips"], r["topology"]))
    lines = [START,
             "| program | config (overrides) | what | topology (chips) | mesh data x fsdp x tensor | HBM per chip, "
             "GiB: total (args / outputs / temps) | fits | TFLOP per chip per step | **predicted** s/step at "
             "40% / 60% MFU | compile s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [row(r) for r in reports]
    lines.append(END)
    return "\n".join(lines)


def main() -> int:
    reports = []
    for path in sorted(glob.glob(os.path.join(HERE, "aot", "*.json"))):
        with open(path, encoding="utf-8") as f:
            reports.append(json.load(f))
    with open(DOC, encoding="utf-8") as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit(f"{DOC} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    text = head + table(reports) + rest.split(END, 1)[1]
    with open(DOC, "w", encoding="utf-8") as f:
        f.write(text)
    print(f"wrote {len(reports)} rows into {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
