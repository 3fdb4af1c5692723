"""AOT builders of the training programs: the train steps of `train-dit`, `train-lora`, `distill` (one DMD update)
and `train-vae`, each THE jitted step its trainer runs, built by the trainer's own library call, with abstract
state and batch."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenimage_jax.aot.flops import dit_forward_flops, jaxpr_flops
from qwenimage_jax.aot.program import Program, _abstract, _key, _mesh_context, _MeshCall, _params, argument_bytes

def _dit_batch(config, mesh, resolution: int, cfg) -> tuple[dict, dict]:
    """(abstract global batch over (data, fsdp), a one-row numpy example for `batch_layout`)."""
    from qwenimage_jax.training.dit import BATCH_AXES

    if resolution % 16:
        raise ValueError(f"resolution {resolution} is not a multiple of 16 (the VAE's f16 grid)")
    h = w = resolution // 16
    b, length = int(config.batch_size), int(config.data.max_text_tokens)
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    # float fields travel as cached: float16 (latent_records), cast to float32 inside the step
    batch = {"latents": _abstract((b, h, w, cfg.in_channels), jnp.float16, sharding),
             "text_embeds": _abstract((b, length, cfg.context_in_dim), jnp.float16, sharding),
             "text_mask": _abstract((b, length), bool, sharding),
             "image_pad_mask": _abstract((b, length), bool, sharding)}
    example = {"latents": np.zeros((1, h, w, cfg.in_channels), np.float16),
               "image_pad_mask": np.zeros((1, length), bool)}
    return batch, example


def _null_text(config, cfg, length: int, replicated):
    """The cached empty-prompt (embeds, mask) the train step takes as an argument with CFG dropout, else None."""
    if float(config.get("cfg_dropout", 0.0)) <= 0:
        return None
    return (_abstract((length, cfg.context_in_dim), jnp.float32, replicated),
            _abstract((length,), jnp.bool_, replicated))


def build_train_dit(config, mesh, resolution: int = 1024) -> Program:
    """The flow-matching train step of `train-dit` at `resolution`² (text-to-image bucket, global batch_size)."""
    from qwenimage_jax.training import dit as dit_train

    cfg = dit_train.model_config(config)
    batch, example = _dit_batch(config, mesh, resolution, cfg)
    layout = dit_train.batch_layout(example)
    length = int(config.data.max_text_tokens)
    replicated = NamedSharding(mesh, P())
    null_text = _null_text(config, cfg, length, replicated)
    with _mesh_context(mesh):
        abstract, shardings, module, tx, lr = dit_train.abstract_train_state(config, mesh, _key(None))
        step = dit_train.make_train_step(module, tx, lr, config, layout, null_text, shardings, mesh)
    n_target = (resolution // 16) ** 2
    seq = n_target + length
    flops = int(config.batch_size) * dit_train.train_flops_per_example(cfg, seq, length)
    args = (abstract, batch, _key(replicated), null_text)
    return Program("train-dit", f"DiT {_params(abstract.params)} params, {resolution}² ({n_target} image + {length} "
                   f"text tokens), global batch {config.batch_size}, attention {cfg.attention}, remat {cfg.remat}",
                   step, args, {}, mesh, flops, "analytic 3 x forward, remat recompute not counted",
                   argument_bytes(args), _train_hints(config))


def build_train_lora(config, mesh, resolution: int = 1024) -> Program:
    """The `train-lora` step at `resolution`²: the frozen base (config.model shape, stored in config.base_dtype,
    sharded by the rules) is an argument, the TrainState holds only the factors and their AdamW moments."""
    from qwenimage_jax.checkpoints.params import unbox_abstract
    from qwenimage_jax.models.dit import DiT, DiTConfig, abstract_params, param_shardings
    from qwenimage_jax.training import dit as dit_train
    from qwenimage_jax.training import lora as lora_train
    from qwenimage_jax.training.state import make_optimizer, state_shardings

    from qwenimage_jax.checkpoints import quantize as quant

    runtime = lora_train.base_config(config)
    cfg = DiTConfig.from_diffusers(dict(config.model), param_dtype=jnp.dtype(config.get("base_dtype", "float32")),
                                   **runtime)
    mode = quant.check_mode(config.get("quantize", "none"))
    batch, example = _dit_batch(config, mesh, resolution, cfg)
    layout = dit_train.batch_layout(example)
    length = int(config.data.max_text_tokens)
    rank, alpha = int(config.lora.rank), float(config.lora.get("alpha", config.lora.rank))
    replicated = NamedSharding(mesh, P())
    null_text = _null_text(config, cfg, length, replicated)
    with _mesh_context(mesh):
        targets = lora_train.lora_layout(cfg, list(config.lora.target_modules), rank)
        tx, lr = make_optimizer(config.optimizer)
        abstract, shardings = state_shardings(lambda k: lora_train.init_factors(targets, rank, k), tx, mesh,
                                              _key(None), use_ema=False)
        base_shardings = param_shardings(cfg, mesh)
        base = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, cfg.param_dtype, sharding=sh),
                            unbox_abstract(abstract_params(cfg)), base_shardings)
        module = DiT(cfg)
        if mode is not None:  # QLoRA: the frozen base's block kernels quantized, the factors in float
            quantizer = quant.transformer_quantizer(module, mode, mesh)
            module, base = quantizer[0], quant.abstract_quantized(quantizer, base, cfg.dtype)
            base_shardings = jax.tree.map(lambda x: x.sharding, base)
        scales = jax.tree.map(lambda x: _abstract(x.shape, jnp.float32, replicated),
                              lora_train.column_scales(targets, rank, alpha))
        step = lora_train.make_train_step(module, tx, lr, config, layout, null_text, shardings, base_shardings,
                                          mesh)
    n_target = (resolution // 16) ** 2
    seq = n_target + length
    # the frozen base still runs forward and backward through the activations; only its weight gradients are
    # skipped (2 of the 3 forward-equivalents remain): 2 x forward is the honest count
    flops = int(config.batch_size) * dit_train.train_flops_per_example(cfg, seq, length) * 2.0 / 3.0
    args = (abstract, base, scales, batch, _key(replicated), null_text)
    n_train, n_base = _count_params(abstract.params), _count_params(base)
    return Program("train-lora", f"LoRA rank {rank} on {len(targets)} linears of a {_params(base)}-param DiT "
                   f"({jnp.dtype(cfg.param_dtype).name} base{f' with {mode} block kernels (QLoRA)' if mode else ''}"
                   f", frozen): {n_train / 1e6:.1f}M trainable "
                   f"({100 * n_train / n_base:.2f}% of the base), {resolution}², global batch {config.batch_size}, "
                   f"attention {cfg.attention}, remat {cfg.remat}",
                   step, args, {}, mesh, flops, "analytic 2 x forward (activation gradients, no base weight "
                   "gradients), remat recompute not counted", argument_bytes(args), _train_hints(config))


def _count_params(tree) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def build_distill(config, mesh, resolution: int = 1024) -> Program:
    """One DMD update of `distill` (fake-score updates + student update, frozen teacher) at `resolution`²."""
    from qwenimage_jax.models.dit import abstract_params
    from qwenimage_jax.training import distill as distill_train
    from qwenimage_jax.training.state import abstract_state

    cfg, teacher_cfg = distill_train.model_configs(config)
    batch, example = _dit_batch(config, mesh, resolution, cfg)
    layout = distill_train.batch_layout(example)
    length = int(config.data.max_text_tokens)
    replicated = NamedSharding(mesh, P())
    with _mesh_context(mesh):
        shardings, abstract, teacher_shardings = distill_train.distill_shardings(config, mesh)
        teacher = abstract_state(abstract_params(teacher_cfg), teacher_shardings)
        step = distill_train.make_distill_step(config, layout, mesh)
    null_text = (_abstract((length, cfg.context_in_dim), jnp.float32, replicated),
                 _abstract((length,), bool, replicated))
    n = len(distill_train.student_sample_sigmas(config))
    n_fake = int(config.fake.updates)
    real = 2.0 if float(config.dmd.real_cfg_scale) != 1.0 else 1.0
    sim = (n - 1) / 2.0                         # backward simulation: k ~ U{0..n-1} student forwards
    forwards = n_fake * (sim + 1 + 3) + (sim + 3 + real + 1)
    if float(config.regression.weight) > 0:
        forwards += int(config.regression.teacher_steps) * real
    seq = (resolution // 16) ** 2 + length
    flops = int(config.batch_size) * forwards * dit_forward_flops(cfg, seq, seq, length)
    args = (abstract, teacher, batch, null_text, _key(replicated))
    return Program("distill", f"DMD update: student + fake score {_params(abstract.student.params)} params each, "
                   f"frozen teacher ({jnp.dtype(teacher_cfg.param_dtype).name}), "
                   f"{n}-step student, {n_fake} fake updates, {resolution}², global batch {config.batch_size}",
                   step, args, {}, mesh, flops,
                   f"analytic: {forwards:.1f} DiT forward-equivalents per example (expected backward-simulation "
                   "depth, fwd+bwd = 3 forwards)", argument_bytes(args), _train_hints(config))


def build_train_vae(config, mesh_devices, resolution: int | None = None) -> Program:
    """The `train-vae` step (L1 + LPIPS + alignment, frozen LPIPS/aligner nets) at config.data.resolution²."""
    from qwenimage_jax.training import vae as vae_train

    if resolution:
        config.data.resolution = int(resolution)
    setup = vae_train.build(config, devices=mesh_devices, abstract=True)
    mesh = setup.mesh
    res = int(config.data.resolution)
    batch = _abstract((int(config.batch_size), res, res, 3), jnp.float32, setup.batch_sharding)
    args = (setup.abstract_state, batch, setup.frozen)
    jitted = setup.step_fn.jitted
    with _mesh_context(mesh):
        flops = jaxpr_flops(jitted, *args)
    return Program("train-vae", f"VAE {_params(setup.abstract_state.params)} params (+ frozen LPIPS/aligner), "
                   f"{res}², global batch {config.batch_size}, remat {config.get('remat', False)}",
                   _MeshCall(jitted, mesh), args, {}, mesh, flops,
                   "counted from the step's jaxpr: 2 x MACs of convs and matmuls, remat recompute included",
                   argument_bytes(args), _train_hints(config))


def _train_hints(config) -> tuple:
    mesh = dict(config.mesh)
    return (f"more fsdp (config.mesh is {mesh}; e.g. --config.mesh.data=1 --config.mesh.fsdp=-1) or a larger "
            "slice", "a remat policy that saves less: --config.remat=full",
            f"a smaller per-chip batch: --config.batch_size (now {config.batch_size}) or --config.grad_accum=N")
