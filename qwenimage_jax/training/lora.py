"""LoRA trainer: flow matching on cached latents (the DiT trainer's data path and loss) with the base frozen.

    qwenimage-jax train-lora --config configs/world_lora.py --workdir /tmp/lora [--config.lora.rank=16 ...]

The base transformer (`config.base`, a diffusers or Orbax `transformer/` directory) is loaded straight into the
rule-derived shardings of the mesh (fsdp / tensor, as the DiT trainer places it), optionally stored in bf16
(`config.base_dtype`) or quantized (`config.quantize`: QLoRA, int8 / fp8 / int4 block kernels), and never
differentiated: only the LoRA factors `a` / `b` and their optimizer state form the
TrainState (Orbax checkpoints with the data iterator, so a resume is exact). The factors ride in the DiT's `lora`
collection (see `models.dit.Dense`) with scale alpha / r; `a` starts like peft's (uniform +-1/sqrt(fan_in)), `b`
at zero, so step 0 is the base model. At the end the adapter is written in diffusers' format
(`export/lora/pytorch_lora_weights.safetensors`), which `QwenImage21Pipeline.load_lora_weights` and ours read.
"""
from __future__ import annotations

import logging
import math
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenimage_jax.checkpoints import lora as lora_io
from qwenimage_jax.data import latent_records
from qwenimage_jax.checkpoints import load_transformer
from qwenimage_jax.models.dit import DiT, abstract_params
from qwenimage_jax.parallel.rules import logical_shardings, rules_for
from qwenimage_jax.training.dit import (BATCH_AXES, _global_batch, _null_text, abstract_global_batch,
                                        batch_layout, latent_dataset, make_loss_fn, start_run, warm_batches)
from qwenimage_jax.training.guards import keep_finite
from qwenimage_jax.training.state import TrainState, abstract_state, apply_gradients, make_optimizer, sharded_init

log = logging.getLogger("qwenimage_jax.training.lora")


# ----------------------------------------------------------------------------------------------------------------
# The adapter's layout


def lora_layout(dit_config, target_modules, rank: int) -> dict[tuple[str, ...], dict]:
    """Which Dense paths the adapter covers: {path: {"layers": bool mask or None, "names": kernel axis names,
    "shape": kernel shape}} for every linear whose torch name matches one of `target_modules` (peft's rule)."""
    if rank < 1:
        raise ValueError(f"lora.rank must be >= 1, got {rank}")
    targets = lora_io.lora_targets(dit_config)
    chosen = {m: t for m, t in targets.items() if any(lora_io.matches(m, p) for p in target_modules)}
    if not chosen:
        names = sorted({m.split(".", 2)[-1] if m.startswith("transformer_blocks.") else m for m in targets})
        raise ValueError(f"lora.target_modules {list(target_modules)} match none of the transformer's linears; "
                         f"choose from {names}")
    boxed = flax.traverse_util.flatten_dict(abstract_params(dit_config))
    layout = {}
    for module, target in chosen.items():
        kernel = boxed[target.path + ("kernel",)]
        entry = layout.setdefault(target.path, {"names": tuple(kernel.names), "shape": tuple(kernel.value.shape),
                                                "layers": None})
        if target.layer is not None:
            if entry["layers"] is None:
                entry["layers"] = np.zeros(kernel.value.shape[0], bool)
            entry["layers"][target.layer] = True
    return layout


def _n_in(path: tuple[str, ...]) -> int:
    """Input axes of a DiT kernel: the attention output projection contracts (heads, head_dim), the rest one."""
    return 2 if path[-1] == "to_out" else 1


def init_factors(layout: dict, rank: int, key) -> dict:
    """Boxed (`nn.LogicallyPartitioned`) trainable factors {path: {"a", "b"}}: a ~ U(+-1/sqrt(fan_in)) (peft's
    kaiming_uniform(a=sqrt(5))), zero in layers the adapter does not target; b = 0."""
    out = {}
    for i, (path, entry) in enumerate(sorted(layout.items())):
        names, shape, layers = entry["names"], entry["shape"], entry["layers"]
        lead = 1 if names[0] == "layers" else 0
        n_in = _n_in(path)
        in_shape, out_shape = shape[lead:lead + n_in], shape[lead + n_in:]
        bound = 1.0 / math.sqrt(math.prod(in_shape))
        a = jax.random.uniform(jax.random.fold_in(key, i), shape[:lead] + in_shape + (rank,), jnp.float32,
                               -bound, bound)
        if layers is not None:
            a = a * jnp.asarray(layers, jnp.float32).reshape((-1,) + (1,) * (a.ndim - 1))
        b = jnp.zeros(shape[:lead] + (rank,) + out_shape, jnp.float32)
        out[path] = {"a": nn.LogicallyPartitioned(a, names[:lead + n_in] + ("lora_rank",)),
                     "b": nn.LogicallyPartitioned(b, names[:lead] + ("lora_rank",) + names[lead + n_in:])}
    return flax.traverse_util.unflatten_dict({p + (k,): v for p, f in out.items() for k, v in f.items()})


