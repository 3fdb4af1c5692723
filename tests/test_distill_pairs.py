"""Precomputed DMD regression pairs (training/distill_pairs.py) on the tiny DiT: the store is deterministic, resumes
after an interruption to the same result, holds the teacher's CFG Euler solutions from its stored noise (checked
against an Euler loop written here), a distill run on pairs data regresses to the stored target from the stored
noise, pairs follow their teacher's files (not its path), and the world recipe builds them once."""
import json
import os
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenimage_jax import cli
from qwenimage_jax.data import latent_records
from qwenimage_jax.models.dit import DiT
from qwenimage_jax.sampling import scheduler as sched
from qwenimage_jax.training import distill as dt
from qwenimage_jax.training import distill_pairs as dp
from tests.test_distill import CONFIG_PATH, _config, setup  # noqa: F401  (setup: the module fixture)

NUM_PAIRS, BATCH, CHUNK = 8, 4, 4      # two chunks of one teacher batch each
TEXT_TOKENS, TOKENS, CHANNELS = 12, 16, 16
TEACHER_STEPS, CFG = 4, 2.0            # setup's overrides: regression.teacher_steps=4, dmd.real_cfg_scale=2.0


def _build(config, out, **kwargs):
    args = dict(num_pairs=NUM_PAIRS, batch_size=BATCH, chunk_size=CHUNK, progress=False)
    return dp.make_pairs(config, str(out), **dict(args, **kwargs))


def _records(store) -> list[dict]:
    """Every record of a store, shard by shard, read with grain as the trainer's data source does."""
    meta = latent_records.load_meta(store)
    out = []
    for name in sorted(meta["shards"]):
        source = grain.sources.ArrayRecordDataSource([os.path.join(store, name)])
        out += [latent_records.decode_record(source[i]) for i in range(len(source))]
    return out


def _assert_same_records(got, want):
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert sorted(a) == sorted(b)
        for name in a:
            np.testing.assert_array_equal(np.asarray(a[name]), np.asarray(b[name]), err_msg=name)


@pytest.fixture(scope="module")
def store(setup, tmp_path_factory):
    _, _, overrides = setup
    out = tmp_path_factory.mktemp("pairs") / "store"
    _build(_config(overrides), out)
    return str(out)


def test_store_is_a_latent_dataset_of_the_source_rows_with_seeded_noise_and_is_deterministic(setup, store, tmp_path):
    data, _, overrides = setup
    manifest = json.load(open(os.path.join(store, dp.MANIFEST)))
    assert manifest["complete"] and manifest["num_pairs"] == NUM_PAIRS and manifest["seconds"] > 0
    assert (manifest["teacher_steps"], manifest["cfg_scale"], manifest["seed"]) == (TEACHER_STEPS, CFG, 0)
    records = _records(store)
    assert len(records) == NUM_PAIRS
    # row r is row r of the source's batch stream (data.seed shuffle), its text copied and its noise drawn from
    # fold_in(fold_in(key(seed), NOISE_STREAM), r), as the module documents
    stream = latent_records.bucketed_batches(data, BATCH, max_text_tokens=TEXT_TOKENS, seed=0)
    for r, record in enumerate(records):
        row = stream[r // BATCH]
        length = int(row["text_mask"][r % BATCH].sum())
        np.testing.assert_array_equal(record["text_embeds"], row["text_embeds"][r % BATCH, :length])
        assert record["latents"].shape == (4, 4, CHANNELS) and record["latents"].dtype == np.float32
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), 0x50414952), r)
        np.testing.assert_array_equal(record["noise"], np.asarray(jax.random.normal(key, (TOKENS, CHANNELS))))
        assert record["noise"].dtype == np.float32
    # the trainer's reader reads it unchanged, with the noise beside the latents
    batch = latent_records.bucketed_batches(store, BATCH, max_text_tokens=TEXT_TOKENS)[0]
    assert batch["noise"].shape == (BATCH, TOKENS, CHANNELS) and batch["latents"].shape == (BATCH, 4, 4, CHANNELS)
    assert os.path.exists(os.path.join(store, latent_records.NULL_EMBEDS))

    again = tmp_path / "again"
    _build(_config(overrides), again)
    _assert_same_records(_records(str(again)), records)


