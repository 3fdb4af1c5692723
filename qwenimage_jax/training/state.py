"""The training state shared by every trainer (VAE, DiT, distillation): a pytree of step, params, optimizer
state and EMA params, plus the optimizer built from config (AdamW, warmup + decay, global-norm clipping).

Sharding recipe (maxtext style): build the state once abstractly with *boxed* params
(`nn.with_logical_partitioning`), read the logical specs off it, map them through `parallel.rules`, then
init for real under `jax.jit(..., out_shardings=...)` and unbox. `sharded_init` does all of that.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from qwenimage_jax.parallel.rules import LOGICAL_RULES, logical_shardings
from qwenimage_jax.training.schedules import make_schedule


@flax.struct.dataclass
class TrainState:
    """step: int32 scalar; params / ema_params: same tree (ema_params None when EMA is off);
    opt_state: the optax state of `tx` (tx itself is not part of the pytree)."""
    step: jax.Array
    params: Any
    opt_state: Any
    ema_params: Any = None

    @classmethod
    def create(cls, params: Any, tx: optax.GradientTransformation, use_ema: bool = True) -> "TrainState":
        ema = jax.tree.map(jnp.copy, params) if use_ema else None
        return cls(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=ema)


def _decay_mask(params):
    """Weight decay on matrices and conv kernels only (not on biases, norm scales, or scalars)."""
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def make_optimizer(opt_config) -> tuple[optax.GradientTransformation, Callable]:
    """config.optimizer -> (tx, learning-rate schedule).

    Fields: learning_rate (number or schedule spec, see `schedules.make_schedule`), b1, b2, eps, weight_decay,
    grad_clip_norm (<= 0 disables clipping), clip_per_group (clip each top-level params entry on its own),
    decay_all (bool: also decay biases/norms; default False).
    """
    lr = make_schedule(opt_config.get("learning_rate", 1e-4))
    mask = None if opt_config.get("decay_all", False) else _decay_mask
    adamw = optax.adamw(lr, b1=opt_config.get("b1", 0.9), b2=opt_config.get("b2", 0.99),
                        eps=opt_config.get("eps", 1e-8), weight_decay=opt_config.get("weight_decay", 1e-4),
                        mask=mask)
    clip = float(opt_config.get("grad_clip_norm", 1.0))
    if clip <= 0:
        return adamw, lr
    clipper = clip_each_group(clip) if opt_config.get("clip_per_group", False) else optax.clip_by_global_norm(clip)
    return optax.chain(clipper, adamw), lr


def clip_each_group(max_norm: float) -> optax.GradientTransformation:
    """Global-norm clipping applied separately to each top-level entry of a dict of params (e.g. "vae" and an
    auxiliary "proj" head), so an auxiliary head's gradients never rescale the main model's."""
    def update(updates, state, params=None):  # noqa: ARG001
        def clip(tree):
            norm = optax.tree.norm(tree)
            scale = jnp.where(norm > max_norm, max_norm / jnp.maximum(norm, 1e-12), 1.0)
            return jax.tree.map(lambda g: (g * scale).astype(g.dtype), tree)
        return {name: clip(tree) for name, tree in updates.items()}, state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def apply_gradients(state: TrainState, grads: Any, tx: optax.GradientTransformation,
                    ema_decay: float = 0.0) -> TrainState:
    """One optimizer update + EMA (ema <- decay * ema + (1 - decay) * params, on the updated params)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
        ema = jax.tree.map(lambda e, p: (ema_decay * e + (1.0 - ema_decay) * p).astype(e.dtype), ema, params)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema)


def restart_from(state: TrainState, params: Any, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """`state` with trained `params` (e.g. `init_from` weights), a fresh optimizer state in its shardings, and the
    EMA (when kept) starting at those params."""
    return state.replace(params=params, opt_state=jax.jit(tx.init, out_shardings=shardings.opt_state)(params),
                         ema_params=None if state.ema_params is None else jax.tree.map(jnp.copy, params))


def sharded_init(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh,
                 key: jax.Array, use_ema: bool = True, rules=LOGICAL_RULES) -> tuple[TrainState, Any]:
    """Initialise a TrainState directly onto its shardings.

    init_params(key) -> params tree, possibly with `nn.Partitioned` boxes (logical axis names).
    Returns (state with plain arrays, state shardings tree); the shardings also serve checkpoint restores.
    """
    def boxed_state(k):
        return TrainState.create(init_params(k), tx, use_ema)

    _, shardings = state_shardings(init_params, tx, mesh, key, use_ema, rules)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state = jax.jit(lambda k: nn.unbox(boxed_state(k)), out_shardings=shardings)(key)
    return state, shardings


def state_shardings(init_params: Callable[[jax.Array], Any], tx: optax.GradientTransformation, mesh,
                    key: jax.Array, use_ema: bool = True, rules=LOGICAL_RULES) -> tuple[Any, Any]:
    """(abstract unboxed state with shardings, shardings) without allocating anything: what a restore needs."""
    boxed = jax.eval_shape(lambda k: TrainState.create(init_params(k), tx, use_ema), key)
    shardings = logical_shardings(boxed, mesh, rules)
    return abstract_state(boxed, shardings), shardings


def abstract_state(state_or_fn: Any, shardings: Any = None, *args) -> Any:
    """ShapeDtypeStructs (with shardings when given) for a state, or for `fn(*args)` via `jax.eval_shape`."""
    tree = jax.eval_shape(state_or_fn, *args) if callable(state_or_fn) else state_or_fn
    # Unbox without sharding constraints: these are abstract values, possibly under an active mesh + rules.
    tree = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x, tree,
                        is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    if shardings is None:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def param_count(params: Any) -> int:
    return int(sum(x.size for x in jax.tree.leaves(params)))
