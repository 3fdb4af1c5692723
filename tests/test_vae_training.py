"""VAE trainer: sharded step == single-device step, exact kill-and-resume, loss decreases on the bundled photos,
schedule values logged every step, CLI overrides, export + eval-vae.

All runs use `configs/vae_train_tiny.py:test` (an f4 VAE at 32 px, batch 4) and share compiled executables
through a persistent compilation cache, so each distinct step compiles once per file.
"""
import os
import signal

import jax
import numpy as np
import optax
import pytest

from qwenimage_jax.config_cli import load_config
from qwenimage_jax.training import vae as vae_trainer
from qwenimage_jax.training.metrics_writer import read_scalars
from tests.conftest import max_rel_err

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "vae_train_tiny.py")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    previous = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    yield
    jax.config.update("jax_compilation_cache_dir", previous[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", previous[1])


def _config(*overrides):
    return load_config(CONFIG + ":test", list(overrides))


UNINTERRUPTED = ("--config.total_steps=40", "--config.export_ema=True", "--config.eval_every=20",
                 "--config.image_every=20", "--config.eval.resolution=32", "--config.eval.crops_per_image=2")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """40 steps straight through (with export of the EMA weights at the end)."""
    workdir = str(tmp_path_factory.mktemp("run_a"))
    config = _config(*UNINTERRUPTED)
    result = vae_trainer.train(config, workdir, show_progress=False)
    return workdir, result


def test_kill_and_resume_matches_uninterrupted_run(uninterrupted, tmp_path):
    _, straight = uninterrupted
    workdir = str(tmp_path / "run_b")
    config = _config("--config.total_steps=20")

    def kill_at_10(step, _metrics):
        if step == 10:
            os.kill(os.getpid(), signal.SIGTERM)

    first = vae_trainer.train(config, workdir, on_step=kill_at_10, show_progress=False)
    assert first["stopped_early"] and [s for s, _ in first["history"]] == list(range(1, 11))
    second = vae_trainer.train(config, workdir, show_progress=False)
    assert [s for s, _ in second["history"]] == list(range(11, 21))
    expected = dict(straight["history"])
    for step, metrics in second["history"]:
        for name in ("loss", "l1", "align", "grad_norm"):
            assert abs(metrics[name] - expected[step][name]) <= 1e-6 * max(1.0, abs(expected[step][name])), \
                (step, name, metrics[name], expected[step][name])
    # the metrics file holds steps 1..20 exactly once each after the resume
    assert [r["step"] for r in read_scalars(workdir)] == list(range(1, 21))


def test_loss_decreases_on_bundled_photos(uninterrupted):
    _, result = uninterrupted
    l1 = np.array([m["l1"] for _, m in result["history"]])
    assert len(l1) == 40 and np.all(np.isfinite(l1))
    first, last = l1[:5].mean(), l1[-5:].mean()
    assert last < 0.7 * first, (first, last)


def test_schedule_values_logged_every_step_follow_optax(uninterrupted):
    workdir, result = uninterrupted
    weight = optax.join_schedules([optax.constant_schedule(0.5), optax.cosine_decay_schedule(0.5, 10, alpha=0.1)],
                                  [5])
    m_cos = optax.join_schedules([optax.constant_schedule(0.1), optax.linear_schedule(0.1, 0.5, 10)], [5])
    records = {r["step"]: r for r in read_scalars(workdir)}
    for step, metrics in result["history"]:
        # the value used by step s is the schedule at the state's step before the update, s - 1
        assert metrics["align_weight"] == pytest.approx(float(weight(step - 1)), abs=1e-6)
        assert metrics["m_cos"] == pytest.approx(float(m_cos(step - 1)), abs=1e-6)
        assert metrics["m_dist"] == pytest.approx(0.05)
        assert records[step]["train/align_weight"] == pytest.approx(metrics["align_weight"])
        assert records[step]["train/m_cos"] == pytest.approx(metrics["m_cos"])
    assert len({round(m["align_weight"], 6) for _, m in result["history"]}) >= 8   # it really anneals


def test_sharded_step_on_8_devices_equals_single_device_step():
    single = vae_trainer.build(_config("--config.batch_size=8", "--config.donate_state=False"))
    sharded = vae_trainer.build(_config("--config.batch_size=8", "--config.donate_state=False",
                                        "--config.mesh.data=2", "--config.mesh.fsdp=4"))
    assert sharded.mesh.devices.size == 8 and single.mesh.devices.size == 1
    state = single.init_state()
    state8 = jax.device_put(state, sharded.state_shardings)
    from qwenimage_jax.data.images import train_dataset
    batch = next(iter(train_dataset(single.config.data, 8, 0, single.vae_cfg.spatial_compression)))
    new1, metrics1 = single.step_fn(state, single.put_batch(batch), single.frozen)
    new8, metrics8 = sharded.step_fn(state8, sharded.put_batch(batch), sharded.frozen)
    assert len(new8.params["vae"]["decoder"]["conv_out"]["kernel"].sharding.device_set) == 8
    for name in ("loss", "l1", "align", "grad_norm"):
        assert abs(float(metrics8[name]) - float(metrics1[name])) <= 1e-5 * abs(float(metrics1[name])), name
    worst = max(max_rel_err(b, a) for a, b in zip(jax.tree.leaves(new1.params), jax.tree.leaves(new8.params)))
    assert worst <= 1e-5, worst


def test_tensorboard_scalars_eval_and_reconstruction_grids_written(uninterrupted):
    """The logged eval/psnr and eval/ssim at the last step are scikit-image's PSNR / SSIM (data range 2) of the
    final weights' reconstructions of the eval crops, and the bicubic baseline is scikit-image's PSNR of it."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    from qwenimage_jax.data import images as image_data
    from qwenimage_jax.evals.vae import bicubic_baseline
    from qwenimage_jax.models.vae import QwenImageVAE

    workdir, result = uninterrupted
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir))
    assert sorted(os.listdir(os.path.join(workdir, "images"))) == ["reconstructions_0000020.png",
                                                                   "reconstructions_0000040.png"]
    records = {r["step"]: r for r in read_scalars(workdir)}
    config = _config(*UNINTERRUPTED)
    crops = image_data.eval_crops(config.eval.source, 32, 2, int(config.seed))
    vae_cfg = vae_trainer.vae_config_from(config)
    reconstruct = jax.jit(vae_trainer.make_reconstruct(QwenImageVAE(vae_cfg)))
    params = result["state"].params["vae"]
    recon = np.concatenate([np.asarray(reconstruct(params, crops[i:i + 8])) for i in range(0, len(crops), 8)])
    psnr = np.mean([peak_signal_noise_ratio(o, r, data_range=2.0) for o, r in zip(crops, recon)])
    ssim = np.mean([structural_similarity(o, r, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                          data_range=2.0, channel_axis=-1) for o, r in zip(crops, recon)])
    assert records[40]["eval/psnr"] == pytest.approx(psnr, abs=2e-3)
    assert records[40]["eval/ssim"] == pytest.approx(ssim, abs=1e-3)
    r = vae_cfg.spatial_compression
    baseline = bicubic_baseline(crops, (32 // r) ** 2 * vae_cfg.z_dim)
    expected = np.mean([peak_signal_noise_ratio(o, b, data_range=2.0) for o, b in zip(crops, baseline)])
    assert records[0]["eval/bicubic_baseline_psnr"] == pytest.approx(expected, abs=2e-3)
    assert "eval/ema_psnr" in records[20] and "eval/ema_psnr" in records[40]
    # and training did something: the initial weights (the same seeded init) reconstruct far worse
    initial = vae_trainer.build(config).init_state().params["vae"]
    recon0 = np.concatenate([np.asarray(reconstruct(initial, crops[i:i + 8])) for i in range(0, len(crops), 8)])
    psnr0 = np.mean([peak_signal_noise_ratio(o, r, data_range=2.0) for o, r in zip(crops, recon0)])
    assert records[40]["eval/psnr"] >= psnr0 + 3.0
    assert records[40]["eval/psnr"] > records[20]["eval/psnr"]


def test_cli_train_vae_with_overrides(tmp_path, capsys):
    from qwenimage_jax import cli

    workdir = str(tmp_path / "cli")
    assert cli.main(["train-vae", "--config", CONFIG + ":test", "--workdir", workdir, "--no-progress",
                     "--config.total_steps=2", "--config.checkpoint_every=1"]) == 0
    assert "trained to step 2" in capsys.readouterr().out
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["1", "2"]


def test_config_overrides_reach_the_trainer_config():
    config = _config("--config.total_steps=7", "--config.losses.align.aligner=none", "--config.vae.dim_mult=(1,2)",
                     "--config.optimizer.learning_rate.peak_value=3e-4", "--config.ema_decay=0.5")
    assert config.total_steps == 7 and config.losses.align.aligner == "none"
    assert tuple(config.vae.dim_mult) == (1, 2) and config.optimizer.learning_rate.peak_value == 3e-4
    assert config.ema_decay == 0.5
    assert vae_trainer.make_aligner(config.losses.align) is None
    with pytest.raises(ValueError, match="unknown aligner"):
        vae_trainer.make_aligner({"aligner": "clip"})
    with pytest.raises(KeyError, match="unknown config key"):
        _config("--config.total_stepz=3")


def test_exported_ema_weights_load_in_eval_vae(uninterrupted, capsys):
    workdir, result = uninterrupted
    from qwenimage_jax import cli

    export = os.path.join(workdir, "vae_export")
    assert os.path.isdir(os.path.join(export, "params"))
    rc = cli.main(["eval-vae", "--vae", export, "--data", "photos:chelsea,coffee", "--resolution", "32",
                   "--crops-per-image", "2", "--no-lpips"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "psnr" in out and "bicubic" in out


def test_decoder_only_finetune_from_an_export_keeps_the_latent_space(uninterrupted, tmp_path):
    """init_from the exported VAE + trainable="decoder": the run starts from those weights (fresh optimizer) and
    moves only the decoder side; encoder and quant_conv stay bitwise the export's, so latents a DiT was trained on
    do not change."""
    from qwenimage_jax import checkpoints

    export = os.path.join(uninterrupted[0], "vae_export")
    config = _config("--config.total_steps=3", f"--config.init_from={export}", "--config.trainable=decoder",
                     "--config.ema_decay=0.0", "--config.eval_every=0", "--config.image_every=0")
    result = vae_trainer.train(config, str(tmp_path / "tune"), show_progress=False)
    before = checkpoints.load("vae", export).params
    after = jax.device_get(result["state"].params["vae"])
    for name in vae_trainer.ENCODER_PARAMS:
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(before[name]), after[name])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                         jax.device_get(before["decoder"]), after["decoder"]))
    assert max(moved) > 0
    with pytest.raises(ValueError, match="trainable"):
        vae_trainer.make_train_step(None, None, None, _config("--config.trainable=both"), None, None)


def test_encoder_phase_trains_the_latents_alone_and_a_restart_fits_the_patch_head(uninterrupted, tmp_path):
    """trainable="encoder": patch_l2 alone, the decoder never run and bitwise the export's, the encoder moved;
    without patch_l2 it is refused. A run from an export with patch_l2 starts its read-out head at the least-squares
    fit to the export's latents."""
    from qwenimage_jax import checkpoints
    from qwenimage_jax.data import images as image_data
    from qwenimage_jax.evals.vae import cell_patches

    export = os.path.join(uninterrupted[0], "vae_export")
    config = _config("--config.total_steps=3", f"--config.init_from={export}", "--config.trainable=encoder",
                     "--config.losses.patch_l2=1.0", "--config.ema_decay=0.0", "--config.eval_every=0",
                     "--config.image_every=0")
    result = vae_trainer.train(config, str(tmp_path / "encoder"), show_progress=False)
    assert all(set(metrics) >= {"patch_l2", "loss"} and "l1" not in metrics for _, metrics in result["history"])
    before = checkpoints.load("vae", export).params
    after = jax.device_get(result["state"].params["vae"])
    for name in vae_trainer.DECODER_PARAMS:
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(before[name]), after[name])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                                         jax.device_get(before["encoder"]), after["encoder"]))
    assert max(moved) > 0
    with pytest.raises(ValueError, match="patch_l2"):
        vae_trainer.make_train_step(None, None, None, _config("--config.trainable=encoder"), None, None)

    # the restart's head: the least-squares read-out of each cell's pixels from its latent (numpy's lstsq on the
    # same scenes, drawn here from the same stream)
    setup = vae_trainer.build(config)
    head = jax.device_get(setup.init_state().params["patch"])
    r = setup.vae_cfg.spatial_compression
    stream = iter(image_data.train_dataset(config.data, 32, int(config.seed) + 1, r))
    images = np.concatenate([np.asarray(next(stream), np.float32) for _ in range(8)])
    latents = np.asarray(setup.vae_module.apply({"params": before}, images, method="encode")[0], np.float64)
    x = np.concatenate([latents.reshape(-1, latents.shape[-1]), np.ones((latents[..., 0].size, 1))], axis=1)
    y = cell_patches(images.astype(np.float64), r)
    best = np.mean((x @ np.linalg.lstsq(x, y, rcond=None)[0] - y) ** 2)
    fitted = np.mean((x[:, :-1] @ head["kernel"] + head["bias"] - y) ** 2)
    assert best <= fitted <= 1.02 * best


