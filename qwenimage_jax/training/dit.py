"""DiT trainer: flow matching on cached latents + text embeddings, sharded over (data, fsdp, tensor).

    qwenimage-jax train-dit --config configs/dit_train_tiny.py --workdir /tmp/dit [--config.steps=200 ...]

One readable loop (big_vision style): build the mesh, init (or restore) the TrainState straight into its
shardings, read homogeneous batches from grain (one compiled step per layout bucket), step, log, checkpoint.
Per step: sigmas ~ logit-normal shifted by mu(tokens) (the sampler's own shift), x_sigma = (1-sigma) x0 +
sigma noise, target = noise - x0, MSE on the target-image tokens; 10% of text-to-image samples see the empty
prompt (classifier-free guidance dropout). bf16 compute with fp32 master weights and optimizer state, AdamW
with warmup + decay and grad clipping, EMA, gradient accumulation by a scan over micro-batches.

MFU uses the analytic FLOPs of `train_flops_per_example` (see its docstring) against
`config.peak_flops_per_device` (0 disables MFU, e.g. on CPU).
"""
from __future__ import annotations

import logging
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenimage_jax.data import latent_records
from qwenimage_jax.checkpoints import load_transformer
from qwenimage_jax.models.dit import DiT, DiTConfig, _dummy_inputs, check_parallelism
from qwenimage_jax.parallel.distributed import maybe_initialize
from qwenimage_jax.parallel.mesh import mesh_from_config
from qwenimage_jax.parallel.rules import rules_for
from qwenimage_jax.training import flow_matching as fm
from qwenimage_jax.training.guards import keep_finite
from qwenimage_jax.training.state import (TrainState, abstract_state, apply_gradients, make_optimizer,
                                          param_count, restart_from, sharded_init, state_shardings)

log = logging.getLogger("qwenimage_jax.training.dit")

BATCH_AXES = ("data", "fsdp")


# ----------------------------------------------------------------------------------------------------------------
# Layout and FLOPs


