"""Flax DINOv2 vs transformers `Dinov2Model` on tiny seeded random configs, loaded through our importer."""
import json

import numpy as np
import pytest
import torch
import transformers
from safetensors.torch import save_file

from qwenimage_jax.checkpoints.params import WeightKeyError
from qwenimage_jax.checkpoints import load_dinov2
from tests.conftest import max_rel_err

TOL = 1e-4
# (28, 28): the stored 4x4 position grid as is; (35, 49): a non-square 5x7 grid, bicubic interpolation.
SIZES = ((28, 28), (35, 49))


def _tiny_dinov2(tmp_path_factory, name: str, **overrides):
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, image_size=28,
                                       patch_size=7, layerscale_value=0.5, **overrides)
    model = transformers.Dinov2Model(config).eval()
    with torch.no_grad():  # non-trivial layer scales and norms so that every parameter matters
        for param_name, param in model.named_parameters():
            if "lambda1" in param_name or "norm" in param_name:
                param.add_(0.2 * torch.randn_like(param))
    path = tmp_path_factory.mktemp(name)
    model.save_pretrained(path)
    return model, str(path)


@pytest.fixture(scope="module", params=["gelu_mlp", "swiglu"])
def models(request, tmp_path_factory):
    model, path = _tiny_dinov2(tmp_path_factory, request.param, use_swiglu_ffn=request.param == "swiglu")
    return model, load_dinov2(path)


@pytest.mark.parametrize("size", SIZES)
def test_all_hidden_states_and_output_match_transformers(models, size):
    reference, ours = models
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, *size)
    with torch.no_grad():
        ref = reference(pixel_values, output_hidden_states=True)
    out = ours(pixel_values.numpy().transpose(0, 2, 3, 1))
    assert out["hidden_states"].shape[0] == len(ref.hidden_states) == 4
    for index, ref_state in enumerate(ref.hidden_states):
        err = max_rel_err(out["hidden_states"][index], ref_state.numpy())
        assert err <= TOL, f"hidden_states[{index}] at {size}: rel err {err:.2e}"
    err = max_rel_err(out["last_hidden_state"], ref.last_hidden_state.numpy())
    assert err <= TOL, f"last_hidden_state at {size}: rel err {err:.2e}"


def test_features_are_the_middle_layer_patch_grid(models):
    reference, ours = models
    rng = np.random.default_rng(2)
    images = rng.uniform(-1, 1, (2, 35, 49, 3)).astype(np.float32)
    # DINOv2's preprocessing of [0, 1] pixels: ImageNet mean / std.
    pixel_values = ((images + 1) / 2 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])
    with torch.no_grad():
        ref = reference(torch.from_numpy(pixel_values.transpose(0, 3, 1, 2).astype(np.float32)),
                        output_hidden_states=True)
    grid = np.asarray(ours.features(images, layer=2))
    assert grid.shape == (2, 5, 7, 32)
    expected = ref.hidden_states[2][:, 1:].numpy().reshape(2, 5, 7, 32)
    assert max_rel_err(grid, expected) <= TOL


def test_loads_transformers5_in_memory_key_names(models, tmp_path):
    reference, _ = models
    state = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert any("q_proj" in k for k in state)  # the renamed layout, unlike save_pretrained's
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(reference.config.to_dict()))
    ours = load_dinov2(str(tmp_path))
    pixel_values = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = reference(pixel_values).last_hidden_state.numpy()
    assert max_rel_err(ours(pixel_values.numpy().transpose(0, 2, 3, 1))["last_hidden_state"], ref) <= TOL


def test_missing_key_is_reported(models, tmp_path):
    reference, _ = models
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if "layer.1.norm2.weight" not in k}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(reference.config.to_dict()))
    with pytest.raises(WeightKeyError, match=r"encoder.layer.1.norm2.weight"):
        load_dinov2(str(tmp_path))


def test_rejects_sizes_off_the_patch_grid(models):
    _, ours = models
    with pytest.raises(ValueError, match="multiples of the patch size 7"):
        ours.features(np.zeros((1, 30, 28, 3), np.float32), layer=1)


def test_orbax_round_trip(models, tmp_path):
    from qwenimage_jax.checkpoints.orbax_io import save_component

    _, ours = models
    save_component(str(tmp_path / "dino"), ours.params, ours.config, "dinov2")
    restored = load_dinov2(str(tmp_path / "dino"))
    pixel_values = np.random.default_rng(4).normal(size=(1, 28, 42, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(restored(pixel_values)["last_hidden_state"]),
                                  np.asarray(ours(pixel_values)["last_hidden_state"]))
