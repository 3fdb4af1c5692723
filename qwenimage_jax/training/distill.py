"""DMD step distillation of the DiT: a few-step student (4 Euler steps by default) from a many-step teacher.

    qwenimage-jax distill --config configs/distill_tiny.py --workdir DIR --config.teacher=TEACHER_DIR \
        --config.data.path=LATENTS_DIR

Three networks with the same architecture and the same sharding rules (METHODS.md section 3):
  G      the student, initialised from the teacher, trained (AdamW, EMA);
  real   the teacher, frozen; optional true CFG inside the real score (decoupled DMD's "CFG augmentation");
  fake   the fake score, initialised from the teacher, trained online by flow matching on G's samples.
One distillation step = `fake.updates` fake-score updates (DMD2's two time-scale rule), each on fresh student
samples, then one student update:
  k ~ U{0..n-1};  x_k = k Euler steps of G from noise z along the student grid (backward simulation, no grad)
  x0 = x_k - sigma_k G(x_k, sigma_k)                               (the only term with a gradient)
  t ~ [t_min, t_max];  x_t = (1 - t) sg(x0) + t eps
  grad = (x0_fake(x_t) - x0_real(x_t)) / mean|x0 - x0_real|;   L = w_dmd 0.5 |x0 - sg(x0 - grad)|^2
       (+ w_reg |x0 - teacher_ODE(z)|^2, the teacher's own many-step solution from the same noise, when enabled)
The regression target is either solved online every update (`regression.teacher_steps` CFG Euler steps of the
teacher from z) or, as DMD1 does, read from a precomputed pairs store (`regression.pairs`, written by
training/distill_pairs.py): its batches carry `noise` (z) beside `latents` (the teacher's solution from z), the
student update starts from that z, and no teacher ODE runs in the step. Which one is decided at trace time by the
batch's keys. The fake score always trains on fresh noise: it models the student's whole output distribution.
The student grid is exactly what the exported pipeline samples with: `student.sample_sigmas` (pre-shift, the
model_index.json `sample_sigmas`; default linspace(1, 1/n, n)) through the scheduler's mu shift and terminal
stretch at the batch's token count; the network reads the pipeline's `timestep / 1000` at each grid point.

Text conditions and layouts come from a cached latent dataset (`data.latent_records`; the image latents are not
used, DMD needs no real images). The Orbax checkpoint holds the whole trainable state (student + EMA + optimizer,
fake + optimizer, step) and the data iterator; the frozen teacher is re-read from `config.teacher` on resume.
At the end the student (EMA when kept) is written as a diffusers pipeline directory with `sample_sigmas`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import shutil
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenimage_jax.data import latent_records
from qwenimage_jax.checkpoints import load_transformer
from qwenimage_jax.models.dit import (DiT, DiTConfig, _dummy_inputs, check_parallelism, init_transformer,
                                      param_shardings)
from qwenimage_jax.parallel.rules import LOGICAL_RULES
from qwenimage_jax.sampling import scheduler as sched
from qwenimage_jax.training import dmd
from qwenimage_jax.training.dit import (BATCH_AXES, _global_batch, _null_text, batch_layout, compute_batch,
                                        latent_dataset, start_run)
from qwenimage_jax.training.guards import keep_finite
from qwenimage_jax.training.loop import Task, run
from qwenimage_jax.training.state import TrainState, apply_gradients, make_optimizer, param_count, state_shardings

log = logging.getLogger("qwenimage_jax.training.distill")
STEPS_FILE = "distilled_steps.json"  # in an export: the student update it was written at


@flax.struct.dataclass
class DistillState:
    """Everything trainable: step (int32, student updates), student (TrainState with EMA when enabled),
    fake (TrainState, no EMA). The teacher's params travel separately (frozen, not checkpointed)."""
    step: jax.Array
    student: TrainState
    fake: TrainState


# ----------------------------------------------------------------------------------------------------------------
# Configuration helpers