def batch_layout(batch: dict) -> tuple[tuple, tuple]:
    """(img_shapes, img_mask) of a homogeneous batch: condition image first (editing), target last."""
    _, h, w, _ = batch["latents"].shape
    if (h * w) % 4:
        raise ValueError(f"target latent grid {h}x{w} has {h * w} tokens, not a multiple of 4 (2x2 image slots)")
    shapes = []
    if batch.get("cond_latents") is not None:
        _, hc, wc, _ = batch["cond_latents"].shape
        shapes.append((1, int(hc), int(wc)))
    shapes.append((1, int(h), int(w)))
    slots = np.asarray(batch["image_pad_mask"])[0].astype(bool)
    return tuple(shapes), tuple(bool(s) for s in slots) + (True,) * (h * w // 4)


def train_flops_per_example(cfg: DiTConfig, seq_len: int, text_len: int) -> float:
    """Analytic training FLOPs for one example (forward + backward = 3 x forward; remat recompute not counted).

    Per layer and token: q,k,v,o projections 4 * 2 d^2, SwiGLU 3 * 2 * d * (r d); attention scores and values
    2 * 2 * S * d (full S x S, the block-causal mask is not discounted). Plus text projection (2 * 2 * C_ctx d
    per text token... counted as 2 * (C_ctx d + d^2)), image in/out projections and the time MLP (negligible).
    """
    d, r, layers = cfg.inner_dim, cfg.mlp_ratio, cfg.num_layers
    per_token_layer = 8 * d * d + 6 * r * d * d + 4 * seq_len * d
    forward = layers * seq_len * per_token_layer
    forward += text_len * 2 * (cfg.context_in_dim * d + d * d)
    forward += seq_len * 2 * d * (cfg.input_features + cfg.output_features)
    return 3.0 * forward


# ----------------------------------------------------------------------------------------------------------------
# The step


def make_loss_fn(module: DiT, config, layout, null_text, variables_of=None):
    """loss_fn(params, batch, key, null_text, *frozen) -> scalar flow-matching loss for one layout bucket.

    `null_text` (the cached empty-prompt (embeds, mask), or None) here only says whether CFG dropout runs; the
    arrays come in as the loss's argument, so the jitted step takes them as an input instead of baking an
    (8 MB at 7B) constant into every compiled program. variables_of(params, *frozen) -> the variables
    `module.apply` takes (default {"params": params}); the LoRA trainer passes trainable factors as `params` and
    the frozen base weights as `frozen`."""
    variables_of = variables_of or (lambda params: {"params": params})
    img_shapes, img_mask = layout
    n_target = img_shapes[-1][1] * img_shapes[-1][2]
    mu = fm.mu_for_tokens(n_target) if config.flow.shift == "tokens" else None
    shift = float(config.flow.shift) if config.flow.shift not in ("tokens", "none") else 1.0
    is_t2i = len(img_shapes) == 1 and not any(img_mask[:len(img_mask) - n_target // 4])
    dropout = float(config.cfg_dropout) if (is_t2i and null_text is not None) else 0.0
    metric = None
    if float(config.flow.get("whiten", 0.0)) > 0:  # training/latent_metric.py: why and what it changes
        from qwenimage_jax.training.latent_metric import whitening_matrix

        metric = whitening_matrix(str(config.data.path), float(config.flow.whiten),
                                  float(config.flow.get("whiten_cap", 10.0)),
                                  max_text_tokens=int(config.data.max_text_tokens))

    def loss_fn(params, batch, key, null_text, *frozen):
        batch = compute_batch(batch)
        x0 = batch["latents"]                                   # (B, h, w, C)
        bsz = x0.shape[0]
        k_sigma, k_noise, k_drop = jax.random.split(key, 3)
        sigmas = fm.sample_sigmas(k_sigma, bsz, distribution=config.flow.distribution, mean=config.flow.mean,
                                  std=config.flow.std, mu=mu, shift=shift)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        x_t = fm.noisy_latents(x0, noise, sigmas).reshape(bsz, n_target, -1)
        target = fm.velocity_target(x0, noise).reshape(bsz, n_target, -1)
        hidden = x_t
        if batch.get("cond_latents") is not None:
            cond = batch["cond_latents"]
            hidden = jnp.concatenate([cond.reshape(bsz, -1, cond.shape[-1]), x_t], axis=1)
        text, text_mask = batch["text_embeds"], batch["text_mask"]
        if dropout > 0:
            null_embeds, null_mask = null_text
            drop = jax.random.bernoulli(k_drop, dropout, (bsz,))
            text = jnp.where(drop[:, None, None], null_embeds[None], text)
            text_mask = jnp.where(drop[:, None], null_mask[None], text_mask)
        pred = module.apply(variables_of(params, *frozen), hidden.astype(module.config.dtype),
                            text.astype(module.config.dtype), sigmas, img_shapes, img_mask,
                            encoder_hidden_states_mask=text_mask, rngs={"dropout": jax.random.fold_in(key, 1)})
        if metric is not None:
            from qwenimage_jax.training.latent_metric import metric_loss

            return metric_loss(pred[:, -n_target:], target, metric)
        return fm.flow_matching_loss(pred[:, -n_target:], target)

    return loss_fn


def make_train_step(module: DiT, tx, lr_schedule, config, layout, null_text, state_shardings, mesh):
    """A jitted (state, batch, key, null_text) -> (state, metrics) for one layout bucket (`bind` fixes the last
    argument for the loop)."""
    loss_fn = make_loss_fn(module, config, layout, null_text)
    accum = int(config.get("grad_accum", 1))

    def step(state: TrainState, batch: dict, key, null_text):
        if accum == 1:
            loss, grads = jax.value_and_grad(loss_fn)(state.params, batch, key, null_text)
        else:
            micro = jax.tree.map(lambda x: x.reshape((accum, x.shape[0] // accum) + x.shape[1:]), batch)

            def body(carry, inputs):
                i, mb = inputs
                l, g = jax.value_and_grad(loss_fn)(state.params, mb, jax.random.fold_in(key, i), null_text)
                return jax.tree.map(jnp.add, carry, (l, g)), None

            zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state.params))
            (loss, grads), _ = jax.lax.scan(body, zero, (jnp.arange(accum), micro))
            loss, grads = loss / accum, jax.tree.map(lambda g: g / accum, grads)
        grad_norm = optax.tree.norm(grads)
        new_state = apply_gradients(state, grads, tx, float(config.ema_decay))
        new_state, finite = keep_finite(state, new_state, loss, grad_norm)     # a NaN/Inf step changes nothing
        return new_state, {"loss": loss, "grad_norm": grad_norm, "learning_rate": lr_schedule(state.step),
                           "finite": finite}

    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    replicated = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_shardings, batch_sharding, replicated, replicated),
                   out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def bind(step, *trailing):
    """`step` with its trailing arguments (e.g. null_text) fixed: the (state, batch, key) callable the loop runs."""
    return lambda state, batch, key: step(state, batch, key, *trailing)


def compiled(step, state, batch, key, *trailing, executable: str = ""):
    """`step` (jitted) compiled ahead for these arguments' shapes and shardings, bound as `bind` does; a step
    without `.lower` (a test's wrapper) is bound as it is and compiles on its first call. `executable`: a file
    saved by `aot --save` (or `checkpoints.executables.save_executable`) to run instead of compiling, after checking
    that it was compiled for these arguments, versions and devices."""
    if executable:
        from qwenimage_jax.checkpoints.executables import load_executable

        return bind(load_executable(executable, expect=(state, batch, key, *trailing)), *trailing)
    if not hasattr(step, "lower"):
        return bind(step, *trailing)
    return bind(step.lower(state, batch, key, *trailing).compile(), *trailing)


def warm_batches(config, global_batch: int, n_proc: int, proc: int):
    """() -> one local batch per layout bucket that `latent_dataset` trains on (the loop compiles them first)."""
    return lambda: list(latent_records.bucket_batches(
        config.data.path, global_batch // n_proc, max_text_tokens=int(config.data.max_text_tokens),
        process_index=proc, process_count=n_proc).values())


# ----------------------------------------------------------------------------------------------------------------
# Setup helpers


def model_config(config) -> DiTConfig:
    fields = dict(config.model)
    runtime = dict(dtype=jnp.dtype(config.get("compute_dtype", "float32")), param_dtype=jnp.float32,
                   remat=config.get("remat", "none"), attention=config.get("attention", "xla"))
    return DiTConfig.from_diffusers(fields, **runtime)


def _setup(config, mesh):
    """(module, tx, lr_schedule, init_params(key) -> boxed params, use_ema) for `config` on `mesh`."""
    cfg = model_config(config)
    check_parallelism(cfg, mesh, int(config.batch_size))
    module = DiT(cfg)
    tx, lr_schedule = make_optimizer(config.optimizer)
    # The DiT checks batch divisibility under a mesh, so the init batch spans the batch axes. The dummy inputs
    # are built inside the traced init (shapes only), so this also works on compile-only (AOT) devices.
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    return module, tx, lr_schedule, lambda k: module.init(k, *_dummy_inputs(cfg, n_batch))["params"], \
        float(config.ema_decay) > 0


def abstract_train_state(config, mesh, key):
    """(abstract state (ShapeDtypeStructs with shardings), state_shardings, module, tx, lr_schedule) without
    allocating anything: what `aot` compiles the train step against. `key` may itself be abstract."""
    module, tx, lr_schedule, init_params, use_ema = _setup(config, mesh)
    abstract, shardings = state_shardings(init_params, tx, mesh, key, use_ema=use_ema, rules=rules_for(config))
    return abstract, shardings, module, tx, lr_schedule


def init_state(config, mesh, key):
    """(state, state_shardings, module, tx, lr_schedule): fresh init straight into shardings, optionally
    overwritten by a diffusers/Orbax transformer checkpoint (`config.init_from`)."""
    module, tx, lr_schedule, init_params, use_ema = _setup(config, mesh)
    state, shardings = sharded_init(init_params, tx, mesh, key, use_ema=use_ema, rules=rules_for(config))
    if config.get("init_from"):
        loaded = load_transformer(config.init_from, dtype=jnp.float32, shardings=shardings.params)
        state = restart_from(state, loaded.params, tx, shardings)
    return state, shardings, module, tx, lr_schedule


def _null_text(data_dir: str, max_text_tokens: int):
    embeds = latent_records.load_null_text_embeds(data_dir)
    if embeds is None:
        return None
    length = embeds.shape[0]
    padded = np.zeros((max_text_tokens, embeds.shape[1]), np.float32)
    padded[:length] = embeds
    return jnp.asarray(padded), jnp.asarray(np.arange(max_text_tokens) < length)


def abstract_global_batch(batch: dict, sharding) -> dict:
    """The shapes, dtypes and sharding `_global_batch` would give this host-local batch (every host holds the same
    share), without moving any data: what a step is compiled against."""
    hosts = jax.process_count()
    return {k: jax.ShapeDtypeStruct((np.shape(v)[0] * hosts,) + np.shape(v)[1:], np.asarray(v).dtype,
                                    sharding=sharding) for k, v in batch.items() if v is not None}


def compute_batch(batch: dict) -> dict:
    """The batch's floating-point fields as float32 (inside the jitted step: the host sends them as stored, float16
    latents and text states, half the bytes of float32; the cast is exact)."""
    return {k: (v.astype(jnp.float32) if v is not None and jnp.issubdtype(v.dtype, jnp.floating) else v)
            for k, v in batch.items()}


def _global_batch(batch: dict, sharding) -> dict:
    """Host-local numpy batch -> global jax arrays sharded over the batch axes (multi-host aware)."""
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()
            if v is not None}


# ----------------------------------------------------------------------------------------------------------------
# The loop


def latent_dataset(config, global_batch: int, n_proc: int, proc: int):
    """This host's share of the cached-latent batches (`config.data`), bucketed by layout: the data path every
    DiT-family trainer (DiT, LoRA, distillation) reads."""
    return latent_records.bucketed_batches(
        config.data.path, global_batch // n_proc, max_text_tokens=int(config.data.max_text_tokens),
        seed=int(config.data.seed), bucket_weights=dict(config.data.bucket_weights or {}) or None,
        process_index=proc, process_count=n_proc)


def start_run(config, workdir: str, devices=None) -> tuple[Any, int, int, int]:
    """The common start of a DiT-family run (training, distillation): multi-host init, the mesh (over `devices`,
    default all), the workdir, and the global batch checked against the process count.
    Returns (mesh, global_batch, process_count, index)."""
    maybe_initialize()
    from qwenimage_jax.models.attention import check_platform

    check_platform(str(config.get("attention", "xla")))  # cuDNN off GPU / splash off TPU: one line, before any work
    mesh = mesh_from_config(config.mesh, devices)
    os.makedirs(workdir, exist_ok=True)
    n_proc, proc = jax.process_count(), jax.process_index()
    global_batch = int(config.batch_size)
    if global_batch % n_proc:
        raise ValueError(f"batch_size {global_batch} is not divisible by the {n_proc} processes")
    return mesh, global_batch, n_proc, proc


def train(config, workdir: str) -> dict[str, Any]:
    """Runs (or resumes) training in `workdir`; returns {"losses": {step: loss}, "final_step": int, ...}."""
    from qwenimage_jax.training.loop import Task, run

    mesh, global_batch, n_proc, proc = start_run(config, workdir)
    key = jax.random.key(int(config.seed))

    rules = rules_for(config)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, shardings, module, tx, lr_schedule = init_state(config, mesh, key)
    log.info("DiT with %.2fM parameters on mesh %s", param_count(state.params) / 1e6, dict(mesh.shape))

    dataset = latent_dataset(config, global_batch, n_proc, proc)
    null_text = _null_text(config.data.path, int(config.data.max_text_tokens))
    batch_sharding = NamedSharding(mesh, P(BATCH_AXES))
    batch_checksums = []
    peak = float(config.get("peak_flops_per_device", 0.0))
    text_tokens = int(config.data.max_text_tokens)

    def to_global(local):
        batch = _global_batch(local, batch_sharding)
        if config.get("record_batch_checksums", False):  # multi-host tests: global vs this host's data
            # summed after the run: this runs on the loop's prefetch thread, where a global sum (a collective)
            # could interleave differently with the steps on each host
            batch_checksums.append((batch["latents"], float(np.sum(local["latents"], dtype=np.float64))))
        return batch

    def extra_scalars(layout, scalars):
        n_tokens = sum(h * w for _, h, w in layout[0]) + text_tokens
        out = {"tokens_per_s": global_batch * n_tokens / scalars["step_time_s"]}
        if peak > 0:
            flops = train_flops_per_example(module.config, n_tokens, text_tokens)
            out["mfu"] = global_batch * flops / scalars["step_time_s"] / (peak * jax.device_count())
        return out

    export_dir = os.path.join(workdir, "export", "transformer")

    def export(final_state):
        if n_proc != 1 or os.path.exists(export_dir):
            return None
        # A diffusers-format transformer dir (EMA weights) that load_transformer, the pipeline and `distill
        # --config.teacher=` read. Multi-host runs export from a checkpoint restored on one host instead.
        from qwenimage_jax.checkpoints.exporters import export_transformer

        from qwenimage_jax.io_utils import staged_dir

        with staged_dir(export_dir) as staged:  # a kill mid-write leaves no half export for the next run to keep
            export_transformer(export_params(final_state), module.config, staged)
        log.info("exported the %s weights to %s", "EMA" if final_state.ema_params is not None else "raw", export_dir)
        return export_dir

    task = Task("train-dit", state, abstract_state(state, shardings), latent_records.iterate(dataset),
                step_for=lambda layout: bind(make_train_step(module, tx, lr_schedule, config, layout, null_text,
                                                             shardings, mesh), null_text),
                layout_of=batch_layout, to_global=to_global, key=key, export=export, extra_scalars=extra_scalars,
                warm_batches=warm_batches(config, global_batch, n_proc, proc),
                compile_step=lambda layout, batch, state: compiled(
                    make_train_step(module, tx, lr_schedule, config, layout, null_text, shardings, mesh), state,
                    abstract_global_batch(batch, batch_sharding), jax.random.fold_in(key, 0), null_text,
                    executable=str(config.get("executable", "") or "")))
    result = run(task, config, workdir, mesh, rules, proc)
    # the batches the steps used, in order (the prefetch thread may have made more)
    used = batch_checksums[:result["final_step"] - result["start_step"]]
    result.update(export_dir=export_dir, batch_checksums=[(float(jnp.sum(g.astype(jnp.float32))), l) for g, l in used], mesh=mesh)
    return result


def export_params(state: TrainState, use_ema: bool = True):
    """The parameters to ship: EMA when kept, else the raw ones."""
    return state.ema_params if (use_ema and state.ema_params is not None) else state.params
