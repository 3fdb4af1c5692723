"""LoRA trainer: only the factors train (base untouched, step 0 is the base model), kill-and-resume reproduces the
losses, the loss falls, the rank/target config is honoured, and the exported adapter loads in diffusers and gives
the transformer output ours gives."""
import os

import numpy as np
import pytest

from tests import dit_train_fixtures as fx
from tests.conftest import max_rel_err

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Cached structured latents and a random base transformer exported in diffusers format."""
    import jax

    from qwenimage_jax.checkpoints.exporters import export_transformer
    from qwenimage_jax.models.dit import init_transformer

    root = tmp_path_factory.mktemp("lora_train")
    data = fx.write(root / "data", n=64)
    model = dict(patch_size=1, in_channels=fx.CHANNELS, out_channels=fx.CHANNELS, num_layers=2, attention_head_dim=16,
                 num_attention_heads=4, context_in_dim=fx.CONTEXT, mlp_ratio=3, axes_dims_rope=[4, 6, 6], eps=1e-6,
                 causal_condition=True)
    base = init_transformer(model, jax.random.key(3))
    export_transformer(base.params, base.dit_config, str(root / "base"))
    return data, str(root / "base"), base


def _config(world, **overrides):
    from qwenimage_jax.config_cli import load_config

    data, base_dir, _ = world
    config = load_config(os.path.join(CONFIGS, "lora_tiny.py"), [])
    config.base, config.data.path, config.progress = base_dir, data, False
    return fx.apply_overrides(config, overrides)


@pytest.fixture(scope="module")
def full_run(world, tmp_path_factory):
    from qwenimage_jax.training import lora as lora_trainer

    return lora_trainer.train(_config(world, steps=20), str(tmp_path_factory.mktemp("full")))


def test_kill_and_resume_reproduces_losses(world, full_run, tmp_path):
    from qwenimage_jax.training import lora as lora_trainer

    part = lora_trainer.train(_config(world, steps=10, export=False), str(tmp_path))
    assert sorted(part["losses"]) == list(range(1, 11))
    resumed = lora_trainer.train(_config(world, steps=20), str(tmp_path))
    assert sorted(resumed["losses"]) == list(range(11, 21)), "resume must continue at step 11"
    for s in range(11, 21):
        assert resumed["losses"][s] == pytest.approx(full_run["losses"][s], abs=1e-6), f"step {s}"


def test_only_the_factors_train_and_the_loss_falls(world, tmp_path):
    import flax

    from qwenimage_jax.training import lora as lora_trainer

    targets = ["to_q", "to_k", "to_v", "to_out.0", "img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out", "img_in",
               "proj_out"]
    config = _config(world, steps=40, **{"lora.rank": 8, "lora.alpha": 16.0, "lora.target_modules": targets,
                                         "optimizer.learning_rate.peak_value": 3e-3})
    result = lora_trainer.train(config, str(tmp_path))
    losses = [result["losses"][s] for s in sorted(result["losses"])]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8]), losses
    flat = flax.traverse_util.flatten_dict(result["state"].params)
    assert {p[-1] for p in flat} == {"a", "b"}
    assert {p[:-1] for p in flat} == ({("blocks", "attn", n) for n in ("to_q", "to_k", "to_v", "to_out")}
                                      | {("blocks", "mlp", n) for n in ("proj", "gate_layer", "out")}
                                      | {("img_in",), ("proj_out",)})
    assert all(v.shape[-1 if k[-1] == "a" else (1 if k[0] == "blocks" else 0)] == 8 for k, v in flat.items())
    n_base = result["base_params"]
    assert result["trainable_params"] == sum(v.size for v in flat.values()) < 0.2 * n_base
    # the optimizer state holds moments of the factors only (nothing base-sized)
    opt_leaves = [x for x in __import__("jax").tree.leaves(result["state"].opt_state) if hasattr(x, "size")]
    assert sum(x.size for x in opt_leaves) <= 2 * result["trainable_params"] + 8


def test_step_zero_is_the_base_model_and_targets_select_layers(world):
    """b starts at zero; a target naming one block adapts only that block's layer of the stacked kernel."""
    import jax
    import jax.numpy as jnp

    from qwenimage_jax.parallel.mesh import mesh_from_config
    from qwenimage_jax.training import lora as lora_trainer

    config = _config(world, **{"lora.target_modules": ["transformer_blocks.1.attn.to_q", "img_mlp.out"]})
    mesh = mesh_from_config(config.mesh)
    state, _, module, base, scales, *_ = lora_trainer.setup(config, mesh, jax.random.key(0))
    assert scales["blocks"]["attn"]["to_q"]["scale"][0].sum() == 0 and scales["blocks"]["attn"]["to_q"]["scale"][1].all()
    assert state.params["blocks"]["attn"]["to_q"]["a"][0].sum() == 0
    x = jnp.ones((1, 4, fx.CHANNELS))
    text = jnp.ones((1, 3, fx.CONTEXT))
    args = (x, text, jnp.array([0.5]), ((1, 2, 2),), (False, False, False, True))
    base_out = module.apply({"params": base}, *args)
    lora_out = module.apply({"params": base, "lora": lora_trainer.with_scales(state.params, scales)}, *args)
    assert np.array_equal(np.asarray(base_out), np.asarray(lora_out))


