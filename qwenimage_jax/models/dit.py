"""Qwen-Image-2 single-stream diffusion transformer (diffusers `QwenImage21Transformer2DModel`) in Flax Linen.

Public API
----------
    checkpoints.load("transformer", path, dtype=..., mesh=None, shardings=None, **runtime) -> Transformer
        (the loader lives in `checkpoints/`; this module only defines the model and the loaded object)
    init_transformer(config, key, mesh=None) -> Transformer          # random init, jitted straight into shardings
    Transformer.__call__(hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask,
                         encoder_hidden_states_mask=None, kv_cache_mode=None, kv_cache=None, return_dict=True)
        Same arguments and meaning as the reference forward; returns `DiTOutput(sample, prefix_kv)`
        (`out.sample`, `out[0]`; `return_dict=False` gives the tuple `(sample,)` or `(sample, prefix_kv)`).
    Transformer.module / .params / .config (raw diffusers dict) / .dit_config (DiTConfig)

The Linen module, for use inside jit (training, the sampling loop):
    DiT(config).apply({"params": params}, hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask,
                      encoder_hidden_states_mask=None, kv_cache_mode=None, kv_cache=None)
      hidden_states          (B, N_cond + N_tgt, C_in)   packed latents, condition images first, target last
                             (kv_cache_mode="cached": (B, N_tgt, C_in) or the full (B, N_cond + N_tgt, C_in))
      encoder_hidden_states  (B, L, C_ctx)   text states incl. the VLM image-slot positions (None when "cached")
      timestep               (B,) or ()      sigma in [0, 1]
      img_shapes             STATIC: ((f, h, w), ...) latent grid per image, condition images first, target last;
                             the reference's per-sample list `[[...]] * B` is accepted too (all samples must agree)
      img_mask               STATIC: (L + N_tgt // 4,) bools (tuple or numpy; a (B, ...) array uses row 0 like the
                             reference) marking VLM image slots; each True stands for 4 (= 2x2) latent tokens
      encoder_hidden_states_mask  (B, L) bool/int or None: valid text positions (padding is never attended)
      kv_cache_mode          None | "extract" | "cached"   (static)
      kv_cache               prefix_kv from "extract" (only with "cached")
      target_frame_shift     (B,) int or None: moves the target's RoPE frame back by this many positions. The
                             pipeline right-pads prompts to a length bucket and passes the number of bucket-padding
                             tokens here, so the padded call sees the positions of the unpadded one (the target's
                             frame otherwise starts after the padded text; `rope.py`)
    returns
      None       -> (B, S, C_out)              the whole joint sequence, like the reference; target = [:, -N_tgt:]
      "extract"  -> ((B, S, C_out), prefix_kv)
      "cached"   -> (B, N_tgt, C_out)          target tokens only, like the reference
    prefix_kv = PrefixKV(k=(layers, B, P, heads, head_dim), v=same, key_valid=(B, P) bool): post-RoPE K/V of the
      P prefix (text + condition image) tokens. It is a plain pytree: carry it through `jax.lax.fori_loop`.
    img_shapes / img_mask fix every shape, so they must be concrete Python/numpy values at trace time: close over
    them or pass them through `static_argnames` as tuples (`layout_key(img_shapes, img_mask)` normalises them).

A denoising loop with the prefix cache (one jit; `shapes`, `mask` are Python tuples from `layout_key`):
    module = DiT(cfg)
    def step(i, carry):
        latents, prefix_kv = carry                                   # latents: (B, N_tgt, C)
        v = module.apply({"params": params}, latents, None, sigmas[i], shapes, mask,
                         kv_cache_mode="cached", kv_cache=prefix_kv)
        return latents + (sigmas[i + 1] - sigmas[i]) * v, prefix_kv
    out, prefix_kv = module.apply({"params": params}, all_latents, text, sigmas[0], shapes, mask,
                                  text_mask, kv_cache_mode="extract")       # step 0: full sequence
    latents = latents + (sigmas[1] - sigmas[0]) * out[:, -n_tgt:]
    latents, _ = jax.lax.fori_loop(1, n_steps, step, (latents, prefix_kv))

Other helpers: `DiTConfig.from_diffusers(dict, **runtime)`, `dit_config_from(configs/dit_*.py ConfigDict)`,
`abstract_params(cfg)` (boxed, with logical names), `param_shardings(cfg, mesh)`, `check_parallelism(cfg, mesh,
batch)`, `joint_layout(*layout_key(img_shapes, img_mask))` (static metadata: seq_len, prefix_len, n_target,
image_ids, target_mask, position_ids, mask).

Joint sequence (reference): every True of img_mask becomes 4 consecutive positions; latent tokens fill those
positions in order (condition images, then target); text keeps its other positions. Block boundaries come from the
token counts of img_shapes. With `causal_condition`, text and condition tokens are modulated from t = 0.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.models.component import Component
from qwenimage_jax.models.attention import BACKENDS, attention, block_causal_mask
from qwenimage_jax.models.kv_cache import PrefixKV
from qwenimage_jax.models.layers import rms_normalize
from qwenimage_jax.models.rope import apply_rope, rope_cos_sin, rope_position_ids

IMG_TOKENS_PER_SLOT = 4  # one VLM image slot = a 2x2 group of latent tokens
TIME_EMBED_DIM = 256
KV_CACHE_MODES = (None, "extract", "cached")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")

# Fields of the diffusers config (`transformer/config.json`) and their defaults (= the released 7B model).
DIFFUSERS_DEFAULTS = dict(patch_size=1, in_channels=64, out_channels=64, num_layers=32, attention_head_dim=128,
                          num_attention_heads=32, context_in_dim=4096, mlp_ratio=3, axes_dims_rope=(16, 56, 56),
                          eps=1e-6, causal_condition=True)


# ----------------------------------------------------------------------------------------------------------------
# Configuration


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture (diffusers field names) + runtime options (dtypes, attention backend, remat)."""
    patch_size: int = 1
    in_channels: int = 64
    out_channels: int | None = 64
    num_layers: int = 32
    attention_head_dim: int = 128
    num_attention_heads: int = 32
    context_in_dim: int = 4096
    mlp_ratio: int = 3
    axes_dims_rope: tuple[int, ...] = (16, 56, 56)
    eps: float = 1e-6
    causal_condition: bool = True
    # runtime
    dtype: Any = jnp.float32          # compute dtype of activations and matmuls (norms/softmax stay fp32)
    param_dtype: Any = jnp.float32    # storage dtype of parameters
    attention: str = "xla"            # one of attention.BACKENDS
    remat: str = "none"               # one of REMAT_POLICIES
    splash_interpret: bool = False    # run the splash kernel in Pallas interpret mode (CPU tests)
    lora_dropout: float = 0.0         # dropout on a LoRA branch's input, only when a "dropout" rng is given

    def __post_init__(self):
        if self.attention not in BACKENDS:
            raise ValueError(f"attention={self.attention!r} is not a backend; choose one of {BACKENDS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat={self.remat!r} is not a policy; choose one of {REMAT_POLICIES}")
        if sum(self.axes_dims_rope) != self.attention_head_dim:
            raise ValueError(f"axes_dims_rope {tuple(self.axes_dims_rope)} sum to {sum(self.axes_dims_rope)}, "
                             f"but attention_head_dim is {self.attention_head_dim}; they must be equal")
        object.__setattr__(self, "axes_dims_rope", tuple(int(a) for a in self.axes_dims_rope))
        object.__setattr__(self, "dtype", jnp.dtype(self.dtype))
        object.__setattr__(self, "param_dtype", jnp.dtype(self.param_dtype))

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def mlp_dim(self) -> int:
        return self.inner_dim * self.mlp_ratio

    @property
    def input_features(self) -> int:
        return self.in_channels * self.patch_size ** 2

    @property
    def output_features(self) -> int:
        return self.patch_size ** 2 * (self.out_channels or self.in_channels)

    @classmethod
    def from_diffusers(cls, config: dict, **runtime) -> "DiTConfig":
        """diffusers config dict (extra keys such as `_class_name` ignored) + runtime overrides."""
        fields = {k: config.get(k, v) for k, v in DIFFUSERS_DEFAULTS.items()}
        fields["axes_dims_rope"] = tuple(fields["axes_dims_rope"])
        return cls(**fields, **runtime)

    def to_diffusers(self) -> dict:
        out = {k: getattr(self, k) for k in DIFFUSERS_DEFAULTS}
        out["axes_dims_rope"] = list(out["axes_dims_rope"])
        return {"_class_name": "QwenImage21Transformer2DModel", **out}


