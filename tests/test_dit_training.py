"""DiT trainer: sharded step == single-device step, kill-and-resume reproduces losses, loss falls, layouts."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenimage_jax.data import latent_records
from qwenimage_jax.parallel.mesh import make_mesh
from qwenimage_jax.training import dit as dit_trainer
from tests.dit_train_fixtures import tiny_config, write


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write(tmp_path_factory.mktemp("latents"), n=64)


def _one_step(config, mesh, batch_np):
    import flax.linen as nn

    from qwenimage_jax.parallel.rules import LOGICAL_RULES

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state, shardings, module, tx, lr = dit_trainer.init_state(config, mesh, jax.random.key(0))
        layout = dit_trainer.batch_layout(batch_np)
        step = dit_trainer.make_train_step(module, tx, lr, config, layout, None, shardings, mesh)
        batch = dit_trainer._global_batch(batch_np, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(dit_trainer.BATCH_AXES)))
        state, metrics = step(state, batch, jax.random.key(1), None)
    return jax.device_get(state.params), jax.device_get(metrics), state


def test_the_empty_prompt_embedding_is_an_argument_of_the_train_step_not_a_constant(dataset):
    """With CFG dropout the cached empty-prompt embedding enters the jitted step as an argument (no constant of
    its shape in the program, which at 7B would be 8 MB baked into every compiled bucket): two different ones
    give different losses from one compile."""
    import flax.linen as nn
    import jax.numpy as jnp

    from qwenimage_jax.parallel.rules import LOGICAL_RULES

    config = tiny_config(dataset)
    config.cfg_dropout = 1.0  # every example takes the empty prompt, so the loss depends on it alone
    mesh = make_mesh(data=1, devices=jax.devices()[:1])
    batch_np = next(latent_records.iterate(latent_records.bucketed_batches(dataset, 8, max_text_tokens=12)))
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        state, shardings, module, tx, lr = dit_trainer.init_state(config, mesh, jax.random.key(0))
        width = module.config.context_in_dim
        nulls = [(jnp.full((12, width), v, jnp.float32), jnp.arange(12) < 4) for v in (0.5, -2.0)]
        step = dit_trainer.make_train_step(module, tx, lr, config, dit_trainer.batch_layout(batch_np), nulls[0],
                                           shardings, mesh)
        batch = dit_trainer._global_batch(batch_np, jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(dit_trainer.BATCH_AXES)))
        program = step.lower(state, batch, jax.random.key(1), nulls[0]).as_text()
        shape = f"tensor<12x{width}xf32>"
        (main,) = [line for line in program.splitlines() if "func.func public @main" in line]
        assert shape in main  # among the entry function's arguments
        assert not [line for line in program.splitlines() if "constant" in line and shape in line]
        losses = []
        for null in nulls:
            fresh, *_ = dit_trainer.init_state(config, mesh, jax.random.key(0))
            losses.append(float(step(fresh, batch, jax.random.key(1), null)[1]["loss"]))
    assert abs(losses[0] - losses[1]) > 1e-3, losses
    assert step._cache_size() == 1


def test_sharded_train_step_matches_single_device(dataset):
    config = tiny_config(dataset)
    batch_np = next(latent_records.iterate(latent_records.bucketed_batches(dataset, 8, max_text_tokens=12)))
    ref_params, ref_metrics, _ = _one_step(config, make_mesh(data=1, devices=jax.devices()[:1]), batch_np)
    for sizes in (dict(data=8), dict(data=1, fsdp=4, tensor=2), dict(data=2, fsdp=2, tensor=2)):
        params, metrics, state = _one_step(config, make_mesh(**sizes), batch_np)
        np.testing.assert_allclose(metrics["loss"], ref_metrics["loss"], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
        if sizes.get("tensor", 1) > 1:
            spec = state.params["blocks"]["mlp"]["proj"]["kernel"].sharding.spec
            assert "tensor" in str(spec), f"mlp kernel not tensor-sharded: {spec}"


def test_kill_and_resume_reproduces_losses_and_restores_onto_another_mesh(dataset, tmp_path):
    full = dit_trainer.train(tiny_config(dataset, steps=20), str(tmp_path / "full"))
    part = dit_trainer.train(tiny_config(dataset, steps=10), str(tmp_path / "part"))
    assert sorted(part["losses"]) == list(range(1, 11))
    resumed = dit_trainer.train(tiny_config(dataset, steps=20), str(tmp_path / "part"))
    assert sorted(resumed["losses"]) == list(range(11, 21)), "resume must continue at step 11"
    for s in range(11, 21):
        assert resumed["losses"][s] == pytest.approx(full["losses"][s], abs=1e-6), f"step {s}"
    # the same checkpoint continues on a different mesh (tensor-parallel instead of data-parallel)
    other = dit_trainer.train(tiny_config(dataset, steps=21, mesh=dict(data=2, fsdp=2, tensor=2)),
                              str(tmp_path / "part"))
    more = dit_trainer.train(tiny_config(dataset, steps=21), str(tmp_path / "full"))  # step 21 on the first mesh
    assert list(other["losses"]) == [21] == list(more["losses"])
    assert other["losses"][21] == pytest.approx(more["losses"][21], rel=1e-5)


def test_loss_falls_on_structured_data(dataset, tmp_path):
    result = dit_trainer.train(tiny_config(dataset, steps=60, ema_decay=0.0), str(tmp_path / "fall"))
    losses = [result["losses"][s] for s in sorted(result["losses"])]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses
    # the run ends with a diffusers-format export that our loader reads back bit-exactly
    from qwenimage_jax.checkpoints import load_transformer

    loaded = load_transformer(result["export_dir"])
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(jax.device_get(result["state"].params))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_editing_bucket_layout_and_step(tmp_path):
    data = write(tmp_path / "edit", n=16, edit_n=16)
    config = tiny_config(data, steps=4)
    config.data.bucket_weights = {}
    batches = latent_records.iterate(latent_records.bucketed_batches(data, 8, max_text_tokens=12))
    layouts = {dit_trainer.batch_layout(next(batches)) for _ in range(6)}
    edit = [l for l in layouts if len(l[0]) == 2]
    assert edit, f"no editing batch among {layouts}"
    shapes, mask = edit[0]
    assert shapes == ((1, 2, 2), (1, 4, 4)) and mask[3] and sum(mask) == 1 + 4
    config.steps = 30
    result = dit_trainer.train(config, str(tmp_path / "run"))
    losses = [result["losses"][s] for s in sorted(result["losses"])]
    assert len(losses) == 30
    # text-to-image and editing batches both learn their class patterns (conditions come from the same classes)
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses


def test_every_layout_is_compiled_before_the_first_step(tmp_path, monkeypatch):
    """A dataset with a text-to-image and an editing bucket: both steps are compiled at start-up, before step 1
    runs, and never again; with compile_at_start off the second layout compiles when its bucket first comes up,
    and the losses are the same either way."""
    data = write(tmp_path / "data", n=16, edit_n=16)
    events, original = [], dit_trainer.compiled

    def recording(step, state, batch, key, *trailing, **kwargs):
        layout = dit_trainer.batch_layout({k: (np.zeros(v.shape, bool) if k == "image_pad_mask" else v)
                                           for k, v in batch.items()})
        events.append(("compile", layout))
        run = original(step, state, batch, key, *trailing, **kwargs)

        def call(*args):
            events.append(("step", layout))
            return run(*args)
        return call

    monkeypatch.setattr(dit_trainer, "compiled", recording)
    config = tiny_config(data, steps=6)
    config.data.bucket_weights = {}
    eager = dit_trainer.train(config, str(tmp_path / "eager"))
    compiles = [e for e in events if e[0] == "compile"]
    assert len(compiles) == 2 and len({layout for _, layout in compiles}) == 2
    assert events[:2] == compiles and len(events) == 2 + 6
    assert {layout for kind, layout in events if kind == "step"} == {layout for _, layout in compiles}
    events.clear()
    config.compile_at_start = False
    lazy = dit_trainer.train(config, str(tmp_path / "lazy"))
    assert not events  # the loop's own lazy path, not the start-up compile
    for s in eager["losses"]:
        assert lazy["losses"][s] == pytest.approx(eager["losses"][s], abs=1e-6)


def test_buckets_are_kept_or_dropped_alike_on_every_host(tmp_path):
    """15 editing records over 2 hosts at 8 per host: one host holds 8, the other 7. Deciding on the host's own
    share, the first would train the bucket and the second not (the two would wait on each other's layouts
    forever); decided from the global count, both drop it."""
    data = write(tmp_path / "data", n=32, edit_n=15)
    kept = [set(latent_records.bucket_batches(data, 8, max_text_tokens=12, process_index=i, process_count=2))
            for i in (0, 1)]
    assert kept[0] == kept[1] and len(kept[0]) == 1
    for i in (0, 1):
        batches = latent_records.iterate(latent_records.bucketed_batches(data, 8, max_text_tokens=12,
                                                                         process_index=i, process_count=2))
        assert all(len(dit_trainer.batch_layout(next(batches))[0]) == 1 for _ in range(6))
    (one_host,) = [latent_records.bucket_batches(data, 8, max_text_tokens=12)]
    assert len(one_host) == 2  # one host holds all 15: both buckets
    # each start-up batch has the keys, shapes and dtypes of the training batches of its layout
    stream = latent_records.iterate(latent_records.bucketed_batches(data, 8, max_text_tokens=12))
    by_layout = {}
    for _ in range(8):
        batch = next(stream)
        by_layout[dit_trainer.batch_layout(batch)] = batch
    for batch in one_host.values():
        reference = by_layout[dit_trainer.batch_layout(batch)]
        assert set(batch) == {k for k, v in reference.items() if v is not None}
        assert all(batch[k].shape == np.shape(reference[k]) and batch[k].dtype == np.asarray(reference[k]).dtype
                   for k in batch)


def test_bad_batch_size_for_mesh_is_a_readable_error(dataset, tmp_path):
    with pytest.raises(ValueError, match="batch size 6 is not divisible"):
        dit_trainer.train(tiny_config(dataset, batch_size=6), str(tmp_path / "bad"))


def _matmul_flops(jaxpr) -> float:
    """2 x M x N x K summed over every dot_general of a jaxpr, scan bodies counted `length` times."""
    total = 0.0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            (contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[i] for i in contract])
        repeat = eqn.params.get("length", 1) if eqn.primitive.name == "scan" else 1
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    total += repeat * _matmul_flops(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    total += repeat * _matmul_flops(sub)
    return total


def test_flops_formula_matches_the_matmuls_of_the_traced_forward_and_backward():
    """MFU's analytic FLOPs (train_flops_per_example) against the matmuls JAX actually traces for one example at a
    16x16 latent grid + 12 text tokens: forward within 2%, and forward + backward (grads of the params) within 5%
    of the analytic 3 x forward."""
    from qwenimage_jax.models.dit import DiT

    cfg = dit_trainer.model_config(tiny_config("x"))
    module = DiT(cfg)
    grid, text_len = (1, 16, 16), 12
    n_image = int(np.prod(grid))
    hidden = jnp.zeros((1, n_image, cfg.input_features), jnp.float32)
    text = jnp.zeros((1, text_len, cfg.context_in_dim), jnp.float32)
    sigma = jnp.full((1,), 0.5, jnp.float32)
    shapes, img_mask = (grid,), (False,) * text_len + (True,) * (n_image // 4)
    params = jax.eval_shape(lambda: module.init(jax.random.key(0), hidden, text, sigma, shapes, img_mask))["params"]

    def forward(p):
        return module.apply({"params": p}, hidden, text, sigma, shapes, img_mask)

    def loss(p):
        return jnp.mean(jnp.square(forward(p)))

    analytic = dit_trainer.train_flops_per_example(cfg, n_image + text_len, text_len)
    traced_forward = _matmul_flops(jax.make_jaxpr(forward)(params).jaxpr)
    traced_train = _matmul_flops(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)
    assert traced_forward == pytest.approx(analytic / 3, rel=0.02), (traced_forward, analytic / 3)
    assert traced_train == pytest.approx(analytic, rel=0.05), (traced_train, analytic)


def test_init_from_loads_an_exported_transformer_inside_the_training_mesh(dataset, tmp_path):
    """`config.init_from` (fine-tuning) restores a diffusers transformer dir under the trainer's mesh context: the
    start state equals the export (params, EMA) with a fresh optimizer, on one device and on an fsdp x tensor mesh."""
    import flax.linen as nn

    from qwenimage_jax.checkpoints.exporters import export_transformer
    from qwenimage_jax.parallel.rules import LOGICAL_RULES

    config = tiny_config(dataset)
    mesh1 = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    with jax.set_mesh(mesh1), nn.logical_axis_rules(LOGICAL_RULES):
        source, *_ = dit_trainer.init_state(config, mesh1, jax.random.key(7))
    export_transformer(jax.device_get(source.params), dit_trainer.model_config(config), str(tmp_path / "export"))
    config.init_from = str(tmp_path / "export")
    for mesh in (mesh1, make_mesh(1, 2, 2, devices=jax.devices()[:4])):
        with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
            state, *_ = dit_trainer.init_state(config, mesh, jax.random.key(0))  # another seed: init is replaced
        for ours, ref in zip(jax.tree.leaves(state.params), jax.tree.leaves(source.params)):
            np.testing.assert_array_equal(np.asarray(ours), np.asarray(ref))
        for ema, ref in zip(jax.tree.leaves(state.ema_params), jax.tree.leaves(source.params)):
            np.testing.assert_array_equal(np.asarray(ema), np.asarray(ref))


def test_time_budget_stops_at_a_checkpoint_and_the_next_call_resumes(dataset, tmp_path):
    """time_budget_s: once a call has trained that long it saves and stops like a SIGTERM (a run that must fit a
    slot of machine time); the next call resumes at that step and reaches the target with the same losses."""
    config = tiny_config(dataset, steps=6)
    config.time_budget_s = 1e-9  # past after the first step
    first = dit_trainer.train(config, str(tmp_path / "budget"))
    assert first["final_step"] == 1 and not os.path.exists(first["export_dir"])
    config.time_budget_s = 0.0
    rest = dit_trainer.train(config, str(tmp_path / "budget"))
    straight = dit_trainer.train(tiny_config(dataset, steps=6), str(tmp_path / "straight"))
    assert rest["final_step"] == 6 and set(rest["losses"]) <= set(straight["losses"])
    for step, loss in rest["losses"].items():
        assert loss == pytest.approx(straight["losses"][step], rel=1e-5)
