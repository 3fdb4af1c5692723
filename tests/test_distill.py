"""DMD trainer on the tiny DiT: student and fake start as the teacher (read from an exported diffusers dir), one
step sharded over (fsdp=4, tensor=2) equals the single-device step, the student trains on the pipeline's own
4-step grid, interrupt + resume reproduces the losses, the CLI runs, and the export is a pipeline dir."""
import json
import os

import jax
import numpy as np
import pytest

from qwenimage_jax import cli
from qwenimage_jax.config_cli import load_config
from qwenimage_jax.checkpoints.exporters import export_transformer
from qwenimage_jax.checkpoints.pipeline_dir import read_sample_sigmas
from qwenimage_jax.data import latent_records
from qwenimage_jax.checkpoints import load_transformer
from qwenimage_jax.models.dit import DiTConfig, init_transformer
from qwenimage_jax.parallel.mesh import make_mesh
from qwenimage_jax.sampling import scheduler as sched
from qwenimage_jax.training import distill as dt
from tests.dit_train_fixtures import write

CONFIG_PATH = os.path.join(os.path.dirname(__file__), "..", "configs", "distill_tiny.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    data = write(tmp_path_factory.mktemp("latents"), n=32)
    teacher = init_transformer(dict(load_config(CONFIG_PATH, []).model), jax.random.key(7))
    teacher_dir = str(tmp_path_factory.mktemp("teacher") / "transformer")
    export_transformer(teacher.params, teacher.dit_config, teacher_dir)
    overrides = [f"--config.teacher={teacher_dir}", f"--config.data.path={data}", "--config.data.max_text_tokens=12",
                 "--config.batch_size=4", "--config.fake.updates=2", "--config.dmd.real_cfg_scale=2.0",
                 "--config.regression.weight=0.5", "--config.regression.teacher_steps=4", "--config.log_every=1",
                 "--config.progress=False", "--config.checkpoint.every=2", "--config.checkpoint.async_save=False",
                 "--config.optimizer.learning_rate=1e-3",
                 "--config.fake.optimizer.learning_rate=1e-3", "--config.mesh.data=1",
                 # Adam's first step is lr * g / (|g| + eps): with eps = 1e-8 it turns float rounding of near-zero
                 # gradient entries into lr-sized sign flips; eps = 1e-3 keeps the update a smooth function of the
                 # gradient, so comparing parameters compares the sharded computation.
                 "--config.optimizer.eps=1e-3", "--config.fake.optimizer.eps=1e-3"]
    return data, teacher, overrides


def _config(overrides, *extra):
    return load_config(CONFIG_PATH, list(overrides) + list(extra))


def _one_step(config, mesh, batch_np):
    _, _, teacher_shardings = dt.distill_shardings(config, mesh)
    teacher = dt.load_teacher(config, mesh, teacher_shardings)
    state = dt.init_from_teacher(config, mesh, teacher)
    step = dt.make_distill_step(config, dt.batch_layout(batch_np), mesh)
    with jax.set_mesh(mesh):
        batch = dt._global_batch(batch_np, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(dt.BATCH_AXES)))
        state, metrics = step(state, teacher, batch, dt.null_text_for(config), jax.random.key(3))
    return jax.device_get(state), jax.device_get(metrics), state, teacher


def test_sharded_step_matches_single_device_and_starts_from_teacher(setup):
    data, teacher, overrides = setup
    config = _config(overrides)
    batch_np = next(latent_records.iterate(latent_records.bucketed_batches(data, 4, max_text_tokens=12)))

    # before any step: student, EMA and fake are the teacher
    mesh1 = make_mesh(data=1, devices=jax.devices()[:1])
    _, _, t_shard = dt.distill_shardings(config, mesh1)
    init = dt.init_from_teacher(config, mesh1, dt.load_teacher(config, mesh1, t_shard))
    for tree in (init.student.params, init.student.ema_params, init.fake.params):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(teacher.params)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    ref, ref_metrics, _, _ = _one_step(config, mesh1, batch_np)
    got, metrics, state, teacher_sharded = _one_step(config, make_mesh(data=1, fsdp=4, tensor=2), batch_np)
    for name in ("loss", "dmd_loss", "fake_loss", "regression_loss", "grad_norm", "fake_grad_norm"):
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=1e-5, err_msg=name)
    assert ref_metrics["dmd_loss"] > 0 and ref_metrics["regression_loss"] > 0 and ref_metrics["fake_loss"] > 0
    for tree, ref_tree in ((got.student.params, ref.student.params), (got.fake.params, ref.fake.params),
                           (got.student.ema_params, ref.student.ema_params)):
        for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(ref_tree)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    # all three networks carry the same rule-derived shardings (fsdp on embed, tensor on mlp)
    for params in (state.student.params, state.fake.params, teacher_sharded):
        spec = str(params["blocks"]["mlp"]["proj"]["kernel"].sharding.spec)
        assert "tensor" in spec and "fsdp" in spec, spec
    # the step changed student and fake, not the teacher
    delta = lambda a, b: max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))  # noqa: E731
                             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    assert delta(ref.student.params, teacher.params) > 0 and delta(ref.fake.params, teacher.params) > 0
    assert delta(teacher_sharded, teacher.params) == 0