def dit_config_from(config) -> DiTConfig:
    """A `configs/dit_*.py` ConfigDict (`model` = diffusers fields; dtype, param_dtype, attention, remat) -> DiTConfig.
    `compute_dtype` is accepted as a synonym of `dtype` (trainer configs)."""
    get = config.get if hasattr(config, "get") else (lambda k, d=None: getattr(config, k, d))
    dtype = get("dtype", None) or get("compute_dtype", None) or "float32"
    return DiTConfig.from_diffusers(dict(get("model")), dtype=dtype, param_dtype=get("param_dtype", None) or "float32",
                                    attention=get("attention", None) or "xla", remat=get("remat", None) or "none")


def check_parallelism(config: DiTConfig, mesh, batch_size: int | None = None) -> None:
    """Raises a readable error when the model or batch cannot be split over `mesh` (a Mesh or AbstractMesh)."""
    if mesh is None or getattr(mesh, "empty", False):
        return
    sizes = dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes") else mesh.devices.shape))
    tensor, fsdp, data = sizes.get("tensor", 1), sizes.get("fsdp", 1), sizes.get("data", 1)
    problems = []
    if config.num_attention_heads % tensor:
        problems.append(f"num_attention_heads={config.num_attention_heads} is not divisible by the tensor axis "
                        f"({tensor}); use tensor in the divisors of {config.num_attention_heads}")
    if config.mlp_dim % tensor:
        problems.append(f"mlp width {config.mlp_dim} is not divisible by the tensor axis ({tensor})")
    if config.inner_dim % fsdp:
        problems.append(f"model width {config.inner_dim} is not divisible by the fsdp axis ({fsdp})")
    if batch_size is not None and batch_size % (data * fsdp):
        problems.append(f"batch size {batch_size} is not divisible by data x fsdp = {data} x {fsdp} = "
                        f"{data * fsdp}; use a batch that is a multiple of {data * fsdp} or a smaller data/fsdp")
    if problems:
        raise ValueError("cannot shard the DiT over mesh " + str(sizes) + ":\n  - " + "\n  - ".join(problems))