def teacher_fields(config) -> dict:
    """The diffusers architecture fields: from the teacher checkpoint's config.json when `config.teacher` is set
    (config.model is then ignored), else `config.model` (random teacher: smoke tests only)."""
    if config.get("teacher"):
        path = config.teacher
        from qwenimage_jax.checkpoints.orbax_io import is_orbax_component, load_component_config
        from qwenimage_jax.checkpoints.safetensors_io import load_json_config

        return load_component_config(path, "transformer") if is_orbax_component(path) else load_json_config(path)
    return dict(config.model)


def model_configs(config) -> tuple[DiTConfig, DiTConfig]:
    """(student/fake DiTConfig with remat, teacher DiTConfig without remat and with its own storage dtype)."""
    fields = teacher_fields(config)
    dtype = jnp.dtype(config.get("compute_dtype", "float32"))
    cfg = DiTConfig.from_diffusers(fields, dtype=dtype, param_dtype=jnp.float32, remat=config.get("remat", "none"),
                                   attention=config.get("attention", "xla"))
    teacher = dataclasses.replace(cfg, remat="none",
                                  param_dtype=jnp.dtype(config.get("teacher_param_dtype", "float32")))
    return cfg, teacher


def scheduler_config(config) -> dict:
    return {**sched.QWEN_IMAGE_SCHEDULER_CONFIG, **dict(config.get("scheduler", None) or {})}


def student_sample_sigmas(config) -> list[float]:
    """The pre-shift student grid = the `sample_sigmas` written to model_index.json."""
    grid = config.student.get("sample_sigmas", None)
    if grid:
        return [float(s) for s in grid]
    n = int(config.student.num_steps)
    return [float(s) for s in np.linspace(1.0, 1.0 / n, n)]


def student_grid(config, n_target: int) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas (n + 1,) ending in 0, model times (n,)) the pipeline uses for the student at n_target tokens."""
    sigmas, timesteps = sched.flow_match_sigmas(None, n_target, scheduler_config(config),
                                                sigmas=student_sample_sigmas(config))
    return sigmas, sched.model_timesteps(timesteps)


def teacher_grid(config, n_target: int) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's own many-step grid (regression targets), `regression.teacher_steps` steps."""
    sigmas, timesteps = sched.flow_match_sigmas(int(config.regression.teacher_steps), n_target,
                                                scheduler_config(config))
    return sigmas, sched.model_timesteps(timesteps)


def _dummy_batch_inputs(cfg: DiTConfig, mesh):
    """Init inputs spanning the batch axes; call inside the traced init (works on compile-only AOT devices)."""
    return _dummy_inputs(cfg, mesh.shape["data"] * mesh.shape["fsdp"])


def optimizers(config):
    """((student tx, student lr schedule), (fake tx, fake lr schedule))."""
    return make_optimizer(config.optimizer), make_optimizer(config.fake.optimizer)


@functools.lru_cache(maxsize=16)
def _shardings_cached(config_json: str, mesh) -> tuple[Any, Any, Any]:
    config = ml_collections.ConfigDict(json.loads(config_json))
    cfg, teacher_cfg = model_configs(config)
    (tx_s, _), (tx_f, _) = optimizers(config)
    init = lambda k: DiT(cfg).init(k, *_dummy_batch_inputs(cfg, mesh))["params"]  # noqa: E731
    use_ema = float(config.ema_decay) > 0
    key = jax.eval_shape(lambda: jax.random.key(0))  # abstract: nothing is placed on the mesh's devices
    abs_s, sh_s = state_shardings(init, tx_s, mesh, key, use_ema=use_ema)
    abs_f, sh_f = state_shardings(init, tx_f, mesh, key, use_ema=False)
    replicated = NamedSharding(mesh, P())
    shardings = DistillState(step=replicated, student=sh_s, fake=sh_f)
    abstract = DistillState(step=jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated), student=abs_s, fake=abs_f)
    return shardings, abstract, param_shardings(teacher_cfg, mesh)


