"""Sharding-rule presets chosen by config: the DiT trainer places weights by the chosen table (replicated vs
split over fsdp) and trains to the same losses; the DiT's activation constraints follow the caller's rules."""
import jax
import pytest

from tests import dit_train_fixtures as fx


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return fx.write(tmp_path_factory.mktemp("presets_data"), n=32)


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
    """Under the "tensor" preset the constraint on the joint sequence shards the batch axis only (as before);
    no rules installed means no constraint at all (a plain single-device call)."""
    import flax.linen as nn
    from qwenimage_jax.models.dit import DiT, DiTConfig, _dummy_inputs
    from qwenimage_jax.parallel.rules import RULE_PRESETS

    cfg = DiTConfig(in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=2,
                    context_in_dim=8, axes_dims_rope=(2, 2, 4))
    module = DiT(cfg)
    inputs = _dummy_inputs(cfg)
    params = module.init(jax.random.key(0), *inputs)

    from qwenimage_jax.parallel.mesh import mesh_from_config

    mesh = mesh_from_config({"data": 1, "fsdp": 1, "tensor": 1})

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "sharding_constraint":
                yield eqn
            for sub in jax.core.jaxprs_in_params(eqn.params):
                yield from walk(sub)

    def constraints(rules):
        import contextlib

        ctx = nn.logical_axis_rules(rules) if rules else contextlib.nullcontext()
        with jax.set_mesh(mesh), ctx:
            jaxpr = jax.make_jaxpr(lambda p: module.apply(p, *inputs))(params)
        return [str(e.params["sharding"].spec) for e in walk(jaxpr.jaxpr)]

    assert constraints(None) == []
    specs = constraints(RULE_PRESETS["tensor"])
    assert specs and any("data" in s and "fsdp" in s for s in specs), specs