# ----------------------------------------------------------------------------------------------------------------
# Static token layout


def _static_array(value, name: str) -> np.ndarray:
    if isinstance(value, jax.core.Tracer):
        raise TypeError(f"{name} fixes the sequence layout and must be concrete (a tuple or numpy array), not a "
                        "traced value; close over it or pass it with static_argnames as a tuple")
    if hasattr(value, "detach"):  # a torch tensor, for code ported from diffusers
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def layout_key(img_shapes, img_mask) -> tuple[tuple[tuple[int, int, int], ...], tuple[bool, ...]]:
    """Reference-style (img_shapes, img_mask) -> hashable ((f, h, w), ...), (bool, ...) for static args."""
    shapes = img_shapes
    if isinstance(shapes, (list, tuple)) and shapes and isinstance(shapes[0], (list, tuple)) and shapes[0] \
            and isinstance(shapes[0][0], (list, tuple)):
        per_sample = [tuple(tuple(int(v) for v in s) for s in sample) for sample in shapes]
        if any(p != per_sample[0] for p in per_sample):
            raise ValueError(f"all samples must share one image layout, got img_shapes {per_sample}")
        shapes = per_sample[0]
    shapes = tuple(tuple(int(v) for v in s) for s in shapes)
    if not shapes or any(len(s) != 3 for s in shapes):
        raise ValueError(f"img_shapes must list (frame, height, width) per image with the target last, got {shapes}")
    mask = _static_array(img_mask, "img_mask").astype(bool)
    if mask.ndim == 2:
        if mask.shape[0] > 1 and not (mask == mask[:1]).all():
            raise ValueError("img_mask rows differ; all samples of a batch must share one layout")
        mask = mask[0]
    if mask.ndim != 1:
        raise ValueError(f"img_mask must be (L,) or (batch, L), got shape {mask.shape}")
    return shapes, tuple(bool(v) for v in mask)


def token_metadata(image_pad_mask: np.ndarray, img_shapes) -> tuple[np.ndarray, np.ndarray]:
    """(S,) bool image-token mask -> image_ids (S,) (-1 text, else block index by token counts of img_shapes) and
    target_mask (S,) (the last image's tokens); diffusers `build_token_metadata`."""
    image_pad_mask = np.asarray(image_pad_mask, dtype=bool)
    positions = np.nonzero(image_pad_mask)[0]
    lengths = [math.prod(s) for s in img_shapes]
    if sum(lengths) != positions.size:
        raise ValueError(f"img_shapes account for {sum(lengths)} image tokens but the image mask marks "
                         f"{positions.size}")
    image_ids = np.full(image_pad_mask.shape, -1, dtype=np.int64)
    image_ids[positions] = np.repeat(np.arange(len(lengths)), lengths)
    target_mask = np.zeros(image_pad_mask.shape, dtype=bool)
    target_mask[positions[positions.size - lengths[-1]:]] = True
    return image_ids, target_mask


@dataclasses.dataclass(frozen=True)
class JointLayout:
    """Where every token of the joint text/image sequence comes from; hashable, computed on the host."""
    img_shapes: tuple[tuple[int, int, int], ...]
    img_mask: tuple[bool, ...]

    @functools.cached_property
    def _derived(self) -> dict:
        slots = np.asarray(self.img_mask, dtype=bool)
        n_target = math.prod(self.img_shapes[-1])
        repeats = np.where(slots, IMG_TOKENS_PER_SLOT, 1)
        image_pad_mask = np.repeat(slots, repeats)                      # (S,)
        vlm_index = np.repeat(np.arange(slots.shape[0]), repeats)       # (S,) source position in the VLM sequence
        block_lengths = [math.prod(s) for s in self.img_shapes]
        n_image = int(image_pad_mask.sum())
        if sum(block_lengths) != n_image:
            raise ValueError(f"img_shapes {list(self.img_shapes)} account for {sum(block_lengths)} latent tokens but "
                             f"img_mask has {int(slots.sum())} image slots = {n_image} latent tokens "
                             f"({IMG_TOKENS_PER_SLOT} per slot); the target alone needs {n_target // 4} trailing "
                             "slots, so its token count must be a multiple of 4")
        image_ids, target_mask = token_metadata(image_pad_mask, self.img_shapes)
        seq_len = image_pad_mask.shape[0]
        prefix_len = seq_len - n_target
        if not target_mask[prefix_len:].all():
            raise ValueError(f"the target image's {n_target} tokens are not the last positions of the joint "
                             "sequence; the target's slots must be the trailing entries of img_mask")
        return dict(image_pad_mask=image_pad_mask, vlm_index=vlm_index, image_ids=image_ids,
                    target_mask=target_mask, seq_len=seq_len, prefix_len=prefix_len, n_target=n_target,
                    n_image=n_image, vlm_len=slots.shape[0])

    def __getattr__(self, name):  # derived fields: image_pad_mask, image_ids, target_mask, seq_len, ...
        if name.startswith("_"):
            raise AttributeError(name)
        derived = self._derived
        if name in derived:
            return derived[name]
        raise AttributeError(name)

    @functools.cached_property
    def position_ids(self) -> np.ndarray:
        """(S, 3) RoPE (frame, y, x) ids."""
        return rope_position_ids(self.img_shapes, self.image_pad_mask)

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """(S, S) block-causal mask (without key padding)."""
        return block_causal_mask(self.image_ids)

    @functools.cached_property
    def prefix_mask(self) -> np.ndarray:
        """(P, P): the mask restricted to prefix queries and keys (prefix queries never see target keys)."""
        return self.mask[:self.prefix_len, :self.prefix_len]

    @functools.cached_property
    def joint_gather(self) -> np.ndarray:
        """(S,) index into concat([text (L), latents (N_img)], axis=1) that assembles the joint sequence."""
        gather = self.vlm_index.copy()
        gather[self.image_pad_mask] = self.vlm_len - self.n_target // IMG_TOKENS_PER_SLOT + np.arange(self.n_image)
        return gather

    @functools.cached_property
    def key_valid_gather(self) -> np.ndarray:
        """(S,) index into concat([text_mask (L_text), True]) giving each joint position's key validity."""
        out = self.vlm_index.copy()
        out[self.image_pad_mask] = -1  # -> the trailing always-True column
        return out