def distill_shardings(config, mesh):
    """(state shardings, abstract state with shardings, teacher param shardings), all rule-derived on `mesh`."""
    return _shardings_cached(_step_key(config), mesh)


# ----------------------------------------------------------------------------------------------------------------
# Initialisation


def load_teacher(config, mesh, shardings):
    """The frozen teacher's params on `shardings`: from `config.teacher`, or random (`config.seed`) when empty."""
    _, teacher_cfg = model_configs(config)
    if config.get("teacher"):
        loaded = load_transformer(config.teacher, dtype=teacher_cfg.dtype, param_dtype=teacher_cfg.param_dtype,
                                  shardings=shardings)
        return loaded.params
    log.warning("config.teacher is empty: distilling a RANDOM teacher (smoke test only)")
    return init_transformer(teacher_cfg, jax.random.key(int(config.seed) + 1), mesh=mesh).params


def init_from_teacher(config, mesh, teacher_params):
    """DistillState with student and fake both copied from the teacher (fp32 masters), on their shardings."""
    shardings, _, _ = distill_shardings(config, mesh)
    (tx_s, _), (tx_f, _) = optimizers(config)
    use_ema = float(config.ema_decay) > 0

    def create(tparams):
        params = jax.tree.map(lambda p: p.astype(jnp.float32), tparams)
        student = TrainState.create(jax.tree.map(jnp.copy, params), tx_s, use_ema)
        fake = TrainState.create(jax.tree.map(jnp.copy, params), tx_f, use_ema=False)
        return DistillState(step=jnp.zeros((), jnp.int32), student=student, fake=fake)

    with jax.set_mesh(mesh):
        return jax.jit(create, out_shardings=shardings)(teacher_params)


# ----------------------------------------------------------------------------------------------------------------
# Velocities and the teacher's ODE (shared by the step and the pairs builder, training/distill_pairs.py)


def target_tokens(layout) -> int:
    """Token count of the target image of a layout bucket (the last entry of img_shapes)."""
    img_shapes, _ = layout
    return img_shapes[-1][1] * img_shapes[-1][2]


