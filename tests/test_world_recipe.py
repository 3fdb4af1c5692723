"""The small world's recipe (`python -m qwenimage_jax.recipes.world`) end to end in its smoke configuration: every
stage (text, both arms of the alignment ablation through vae / cache / dit, the ablation's judge runs, DMD
distillation, assemble, figures) runs with tiny models in seconds and leaves a loadable pipeline directory."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest

from qwenimage_jax.recipes import world
from qwenimage_jax.recipes.world import ship, stages


def test_every_stage_runs_in_the_smoke_configuration(tmp_path):
    workdir, out = tmp_path / "work", tmp_path / "model"
    assert world.main(["--workdir", str(workdir), "--out", str(out), "--config-arg", "smoke"]) == 0
    times = json.load(open(workdir / "times.json"))
    for stage in ("text", "text_check", "vae_encoder", "vae", "vae_decoder", "vae_noalign", "vae_decoder_noalign",
                  "vae_palette", "cache", "cache_noalign", "dit_ablation", "dit", "dit_cooldown", "dit_ablation_noalign", "ablation", "distill_pairs", "distill_2",
                  "distill_1", "figures"):
        assert stage in times and times[stage]["seconds"] > 0, stage
        assert times[stage]["commit"] == times["provenance"]["commit"], stage  # one run wrote every stage
    # both VAE arms were judged on held-out reconstructions, both teachers on generated images
    for arm in ("vae", "vae_noalign"):
        attributes = times[arm]["heldout_judge_attributes"]
        assert set(attributes) >= {"colour", "shape", "count", "position", "size"}
        assert 3.0 < times[arm]["heldout_psnr"] < 60.0, times[arm]  # finite and in dB (not a 0-1 MSE, not NaN)
    # the palette phase ran its cycles (the shipped arm only), each from the previous one's export
    assert times["vae_palette"]["trained_steps"] == 4 and "vae_palette_noalign" not in times
    assert sorted(os.listdir(workdir / "vae_palette")) == ["cycle_0", "cycle_1"]
    ablation = json.load(open(workdir / "ablation.json"))
    assert set(ablation) == {"align", "noalign", "provenance"} and "dit_noalign" not in times  # only the shipped arm goes on
    assert ablation["provenance"]["commit"] and ablation["provenance"]["versions"]["jax"]
    for arm in ("align", "noalign"):
        assert ablation[arm]["teacher_40_heldout"]["ground_truth"]["overall"] >= 0.9
    # the shipped directory: student as the default transformer, teacher beside it, the world size recorded
    index = json.load(open(out / "model_index.json"))
    # the shipped student is one of the two distilled (2 and 1 steps), chosen on the validation judge
    assert index["_class_name"] == "QwenImage21Pipeline"
    assert len(index["sample_sigmas"]) == stages.shipped_student(str(workdir)) in (1, 2)
    # the teacher is judged once, on the same validation prompts, as the bar for both students
    assert times["distill_1"]["teacher_40_validation_judge"] == times["distill_2"]["teacher_40_validation_judge"]
    assert json.load(open(out / "world.json")) == {"image_size": 64}
    for name in ("transformer", "teacher/transformer", "vae", "text_encoder", "processor", "expander"):
        assert os.path.isdir(out / name), name
    figures = json.load(open(out / "figures.json"))
    assert {"heldout_teacher_40", "heldout_teacher_1", "heldout_student_2", "heldout_student_1"} <= set(figures)
    assert figures["heldout_student_1"]["mask_sliced_w2_to_teacher_40"] >= 0.0
    assert "## Figures" in open(out / "README.md").read()

    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(str(out))
    image = pipe("one red circle on the left", height=64, width=64, seed=0, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_a_snapshot_lets_another_machine_continue_the_teacher(tmp_path, monkeypatch):
    """The smoke recipe to its stable DiT phase with --snapshot, then on a fresh workdir (another machine: only
    the snapshot) `--resume-from` + more stable steps: the phase continues from the exported weights, its steps
    counted on (2 -> 4), then cools down; the loss curve joins both runs."""
    first, snap, second = tmp_path / "first", tmp_path / "snap", tmp_path / "second"
    args = ["--config-arg", "smoke", "--stage", "text", "--stage", "vae", "--stage", "cache", "--stage", "dit"]
    assert world.main(["--workdir", str(first), "--snapshot", str(snap)] + args) == 0
    assert json.load(open(snap / "transformer_base" / stages.TRAINED_FILE))["steps"] == 2
    assert not (snap / "latents").exists() and (snap / "dit" / "metrics.jsonl").exists()
    config = stages._config

    def more_steps(name, arg=None):
        c = config(name, arg)
        if name == "world_dit":
            c.steps = 4
        return c

    monkeypatch.setattr(stages, "_config", more_steps)
    assert world.main(["--workdir", str(second), "--resume-from", str(snap)] + args) == 0
    assert json.load(open(second / "stable_run.json"))["offset"] == 2
    assert json.load(open(second / "transformer_base" / stages.TRAINED_FILE))["steps"] == 4
    assert json.load(open(second / "transformer" / stages.TRAINED_FILE)) == {"steps": 5, "base_step": 4}
    curve = json.load(open(ship.write_loss_curve(str(second), str(second))))
    assert [s for s, _ in curve["stable"]] == [1, 2, 3, 4] and [s for s, _ in curve["cooldown"]] == [5]
    # each record says what this call trained: 2 more stable steps; a call that only resumed a finished run and
    # exported logs no loss, and its record says so (None) instead of the mean of no losses (0.0)
    dit = json.load(open(second / "times.json"))["dit"]
    assert dit["trained_steps"] == 2 and dit["final_step"] == 4 and dit["final_loss"] > 0
    assert stages._last_loss({"losses": {}}) is None


def test_a_snapshot_points_at_the_shipped_vae_instead_of_copying_it(tmp_path):
    """world_build keeps no second copy of the shipped VAE: `snapshot` writes vae_diffusers.shipped.json (path and
    digest) when the workdir's VAE is the shipped one byte for byte, `resume_from` restores the same bytes, and a
    pointer whose digest no longer matches the shipped VAE is one clear error."""
    import shutil

    from qwenimage_jax.recipes.world import snapshots

    workdir, snap, again = tmp_path / "work", tmp_path / "snap", tmp_path / "again"
    shutil.copytree(os.path.join(snapshots.SHIPPED_DIR, "vae"), workdir / "vae_diffusers")
    snapshots.snapshot(str(workdir), str(snap))
    assert not (snap / "vae_diffusers").exists()
    pointer = json.load(open(snap / "vae_diffusers.shipped.json"))
    assert pointer["same_as"] == os.path.join("qwenimage_jax", "assets", "tiny_world", "vae")
    snapshots.resume_from(str(snap), str(again))
    assert snapshots._digest(str(again / "vae_diffusers")) == pointer["sha256"]
    pointer["sha256"] = "0" * 64
    json.dump(pointer, open(snap / "vae_diffusers.shipped.json", "w"))
    with pytest.raises(ValueError, match="no longer the snapshot's vae_diffusers"):
        snapshots.resume_from(str(snap), str(tmp_path / "third"))