def test_an_interrupted_build_resumes_to_the_one_shot_result(setup, store, tmp_path, monkeypatch):
    _, _, overrides = setup
    config, out = _config(overrides), tmp_path / "resumed"
    write_chunk, solved = dp._write_chunk, []

    def interrupted(out_dir, index, *args):
        if index == 1:
            raise KeyboardInterrupt
        write_chunk(out_dir, index, *args)

    monkeypatch.setattr(dp, "_write_chunk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _build(config, out)
    assert os.path.exists(out / "chunk-00000.json") and not os.path.exists(out / "chunk-00001.json")
    assert not json.load(open(out / dp.MANIFEST))["complete"] and not os.path.exists(out / latent_records.META)
    (out / "shard-00001-of-00002.array_record").write_bytes(b"half a shard")   # a partial chunk: rewritten

    monkeypatch.setattr(dp, "_write_chunk", write_chunk)
    solve_chunk = dp._solve_chunk
    monkeypatch.setattr(dp, "_solve_chunk", lambda t, b, s, index: solved.append(index) or solve_chunk(t, b, s, index))
    manifest = _build(config, out)
    assert solved == [1] and manifest["complete"]
    _assert_same_records(_records(str(out)), _records(store))
    _build(config, out)
    assert solved == [1], "a complete store was solved again"
    with pytest.raises(ValueError, match="other settings"):
        _build(_config(overrides, "--config.regression.teacher_steps=3"), out)


def _velocity(module, params, x, t, text, mask):
    """The DiT's velocity on the target tokens: it returns the joint (text, image) sequence, the target last."""
    img_mask = (False,) * TEXT_TOKENS + (True,) * (TOKENS // 4)   # no VLM image slots; 2x2 slots of the 4x4 target
    out = module.apply({"params": params}, x, text, jnp.full((x.shape[0],), t, jnp.float32), ((1, 4, 4),),
                       img_mask, encoder_hidden_states_mask=mask)
    return out[:, -TOKENS:].astype(jnp.float32)


def _padded_text(records):
    text = np.zeros((len(records), TEXT_TOKENS, records[0]["text_embeds"].shape[-1]), np.float32)
    mask = np.zeros((len(records), TEXT_TOKENS), bool)
    for i, record in enumerate(records):
        text[i, :len(record["text_embeds"])] = record["text_embeds"]
        mask[i, :len(record["text_embeds"])] = True
    return jnp.asarray(text), jnp.asarray(mask)


def test_stored_targets_are_the_teachers_cfg_euler_solution_from_the_stored_noise(setup, store):
    data, teacher, _ = setup
    records = _records(store)
    module = DiT(teacher.dit_config)
    text, mask = _padded_text(records)
    null = np.load(os.path.join(data, latent_records.NULL_EMBEDS))
    null_text = np.zeros((len(records), TEXT_TOKENS, null.shape[-1]), np.float32)
    null_text[:, :len(null)] = null
    null_mask = np.broadcast_to(np.arange(TEXT_TOKENS) < len(null), (len(records), TEXT_TOKENS))
    sigmas, timesteps = sched.flow_match_sigmas(TEACHER_STEPS, TOKENS, sched.QWEN_IMAGE_SCHEDULER_CONFIG)
    x = jnp.asarray(np.stack([r["noise"] for r in records]))
    for j in range(TEACHER_STEPS):
        t = float(timesteps[j]) / 1000.0
        cond = _velocity(module, teacher.params, x, t, text, mask)
        uncond = _velocity(module, teacher.params, x, t, jnp.asarray(null_text), jnp.asarray(null_mask))
        x = x + float(sigmas[j + 1] - sigmas[j]) * (uncond + CFG * (cond - uncond))
    stored = np.stack([r["latents"].reshape(TOKENS, CHANNELS) for r in records])
    np.testing.assert_allclose(stored, np.asarray(x), rtol=1e-5, atol=1e-5)
    assert float(np.abs(stored - np.stack([r["noise"] for r in records])).mean()) > 0.1   # it moved off the noise


def _student_regression_loss(teacher, batch):
    """mean((x0 - target)^2) of a one-step student that is still the teacher: x0 = z - sigma_0 v(z, t_0)."""
    sigmas, timesteps = sched.flow_match_sigmas(None, TOKENS, sched.QWEN_IMAGE_SCHEDULER_CONFIG, sigmas=[1.0])
    z = jnp.asarray(batch["noise"])
    v = _velocity(DiT(teacher.dit_config), teacher.params, z, float(timesteps[0]) / 1000.0,
                  jnp.asarray(batch["text_embeds"]), jnp.asarray(batch["text_mask"]))
    x0 = z - float(sigmas[0]) * v
    target = np.asarray(batch["latents"]).reshape(len(z), TOKENS, CHANNELS)
    return float(jnp.mean(jnp.square(x0 - target)))


def _perturbed_copy(store, out, shift):
    """A copy of the store whose targets are moved by `shift` (the manifest and empty prompt copied as they are)."""
    records = [dict(r, latents=r["latents"] + shift) for r in _records(store)]
    latent_records.write_dataset(records, str(out), float32_fields=("latents", "noise"))
    for name in (dp.MANIFEST, latent_records.NULL_EMBEDS):
        shutil.copy(os.path.join(store, name), out / name)
    return str(out)


def test_distilling_on_pairs_regresses_to_the_stored_target_from_the_stored_noise(setup, store, tmp_path):
    _, teacher, overrides = setup
    # one student step (k = 0 always) and the DMD term weighted 0: the loss is the regression term alone
    extra = ["--config.dmd.weight=0.0", "--config.fake.updates=0", "--config.student.num_steps=1", "--config.steps=1",
             "--config.export.enabled=False"]
    losses = {}
    for name, pairs in (("stored", store), ("target+0.5", _perturbed_copy(store, tmp_path / "moved", 0.5))):
        run = dt.distill(_config(overrides, *extra, f"--config.regression.pairs={pairs}"), str(tmp_path / name))
        metrics = run["metrics"][1]
        first = latent_records.bucketed_batches(pairs, BATCH, max_text_tokens=TEXT_TOKENS, seed=0)[0]
        assert "noise" in first
        losses[name] = float(metrics["regression_loss"])
        assert losses[name] == pytest.approx(_student_regression_loss(teacher, first), rel=1e-5), name
        assert float(metrics["loss"]) == pytest.approx(0.5 * losses[name], rel=1e-6)   # regression.weight=0.5
    assert abs(losses["target+0.5"] - losses["stored"]) > 0.1
    with pytest.raises(ValueError, match="teacher_steps"):
        dt.pairs_data_config(_config(overrides, f"--config.regression.pairs={store}",
                                     "--config.regression.teacher_steps=40"))


def test_a_moved_teacher_still_matches_its_pairs_and_a_retrained_one_does_not(setup, store, tmp_path):
    _, _, overrides = setup
    teacher_dir = _config(overrides).teacher
    moved = str(tmp_path / "moved_teacher")
    shutil.copytree(teacher_dir, moved)   # keeps the files' mtimes, as the recipe's snapshots do
    assert dp.check_pairs_match(_config(overrides, f"--config.teacher={moved}"), store)["complete"]
    weights = [os.path.join(d, f) for d, _, files in os.walk(moved) for f in files if f.endswith(".safetensors")]
    os.utime(weights[0], (os.stat(weights[0]).st_atime, os.stat(weights[0]).st_mtime + 60))   # written again
    with pytest.raises(ValueError, match="teacher_files"):
        dp.check_pairs_match(_config(overrides, f"--config.teacher={moved}"), store)


def test_cli_builds_the_same_pairs_for_the_same_rows(setup, store, tmp_path):
    _, _, overrides = setup
    out = str(tmp_path / "cli")
    assert cli.main(["distill-pairs", "--config", CONFIG_PATH, "--out", out, "--num-pairs", "4", "--batch", "4",
                     *overrides]) == 0
    # rows and noise depend on the row index only: a 4-pair store is the first 4 pairs of the 8-pair one
    _assert_same_records(_records(out), _records(store)[:4])


def test_the_recipe_builds_the_pairs_once_and_records_their_time(setup, tmp_path, monkeypatch):
    from qwenimage_jax.recipes.world import stages

    data, _, overrides = setup
    workdir = tmp_path / "world"
    workdir.mkdir()
    os.symlink(_config(overrides).teacher, workdir / "transformer")
    os.symlink(data, workdir / "latents")
    monkeypatch.setattr(stages, "CONFIG_ARG", "smoke")
    pairs = stages.stage_distill_pairs(str(workdir))
    assert pairs == str(workdir / "distill_pairs")
    recorded = json.load(open(workdir / "times.json"))["distill_pairs"]
    assert recorded["num_pairs"] == 4 and recorded["teacher_steps"] == 2 and len(_records(pairs)) == 4
    built = os.stat(os.path.join(pairs, dp.MANIFEST)).st_mtime_ns
    stages.stage_distill_pairs(str(workdir))   # complete: reused, not rebuilt
    assert os.stat(os.path.join(pairs, dp.MANIFEST)).st_mtime_ns == built