def is_text_to_image(layout) -> bool:
    """One target image and no VLM image slots: the layouts where true CFG (an empty-prompt branch) applies."""
    img_shapes, img_mask = layout
    return len(img_shapes) == 1 and not any(img_mask[:len(img_mask) - target_tokens(layout) // 4])


def regression_cfg_scale(config, layout) -> float:
    """The CFG scale of the regression target's teacher ODE (`regression.cfg_scale`, else the real score's)."""
    if not is_text_to_image(layout):
        return 1.0
    return float(config.regression.get("cfg_scale", None) or config.dmd.real_cfg_scale)


def is_pairs_batch(batch) -> bool:
    """A batch of precomputed (noise, teacher solution) pairs (training/distill_pairs.py): it carries `noise`."""
    return "noise" in batch


def batch_conditions(batch) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """(text embeds, text mask, condition-image tokens (B, N_cond, C) or None) of a batch."""
    cond = batch.get("cond_latents")
    if cond is not None:
        cond = cond.reshape(cond.shape[0], -1, cond.shape[-1])
    return batch["text_embeds"], batch["text_mask"], cond


def dit_velocity(module, params, x, t, text, text_mask, cond, layout):
    """x: (B, N_tgt, C) target latents; t: (B,) model time -> v (B, N_tgt, C) float32."""
    img_shapes, img_mask = layout
    n_target = target_tokens(layout)
    hidden = x if cond is None else jnp.concatenate([cond, x.astype(cond.dtype)], axis=1)
    out = module.apply({"params": params}, hidden.astype(module.config.dtype), text.astype(module.config.dtype),
                       t, img_shapes, img_mask, encoder_hidden_states_mask=text_mask)
    return out[:, -n_target:].astype(jnp.float32)


def teacher_velocity(module, tparams, x, t, batch, null_text, scale, layout):
    """The teacher's velocity with true CFG `scale` against the empty prompt `null_text` (scale 1: conditional)."""
    text, mask, cond = batch_conditions(batch)
    if scale == 1.0:
        return dit_velocity(module, tparams, x, t, text, mask, cond, layout)
    # conditional and empty-prompt branches as one doubled batch (same layout: text-to-image only)
    bsz = x.shape[0]
    null_embeds = jnp.broadcast_to(null_text[0][None].astype(text.dtype), (bsz,) + null_text[0].shape)
    null_mask = jnp.broadcast_to(null_text[1][None], (bsz,) + null_text[1].shape).astype(mask.dtype)
    both = dit_velocity(module, tparams, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                        jnp.concatenate([text, null_embeds]), jnp.concatenate([mask, null_mask]), None, layout)
    return dmd.guided_velocity(both[:bsz], both[bsz:], scale)


def teacher_ode(module, tparams, z, batch, null_text, scale, sigmas, model_t, layout):
    """The teacher's CFG Euler solution from noise z (B, N_tgt, C) along (sigmas, model_t); no gradient."""
    def body(j, x):
        t = jnp.broadcast_to(jnp.asarray(model_t)[j], (x.shape[0],))
        v = teacher_velocity(module, tparams, x, t, batch, null_text, scale, layout)
        return x + (jnp.asarray(sigmas)[j + 1] - jnp.asarray(sigmas)[j]) * v
    return jax.lax.stop_gradient(jax.lax.fori_loop(0, len(model_t), body, z))


def regression_target_fn(config, layout):
    """(tparams, z, batch, null_text) -> the regression target from z: the teacher's ODE on its own grid
    (`regression.teacher_steps`) with the regression's CFG."""
    _, teacher_cfg = model_configs(config)
    module = DiT(teacher_cfg)
    sigmas, model_t = teacher_grid(config, target_tokens(layout))
    scale = regression_cfg_scale(config, layout)
    solve = functools.partial(teacher_ode, module, sigmas=sigmas, model_t=model_t, layout=layout, scale=scale)
    return lambda tparams, z, batch, null_text: solve(tparams, z, compute_batch(batch), null_text)


# ----------------------------------------------------------------------------------------------------------------
# The step


def make_distill_step(config, layout, mesh):
    """A jitted (state, teacher_params, batch, null_text, key) -> (state, metrics) for one layout bucket; cached
    on (config, layout, mesh) so repeated runs (resume, tests) reuse the compiled program."""
    return _make_distill_step(_step_key(config), layout, mesh)


def _step_key(config) -> str:
    """The config as JSON without the fields that cannot change the compiled step (run length, logging,
    checkpointing, export, data location, what to do on a NaN/Inf step), so a resumed or longer run reuses the
    program. The pairs store's location and size are data too: whether the step reads its regression target from
    the batch is decided by the batch's keys when it is traced."""
    key = ml_collections.ConfigDict(config.to_dict())
    for name in ("steps", "checkpoint", "log_every", "progress", "export", "data", "on_nonfinite",
                 "nonfinite_in_a_row"):
        if name in key:
            del key[name]
    for name in ("pairs", "num_pairs"):
        if "regression" in key and name in key.regression:
            del key.regression[name]
    return key.to_json()


@functools.lru_cache(maxsize=32)
def _make_distill_step(config_json: str, layout, mesh):
    config = ml_collections.ConfigDict(json.loads(config_json))
    cfg, teacher_cfg = model_configs(config)
    student_mod, teacher_mod = DiT(cfg), DiT(teacher_cfg)
    (tx_s, lr_s), (tx_f, lr_f) = optimizers(config)
    n_target = target_tokens(layout)
    sigmas, model_t = student_grid(config, n_target)
    n_steps = len(model_t)
    real_cfg = float(config.dmd.real_cfg_scale) if is_text_to_image(layout) else 1.0
    reg_weight = float(config.regression.weight)
    online_target = regression_target_fn(config, layout) if reg_weight > 0 else None
    n_fake = int(config.fake.updates)
    sim_mode = config.student.get("backward_sim", "euler")
    mu = sched.mu_for(n_target, sched.SchedulerConfig.from_dict(scheduler_config(config))) \
        if config.dmd.get("shift", "none") == "tokens" else None
    times = dict(t_min=float(config.dmd.t_min), t_max=float(config.dmd.t_max),
                 distribution=config.dmd.distribution, mean=float(config.dmd.get("mean", 0.0)),
                 std=float(config.dmd.get("std", 1.0)), mu=mu)
    fake_times = dict(times, **dict(config.fake.get("times", None) or {}))

    def velocity(module, params, x, t, text, text_mask, cond):
        return dit_velocity(module, params, x, t, text, text_mask, cond, layout)

    def real_velocity(tparams, x, t, batch, null_text, scale):
        return teacher_velocity(teacher_mod, tparams, x, t, batch, null_text, scale, layout)

    def student_state(sparams, batch, key, noise=None):
        """Backward simulation: (z, x_k, sigma_k, t_k) for a random grid index k (one per batch); z is `noise`
        when given (a pairs batch), else drawn from `key`."""
        k_k, k_z, k_sim = jax.random.split(key, 3)
        k = jax.random.randint(k_k, (), 0, n_steps)
        x0_shape = batch["latents"].shape
        if noise is None:
            z = jax.random.normal(k_z, (x0_shape[0], n_target, x0_shape[-1]), jnp.float32)
        else:
            z = noise.astype(jnp.float32)
        text, mask, cond = batch_conditions(batch)
        frozen = jax.lax.stop_gradient(sparams)
        fn = lambda x, t: velocity(student_mod, frozen, x, t, text, mask, cond)  # noqa: E731
        x_k, sigma_k, t_k = dmd.backward_simulate(fn, z, sigmas, model_t, k, mode=sim_mode, key=k_sim)
        return z, x_k, sigma_k, t_k, k

    def fake_update(fake: TrainState, sparams, batch, key):
        k_state, k_t, k_eps = jax.random.split(key, 3)
        _, x_k, sigma_k, t_k, _ = student_state(sparams, batch, k_state)
        text, mask, cond = batch_conditions(batch)
        x0 = jax.lax.stop_gradient(dmd.x0_from_velocity(
            x_k, velocity(student_mod, sparams, x_k, t_k, text, mask, cond), sigma_k))
        t = dmd.sample_times(k_t, x0.shape[0], **fake_times)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        x_t = dmd.renoise(x0, eps, t)

        def loss_fn(fparams):
            return dmd.fake_score_loss(velocity(student_mod, fparams, x_t, t, text, mask, cond), x0, eps)

        loss, grads = jax.value_and_grad(loss_fn)(fake.params)
        return apply_gradients(fake, grads, tx_f, 0.0), loss, optax.global_norm(grads)

    def regression_target(tparams, z, batch, null_text):
        if is_pairs_batch(batch):  # the precomputed teacher solution from the batch's own noise
            latents = batch["latents"]
            return jax.lax.stop_gradient(latents.reshape(latents.shape[0], n_target, latents.shape[-1])
                                         .astype(jnp.float32))
        return online_target(tparams, z, batch, null_text)

    def student_loss(sparams, fparams, tparams, batch, null_text, key):
        k_state, k_t, k_eps = jax.random.split(key, 3)
        fparams, tparams = jax.lax.stop_gradient(fparams), jax.lax.stop_gradient(tparams)
        z, x_k, sigma_k, t_k, k = student_state(sparams, batch, k_state, noise=batch.get("noise"))
        text, mask, cond = batch_conditions(batch)
        x0 = dmd.x0_from_velocity(x_k, velocity(student_mod, sparams, x_k, t_k, text, mask, cond), sigma_k)
        t = dmd.sample_times(k_t, x0.shape[0], **times)
        eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
        x_t = dmd.renoise(jax.lax.stop_gradient(x0), eps, t)
        x0_real = dmd.x0_from_velocity(x_t, real_velocity(tparams, x_t, t, batch, null_text, real_cfg), t)
        x0_fake = dmd.x0_from_velocity(x_t, velocity(student_mod, fparams, x_t, t, text, mask, cond), t)
        grad = dmd.dmd_gradient(x0, x0_real, x0_fake)
        dmd_term = dmd.dmd_loss(x0, grad)
        loss = float(config.dmd.weight) * dmd_term
        aux = {"dmd_loss": dmd_term, "dmd_grad_abs": jnp.mean(jnp.abs(grad)), "k": k.astype(jnp.float32),
               "student_x0_std": jnp.std(x0)}
        if reg_weight > 0:
            reg = dmd.regression_loss(x0, regression_target(tparams, z, batch, null_text))
            loss = loss + reg_weight * reg
            aux["regression_loss"] = reg
        return loss, aux

    def step(state: DistillState, tparams, batch, null_text, key):
        batch = compute_batch(batch)   # float16 on the way in, float32 here
        k_fake, k_student = jax.random.split(jax.random.fold_in(key, state.step))
        fake = state.fake
        metrics = {}
        if n_fake > 0:
            def body(f, i):
                f, loss, gnorm = fake_update(f, state.student.params, batch, jax.random.fold_in(k_fake, i))
                return f, (loss, gnorm)

            fake, (f_loss, f_gnorm) = jax.lax.scan(body, fake, jnp.arange(n_fake))
            metrics.update(fake_loss=jnp.mean(f_loss), fake_loss_first=f_loss[0], fake_loss_last=f_loss[-1],
                           fake_grad_norm=jnp.mean(f_gnorm))
        (loss, aux), grads = jax.value_and_grad(student_loss, has_aux=True)(
            state.student.params, fake.params, tparams, batch, null_text, k_student)
        student = apply_gradients(state.student, grads, tx_s, float(config.ema_decay))
        grad_norm = optax.global_norm(grads)
        metrics.update(aux, loss=loss, grad_norm=grad_norm, learning_rate=lr_s(state.student.step),
                       fake_learning_rate=lr_f(state.fake.step))
        new_state = DistillState(step=state.step + 1, student=student, fake=fake)
        # a NaN/Inf in the student's or the fake score's loss leaves both as they were (training/guards.py)
        checked = loss + metrics.get("fake_loss", 0.0) + metrics.get("fake_grad_norm", 0.0)
        new_state, metrics["finite"] = keep_finite(state, new_state, checked, grad_norm)
        return new_state, metrics

    shardings, _, teacher_shardings = _shardings_cached(config_json, mesh)
    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(shardings, teacher_shardings, batch_sharding, replicated, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))


def pairs_data_config(config):
    """`config` itself, or, with `regression.pairs` set, a copy whose data.path is that (complete) pairs store,
    checked to hold the regression target this config asks for."""
    pairs = config.regression.get("pairs", "")
    if not pairs:
        return config
    from qwenimage_jax.training.distill_pairs import check_pairs_match

    check_pairs_match(config, pairs)
    data_config = ml_collections.ConfigDict(config.to_dict())
    data_config.data.path = pairs
    return data_config


def null_text_for(config) -> tuple[jax.Array, jax.Array]:
    """(embeds (L, D), mask (L,)) of the empty prompt padded to data.max_text_tokens; zeros when the dataset has
    none (then CFG inside the real score is refused)."""
    null = _null_text(config.data.path, int(config.data.max_text_tokens))
    if null is None:
        if float(config.dmd.real_cfg_scale) != 1.0:
            raise ValueError(f"dmd.real_cfg_scale={config.dmd.real_cfg_scale} needs the empty-prompt embedding, but "
                             f"{config.data.path!r} has no null_text_embeds.npy; re-cache the data or set "
                             "--config.dmd.real_cfg_scale=1.0")
        n, d = int(config.data.max_text_tokens), int(teacher_fields(config).get("context_in_dim", 4096))
        return jnp.zeros((n, d), jnp.float32), jnp.zeros((n,), bool)
    return null


# ----------------------------------------------------------------------------------------------------------------
# The loop


def distill(config, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) distillation in `workdir`; returns {"losses": {step: loss}, "metrics": {step: dict},
    "final_step", "state", "teacher_params", "export_dir"}."""
    mesh, global_batch, n_proc, proc = start_run(config, workdir)
    cfg, _ = model_configs(config)
    check_parallelism(cfg, mesh, global_batch)
    key = jax.random.key(int(config.seed))

    _, abstract, teacher_shardings = distill_shardings(config, mesh)
    with nn.logical_axis_rules(LOGICAL_RULES):
        teacher_params = load_teacher(config, mesh, teacher_shardings)

    # with a pairs store its records are the data: the same text conditions, plus each pair's noise and target
    data_config = pairs_data_config(config)
    dataset = latent_dataset(data_config, global_batch, n_proc, proc)
    data_iter = latent_records.iterate(dataset)
    null_text = null_text_for(data_config)

    log.info("DMD: student/fake/teacher of %.2fM parameters each on mesh %s; %d fake updates per student update",
             param_count(teacher_params) / 1e6, dict(mesh.shape), int(config.fake.updates))

    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    export_dir = os.path.join(workdir, "export")

    def step_for(layout):
        step_fn = make_distill_step(config, layout, mesh)
        # the DMD step folds its own step counter into one fixed key (as the shipped student was trained)
        return lambda s, batch, _: step_fn(s, teacher_params, batch, null_text, key)

    # the initial state is built (from the teacher) only when there is no checkpoint to resume from
    task = Task("distill", lambda: init_from_teacher(config, mesh, teacher_params), abstract, data_iter, step_for,
                batch_layout, lambda local: _global_batch(local, batch_sharding), key,
                export=lambda s: export_student(config, s, export_dir) if proc == 0 else None,
                postfix=lambda m: {"dmd": f"{m['dmd_loss']:.3g}", "fake": f"{m.get('fake_loss', 0):.3g}"})
    result = run(task, config, workdir, mesh, LOGICAL_RULES, proc)
    result.update(teacher_params=teacher_params, mesh=mesh)
    return result


def export_student(config, state: DistillState, dst: str) -> str:
    """Writes the student (EMA when kept) as a QwenImage21Pipeline directory with the student's `sample_sigmas`;
    other components are copied from `config.export.components` ({"vae": DIR, ...}) when given."""
    from qwenimage_jax.checkpoints.pipeline_dir import write_pipeline_dir
    from qwenimage_jax.io_utils import swap_in_dir

    cfg, _ = model_configs(config)
    params = state.student.ema_params if state.student.ema_params is not None else state.student.params
    step = int(state.step)
    record = os.path.join(dst, STEPS_FILE)
    if os.path.exists(os.path.join(dst, "model_index.json")):
        exported = json.load(open(record))["steps"] if os.path.exists(record) else None
        if exported is None or exported >= step:
            # not ours to replace: another run's export, or this run's at the same step
            log.warning("%s already holds an export%s; leaving it unchanged", dst,
                        f" of update {exported}" if exported is not None else "")
            return dst
    # a continued run replaces its earlier export: written beside it, then swapped in
    tmp = dst.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    components = {k: v for k, v in dict(config.export.get("components", None) or {}).items() if v}
    write_pipeline_dir(tmp, params, cfg, sample_sigmas=student_sample_sigmas(config), components=components,
                       scheduler_config=scheduler_config(config), dtype=config.export.get("dtype", "float32"),
                       link=bool(config.export.get("link", False)))
    with open(os.path.join(tmp, STEPS_FILE), "w") as f:
        json.dump({"steps": step}, f)
    swap_in_dir(tmp, dst)  # the previous export stays whole until the new one is in place
    log.info("student (update %d) exported to %s (sample_sigmas %s)", step, dst, student_sample_sigmas(config))
    return dst