def test_latent_readout_reads_the_encoders_posterior_means():
    """`latent_readout` (eval/cell_readout_mse) scores the encoder's posterior means, and a fit on the test images
    themselves can only do better than on other images."""
    from qwenimage_jax.evals.vae import cell_readout_mse

    config = _config()
    setup = vae_trainer.build(config)
    params = setup.init_state().params["vae"]
    rng = np.random.default_rng(0)
    fit = rng.uniform(-1, 1, (24, 32, 32, 3)).astype(np.float32)
    test = rng.uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    mse = vae_trainer.latent_readout(setup, params, fit, test, batch_size=8)

    def means(images):
        return np.asarray(setup.vae_module.apply({"params": params}, images, method="encode")[0])
    assert abs(mse - cell_readout_mse(means(fit), fit, means(test), test)) < 1e-6 * mse
    assert vae_trainer.latent_readout(setup, params, test, test) < mse


def test_training_logs_the_latent_readout_and_its_references(tmp_path):
    """With `eval.readout` (world scenes to fit the read-out on) the run logs eval/cell_readout_mse at each eval
    and, at step 0, the references it is read against."""
    config = _config("--config.total_steps=2", "--config.eval_every=2", "--config.image_every=0",
                     "--config.eval.resolution=32", "--config.eval.crops_per_image=1")
    config.eval.readout = dict(length=8, seed=1, split="train", size=64)
    vae_trainer.train(config, str(tmp_path), show_progress=False)
    records = {record["step"]: record for record in read_scalars(str(tmp_path))}
    z_dim = vae_trainer.vae_config_from(config).z_dim
    references = [records[0][f"eval/readout_ref_{name}"] for name in ("block_mean_cell", "block_mean_4px",
                                                                       f"cell_pca_{z_dim}")]
    assert all(0.0 < value < 1.0 for value in references)
    assert 0.0 < records[2]["eval/cell_readout_mse"] < 4.0