def column_scales(layout: dict, rank: int, alpha: float) -> dict:
    """The constant `scale` leaves: alpha / r per rank column, 0 in layers the adapter does not target."""
    out = {}
    for path, entry in layout.items():
        lead = 1 if entry["names"][0] == "layers" else 0
        scale = np.full(entry["shape"][:lead] + (rank,), alpha / rank, np.float32)
        if entry["layers"] is not None:
            scale *= entry["layers"][:, None]
        out[path + ("scale",)] = scale
    return flax.traverse_util.unflatten_dict(out)


def with_scales(factors, scales) -> dict:
    """The `lora` collection: trainable {path: {a, b}} joined with the constant {path: {scale}}."""
    flat = flax.traverse_util.flatten_dict(factors)
    flat.update(flax.traverse_util.flatten_dict(scales))
    return flax.traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------------------------------------------
# Setup and the step


def base_config(config):
    """DiTConfig of the base with the trainer's runtime options (compute dtype, remat, attention, lora dropout)."""
    return dict(dtype=jnp.dtype(config.get("compute_dtype", "float32")), remat=config.get("remat", "none"),
                attention=config.get("attention", "xla"), lora_dropout=float(config.lora.get("dropout", 0.0)))


def setup(config, mesh, key, base=None):
    """(state, state shardings, module, base params, scales, tx, lr_schedule, layout): the base restored into its
    shardings (or the given `base` Transformer), the factors initialised straight into theirs."""
    rules = rules_for(config)
    if base is None:
        runtime = {k: v for k, v in base_config(config).items() if k != "dtype"}
        dtype, param_dtype = (jnp.dtype(config.get(k, "float32")) for k in ("compute_dtype", "base_dtype"))
        shardings = logical_shardings(abstract_params(_base_dit_config(config.base, dtype, param_dtype, runtime)),
                                      mesh, rules)
        # QLoRA: the frozen base's block kernels quantized as they are read (checkpoints.quantize); the factors
        # run in float beside them, and only they are differentiated
        quantize = config.get("quantize", "none")
        base = load_transformer(config.base, dtype=dtype, param_dtype=param_dtype, shardings=shardings,
                                quantize=quantize, mesh=mesh if quantize not in (None, "none") else None, **runtime)
    module = base.module   # the quantized module when the base is quantized
    rank, alpha = int(config.lora.rank), float(config.lora.get("alpha", config.lora.rank))
    layout = lora_layout(base.dit_config, list(config.lora.target_modules), rank)
    tx, lr_schedule = make_optimizer(config.optimizer)
    state, shardings = sharded_init(lambda k: init_factors(layout, rank, k), tx, mesh, key, use_ema=False,
                                    rules=rules)
    scales = jax.tree.map(jnp.asarray, column_scales(layout, rank, alpha))
    return state, shardings, module, base.params, scales, tx, lr_schedule, layout


def _base_dit_config(path: str, dtype, param_dtype, runtime):
    """The DiTConfig of a transformer directory (diffusers or Orbax), read before its weights."""
    from qwenimage_jax.checkpoints.orbax_io import is_orbax_component, load_component_config
    from qwenimage_jax.checkpoints.safetensors_io import load_json_config
    from qwenimage_jax.models.dit import DiTConfig

    raw = load_component_config(path, "transformer") if is_orbax_component(path) else load_json_config(path)
    return DiTConfig.from_diffusers(raw, dtype=dtype, param_dtype=param_dtype, **runtime)


