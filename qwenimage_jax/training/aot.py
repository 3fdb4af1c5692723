"""Ahead-of-time compilation of the project's jitted programs for a Cloud TPU topology, on a CPU-only host.

    qwenimage-jax aot --config configs/dit_7b_train.py --topology v5p-128

Each builder returns THE jitted function the trainer or sampler runs (built by the same library call:
`training.dit.make_train_step`, `training.distill.make_distill_step`, `training.vae.build`, the pipeline's
`_denoise_jit`, the text encoder's `_forward`) together with abstract arguments: the state from
`jax.eval_shape` with the rule-derived shardings and a batch of ShapeDtypeStructs split over (data, fsdp). No
weights, no data. `compile_program` lowers and compiles it for the topology's compile-only devices and reads the
compiler's per-chip memory analysis; a program larger than the chip's HBM is refused by the compiler
(RESOURCE_EXHAUSTED), which becomes a readable "does not fit" result.

FLOPs are analytic (documented per program): XLA's cost analysis counts a while-loop body (the scanned layer
stack, the sampling loop) once.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import re
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenimage_jax.parallel.rules import LOGICAL_RULES

GIB = 1024 ** 3
PROGRAMS = ("train-dit", "train-lora", "distill", "train-vae", "sample", "encode-prompt")


@dataclasses.dataclass
class Program:
    """A jitted function + abstract arguments + what one call costs."""
    kind: str
    description: str
    fn: Any                       # jitted
    args: tuple                   # ShapeDtypeStructs (with shardings) / static values as the call takes them
    kwargs: dict
    mesh: Any
    flops: float                  # analytic FLOPs of one call, all chips together
    flops_note: str
    expected_argument_bytes: int  # per chip, from the shardings of the abstract arguments
    hints: tuple = ()             # what to change when it does not fit
    unit: str = "step"            # what one call is: a training step, or a whole sampling call


@dataclasses.dataclass
class Report:
    """The result of one ahead-of-time compile (bytes are per chip)."""
    kind: str
    description: str
    topology: str
    chips: int
    mesh: dict
    capacity_bytes: float
    fits: bool
    compile_s: float
    flops_per_chip: float
    flops_note: str
    peak_flops_per_chip: float
    chip: str = ""
    unit: str = "step"
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    total_bytes: int = 0
    expected_argument_bytes: int = 0  # the rules' shard shapes, unpadded
    layout_argument_bytes: int = 0    # the same shards padded to the compiled input layouts' tiles
    needed_bytes: float | None = None  # from the compiler's refusal
    error: str = ""
    advice: tuple = ()
    saved: str = ""

    def step_time_at(self, mfu: float) -> float:
        """Predicted seconds per call at a model-FLOPs utilisation `mfu` of the chip's bf16 peak."""
        return self.flops_per_chip / (mfu * self.peak_flops_per_chip)

    def summary(self) -> str:
        def gib(b):
            return f"{b / GIB:.2f} GiB" if b >= 0.1 * GIB else f"{b / 1024 ** 2:.2f} MiB"
        lines = [f"program:   {self.kind}: {self.description}",
                 f"topology:  {self.topology}",
                 f"mesh:      {' x '.join(f'{k}={v}' for k, v in self.mesh.items())}",
                 f"compile:   {self.compile_s:.1f} s"]
        if self.fits:
            lines += [f"HBM/chip:  arguments {gib(self.argument_bytes)}, outputs {gib(self.output_bytes)} "
                      f"(aliased {gib(self.alias_bytes)}), temporaries {gib(self.temp_bytes)}; "
                      f"total {gib(self.total_bytes)} of {gib(self.capacity_bytes)} "
                      f"({100 * self.total_bytes / self.capacity_bytes:.0f}%)",
                      f"arguments from the sharding rules: {gib(self.expected_argument_bytes)} "
                      f"({gib(self.layout_argument_bytes)} in the compiled tiled layouts)"]
        lines += [f"FLOPs:     {self.flops_per_chip:.3e} per chip per {self.unit} ({self.flops_note})",
                  f"predicted: {self.step_time_at(0.4):.3g} s per {self.unit} at 40% MFU, {self.step_time_at(0.6):.3g} s at "
                  f"60% (prediction from the chip's bf16 peak {self.peak_flops_per_chip / 1e12:.0f} TFLOP/s, "
                  "not a measurement)"]
        if not self.fits:
            need = f"{self.needed_bytes / GIB:.2f} GiB" if self.needed_bytes else "more than that"
            lines.append(f"does not fit: needs {need} per chip, {self.chip} has "
                         f"{self.capacity_bytes / GIB:.2f} GiB")
            lines += [f"  - {a}" for a in self.advice]
            if self.error and not self.needed_bytes:
                lines.append(f"  compiler: {self.error[:300]}")
        if self.saved:
            lines.append(f"saved:     {self.saved}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["predicted_step_s_at_40pct_mfu"] = self.step_time_at(0.4)
        d["predicted_step_s_at_60pct_mfu"] = self.step_time_at(0.6)
        return d


# ------------------------------------------------------------------------------------------------ helpers
def _leaf_bytes(leaf, layout=None) -> int:
    """One chip's shard of `leaf` in bytes; with the compiled `layout`, padded to its tiles (TPU layouts tile
    the minor dimensions, e.g. (8, 128) for fp32)."""
    sharding = getattr(leaf, "sharding", None)
    shape = list(sharding.shard_shape(leaf.shape) if sharding is not None else leaf.shape)
    dtype = leaf.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):  # threefry keys are uint32[..., 2] on device
        shape, itemsize = shape + [2], 4
    else:
        itemsize = np.dtype(dtype).itemsize
    tiling = getattr(layout, "tiling", None) if layout is not None else None
    order = getattr(layout, "major_to_minor", None) if layout is not None else None
    if tiling and order is not None and len(order) == len(shape):
        physical = [shape[i] for i in order]
        tile = tiling[0]
        for j, t in enumerate(tile):
            dim = len(physical) - len(tile) + j
            if dim >= 0:
                physical[dim] = -(-physical[dim] // t) * t
            elif t > 1:  # a rank-0/1 array laid out in a larger tile
                physical = [1] * (-dim) + physical
                physical[0] = t
        shape = physical
    return int(math.prod(shape)) * itemsize


def argument_bytes(args, compiled=None) -> int:
    """Per-chip bytes of the arguments' shards as the sharding rules lay them out; given the compiled program,
    padded to the tiles of its input layouts (what the compiler's argument size counts)."""
    leaves = [x for x in jax.tree.leaves(args) if hasattr(x, "shape") and hasattr(x, "dtype")]
    if compiled is None:
        return sum(_leaf_bytes(x) for x in leaves)
    formats = jax.tree.leaves(compiled.input_formats, is_leaf=lambda x: hasattr(x, "layout"))
    if len(formats) != len(leaves):
        raise ValueError(f"{len(leaves)} abstract arguments but the executable has {len(formats)} inputs")
    # an input the program never reads gets no layout and no buffer
    return sum(_leaf_bytes(x, f.layout) for x, f in zip(leaves, formats) if f.layout is not None)


def _abstract(shape, dtype, sharding):
    return jax.ShapeDtypeStruct(tuple(int(s) for s in shape), jnp.dtype(dtype), sharding=sharding)


def _key(sharding):
    k = jax.eval_shape(lambda: jax.random.key(0))
    return jax.ShapeDtypeStruct(k.shape, k.dtype, sharding=sharding)


def _mesh_context(mesh):
    stack = contextlib.ExitStack()
    stack.enter_context(jax.set_mesh(mesh))
    stack.enter_context(nn.logical_axis_rules(LOGICAL_RULES))
    return stack


def dit_forward_flops(cfg, q_tokens: int, kv_tokens: int, text_tokens: int) -> float:
    """Analytic forward FLOPs of one DiT call for one example: `q_tokens` rows through every layer, attending
    `kv_tokens` keys (a cached sampling step: q = target, kv = prefix + target), `text_tokens` projected in.
    Same terms as `training.dit.train_flops_per_example` (which is 3x this with q = kv = sequence)."""
    d, r, layers = cfg.inner_dim, cfg.mlp_ratio, cfg.num_layers
    per_token_layer = 8 * d * d + 6 * r * d * d + 4 * kv_tokens * d
    flops = layers * q_tokens * per_token_layer
    flops += text_tokens * 2 * (cfg.context_in_dim * d + d * d)
    flops += q_tokens * 2 * d * (cfg.input_features + cfg.output_features)
    return float(flops)


def jaxpr_flops(fn: Callable, *args, **kwargs) -> float:
    """2 x multiply-adds of every dot_general and convolution in `fn`'s jaxpr (scans counted `length` times;
    recomputation under remat included, element-wise work ignored). For programs without while loops."""
    closed = jax.make_jaxpr(fn)(*args, **kwargs)
    return _count(closed.jaxpr)


def _count(jaxpr) -> float:
    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lc)
        elif name == "conv_general_dilated":
            rhs = eqn.invars[1].aval.shape
            out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
            total += 2.0 * math.prod(eqn.outvars[0].aval.shape) * math.prod(rhs) / rhs[out_feature_dim]
        mult = float(eqn.params.get("length", 1)) if name == "scan" else 1.0
        for value in eqn.params.values():
            for sub in (value if isinstance(value, (tuple, list)) else (value,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    total += mult * _count(inner)
    return total


# ------------------------------------------------------------------------------------------------ builders
def _dit_batch(config, mesh, resolution: int, cfg) -> tuple[dict, dict]:
    """(abstract global batch over (data, fsdp), a one-row numpy example for `batch_layout`)."""
    from qwenimage_jax.training.dit import BATCH_AXES

    if resolution % 16:
        raise ValueError(f"resolution {resolution} is not a multiple of 16 (the VAE's f16 grid)")
    h = w = resolution // 16
    b, length = int(config.batch_size), int(config.data.max_text_tokens)
    sharding = NamedSharding(mesh, P(BATCH_AXES))
    batch = {"latents": _abstract((b, h, w, cfg.in_channels), jnp.float32, sharding),
             "text_embeds": _abstract((b, length, cfg.context_in_dim), jnp.float32, sharding),
             "text_mask": _abstract((b, length), bool, sharding),
             "image_pad_mask": _abstract((b, length), bool, sharding)}
    example = {"latents": np.zeros((1, h, w, cfg.in_channels), np.float32),
               "image_pad_mask": np.zeros((1, length), bool)}
    return batch, example


def build_train_dit(config, mesh, resolution: int = 1024) -> Program:
    """The flow-matching train step of `train-dit` at `resolution`² (text-to-image bucket, global batch_size)."""
    from qwenimage_jax.training import dit as dit_train

    cfg = dit_train.model_config(config)
    batch, example = _dit_batch(config, mesh, resolution, cfg)
    layout = dit_train.batch_layout(example)
    length = int(config.data.max_text_tokens)
    replicated = NamedSharding(mesh, P())
    null_text = None
    if float(config.get("cfg_dropout", 0.0)) > 0:  # the cached empty-prompt embedding: an argument of the step
        null_text = (_abstract((length, cfg.context_in_dim), jnp.float32, replicated),
                     _abstract((length,), jnp.bool_, replicated))
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

    runtime = lora_train.base_config(config)
    cfg = DiTConfig.from_diffusers(dict(config.model), param_dtype=jnp.dtype(config.get("base_dtype", "float32")),
                                   **runtime)
    batch, example = _dit_batch(config, mesh, resolution, cfg)
    layout = dit_train.batch_layout(example)
    length = int(config.data.max_text_tokens)
    rank, alpha = int(config.lora.rank), float(config.lora.get("alpha", config.lora.rank))
    replicated = NamedSharding(mesh, P())
    null_text = None
    if float(config.get("cfg_dropout", 0.0)) > 0:  # the cached empty-prompt embedding: an argument of the step
        null_text = (_abstract((length, cfg.context_in_dim), jnp.float32, replicated),
                     _abstract((length,), jnp.bool_, replicated))
    with _mesh_context(mesh):
        targets = lora_train.lora_layout(cfg, list(config.lora.target_modules), rank)
        tx, lr = make_optimizer(config.optimizer)
        abstract, shardings = state_shardings(lambda k: lora_train.init_factors(targets, rank, k), tx, mesh,
                                              _key(None), use_ema=False)
        base_shardings = param_shardings(cfg, mesh)
        base = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, cfg.param_dtype, sharding=sh),
                            unbox_abstract(abstract_params(cfg)), base_shardings)
        scales = jax.tree.map(lambda x: _abstract(x.shape, jnp.float32, replicated),
                              lora_train.column_scales(targets, rank, alpha))
        step = lora_train.make_train_step(DiT(cfg), tx, lr, config, layout, null_text, shardings, base_shardings,
                                          mesh)
    n_target = (resolution // 16) ** 2
    seq = n_target + length
    # the frozen base still runs forward and backward through the activations; only its weight gradients are
    # skipped (2 of the 3 forward-equivalents remain): 2 x forward is the honest count
    flops = int(config.batch_size) * dit_train.train_flops_per_example(cfg, seq, length) * 2.0 / 3.0
    args = (abstract, base, scales, batch, _key(replicated), null_text)
    n_train, n_base = _count_params(abstract.params), _count_params(base)
    return Program("train-lora", f"LoRA rank {rank} on {len(targets)} linears of a {_params(base)}-param DiT "
                   f"({jnp.dtype(cfg.param_dtype).name} base, frozen): {n_train / 1e6:.1f}M trainable "
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


def build_sample(config, mesh, resolution: int = 1024, steps: int = 40, cfg_scale: float = 1.0,
                 batch: int | None = None, prompt_tokens: int = 128) -> Program:
    """The pipeline's jitted sampling loop (`QwenImagePipeline._denoise_jit`): step 0 extracts the text K/V prefix,
    the other steps run cached on the target tokens; CFG as one doubled batch. Abstract bf16 weights."""
    from qwenimage_jax.models.dit import DiT, DiTConfig, Transformer, abstract_params, param_shardings
    from qwenimage_jax.models.vae import VAE, QwenImageVAE, VAEConfig
    from qwenimage_jax.sampling import pipeline as pl
    from qwenimage_jax.sampling import scheduler as sched
    from qwenimage_jax.training.state import abstract_state

    dtype = jnp.dtype(config.get("dtype", "bfloat16"))
    cfg = DiTConfig.from_diffusers(dict(config.model), dtype=dtype,
                                   param_dtype=jnp.dtype(config.get("param_dtype", "bfloat16")),
                                   attention=config.get("attention", "xla"), remat=config.get("remat", "none"))
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = int(batch or n_batch)
    with _mesh_context(mesh):
        params = abstract_state(abstract_params(cfg), param_shardings(cfg, mesh))
    # the loop never touches the VAE; the pipeline only reads its latent width
    vae_cfg = VAEConfig(z_dim=cfg.in_channels, latents_mean=(0.0,) * cfg.in_channels,
                        latents_std=(1.0,) * cfg.in_channels)
    vae = VAE(QwenImageVAE(vae_cfg), None, {"z_dim": cfg.in_channels, "in_channels": 3})
    pipe = pl.QwenImagePipeline(Transformer(DiT(cfg), params, cfg.to_diffusers(), mesh=mesh), vae, mesh=mesh)
    h = w = resolution // 16
    n_target = h * w
    _, timesteps = sched.flow_match_sigmas(steps, n_target, pipe.scheduler_config)
    n_steps = len(timesteps)
    bucket = -(-(n_steps + 1) // pl.SIGMA_BUCKET) * pl.SIGMA_BUCKET
    do_cfg = cfg_scale > 1
    layout = pl._layout_mask(np.zeros((1, prompt_tokens), bool), n_target)
    spec = pl.SamplerSpec(((1, h, w),), layout, layout if do_cfg else None, "batched" if do_cfg else "none", False)
    bs = NamedSharding(mesh, P(("data", "fsdp")))
    rep = NamedSharding(mesh, P())
    text = _abstract((batch, prompt_tokens, cfg.context_in_dim), dtype, bs)
    args = ({"params": params}, _abstract((batch, n_target, cfg.in_channels), dtype, bs), None, text, None,
            text if do_cfg else None, None, _abstract((bucket,), jnp.float32, rep),
            _abstract((bucket,), jnp.float32, rep), _abstract((), jnp.int32, rep), _abstract((), jnp.float32, rep))
    branches = 2 if do_cfg else 1
    seq = n_target + prompt_tokens
    per_image = branches * (dit_forward_flops(cfg, seq, seq, prompt_tokens)
                            + (n_steps - 1) * dit_forward_flops(cfg, n_target, seq, 0))
    return Program("sample", f"sampler {resolution}², {n_steps} steps, CFG {'on (batched)' if do_cfg else 'off'}, "
                   f"KV prefix of {prompt_tokens} text tokens, batch {batch}, DiT {_params(params)} params "
                   f"{jnp.dtype(cfg.param_dtype).name}, attention {cfg.attention}",
                   _MeshCall(pipe._denoise_jit, mesh), args, {"spec": spec}, mesh, batch * per_image,
                   "analytic: 1 full forward + (steps - 1) cached target-token forwards per branch",
                   argument_bytes(args), ("shard the DiT weights: --config.mesh.fsdp=N (or tensor=N)",
                                          "a smaller batch per chip"), unit="sampling call")


def build_encode_prompt(config, mesh, batch: int | None = None, prompt_tokens: int | None = None) -> Program:
    """Qwen3-VL prompt encoding (`TextEncoder._forward`, last-layer pre-norm states, no logits)."""
    from qwenimage_jax.models.qwen3_vl.model import abstract_params, build_module
    from qwenimage_jax.text.encoder import TextEncoder
    from qwenimage_jax.parallel.rules import logical_shardings
    from qwenimage_jax.training.state import abstract_state

    dtype = jnp.dtype(config.get("dtype", "bfloat16"))
    hf_config = {"text_config": dict(config.text_config)}
    module = build_module(hf_config, dtype, with_vision=False)
    boxed = abstract_params(module, hf_config)
    with _mesh_context(mesh):
        params = abstract_state(boxed, logical_shardings(boxed, mesh))
    encoder = TextEncoder(module, params, hf_config, mesh)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = int(batch or config.get("batch_size", 0) or n_batch)
    length = int(prompt_tokens or config.get("prompt_tokens", 256))
    bs = NamedSharding(mesh, P(("data", "fsdp")))
    ids = _abstract((batch, length), jnp.int32, bs)
    pos = _abstract((3, batch, length), jnp.int32, NamedSharding(mesh, P(None, ("data", "fsdp"))))
    args = (params, ids, ids, pos, None, None, False)
    t = module.text_config
    q_dim, kv_dim = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_token = t.num_hidden_layers * (2 * t.hidden_size * (2 * q_dim + 2 * kv_dim)
                                       + 6 * t.hidden_size * t.intermediate_size + 4 * length * q_dim)
    return Program("encode-prompt", f"Qwen3-VL text encoder {_params(params)} params {dtype.name}, {length} tokens, "
                   f"batch {batch}", _MeshCall(encoder._forward, mesh), args, {}, mesh,
                   float(batch * length * per_token),
                   "analytic: projections + SwiGLU + full-square attention, no lm_head",
                   argument_bytes(args), ("shard the weights: --config.mesh.fsdp=N or tensor=N",), unit="call")


class _MeshCall:
    """A jitted function lowered under its mesh and the logical rules (as the sampler/encoder call it)."""

    def __init__(self, fn, mesh):
        self.fn, self.mesh = fn, mesh

    def lower(self, *args, **kwargs):
        with _mesh_context(self.mesh):
            return self.fn.lower(*args, **kwargs)


def _params(tree) -> str:
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape"))
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.1f}M"


def _train_hints(config) -> tuple:
    mesh = dict(config.mesh)
    return (f"more fsdp (config.mesh is {mesh}; e.g. --config.mesh.data=1 --config.mesh.fsdp=-1) or a larger "
            "slice", "a remat policy that saves less: --config.remat=full",
            f"a smaller per-chip batch: --config.batch_size (now {config.batch_size}) or --config.grad_accum=N")


# ------------------------------------------------------------------------------------------------ compile
_OOM = re.compile(r"(RESOURCE_EXHAUSTED|exceeds available HBM|Ran out of memory|out of memory)", re.I)
_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"


def _to_bytes(value: str, unit: str) -> float:
    return float(value) * {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}[unit.upper()]


def _needed_bytes(message: str) -> float | None:
    """The per-chip bytes a refused program asked for, from the compiler's message, e.g. "the total memory
    required for HLO temporaries (81.57G) exceeds available HBM (15.75G)" or "Used 158.2G of 15.75G hbm"."""
    for pattern in (r"\(" + _SIZE + r"\)\s*exceeds available HBM", r"[Uu]sed\s+" + _SIZE + r"\s+of\s+",
                    r"requires?\s+" + _SIZE):
        m = re.search(pattern, message)
        if m:
            return _to_bytes(m.group(1), m.group(2))
    return None


def compile_program(program: Program, topology, save: str | None = None) -> Report:
    """Lowers + compiles `program` for `topology` (a `parallel.topology.Topology`); a refusal for memory
    becomes a Report with fits=False, any other compiler error propagates."""
    mesh = program.mesh
    capacity = topology.spec.hbm_gib * GIB
    base = dict(kind=program.kind, description=program.description, topology=topology.describe(),
                chips=topology.chips, mesh={k: int(v) for k, v in mesh.shape.items()}, capacity_bytes=capacity,
                flops_per_chip=program.flops / topology.chips, flops_note=program.flops_note,
                peak_flops_per_chip=topology.spec.peak_bf16_flops, chip=topology.spec.product, unit=program.unit,
                expected_argument_bytes=program.expected_argument_bytes)
    start = time.perf_counter()
    try:
        with _mesh_context(mesh):  # traced as the trainers call their steps: under the mesh and the rules
            lowered = program.fn.lower(*program.args, **program.kwargs)
        compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - only memory refusals are results; the rest re-raise
        message = str(e)
        if not _OOM.search(message):
            raise
        return Report(**base, fits=False, compile_s=time.perf_counter() - start, needed_bytes=_needed_bytes(message),
                      error=message.strip().splitlines()[0] if message.strip() else type(e).__name__,
                      advice=program.hints)
    elapsed = time.perf_counter() - start
    mem = compiled.memory_analysis()
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    total = arg + out - alias + temp + int(getattr(mem, "generated_code_size_in_bytes", 0) or 0)
    fits = total <= capacity
    report = Report(**base, fits=fits, compile_s=elapsed, argument_bytes=arg, output_bytes=out, alias_bytes=alias,
                    temp_bytes=temp, total_bytes=total, needed_bytes=None if fits else float(total),
                    advice=() if fits else program.hints,
                    layout_argument_bytes=argument_bytes(program.args, compiled))
    if save:
        report.saved = save_executable(compiled, save)
    return report


def save_executable(compiled, path: str) -> str:
    """Writes the serialized executable (+ its input/output tree structure) with pickle; valid only for the same
    jax, jaxlib and libtpu versions and the same topology (see docs/tpu_training.md)."""
    import pickle

    from jax.experimental import serialize_executable

    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    versions = {"jax": jax.__version__}
    try:
        import libtpu
        versions["libtpu"] = getattr(libtpu, "__version__", "unknown")
    except ImportError:
        pass
    with open(path, "wb") as f:
        pickle.dump({"executable": payload, "in_tree": in_tree, "out_tree": out_tree, "versions": versions}, f)
    return f"{path} ({len(payload) / 1e6:.1f} MB; {', '.join(f'{k} {v}' for k, v in versions.items())})"


def load_executable(path: str, backend=None):
    """The compiled function saved by `save_executable` (on a pod host with the same versions and topology)."""
    import pickle

    from jax.experimental import serialize_executable

    with open(path, "rb") as f:
        data = pickle.load(f)
    return serialize_executable.deserialize_and_load(data["executable"], data["in_tree"], data["out_tree"],
                                                     backend=backend)


# ------------------------------------------------------------------------------------------------ dispatch
def program_kind(config) -> str:
    """Which program a config describes: distill (dmd + teacher), train-vae (vae + losses), train-dit
    (model + optimizer), encode-prompt (text_config), sample (a DiT model shape without an optimizer)."""
    if "dmd" in config and "teacher" in config:
        return "distill"
    if "lora" in config and "base" in config:
        return "train-lora"
    if "vae" in config and "losses" in config:
        return "train-vae"
    if "text_config" in config:
        return "encode-prompt"
    if "model" in config and "optimizer" in config:
        return "train-dit"
    if "model" in config:
        return "sample"
    raise ValueError("cannot tell which program this config describes (expected a train-dit, distill, train-vae, "
                     "DiT model or text-encoder config); pass --program")


def build(config, devices, kind: str | None = None, *, resolution: int | None = None, steps: int = 40,
          cfg_scale: float = 1.0, batch: int | None = None, prompt_tokens: int | None = None) -> Program:
    """The Program of `kind` (default: from the config) on a mesh from config.mesh over `devices`."""
    from qwenimage_jax.parallel.mesh import mesh_from_config

    kind = kind or program_kind(config)
    if kind not in PROGRAMS:
        raise ValueError(f"unknown program {kind!r}; choose one of {PROGRAMS}")
    if kind == "train-vae":
        return build_train_vae(config, devices, resolution)
    mesh = mesh_from_config(config.mesh, devices)
    if kind == "train-dit":
        return build_train_dit(config, mesh, resolution or 1024)
    if kind == "distill":
        return build_distill(config, mesh, resolution or 1024)
    if kind == "train-lora":
        return build_train_lora(config, mesh, resolution or 1024)
    if kind == "sample":
        return build_sample(config, mesh, resolution or 1024, steps, cfg_scale, batch, prompt_tokens or 128)
    return build_encode_prompt(config, mesh, batch, prompt_tokens)