def test_init_from_the_encoder_alone_gives_a_wider_fresh_decoder_on_the_same_latents(uninterrupted):
    """init_from_parts="encoder": encoder and quant_conv come from the export, the decoder (here twice as wide) is
    the fresh init's; an export whose encoder differs from the config is refused, naming the keys to match."""
    from qwenimage_jax import checkpoints

    export = os.path.join(uninterrupted[0], "vae_export")
    base = _config()
    wider = base.vae.decoder_base_dim * 2
    config = _config(f"--config.init_from={export}", "--config.init_from_parts=encoder",
                     f"--config.vae.decoder_base_dim={wider}")
    params = jax.device_get(vae_trainer.build(config).init_state().params["vae"])
    before = checkpoints.load("vae", export).params
    for name in vae_trainer.ENCODER_PARAMS:
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(before[name]), params[name])
    assert params["decoder"]["conv_out"]["kernel"].shape[-2] == wider
    with pytest.raises(ValueError, match="base_dim"):
        vae_trainer.build(_config(f"--config.init_from={export}", "--config.init_from_parts=encoder",
                                  f"--config.vae.base_dim={base.vae.base_dim * 2}")).init_state()


def _poison_batches(monkeypatch, calls, value):
    """Makes the global batches of the given calls (1-based, counted from the start of the next run) all `value`."""
    original = vae_trainer.Setup.put_batch
    seen = []

    def put_batch(self, local_batch):
        seen.append(1)
        if len(seen) in calls:
            local_batch = np.full_like(local_batch, value)
        return original(self, local_batch)

    monkeypatch.setattr(vae_trainer.Setup, "put_batch", put_batch)


