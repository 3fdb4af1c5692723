"""The small world's recipe (`python -m qwenimage_jax.world_assets`) end to end in its smoke configuration: every
stage (text, both arms of the alignment ablation through vae / cache / dit, the ablation's judge runs, DMD
distillation, assemble, figures) runs with tiny models in seconds and leaves a loadable pipeline directory."""
from __future__ import annotations

import json
import os

import numpy as np

from qwenimage_jax import world_assets


def test_every_stage_runs_in_the_smoke_configuration(tmp_path):
    workdir, out = tmp_path / "work", tmp_path / "model"
    assert world_assets.main(["--workdir", str(workdir), "--out", str(out), "--config-arg", "smoke"]) == 0
    times = json.load(open(workdir / "times.json"))
    for stage in ("text", "vae", "vae_noalign", "cache", "cache_noalign", "dit_ablation", "dit", "dit_high_noise",
                  "dit_ablation_noalign", "ablation", "distill", "figures"):
        assert stage in times and times[stage]["seconds"] >= 0, stage
    # both VAE arms were judged on held-out reconstructions, both teachers on generated images
    for arm in ("vae", "vae_noalign"):
        assert 0.0 <= times[arm]["heldout_judge_on_reconstructions"] <= 1.0
        assert set(times[arm]["heldout_judge_attributes"]) >= {"colour", "shape", "count", "position", "size"}
    ablation = json.load(open(workdir / "ablation.json"))
    assert set(ablation) == {"align", "noalign"} and "dit_noalign" not in times  # only the shipped arm goes on
    for entry in ablation.values():
        assert entry["teacher_40_heldout"]["ground_truth"]["overall"] >= 0.9
    # the shipped directory: student as the default transformer, teacher beside it, the world size recorded
    index = json.load(open(out / "model_index.json"))
    assert index["_class_name"] == "QwenImage21Pipeline" and len(index["sample_sigmas"]) == 4
    assert json.load(open(out / "world.json")) == {"image_size": 64}
    for name in ("transformer", "teacher/transformer", "vae", "text_encoder", "processor", "expander"):
        assert os.path.isdir(out / name), name
    figures = json.load(open(out / "figures.json"))
    assert {"heldout_teacher_40", "heldout_teacher_4", "heldout_student_4"} <= set(figures)
    assert "## Figures" in open(out / "README.md").read()

    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(out))
    image = pipe("one red circle on the left", height=64, width=64, seed=0, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