def test_exported_adapter_loads_in_diffusers_and_matches_ours(world, full_run):
    import torch
    from diffusers import QwenImage21Transformer2DModel

    from qwenimage_jax.checkpoints import lora as lora_io

    _, base_dir, base = world
    export = full_run["export_dir"]
    file = os.path.join(export, "pytorch_lora_weights.safetensors")
    ref = QwenImage21Transformer2DModel.from_pretrained(base_dir).eval()
    ref.load_lora_adapter(file, prefix="transformer", adapter_name="trained")
    torch_lora = lora_io.read_lora(export, base.dit_config)
    assert torch_lora.rank == 4 and len(torch_lora.modules) == 2 * 4
    # ours: the factors as trained (not re-read from the export), on the base
    from qwenimage_jax.training.lora import column_scales, lora_layout, with_scales

    layout = lora_layout(base.dit_config, ["to_q", "to_k", "to_v", "to_out.0"], 4)
    base.lora = with_scales(full_run["state"].params, column_scales(layout, 4, 4.0))
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 16, fx.CHANNELS, generator=gen)
    text = torch.randn(2, 5, fx.CONTEXT, generator=gen)
    img_mask = torch.tensor([[False] * 5 + [True] * 4] * 2)
    shapes = [[(1, 4, 4)]] * 2
    with torch.no_grad():
        expected = ref(hidden, text, torch.tensor([0.3, 0.8]), shapes, img_mask).sample.numpy()
        ref.disable_adapters()
        base_ref = ref(hidden, text, torch.tensor([0.3, 0.8]), shapes, img_mask).sample.numpy()
    try:
        got = np.asarray(base(hidden.numpy(), text.numpy(), np.array([0.3, 0.8], np.float32), shapes,
                              img_mask.numpy()).sample)
    finally:
        base.lora = None
    assert max_rel_err(got, expected) <= 1e-4
    assert max_rel_err(base_ref, expected) > 1e-3  # the trained adapter changes the output


def test_fsdp_sharded_base_gives_the_single_device_losses(world, tmp_path):
    """The base and the factors sharded over fsdp=4 (the rules' placement) train exactly like on one device."""
    from qwenimage_jax.training import lora as lora_trainer

    single = lora_trainer.train(_config(world, steps=3, export=False, **{"mesh.data": 1}),
                                str(tmp_path / "one"))
    import jax

    assert jax.device_count() >= 4
    sharded = lora_trainer.train(_config(world, steps=3, export=False, **{"mesh.data": 1, "mesh.fsdp": 4}),
                                 str(tmp_path / "fsdp"))
    a = sharded["state"].params["blocks"]["attn"]["to_q"]["a"]
    assert a.sharding.shard_shape(a.shape)[1] == a.shape[1] // 4   # a's input (embed) axis split like the kernel's
    for s in (1, 2, 3):
        assert sharded["losses"][s] == pytest.approx(single["losses"][s], rel=1e-5), s


def test_qlora_on_an_int8_base_trains_the_factors_and_ends_near_the_float_base(world, full_run, tmp_path):
    """`quantize="int8"`: the frozen base is loaded with its block kernels quantized (qwix), the factors train in
    float beside them and only they are differentiated. The losses follow the float base's run within the
    quantization error and the exported adapter has the float run's keys and shapes (it loads wherever theirs does)."""
    import flax
    import jax
    from qwix._src.providers.ptq import WithAux

    from qwenimage_jax.checkpoints.safetensors_io import SafetensorsReader
    from qwenimage_jax.training import lora as lora_trainer

    seen = {}
    real_setup = lora_trainer.setup

    def watching_setup(*args, **kwargs):
        out = real_setup(*args, **kwargs)
        seen["base"] = out[3]
        return out

    import unittest.mock as mock
    with mock.patch.object(lora_trainer, "setup", watching_setup):
        result = lora_trainer.train(_config(world, steps=20, quantize="int8"), str(tmp_path))
    kernel = seen["base"]["blocks"]["attn"]["to_q"]["kernel"]
    assert isinstance(kernel, WithAux) and kernel.array.qvalue.dtype == np.int8
    losses, float_losses = ([run["losses"][s] for s in range(1, 21)] for run in (result, full_run))
    assert max(abs(a - b) for a, b in zip(losses, float_losses)) <= 0.02 * max(float_losses)
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    ours = flax.traverse_util.flatten_dict(jax.device_get(result["state"].params))
    theirs = flax.traverse_util.flatten_dict(jax.device_get(full_run["state"].params))
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}
    assert sorted(os.listdir(result["export_dir"])) == sorted(os.listdir(full_run["export_dir"]))
    q_file, f_file = (SafetensorsReader(run["export_dir"]) for run in (result, full_run))
    assert {k: q_file.shape(k) for k in q_file.keys()} == {k: f_file.shape(k) for k in f_file.keys()}
