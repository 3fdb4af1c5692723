"""Sharding-rule presets chosen by config: the DiT trainer places weights by the chosen table (replicated vs
split over fsdp) and trains to the same losses; the DiT's activation constraints follow the caller's rules."""
import jax
import pytest

from tests import dit_train_fixtures as fx


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return fx.write(tmp_path_factory.mktemp("presets_data"), n=32)


def _walk(jaxpr):
    """Every sharding_constraint equation of a jaxpr, nested ones (scan, remat, pjit) included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "sharding_constraint":
            yield eqn
        for sub in jax.core.jaxprs_in_params(eqn.params):
            yield from _walk(sub)


def _q_kernel(state):
    return state.params["blocks"]["attn"]["to_q"]["kernel"]


def test_replicated_preset_keeps_weights_whole_and_the_losses(dataset, tmp_path):
    from qwenimage_jax.training import dit as dit_trainer

    common = {"steps": 3, "export": False, "mesh.data": 1, "mesh.fsdp": 4}
    split = dit_trainer.train(fx.tiny_config(dataset, **common), str(tmp_path / "fsdp"))
    whole = dit_trainer.train(fx.tiny_config(dataset, sharding_rules="replicated", **common), str(tmp_path / "rep"))
    q_split, q_whole = _q_kernel(split["state"]), _q_kernel(whole["state"])
    assert q_split.sharding.shard_shape(q_split.shape)[1] == q_split.shape[1] // 4   # embed over fsdp
    assert q_whole.sharding.shard_shape(q_whole.shape) == q_whole.shape            # every chip holds it all
    for s in (1, 2, 3):
        assert whole["losses"][s] == pytest.approx(split["losses"][s], rel=1e-5), s


def test_unknown_preset_is_one_clear_error():
    from qwenimage_jax.parallel.rules import RULE_PRESETS, rules_for

    with pytest.raises(ValueError, match="not a preset; choose one of"):
        rules_for({"sharding_rules": "zero3"})
    assert rules_for({}) is RULE_PRESETS["fsdp"]


def test_dit_activation_constraints_follow_the_callers_rules():
    """The DiT constrains what it computes by the rules its caller installed: the joint (batch, length, embed)
    sequence splits its batch over data x fsdp and its length over context under either preset, while the
    in-forward constraints on the attention kernels follow the preset ("tensor" leaves the embed axis whole,
    "fsdp" splits it over fsdp). No rules installed means no constraint at all (a plain single-device call)."""
    import contextlib

    import flax.linen as nn
    from qwenimage_jax.models.dit import DiT, DiTConfig, _dummy_inputs
    from qwenimage_jax.parallel.mesh import mesh_from_config
    from qwenimage_jax.parallel.rules import RULE_PRESETS

    cfg = DiTConfig(in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                    context_in_dim=8, axes_dims_rope=(2, 2, 4))
    module = DiT(cfg)
    inputs = _dummy_inputs(cfg)
    params = module.init(jax.random.key(0), *inputs)
    mesh = mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1})
    embed = cfg.num_attention_heads * cfg.attention_head_dim

    def constraints(rules):
        ctx = nn.logical_axis_rules(rules) if rules else contextlib.nullcontext()
        with jax.set_mesh(mesh), ctx:
            jaxpr = jax.make_jaxpr(lambda p: module.apply(p, *inputs))(params)
        return [(tuple(e.params["sharding"].spec), e.invars[0].aval.shape) for e in _walk(jaxpr.jaxpr)]

    assert constraints(None) == []
    batch_axes = ("data", "fsdp")
    for preset, embed_axis in (("tensor", None), ("fsdp", "fsdp")):
        found = constraints(RULE_PRESETS[preset])
        joint = [spec for spec, shape in found if len(shape) == 3 and shape[0] == 1 and shape[-1] == embed]
        per_head = [spec for spec, shape in found if len(shape) == 4]
        qkv_kernels = [spec for spec, shape in found
                       if shape == (embed, cfg.num_attention_heads, cfg.attention_head_dim)]
        assert joint and all(spec == (batch_axes, "context", None) for spec in joint), (preset, joint)
        assert per_head and all(spec == (batch_axes, "context", "tensor", None) for spec in per_head), preset
        assert len(qkv_kernels) == 3 and all(spec == (embed_axis, "tensor", None) for spec in qkv_kernels), \
            (preset, qkv_kernels)


def test_context_axis_shards_the_joint_sequence_with_the_same_output():
    """The `context` mesh axis is used: `activation_length` maps to it, so on a mesh with context=2 the joint
    text+image sequence is split in two along its length (sequence parallelism for large images; XLA gathers
    keys/values for attention). The output equals the unsharded forward."""
    import numpy as np

    from qwenimage_jax.models.dit import init_transformer
    from qwenimage_jax.parallel.mesh import mesh_from_config
    from tests.conftest import max_rel_err

    config = dict(in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16, num_attention_heads=2,
                  context_in_dim=16, axes_dims_rope=[4, 6, 6])
    mesh = mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1, "context": 2})
    sharded = init_transformer(config, jax.random.key(0), mesh=mesh)
    single = init_transformer(config, jax.random.key(0))
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(1, 64, 8)).astype(np.float32)
    text = rng.normal(size=(1, 8, 16)).astype(np.float32)
    shapes, mask = ((1, 8, 8),), (False,) * 8 + (True,) * 16
    args = (hidden, text, np.array([0.6], np.float32), shapes, mask)
    out = sharded(*args).sample
    ref = single(*args).sample
    assert max_rel_err(np.asarray(out), np.asarray(ref)) <= 1e-5
    import flax.linen as nn

    from qwenimage_jax.parallel.rules import LOGICAL_RULES

    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        jaxpr = jax.make_jaxpr(lambda v: sharded.module.apply(v, *[jax.numpy.asarray(a) for a in args[:3]],
                                                               shapes, mask))(sharded.variables)
    specs = [str(e.params["sharding"].spec) for e in _walk(jaxpr.jaxpr)]
    assert any("context" in spec for spec in specs), specs