def make_train_step(module: DiT, tx, lr_schedule, config, layout, null_text, state_shardings, base_shardings,
                    mesh):
    """A jitted (state, base, scales, batch, key, null_text) -> (state, metrics); gradients reach the factors
    only."""
    loss_fn = make_loss_fn(module, config, layout, null_text,
                           variables_of=lambda factors, base, scales: {"params": base,
                                                                       "lora": with_scales(factors, scales)})

    def step(state: TrainState, base, scales, batch, key, null_text):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key, null_text, base, scales)
        grad_norm = optax.tree.norm(grads)
        new_state = apply_gradients(state, grads, tx)
        new_state, finite = keep_finite(state, new_state, loss, grad_norm)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr_schedule(state.step),
                           "finite": finite}

    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_shardings, base_shardings, replicated, batch_sharding, replicated,
                                       replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def trainable_fraction(factors, base) -> tuple[int, int]:
    """(trainable parameters, base parameters)."""
    count = lambda tree: int(sum(x.size for x in jax.tree.leaves(tree)))  # noqa: E731
    return count(factors), count(base)


# ----------------------------------------------------------------------------------------------------------------
# The loop


def train(config, workdir: str, base=None) -> dict[str, Any]:
    """Runs (or resumes) LoRA training in `workdir`; returns {"losses", "final_step", "export_dir", "state", ...}."""
    from qwenimage_jax.training.loop import Task, run

    mesh, global_batch, n_proc, proc = start_run(config, workdir)
    key = jax.random.key(int(config.seed))
    rules = rules_for(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, shardings, module, base_params, scales, tx, lr_schedule, layout = setup(config, mesh, key, base)
    n_train, n_base = trainable_fraction(state.params, base_params)
    log.info("LoRA rank %d on %d linears: %d trainable parameters (%.3f%% of the base's %d)",
             int(config.lora.rank), len(layout), n_train, 100 * n_train / n_base, n_base)
    base_shardings = jax.tree.map(lambda x: x.sharding, base_params)
    dataset = latent_dataset(config, global_batch, n_proc, proc)
    null_text = _null_text(config.data.path, int(config.data.max_text_tokens))
    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    export_dir = os.path.join(workdir, "export", "lora")

    def step_for(layout_key):
        step = make_train_step(module, tx, lr_schedule, config, layout_key, null_text, shardings, base_shardings,
                               mesh)
        return lambda state, batch, k: step(state, base_params, scales, batch, k, null_text)

    def export(final_state):
        if proc != 0:
            return None
        from qwenimage_jax.io_utils import staged_dir

        with staged_dir(export_dir) as staged:  # the previous adapter stays whole until this one is complete
            export_adapter(staged, final_state.params, scales, module.config, config)
        log.info("exported the adapter to %s (diffusers format)", export_dir)
        return export_dir

    def compile_step(layout_key, local, state):
        step = make_train_step(module, tx, lr_schedule, config, layout_key, null_text, shardings, base_shardings,
                               mesh)
        batch = abstract_global_batch(local, batch_sharding)
        if not hasattr(step, "lower"):
            return lambda state, batch, k: step(state, base_params, scales, batch, k, null_text)
        exe = step.lower(state, base_params, scales, batch, jax.random.fold_in(key, 0), null_text).compile()
        return lambda state, batch, k: exe(state, base_params, scales, batch, k, null_text)

    task = Task("train-lora", state, abstract_state(state, shardings), latent_records.iterate(dataset), step_for,
                batch_layout, lambda local: _global_batch(local, batch_sharding), key, export=export,
                warm_batches=warm_batches(config, global_batch, n_proc, proc), compile_step=compile_step)
    result = run(task, config, workdir, mesh, rules, proc)
    result.update(export_dir=export_dir, trainable_params=n_train, base_params=n_base)
    return result


def export_adapter(directory: str, factors, scales, dit_config, config) -> str:
    """Writes the trained factors in diffusers' format (see `convert.lora.save_lora`)."""
    joined = with_scales(jax.device_get(factors), jax.device_get(scales))
    return lora_io.save_lora(directory, _by_path(joined), dit_config, rank=int(config.lora.rank),
                             alpha=float(config.lora.get("alpha", config.lora.rank)))


def _by_path(tree) -> dict[tuple[str, ...], dict]:
    """{path: {"a", "b", "scale"}} from the nested `lora` collection."""
    flat = flax.traverse_util.flatten_dict(tree)
    out: dict[tuple[str, ...], dict] = {}
    for path, value in flat.items():
        out.setdefault(tuple(path[:-1]), {})[path[-1]] = np.asarray(value)
    return out