@functools.lru_cache(maxsize=256)
def joint_layout(img_shapes: tuple, img_mask: tuple) -> JointLayout:
    """Cached `JointLayout` for hashable (img_shapes, img_mask) from `layout_key`."""
    return JointLayout(img_shapes, img_mask)


# ----------------------------------------------------------------------------------------------------------------
# Layers


def _constrain(x, names):
    # the rules the caller installed (`nn.logical_axis_rules`: a trainer's preset, the pipeline's table); none
    # installed (a plain single-device call) means no constraint
    return nn.with_logical_constraint(x, names)


def _kernel(names, init=nn.initializers.lecun_normal()):
    return nn.with_logical_partitioning(init, names)


class Dense(nn.Module):
    """Bias-free linear with named kernel axes; `features` may be a tuple (e.g. (heads, head_dim)).

    Kernel shape: x.shape[-contract:] + features (flax layout; torch `(out, in)` is transposed at import).
    LoRA: when the `lora` collection holds `a` (x.shape[-contract:] + (r,)), `b` ((r,) + features) and `scale`
    ((r,)) for this layer, the output gains `((x @ a) * scale) @ b`. Several adapters sit side by side on the rank
    axis, each column scaled by its adapter's weight x alpha / r, so changing a weight changes values, not shapes.
    """
    features: int | tuple[int, ...]
    names: tuple[str, ...]
    contract: int = 1          # how many trailing input axes are contracted
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    lora_dropout: float = 0.0

    @nn.compact
    def __call__(self, x):
        feats = (self.features,) if isinstance(self.features, int) else tuple(self.features)
        n_in = self.contract
        init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
                                                out_axis=tuple(range(n_in, n_in + len(feats))))
        kernel = self.param("kernel", _kernel(self.names, init), tuple(x.shape[-n_in:]) + feats, self.param_dtype)
        x_axes = tuple(range(x.ndim - n_in, x.ndim))
        # promote_dtype rather than .astype: a quantized kernel (qwix PTQ, checkpoints/quantize.py) passes through
        # it untouched and is dequantized inside the intercepted dot_general
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        out = jax.lax.dot_general(x, kernel, ((x_axes, tuple(range(n_in))), ((), ())))
        if self.has_variable("lora", "a"):
            lora_in = x
            if self.lora_dropout > 0 and self.has_rng("dropout"):
                lora_in = nn.Dropout(self.lora_dropout, deterministic=False)(x)
            a, b, scale = (self.get_variable("lora", k) for k in ("a", "b", "scale"))
            low = jax.lax.dot_general(lora_in, a.astype(self.dtype), ((x_axes, tuple(range(n_in))), ((), ())))
            low = low * scale.astype(self.dtype)
            out = out + jax.lax.dot_general(low, b.astype(self.dtype), (((low.ndim - 1,), (0,)), ((), ())))
        return out