def test_non_finite_steps_stop_or_are_skipped_and_counted_and_too_many_in_a_row_stop(tmp_path, monkeypatch):
    from qwenimage_jax.training.guards import NonFiniteError

    short = ("--config.total_steps=5", "--config.export_ema=False", "--config.eval_every=0",
             "--config.image_every=0")
    _poison_batches(monkeypatch, {3}, np.nan)
    with pytest.raises(NonFiniteError) as info:   # on_nonfinite="stop", the default
        vae_trainer.train(_config(*short), str(tmp_path / "stop"), show_progress=False)
    for part in ("non-finite loss nan", "at step 3 (data batch 2", "Last good checkpoint: step 1 in",
                 "on_nonfinite=skip"):
        assert part in str(info.value), str(info.value)

    monkeypatch.undo()
    _poison_batches(monkeypatch, {3}, np.inf)
    run = vae_trainer.train(_config(*short, "--config.on_nonfinite=skip"), str(tmp_path / "skip"),
                            show_progress=False)
    assert run["skipped_steps"] == [3] and [s for s, _ in run["history"]] == [1, 2, 4, 5]
    assert int(run["state"].step) == 5, "a skipped step still counts (the loop resumes from state.step)"
    leaves = jax.tree.leaves((run["state"].params, run["state"].ema_params, run["state"].opt_state))
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves), "a skipped step reached the state"
    assert all(np.isfinite(m["loss"]) for _, m in run["history"])

    monkeypatch.undo()   # the VAE trainer reads the shared key nonfinite_in_a_row (default guards.MAX_IN_A_ROW)
    _poison_batches(monkeypatch, {2, 3, 4, 5}, np.nan)
    with pytest.raises(NonFiniteError) as info:
        vae_trainer.train(_config(*short, "--config.on_nonfinite=skip", "--config.nonfinite_in_a_row=2"),
                          str(tmp_path / "row"), show_progress=False)
    assert "at step 3 (data batch 2" in str(info.value)
    assert "2 non-finite steps in a row (steps 2 to 3; 1 skipped in all)" in str(info.value)
