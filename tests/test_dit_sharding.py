"""The DiT on 8 fake CPU devices: sharded forward == single-device forward, parameters placed as the rules say.

A tiny torch model is saved as a *sharded* safetensors checkpoint (index + several files) and streamed onto each
mesh by `load_transformer(path, mesh=...)`; `init_transformer(config, key, mesh)` initialises straight into the
same shardings. Bad combinations fail early with a readable message.
"""
import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
from diffusers import QwenImage21Transformer2DModel

from qwenimage_jax.checkpoints import load_transformer
from qwenimage_jax.models.dit import DiTConfig, abstract_params, init_transformer
from qwenimage_jax.parallel.mesh import make_mesh
from qwenimage_jax.parallel.rules import LOGICAL_RULES
from tests.conftest import max_rel_err

CONFIG = dict(patch_size=1, in_channels=8, out_channels=8, num_layers=2, attention_head_dim=8, num_attention_heads=4,
              context_in_dim=16, mlp_ratio=3, axes_dims_rope=(2, 2, 4), eps=1e-6, causal_condition=True)
MESHES = {"data8": dict(data=8), "fsdp4_tensor2": dict(data=1, fsdp=4, tensor=2),
          "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2)}
BATCH = 8
# text 3 | condition 2x2 (1 slot) | text 2 | target 2x4 (2 slots)
SHAPES = ((1, 2, 2), (1, 2, 4))
IMG_MASK = (False,) * 3 + (True,) + (False,) * 2 + (True,) * 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = QwenImage21Transformer2DModel(**CONFIG).eval()
    path = tmp_path_factory.mktemp("dit_sharded")
    model.save_pretrained(path, max_shard_size="20KB")   # forces an index + several shard files
    assert (path / "diffusion_pytorch_model.safetensors.index.json").exists()
    return str(path)


@pytest.fixture(scope="module")
def inputs():
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((BATCH, 12, 8)).astype(np.float32)
    text = rng.standard_normal((BATCH, 6, 16)).astype(np.float32)
    text_mask = np.ones((BATCH, 6), bool)
    text_mask[1::2, 5] = False
    timestep = rng.uniform(size=(BATCH,)).astype(np.float32)
    return latents, text, timestep, text_mask


@pytest.fixture(scope="module")
def single_device(checkpoint, inputs):
    model = load_transformer(checkpoint)
    latents, text, timestep, text_mask = inputs
    return np.asarray(model(latents, text, timestep, SHAPES, IMG_MASK, encoder_hidden_states_mask=text_mask).sample)


def expected_specs(config: DiTConfig, mesh):
    """The PartitionSpecs the rules table prescribes for every leaf (from the logical names)."""
    shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract_params(config)), mesh, LOGICAL_RULES)
    return jax.tree.map(lambda s: s.spec, shardings)


@pytest.mark.parametrize("mesh_name", sorted(MESHES))
def test_sharded_forward_matches_single_device(checkpoint, inputs, single_device, mesh_name):
    mesh = make_mesh(**MESHES[mesh_name])
    model = load_transformer(checkpoint, mesh=mesh)
    specs = jax.tree.map(lambda a: a.sharding.spec, model.params)
    assert specs == expected_specs(model.dit_config, mesh)
    blocks = model.params["blocks"]
    # spot checks of the rules: layers unsharded, embed -> fsdp, heads / mlp / modulation -> tensor
    assert _norm(blocks["attn"]["to_q"]["kernel"].sharding.spec) == (None, "fsdp", "tensor")
    assert _norm(blocks["attn"]["to_out"]["kernel"].sharding.spec) == (None, "tensor", None, "fsdp")
    assert _norm(blocks["mlp"]["out"]["kernel"].sharding.spec) == (None, "tensor", "fsdp")
    assert _norm(model.params["modulation"]["kernel"].sharding.spec) == ("fsdp", "tensor")
    if mesh.shape["fsdp"] > 1 or mesh.shape["tensor"] > 1:
        kernel = blocks["mlp"]["proj"]["kernel"]
        assert kernel.addressable_shards[0].data.size < kernel.size     # really split, not replicated

    latents, text, timestep, text_mask = inputs
    out = model(latents, text, timestep, SHAPES, IMG_MASK, encoder_hidden_states_mask=text_mask).sample
    assert max_rel_err(out, single_device) <= 1e-5


def _norm(spec):
    """PartitionSpec entries with trailing Nones dropped, for comparison."""
    entries = [None if e in (None, ()) else e for e in tuple(spec)]
    while entries and entries[-1] is None:
        entries.pop()
    return tuple(entries)


def test_init_transformer_places_params_by_the_rules():
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    config = DiTConfig.from_diffusers(CONFIG)
    model = init_transformer(config, jax.random.key(0), mesh=mesh)
    specs = jax.tree.map(lambda a: a.sharding.spec, model.params)
    assert specs == expected_specs(config, mesh)
    assert model.params["blocks"]["attn"]["to_k"]["kernel"].shape == (2, 32, 4, 8)


def test_heads_not_divisible_by_tensor_fail_early():
    config = DiTConfig.from_diffusers({**CONFIG, "num_attention_heads": 3, "attention_head_dim": 8})
    with pytest.raises(ValueError, match="num_attention_heads=3 is not divisible by the tensor axis"):
        init_transformer(config, jax.random.key(0), mesh=make_mesh(data=4, tensor=2))


def test_batch_not_divisible_by_data_fails_early(checkpoint, inputs):
    model = load_transformer(checkpoint, mesh=make_mesh(data=8))
    latents, text, timestep, _ = inputs
    with pytest.raises(ValueError, match="batch size 4 is not divisible by data x fsdp"):
        model(latents[:4], text[:4], timestep[:4], SHAPES, IMG_MASK)


def test_orbax_copy_restores_onto_the_mesh(checkpoint, tmp_path):
    from qwenimage_jax.checkpoints.orbax_io import save_component

    source = load_transformer(checkpoint)
    save_component(str(tmp_path / "orbax"), source.params, source.config, "transformer")
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    restored = load_transformer(str(tmp_path / "orbax"), mesh=mesh)
    assert jax.tree.map(lambda a: a.sharding.spec, restored.params) == expected_specs(restored.dit_config, mesh)
    assert restored.config["num_attention_heads"] == CONFIG["num_attention_heads"]
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored.params, source.params)