def layer_norm(x, eps: float):
    """Bias-free, scale-free LayerNorm over the last axis, in fp32."""
    x = x.astype(jnp.float32)
    mean = x.mean(-1, keepdims=True)
    var = jnp.square(x - mean).mean(-1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(var + eps)


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale, variance in fp32 (diffusers `RMSNorm`); zero_centred stores scale - 1."""
    dim: int
    eps: float
    names: tuple[str, ...]
    zero_centred: bool = False
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.zeros if self.zero_centred else nn.initializers.ones
        scale = self.param("scale", nn.with_logical_partitioning(init, self.names), (self.dim,), self.param_dtype)
        xf = rms_normalize(x.astype(jnp.float32), self.eps)
        scale = scale.astype(jnp.float32) + (1.0 if self.zero_centred else 0.0)
        return (xf * scale).astype(x.dtype)


def timestep_sinusoid(timestep, dim: int = TIME_EMBED_DIM, max_period: float = 10000.0, time_factor: float = 1000.0):
    """(R,) -> (R, dim) fp32 `[cos, sin]` of `time_factor * t * exp(-ln(max_period) j / (dim/2))`."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = (time_factor * timestep.astype(jnp.float32))[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def select_rows(params, row_mask: np.ndarray | None):
    """Per-sample modulation rows -> per-token rows.

    params: (R, F) with R = B (row_mask None: every token reads its own sample's row) or B + 1 (last row = t=0).
    row_mask: static (T,) bool, True where a token reads its sample's row, False where it reads the t=0 row.
    Returns (B, T or 1, F).
    """
    if row_mask is None:
        return params[:, None, :]
    if row_mask.all():
        return params[:-1, None, :]
    real, zero = params[:-1, None, :], params[-1:][None]
    if not row_mask.any():
        return jnp.broadcast_to(zero, (real.shape[0], 1, params.shape[-1]))
    return jnp.where(jnp.asarray(row_mask)[None, :, None], real, zero)


_ACT = ("activation_batch", "activation_length", "activation_embed")
_ACT_HEADS = ("activation_batch", "activation_length", "activation_heads", "activation_head_dim")


class Attention(nn.Module):
    """QK-RMSNorm, RoPE, block-causal attention with prefix KV extract/reuse; bias-free projections."""
    config: DiTConfig
    layout: JointLayout
    mode: str | None

    @nn.compact
    def __call__(self, x, layer_cache, cos, sin, key_valid):
        # x: (B, T, d); layer_cache: None or (k, v) (B, P, H, D); cos/sin: (T, D/2); key_valid: (B, T or P+T) or None
        cfg = self.config
        heads, head_dim = cfg.num_attention_heads, cfg.attention_head_dim
        proj = functools.partial(Dense, (heads, head_dim), ("embed", "heads", "head_dim"), dtype=cfg.dtype,
                                 param_dtype=cfg.param_dtype, lora_dropout=cfg.lora_dropout)
        query, key, value = proj(name="to_q")(x), proj(name="to_k")(x), proj(name="to_v")(x)
        norm = functools.partial(RMSNorm, head_dim, cfg.eps, ("head_dim",), param_dtype=cfg.param_dtype)
        query = apply_rope(norm(name="norm_q")(query).astype(cfg.dtype), cos, sin)
        key = apply_rope(norm(name="norm_k")(key).astype(cfg.dtype), cos, sin)
        query, key, value = (_constrain(t, _ACT_HEADS) for t in (query, key, value))
        run = functools.partial(attention, backend=cfg.attention, splash_interpret=cfg.splash_interpret)

        # image_ids: the keys' layout, from which the cudnn backends derive the mask without materialising it.
        ids = self.layout.image_ids
        new_cache = None
        if self.mode == "cached":
            key = jnp.concatenate([layer_cache[0].astype(key.dtype), key], axis=1)
            value = jnp.concatenate([layer_cache[1].astype(value.dtype), value], axis=1)
            out = run(query, key, value, key_valid=key_valid, image_ids=ids)
        else:
            prefix = self.layout.prefix_len
            if self.mode == "extract":
                new_cache = (key[:, :prefix], value[:, :prefix])
            if prefix == 0:
                out = run(query, key, value, key_valid=key_valid, image_ids=ids)
            else:
                # Prefix queries only see prefix keys (block-causal); target queries see every key.
                prefix_valid = None if key_valid is None else key_valid[:, :prefix]
                out_prefix = run(query[:, :prefix], key[:, :prefix], value[:, :prefix],
                                 mask=self.layout.prefix_mask, key_valid=prefix_valid, image_ids=ids[:prefix])
                out_target = run(query[:, prefix:], key, value, key_valid=key_valid, image_ids=ids)
                out = jnp.concatenate([out_prefix, out_target], axis=1)
        out = _constrain(out.astype(cfg.dtype), _ACT_HEADS)
        out = Dense(cfg.inner_dim, ("heads", "head_dim", "embed"), contract=2, dtype=cfg.dtype,
                    param_dtype=cfg.param_dtype, lora_dropout=cfg.lora_dropout, name="to_out")(out)
        return out, new_cache


class SwiGLU(nn.Module):
    """out(SiLU(gate(x)) * proj(x)), hidden = mlp_ratio x width."""
    config: DiTConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        up = functools.partial(Dense, cfg.mlp_dim, ("embed", "mlp"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                               lora_dropout=cfg.lora_dropout)
        hidden = nn.silu(up(name="gate_layer")(x)) * up(name="proj")(x)
        hidden = _constrain(hidden, ("activation_batch", "activation_length", "activation_mlp"))
        return Dense(cfg.inner_dim, ("mlp", "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     lora_dropout=cfg.lora_dropout, name="out")(hidden)


class Block(nn.Module):
    """One single-stream block; reads the shared modulation (scale/gate only, tanh gates)."""
    config: DiTConfig
    layout: JointLayout
    mode: str | None

    @nn.compact
    def __call__(self, x, layer_cache, modulation, cos, sin, key_valid):
        # x: (B, T, d); modulation: (R, 4d) = [scale1, gate1, scale2, gate2]
        cfg = self.config
        rows = _token_rows(cfg, self.layout, self.mode)
        scale1, gate1, scale2, gate2 = (select_rows(m, rows) for m in jnp.split(modulation, 4, axis=-1))
        normed = (layer_norm(x, cfg.eps) * (1 + scale1.astype(jnp.float32))).astype(cfg.dtype)
        attn_out, new_cache = Attention(cfg, self.layout, self.mode, name="attn")(normed, layer_cache, cos, sin,
                                                                                    key_valid)
        x = x + jnp.tanh(gate1) * attn_out
        normed = (layer_norm(x, cfg.eps) * (1 + scale2.astype(jnp.float32))).astype(cfg.dtype)
        x = x + jnp.tanh(gate2) * SwiGLU(cfg, name="mlp")(normed)
        if cfg.dtype == jnp.float16:
            x = jnp.clip(x, -65504, 65504)
        return _constrain(x.astype(cfg.dtype), _ACT), new_cache


def _token_rows(cfg: DiTConfig, layout: JointLayout, mode: str | None) -> np.ndarray | None:
    """Static per-token modulation-row mask for the tokens this call computes (see `select_rows`)."""
    if not cfg.causal_condition:
        return None
    if mode == "cached":
        return np.ones((layout.n_target,), dtype=bool)
    return layout.target_mask


_REMAT = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class DiT(nn.Module):
    """`QwenImage21Transformer2DModel` as a Linen module; see the module docstring for the call signature."""
    config: DiTConfig

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask,
                 encoder_hidden_states_mask=None, kv_cache_mode=None, kv_cache=None, target_frame_shift=None):
        cfg = self.config
        mode = kv_cache_mode
        if mode not in KV_CACHE_MODES:
            raise ValueError(f"kv_cache_mode must be None, 'extract' or 'cached', got {mode!r}")
        if mode is not None and not cfg.causal_condition:
            raise ValueError("prefix KV caching needs causal_condition=True: only then are text and condition tokens "
                             "independent of the timestep")
        if mode == "cached" and kv_cache is None:
            raise ValueError("kv_cache_mode='cached' needs kv_cache=prefix_kv from an 'extract' call")
        if mode != "cached" and kv_cache is not None:
            raise ValueError(f"kv_cache is only read in 'cached' mode, got kv_cache_mode={mode!r}")
        layout = joint_layout(*layout_key(img_shapes, img_mask))
        batch = hidden_states.shape[0]
        check_parallelism(cfg, jax.sharding.get_abstract_mesh(), batch)
        if hidden_states.ndim != 3 or hidden_states.shape[-1] != cfg.input_features:
            raise ValueError(f"hidden_states must be (batch, tokens, {cfg.input_features}), got {hidden_states.shape}")

        dense = functools.partial(Dense, dtype=cfg.dtype, param_dtype=cfg.param_dtype, lora_dropout=cfg.lora_dropout)
        latents = dense(cfg.inner_dim, ("in_features", "embed"), name="img_in")(hidden_states.astype(cfg.dtype))

        # Modulation: one shared projection; with causal_condition an extra t=0 row for prefix tokens.
        timestep = jnp.broadcast_to(jnp.asarray(timestep).astype(cfg.dtype).reshape(-1), (batch,))
        if cfg.causal_condition:
            timestep = jnp.concatenate([timestep, jnp.zeros((1,), timestep.dtype)])
        temb = timestep_sinusoid(timestep).astype(cfg.dtype)
        temb = dense(cfg.inner_dim, ("in_features", "embed"), name="time_linear_1")(temb)
        temb = dense(cfg.inner_dim, ("embed", "out_features"), name="time_linear_2")(nn.silu(temb))  # (R, d)
        modulation = dense(4 * cfg.inner_dim, ("embed", "modulation"), name="modulation")(nn.silu(temb))

        cos, sin = rope_cos_sin(_positions(layout, target_frame_shift), cfg.axes_dims_rope)  # ([B,] S, D/2) each
        txt_in = _TextProjection(cfg, name="txt_in")
        if mode == "cached":
            n_image = hidden_states.shape[1]
            if n_image not in (layout.n_target, layout.n_image):
                raise ValueError(f"in 'cached' mode hidden_states must hold the {layout.n_target} target tokens (or "
                                 f"all {layout.n_image} image tokens), got {n_image}")
            x = latents[:, n_image - layout.n_target:]
            cos, sin = cos[..., layout.prefix_len:, :], sin[..., layout.prefix_len:, :]
            prefix_valid = kv_cache["key_valid"].astype(bool)
            key_valid = jnp.concatenate([prefix_valid, jnp.ones((batch, layout.n_target), bool)], axis=1)
            if encoder_hidden_states is not None and self.is_initializing():
                txt_in(encoder_hidden_states)
        else:
            if encoder_hidden_states is None:
                raise ValueError("encoder_hidden_states is required unless kv_cache_mode='cached'")
            text_len = encoder_hidden_states.shape[1]
            expected = layout.vlm_len - layout.n_target // IMG_TOKENS_PER_SLOT
            if text_len != expected:
                raise ValueError(f"encoder_hidden_states has {text_len} positions but img_mask describes {expected} "
                                 f"(len(img_mask)={layout.vlm_len} minus {layout.n_target // 4} target slots)")
            if hidden_states.shape[1] != layout.n_image:
                raise ValueError(f"hidden_states has {hidden_states.shape[1]} tokens but img_shapes "
                                 f"{list(layout.img_shapes)} describe {layout.n_image}")
            text = txt_in(encoder_hidden_states.astype(cfg.dtype))                        # (B, L, d)
            x = jnp.take(jnp.concatenate([text, latents], axis=1), jnp.asarray(layout.joint_gather), axis=1)
            key_valid = None
            if encoder_hidden_states_mask is not None:
                text_mask = jnp.asarray(encoder_hidden_states_mask).astype(bool)
                text_mask = jnp.concatenate([text_mask[:, :text_len], jnp.ones((batch, 1), bool)], axis=1)
                key_valid = jnp.take(text_mask, jnp.asarray(layout.key_valid_gather), axis=1)  # (B, S)
        x = _constrain(x, _ACT)

        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT[cfg.remat], prevent_cse=False)
        # "lora" (optional adapter factors) is stacked on the layers axis like the params; dropout differs per layer.
        stack = nn.scan(block, variable_axes={"params": 0, "lora": 0}, split_rngs={"params": True, "dropout": True},
                        in_axes=(0, nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast),
                        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: "layers"})
        layer_caches = (kv_cache["k"], kv_cache["v"]) if mode == "cached" else None
        x, new_caches = stack(cfg, layout, mode, name="blocks")(x, layer_caches, modulation, cos, sin, key_valid)

        # Final scale-only adaptive norm and output projection.
        scale = dense(cfg.inner_dim, ("embed", "out_features"), name="norm_out")(nn.silu(temb))
        rows = _token_rows(cfg, layout, mode)
        x = (layer_norm(x, cfg.eps) * (1 + select_rows(scale, rows).astype(jnp.float32))).astype(cfg.dtype)
        out = dense(cfg.output_features, ("embed", "out_features"), name="proj_out")(x)
        if mode == "extract":
            prefix_valid = (jnp.ones((batch, layout.prefix_len), bool) if key_valid is None
                            else key_valid[:, :layout.prefix_len])
            return out, PrefixKV(new_caches[0], new_caches[1], prefix_valid).constrained()
        return out


def _positions(layout: JointLayout, target_frame_shift):
    """The layout's (S, 3) RoPE ids, or (B, S, 3) with each sample's target frame moved back by its shift (the
    target is the last block, so only its tokens sit after the text padding)."""
    if target_frame_shift is None:
        return layout.position_ids
    moved = np.zeros(layout.position_ids.shape, np.int32)
    moved[layout.prefix_len:, 0] = 1
    shift = jnp.asarray(target_frame_shift, jnp.int32).reshape(-1, 1, 1)
    return jnp.asarray(layout.position_ids, jnp.int32)[None] - shift * moved[None]


class _TextProjection(nn.Module):
    """Zero-centred RMSNorm -> Linear -> GELU(tanh) -> Linear."""
    config: DiTConfig

    @nn.compact
    def __call__(self, text):
        cfg = self.config
        text = RMSNorm(cfg.context_in_dim, cfg.eps, ("norm",), zero_centred=True, param_dtype=cfg.param_dtype,
                       name="text_norm")(text)
        text = Dense(cfg.inner_dim, ("in_features", "embed"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     lora_dropout=cfg.lora_dropout, name="in_layer")(text)
        text = jax.nn.gelu(text, approximate=True)
        return Dense(cfg.inner_dim, ("embed", "out_features"), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                     lora_dropout=cfg.lora_dropout, name="out_layer")(text)


# ----------------------------------------------------------------------------------------------------------------
# Loader object


class DiTOutput(NamedTuple):
    """What `Transformer.__call__` returns: `.sample` (like diffusers' `Transformer2DModelOutput`), and the
    prefix KV pytree after `kv_cache_mode="extract"`. Indexing `[0]` gives the sample, as in diffusers."""
    sample: Any
    prefix_kv: Any = None


def _dummy_inputs(cfg: DiTConfig, n_batch: int = 1):
    """Smallest valid inputs (one 2x2 target, one text token; `n_batch` rows) used to build parameter shapes.
    Call it inside the traced init function (jit / eval_shape): built eagerly under a mesh of compile-only
    devices (ahead-of-time compilation for a TPU topology) the arrays could not be placed."""
    shapes, mask = ((1, 2, 2),), (False, True)
    return (jnp.zeros((n_batch, 4, cfg.input_features), cfg.dtype),
            jnp.zeros((n_batch, 1, cfg.context_in_dim), cfg.dtype), jnp.zeros((n_batch,), jnp.float32), shapes, mask)


def ambient_batch_parallelism() -> int:
    """data x fsdp of the ambient (abstract) mesh, 1 without one: the DiT checks that a batch splits over it."""
    mesh = jax.sharding.get_abstract_mesh()
    shape = dict(zip(mesh.axis_names, mesh.axis_sizes)) if not mesh.empty else {}
    return int(shape.get("data", 1)) * int(shape.get("fsdp", 1))


def _init_module(config: DiTConfig) -> DiT:
    """The module used for init: parameters do not depend on the attention backend or remat, and the einsum
    backend traces on any platform (so a cuDNN/splash config can be set up on a CPU host)."""
    return DiT(dataclasses.replace(config, attention="xla", remat="none"))


def abstract_params(config: DiTConfig):
    """Boxed (`nn.Partitioned`) ShapeDtypeStruct tree of the params collection, without allocating anything."""
    module = _init_module(config)
    # under an ambient mesh (a trainer's `init_from`) the module checks that the batch splits over data x fsdp
    n_batch = ambient_batch_parallelism()
    variables = jax.eval_shape(lambda key: module.init(key, *_dummy_inputs(config, n_batch)),
                               jax.eval_shape(lambda: jax.random.key(0)))
    return variables["params"]


def param_shardings(config: DiTConfig, mesh):
    """NamedShardings of the params tree that `parallel.rules.LOGICAL_RULES` prescribe on `mesh`."""
    from qwenimage_jax.parallel.rules import logical_shardings

    check_parallelism(config, mesh)
    return logical_shardings(abstract_params(config), mesh)


class Transformer(Component):
    """A loaded DiT: `.module` (Linen `DiT`), `.params` (unboxed tree), `.config` (diffusers dict), callable like
    the reference forward (jitted per layout and mode)."""

    def __init__(self, module: DiT, params, config: dict, mesh=None):
        self.module = module
        self.params = params
        self.config = dict(config)
        self.dit_config = module.config
        self.mesh = mesh
        self.lora = None  # optional "lora" collection (see `Dense`); set by the pipeline's LoRA methods
        self._apply = jax.jit(self._forward, static_argnames=("img_shapes", "img_mask", "kv_cache_mode"))

    @property
    def variables(self) -> dict:
        """What `module.apply` takes: the params, plus the unfused LoRA factors when adapters are loaded."""
        return {"params": self.params} if self.lora is None else {"params": self.params, "lora": self.lora}

    def _forward(self, variables, hidden_states, encoder_hidden_states, timestep, encoder_hidden_states_mask,
                 kv_cache, *, img_shapes, img_mask, kv_cache_mode):
        return self.module.apply(variables, hidden_states, encoder_hidden_states, timestep, img_shapes,
                                 img_mask, encoder_hidden_states_mask=encoder_hidden_states_mask,
                                 kv_cache_mode=kv_cache_mode, kv_cache=kv_cache)

    def __call__(self, hidden_states, encoder_hidden_states, timestep, img_shapes, img_mask,
                 encoder_hidden_states_mask=None, kv_cache_mode=None, kv_cache=None, return_dict=True):
        shapes, mask = layout_key(img_shapes, img_mask)
        args = [_to_jax(a) for a in (hidden_states, encoder_hidden_states, timestep, encoder_hidden_states_mask)]
        if args[2] is not None and args[2].ndim == 0:
            args[2] = jnp.broadcast_to(args[2], (args[0].shape[0],))
        if self.mesh is not None:
            check_parallelism(self.dit_config, self.mesh, args[0].shape[0])
            from qwenimage_jax.parallel.rules import ambient_rules

            with jax.set_mesh(self.mesh), nn.logical_axis_rules(ambient_rules()):
                result = self._apply(self.variables, *args, kv_cache, img_shapes=shapes, img_mask=mask,
                                     kv_cache_mode=kv_cache_mode)
        else:
            result = self._apply(self.variables, *args, kv_cache, img_shapes=shapes, img_mask=mask,
                                 kv_cache_mode=kv_cache_mode)
        sample, prefix_kv = result if kv_cache_mode == "extract" else (result, None)
        if not return_dict:
            return (sample,) if prefix_kv is None else (sample, prefix_kv)
        return DiTOutput(sample, prefix_kv)


def _to_jax(x):
    """numpy / jax arrays (or nested lists) -> jax arrays; a torch tensor is the caller's to convert first."""
    return None if x is None else jnp.asarray(x)


def init_transformer(config, key, mesh=None) -> Transformer:
    """Random parameters for `config` (a DiTConfig, or a diffusers-style dict / ConfigDict with optional runtime
    keys), initialised under jit straight into the rule-derived shardings of `mesh` when given."""
    if not isinstance(config, DiTConfig):
        raw = dict(config)
        runtime = {k: raw.pop(k) for k in list(raw) if k in {f.name for f in dataclasses.fields(DiTConfig)}
                   and k not in DIFFUSERS_DEFAULTS}
        config = DiTConfig.from_diffusers(raw, **runtime)
    def init(k):
        return nn.meta.unbox(_init_module(config).init(k, *_dummy_inputs(config))["params"])

    out_shardings = param_shardings(config, mesh) if mesh is not None else None
    params = jax.jit(init, out_shardings=out_shardings)(key)
    return Transformer(DiT(config), params, config.to_diffusers(), mesh=mesh)