def test_student_grid_is_the_pipelines_grid(setup):
    _, _, overrides = setup
    config = _config(overrides)
    sigmas, model_t = dt.student_grid(config, 16)
    want, want_t = sched.flow_match_sigmas(None, 16, sched.QWEN_IMAGE_SCHEDULER_CONFIG, sigmas=[1, .75, .5, .25])
    np.testing.assert_array_equal(sigmas, want)
    np.testing.assert_array_equal(model_t, sched.model_timesteps(want_t))
    assert len(sigmas) == 5 and sigmas[-1] == 0 and sigmas[0] == 1
    assert dt.student_sample_sigmas(_config(overrides, "--config.student.num_steps=2")) == [1.0, 0.5]


def test_interrupt_and_resume_reproduces_losses_then_exports(setup, tmp_path):
    _, teacher, overrides = setup
    full = dt.distill(_config(overrides, "--config.steps=4"), str(tmp_path / "full"))
    part = dt.distill(_config(overrides, "--config.steps=2"), str(tmp_path / "part"))
    assert sorted(part["losses"]) == [1, 2] and part["export_dir"] is not None
    resumed = dt.distill(_config(overrides, "--config.steps=4"), str(tmp_path / "part"))
    assert sorted(resumed["losses"]) == [3, 4], "resume must continue at step 3"
    for s in (3, 4):
        for name in ("loss", "dmd_loss", "fake_loss", "regression_loss"):
            assert resumed["metrics"][s][name] == pytest.approx(full["metrics"][s][name], rel=1e-6, abs=1e-9), \
                (s, name)
    # the exported student: EMA params in the reference format, 4-step grid in model_index.json
    export = full["export_dir"]
    assert read_sample_sigmas(export) == [1.0, 0.75, 0.5, 0.25]
    with open(os.path.join(export, "model_index.json")) as f:
        assert json.load(f)["_class_name"] == "QwenImage21Pipeline"
    back = load_transformer(os.path.join(export, "transformer"))
    for a, b in zip(jax.tree.leaves(back.params), jax.tree.leaves(full["state"].student.ema_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.dit_config == DiTConfig.from_diffusers(teacher.config)
    # the continued run replaced its own step-2 export with the step-4 student (the same weights as the full run's)
    assert resumed["export_dir"] == part["export_dir"]
    with open(os.path.join(resumed["export_dir"], dt.STEPS_FILE)) as f:
        assert json.load(f) == {"steps": 4}
    continued = load_transformer(os.path.join(resumed["export_dir"], "transformer"))
    for a, b in zip(jax.tree.leaves(continued.params), jax.tree.leaves(back.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_cli_runs_distillation(setup, tmp_path, capsys):
    _, _, overrides = setup
    workdir = str(tmp_path / "cli")
    assert cli.main(["distill", "--config", CONFIG_PATH, "--workdir", workdir, "--config.steps=1",
                     *overrides]) == 0
    assert os.path.exists(os.path.join(workdir, "export", "transformer", "diffusion_pytorch_model.safetensors"))
    assert cli.main(["distill", "--config", CONFIG_PATH, "--workdir", workdir]) == 3  # ConfigError's exit code
    assert "data.path is empty" in capsys.readouterr().err


def _poison_text(monkeypatch, calls):
    """NaN text embeddings in the given global batches (1-based, counted from the start of the next run)."""
    original = dt._global_batch
    seen = []

    def poisoned(batch, sharding):
        seen.append(1)
        if len(seen) in calls:
            batch = dict(batch, text_embeds=np.full_like(batch["text_embeds"], np.nan))
        return original(batch, sharding)

    monkeypatch.setattr(dt, "_global_batch", poisoned)


def test_non_finite_steps_are_skipped_and_counted_and_too_many_in_a_row_stop(setup, tmp_path, monkeypatch):
    from qwenimage_jax.training import guards
    from qwenimage_jax.training.guards import NonFiniteError

    _, _, overrides = setup
    config = _config(overrides, "--config.steps=4", "--config.export.enabled=False")
    config.on_nonfinite = "skip"   # a shared trainer key (training/loop.py) the distill preset leaves at "stop"
    _poison_text(monkeypatch, {2})
    run = dt.distill(config, str(tmp_path / "skip"))
    assert run["skipped_steps"] == [2] and run["final_step"] == 4 and 2 not in run["losses"]
    student = jax.device_get(run["state"].student)
    leaves = jax.tree.leaves((student.params, student.ema_params, jax.device_get(run["state"].fake.params)))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves), "a skipped step reached the student or fake"
    assert int(run["state"].step) == 3, "the skipped step's update was not applied"

    monkeypatch.undo()
    monkeypatch.setattr(guards, "MAX_IN_A_ROW", 2)
    _poison_text(monkeypatch, {2, 3, 4})
    with pytest.raises(NonFiniteError) as info:
        dt.distill(config, str(tmp_path / "row"))
    message = str(info.value)
    for part in ("at step 3 (data batch 2", "2 non-finite steps in a row (steps 2 to 3; 1 skipped in all)",
                 "Last good checkpoint: step 2 in"):
        assert part in message, message
