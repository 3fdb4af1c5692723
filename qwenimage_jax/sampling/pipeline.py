"""`QwenImagePipeline`: Qwen-Image-2 text-to-image and image editing in JAX, called like diffusers'
`QwenImage21Pipeline`.

    pipe = QwenImagePipeline.from_pretrained("Qwen/Qwen-Image-2.1", dtype=jnp.bfloat16, mesh=make_mesh(data=-1))
    images = pipe("a capybara wearing a wizard hat", num_inference_steps=40, seed=0).images      # PIL (RGBA)
    arrays = pipe(prompt=[...], image=ref_png, true_cfg_scale=4.0, negative_prompt=" ", output_type="np").images

What runs where:
  * host: prompt templating/tokenisation, condition-image resizing (PIL, as the reference), the sigma grid
    (`scheduler.flow_match_sigmas`), PNG/PIL conversion.
  * one jit, `_denoise`: the whole sampling loop. Step 0 runs the DiT in "extract" mode (full joint sequence) and
    keeps the text/condition-image K/V prefix; the remaining steps run `lax.fori_loop` over "cached" calls that only
    compute the target tokens. CFG runs the conditional and negative branches as one doubled batch when their
    token layouts agree (same padded prompt length and image slots), else as two calls per step inside the same
    loop. The sigma grid is padded to a bucket of 16 and the step count is a traced value, so 3-, 4- and 8-step
    calls share one program; the compile cache is keyed on (batch, prompt bucket, image layout, resolution, CFG
    mode).
  * prompt-length buckets (`text_buckets`, default 64/128/256/512/1024 text tokens, image slots not counted): both
    branches' states are right-padded (masked) to the smallest bucket that holds the call's longest prompt, so
    prompts of one bucket share one compiled sampler (and one text-encoder program). The target's RoPE frame
    starts after the text, padding included (`models/rope.py`), so each row also passes how many bucket tokens it
    got (`target_frame_shift`, traced): the DiT moves the target's frame back by that many, and the result equals
    the unbucketed call, i.e. diffusers' (whose frame follows the batch's longest prompt).
  * one jit, `_decode`: unpack, de-normalise, VAE decode, map to [0, 1], for the whole batch.
  * with a mesh: latents, prompt embeddings and condition latents are sharded over ("data", "fsdp") on the batch
    axis (the rules' `activation_batch`), DiT/VAE/text-encoder parameters by the logical rules; the batch
    (prompts x images per prompt) must be a multiple of data x fsdp.

Deviations from diffusers, all documented: height/width must be multiples of 32 (error instead of silent
rounding); one negative prompt is broadcast over a batch of prompts; `seed`/`rng` replace torch generators (the
noise differs from torch's; pass `latents` to reproduce a diffusers run); `image_pad_mask` /
`negative_image_pad_mask` may accompany `prompt_embeds` for editing from pre-computed embeddings. Prompts are not
truncated (the reference does not truncate either); a prompt longer than the largest bucket is a ValueError that
names the fix (add a bucket; `text_buckets=None` turns bucketing off: a compile per prompt length).
"""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.sampling import checks
from qwenimage_jax.sampling import images as image_utils
from qwenimage_jax.sampling import latents as latent_utils
from qwenimage_jax.sampling import memory
from qwenimage_jax.sampling import scheduler as sched
from qwenimage_jax.errors import WeightsNotFoundError
from qwenimage_jax.sampling.lora import LoraMixin

IMG_TOKENS_PER_SLOT = 4
SIGMA_BUCKET = 16
# prompt lengths (text tokens after the dropped system turn, image slots not counted) one compiled sampler serves
DEFAULT_TEXT_BUCKETS = (64, 128, 256, 512, 1024)
OUTPUT_TYPES = ("pil", "np", "latent")


@dataclasses.dataclass
class QwenImagePipelineOutput:
    """`.images`: list of PIL images, a (B, H, W, C) float32 array in [0, 1], or packed latents (B, N, C)."""
    images: Any


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    """Everything static about one sampling program (part of the jit cache key)."""
    img_shapes: tuple[tuple[int, int, int], ...]   # condition grids then the target grid, (1, h, w)
    cond_mask: tuple[bool, ...]                    # DiT img_mask of the conditional branch
    neg_mask: tuple[bool, ...] | None              # ... of the negative branch (None without CFG)
    cfg: str                                       # "none" | "batched" | "split"
    progress: bool


class _Progress:
    """Host end of the progress callback: a tqdm bar the jitted loop ticks once per step."""

    def __init__(self):
        self.bar = None

    def tick(self, step):
        if self.bar is not None:
            self.bar.update(1)


def _layout_mask(image_pad_mask: np.ndarray, n_target: int) -> tuple[bool, ...]:
    """Row 0 of the prompt's image-pad mask plus one slot per 2x2 group of target tokens (as the reference)."""
    row = np.asarray(image_pad_mask).astype(bool)
    row = row[0] if row.ndim == 2 else row
    return tuple(bool(v) for v in row) + (True,) * (n_target // IMG_TOKENS_PER_SLOT)


def _repeat_rows(x, n: int):
    """(B, ...) -> (B * n, ...), each row repeated n times in place (diffusers' repeat + view)."""
    return x if x is None or n == 1 else jnp.repeat(x, n, axis=0)


def _as_array(x, dtype=None):
    if x is None:
        return None
    if hasattr(x, "detach"):
        x = x.detach().cpu().float().numpy() if dtype is not None else x.detach().cpu().numpy()
    x = jnp.asarray(x)
    return x.astype(dtype) if dtype is not None else x


def _normalize_mask(mask, batch: int, length: int):
    """A (B, L) mask as int32, or None when there is none or it is all ones (like the reference)."""
    if mask is None:
        return None
    mask = np.asarray(mask.detach().cpu().numpy() if hasattr(mask, "detach") else mask)
    if mask.shape != (batch, length):
        raise ValueError(f"prompt mask shape {mask.shape} does not match the embeddings (batch {batch}, length "
                         f"{length})")
    if mask.astype(bool).all():
        return None
    return jnp.asarray(mask.astype(np.int32))


def pad_text_states(embeds, mask, image_pad_mask, multiple: int):
    """Right-pads (B, L, D) text states, their mask and image_pad_mask to a multiple of `multiple` tokens."""
    embeds = np.asarray(embeds)
    batch, length = embeds.shape[:2]
    extra = -length % int(multiple)
    mask = np.ones((batch, length), np.int32) if mask is None else np.asarray(mask, np.int32)
    if extra == 0:
        return embeds, mask, image_pad_mask
    return (np.pad(embeds, ((0, 0), (0, extra), (0, 0))), np.pad(mask, ((0, 0), (0, extra))),
            np.pad(np.asarray(image_pad_mask, bool), ((0, 0), (0, extra))))


def text_bucket(tokens: int, buckets: Sequence[int]) -> int:
    """The smallest bucket holding `tokens` text tokens; a ValueError naming the fix when none does."""
    buckets = tuple(sorted(int(b) for b in buckets))
    for bucket in buckets:
        if tokens <= bucket:
            return bucket
    bigger = 1 << (int(tokens) - 1).bit_length()
    raise ValueError(f"the prompt has {tokens} text tokens, more than the largest prompt-length bucket "
                     f"({max(buckets)}); shorten the prompt, or add a larger bucket: pipe.text_buckets = "
                     f"{tuple(buckets) + (bigger,)} (or \"text_buckets\" in model_index.json)")


def _pad_branch(text, mask, image_pad_mask, length: int):
    """Right-pads (B, L, D) states, their (B, L) mask (ones when None, so every call has one) and the (B, L) image
    slot mask to `length` positions; the pads are masked."""
    extra = length - text.shape[1]
    mask = jnp.ones(text.shape[:2], jnp.int32) if mask is None else mask.astype(jnp.int32)
    return (jnp.pad(text, ((0, 0), (0, extra), (0, 0))), jnp.pad(mask, ((0, 0), (0, extra))),
            np.pad(image_pad_mask, ((0, 0), (0, extra))))


def _row_lengths(lengths, name: str, prompts: int, per_prompt: int, longest: int):
    """`lengths` (one per prompt) checked and repeated per image as an int32 numpy array, or None."""
    if lengths is None:
        return None
    values = np.asarray(lengths)
    if values.shape != (prompts,) or not np.issubdtype(values.dtype, np.integer) \
            or values.min() < 1 or values.max() > longest:
        raise ValueError(f"{name}={np.ravel(lengths).tolist()!r}; give one length per prompt ({prompts}), each from 1 "
                         f"to the states' length {longest}")
    return np.repeat(values.astype(np.int32), per_prompt)


class QwenImagePipeline(LoraMixin):
    """Loaded Qwen-Image-2 components + the jitted sampler. Build with `from_pretrained` or from components.

    transformer: `models.dit.Transformer`; vae: `models.vae.VAE`; text_encoder: `text.encoder.TextEncoder` or
    None (then pass `prompt_embeds`); scheduler_config: diffusers scheduler config dict; sample_sigmas: default
    grid from model_index.json (Turbo) or None; mesh: optional `jax.sharding.Mesh` with a data/fsdp axis;
    text_pad_tokens: model_index.json's `text_pad_tokens` (a model trained on text states right-padded to a
    multiple of this many tokens, e.g. the small world's: prompts are padded the same way, and that padding is
    part of the model's RoPE layout) or None; text_buckets: prompt-length buckets (model_index.json
    `text_buckets`; None: no bucketing, a compile per prompt length). Set `pipe.text_buckets` to change them.
    """

    def __init__(self, transformer, vae, text_encoder=None, scheduler_config: dict | None = None,
                 sample_sigmas: Sequence[float] | None = None, mesh=None, text_pad_tokens: int | None = None,
                 text_buckets: Sequence[int] | None = DEFAULT_TEXT_BUCKETS):
        self.transformer = transformer
        self.vae = vae
        self.text_encoder = text_encoder
        self.scheduler_config = sched.SchedulerConfig.from_dict(
            scheduler_config if scheduler_config is not None else sched.QWEN_IMAGE_SCHEDULER_CONFIG)
        self.sample_sigmas = None if sample_sigmas is None else [float(s) for s in sample_sigmas]
        if text_pad_tokens is not None and int(text_pad_tokens) <= 0:
            raise ValueError(f"text_pad_tokens={text_pad_tokens!r} must be a positive number of tokens or None")
        self.text_pad_tokens = None if text_pad_tokens is None else int(text_pad_tokens)
        if text_buckets is not None and (not text_buckets or any(int(b) <= 0 for b in text_buckets)):
            raise ValueError(f"text_buckets={text_buckets!r} must list positive token counts, or be None")
        self.text_buckets = None if text_buckets is None else tuple(sorted(int(b) for b in text_buckets))
        self.mesh = mesh
        self.dtype = transformer.dit_config.dtype
        self.latent_channels = transformer.dit_config.in_channels
        vae_z = int(vae.config.get("z_dim", self.latent_channels))
        if vae_z != self.latent_channels:
            raise ValueError(f"the VAE has z_dim={vae_z} but the transformer reads in_channels="
                             f"{self.latent_channels}; the two components do not belong together")
        self.vae_channels = int(vae.config.get("in_channels", 4) or 4)
        self.num_traces = 0          # incremented whenever `_denoise` is traced (a compile)
        self.num_decode_traces = 0
        self._progress = _Progress()
        self._denoise_jit = jax.jit(self._denoise, static_argnames=("spec",))
        self._decode_jit = jax.jit(self._decode, static_argnames=("height", "width"))
        # a sampling loop saved by `qwenimage-jax aot --program sample --save FILE`, run instead of compiling
        # (`use_executable`); it serves the one shape it was compiled for
        self.executable: str | None = None
        self._loaded_executable = None

    def use_executable(self, path: str | None) -> None:
        """Run the sampling loop from `path` (what `aot --program sample --save` writes) instead of compiling it.
        It serves one shape, the one it was compiled for: batch, resolution, prompt bucket, CFG on or off, and the
        weights' dtype and placement. A call with another shape is one error that names what differs. A saved
        program holds no host callback, so its calls draw no per-step progress bar. None: compile as usual."""
        self.executable = None if path is None else str(path)
        self._loaded_executable = None

    def _executable_for(self, args, spec: SamplerSpec):
        """The loaded executable, checked against this call's arguments and static spec (once per shape)."""
        from qwenimage_jax.checkpoints.executables import load_executable, program_meta

        key = (tuple((tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(args) if hasattr(a, "shape")), spec)
        if self._loaded_executable is None or self._loaded_executable[0] != key:
            devices = list(self.mesh.devices.flat) if self.mesh is not None else jax.devices()[:1]
            loaded = load_executable(self.executable, expect=args, meta=program_meta("sample", {"spec": spec}),
                                     devices=devices)
            self._loaded_executable = (key, loaded)
        return self._loaded_executable[1]

    # ------------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, path: str, dtype=None, mesh=None, *, vae_dtype=None,
                        load_text_encoder: bool = True, transformer_subfolder: str = "transformer",
                        quantize: str | None = None, **transformer_runtime) -> "QwenImagePipeline":
        """Loads a diffusers-format Qwen-Image-2 directory (model_index.json, scheduler/, vae/, transformer/,
        text_encoder/, processor/ or tokenizer/); each component may also be our Orbax format.

        dtype: compute and parameter dtype of the DiT and text encoder (and the VAE unless `vae_dtype`); None:
            bfloat16 on GPU and TPU, float32 on CPU (`attention.platform_dtype`).
        mesh: shard parameters by the logical rules and the batch over data/fsdp.
        transformer_subfolder: another transformer inside `path` (e.g. "teacher/transformer" beside a distilled
            default); model_index.json's `sample_sigmas` belong to the default transformer and are then not used.
        quantize: None/"none", "int8", "fp8" or "int4": weight-only quantization of the DiT blocks and the text
            decoder layers, each kernel as it is read (`checkpoints.quantize`; the VAE keeps its dtype).
        transformer_runtime: DiTConfig runtime fields, e.g. attention="cudnn"; attention absent or "auto": cuDNN
            on GPU, splash on TPU, the einsum path on CPU (`attention.platform_default`).
        """
        from qwenimage_jax import checkpoints
        from qwenimage_jax.checkpoints import quantize as quant
        from qwenimage_jax.checkpoints.safetensors_io import load_json_config, read_json_file

        if not os.path.isdir(path):
            raise WeightsNotFoundError(f"model directory {path!r} does not exist; pass a diffusers-format Qwen-Image-2 "
                                       "directory (model_index.json, transformer/, vae/, text_encoder/, ...)")
        index_path = os.path.join(path, "model_index.json")
        index = {}
        if os.path.exists(index_path):
            index = read_json_file(index_path, "model_index.json")  # a corrupt file is named, not a bare JSON error
        for component in ("transformer", "vae"):
            if not os.path.isdir(os.path.join(path, component)):
                raise WeightsNotFoundError(f"{path!r} has no {component}/ directory; expected a diffusers-format "
                                           "Qwen-Image-2 directory (model_index.json, transformer/, vae/, ...)")
        scheduler_config = None
        sched_path = os.path.join(path, "scheduler", "scheduler_config.json")
        if os.path.exists(sched_path):
            scheduler_config = load_json_config(os.path.join(path, "scheduler"), "scheduler_config.json")
        if not os.path.isdir(os.path.join(path, transformer_subfolder)):
            raise WeightsNotFoundError(f"{path!r} has no {transformer_subfolder}/ directory; name the subfolder that "
                                       "holds the DiT (--transformer, default transformer)")
        quantize = quant.check_mode(quantize)  # a bad mode fails before anything loads
        from qwenimage_jax.models.attention import check_platform, platform_default, platform_dtype

        dtype = platform_dtype() if dtype is None else dtype
        if transformer_runtime.get("attention") in (None, "auto"):
            transformer_runtime["attention"] = platform_default()
        check_platform(transformer_runtime["attention"],   # before any weight is read
                       splash_interpret=bool(transformer_runtime.get("splash_interpret", False)))
        # quantized while read (one float tensor at a time), not after a whole float copy is loaded
        transformer = checkpoints.load("transformer", os.path.join(path, transformer_subfolder), dtype=dtype,
                                       mesh=mesh, quantize=quantize, **transformer_runtime)
        # The loader derives the VAE's shardings from `mesh` for either format (diffusers or Orbax).
        vae = checkpoints.load("vae", os.path.join(path, "vae"), dtype=dtype if vae_dtype is None else vae_dtype,
                               mesh=mesh)
        text_encoder = None
        te_entry = index.get("text_encoder", ["", ""])
        te_dir = os.path.join(path, "text_encoder")
        if load_text_encoder and os.path.isdir(te_dir) and not (isinstance(te_entry, list) and te_entry[0] is None):
            tok_dir = next((os.path.join(path, d) for d in ("processor", "tokenizer")
                            if os.path.isdir(os.path.join(path, d))), None)
            text_encoder = checkpoints.load("text_encoder", te_dir, dtype=dtype, mesh=mesh, tokenizer_path=tok_dir,
                                            quantize=quantize)
        sample_sigmas = index.get("sample_sigmas") if transformer_subfolder == "transformer" else None
        return cls(transformer, vae, text_encoder, scheduler_config, sample_sigmas, mesh,
                   text_pad_tokens=index.get("text_pad_tokens"),
                   text_buckets=index.get("text_buckets", DEFAULT_TEXT_BUCKETS))

    # ------------------------------------------------------------------------------------------- prompts
    def encode_prompt(self, prompt, image=None, num_images_per_prompt: int = 1, prompt_embeds=None,
                      prompt_embeds_mask=None, image_pad_mask=None):
        """(prompt_embeds (B*n, L, D), mask (B*n, L) int32 or None, image_pad_mask (B, L) bool) as diffusers'
        `encode_prompt` returns them. `image`: condition images (already resized PIL) or None."""
        if prompt_embeds is None:
            if self.text_encoder is None:
                raise ValueError("this pipeline has no text encoder; pass prompt_embeds (and prompt_embeds_mask) or "
                                 "load one with from_pretrained(..., load_text_encoder=True)")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            # the encoder input is padded to the bucket too: one encoder program per bucket
            bucket = (lambda n: text_bucket(n, self.text_buckets)) if self.text_buckets else None
            prompt_embeds, prompt_embeds_mask, image_pad_mask = self.text_encoder.encode_prompt(prompts, image,
                                                                                                bucket=bucket)
            if self.text_pad_tokens:  # the layout the DiT was trained on (masked zero states after the prompt)
                prompt_embeds, prompt_embeds_mask, image_pad_mask = pad_text_states(
                    prompt_embeds, prompt_embeds_mask, image_pad_mask, self.text_pad_tokens)
        else:
            prompt_embeds = _as_array(prompt_embeds, self.dtype)
            if image_pad_mask is None:
                if image is not None:
                    raise ValueError("pass image_pad_mask alongside prompt_embeds when the embeddings cover condition "
                                     "images, so the transformer knows which positions hold image tokens")
                image_pad_mask = np.zeros(prompt_embeds.shape[:2], bool)
        prompt_embeds = jnp.asarray(prompt_embeds).astype(self.dtype)
        if prompt_embeds.ndim != 3 or 0 in prompt_embeds.shape:
            raise ValueError(f"prompt_embeds must be (batch, tokens, features) with none of them 0, got shape "
                             f"{prompt_embeds.shape}")
        batch, length = prompt_embeds.shape[:2]
        mask = _normalize_mask(prompt_embeds_mask, batch, length)
        image_pad_mask = np.asarray(image_pad_mask.detach().cpu().numpy() if hasattr(image_pad_mask, "detach")
                                    else image_pad_mask).astype(bool)
        if image_pad_mask.ndim == 1:
            image_pad_mask = image_pad_mask[None]
        if image_pad_mask.shape[-1] != length:
            raise ValueError(f"image_pad_mask has {image_pad_mask.shape[-1]} positions but prompt_embeds has {length}")
        return _repeat_rows(prompt_embeds, num_images_per_prompt), _repeat_rows(mask, num_images_per_prompt), \
            image_pad_mask

    def text_state_lengths(self, prompts: Sequence[str], chunk: int = 256) -> list[int]:
        """For each text-to-image prompt, the length of its states when encoded alone (text tokens after the
        dropped system turn, rounded up to `text_pad_tokens`): its `prompt_lengths` entry, and what its bucket is
        chosen from (`prompt_bucket`). Tokenizes only; needs the text encoder's tokenizer."""
        from qwenimage_jax.text import templates

        if self.text_encoder is None:
            raise ValueError("this pipeline has no text encoder to tokenize prompts with")
        drop = templates.drop_index(self.text_encoder.tokenizer)
        out = []
        for i in range(0, len(prompts), chunk):
            texts = [templates.build_prompt(p, 0) for p in prompts[i:i + chunk]]
            mask = np.asarray(self.text_encoder.prepare_inputs(texts)["attention_mask"])
            out.extend(int(n) - drop for n in mask.sum(1))
        if self.text_pad_tokens:
            out = [-(-n // self.text_pad_tokens) * self.text_pad_tokens for n in out]
        return out

    def prompt_bucket(self, length: int) -> int:
        """The padded length a call whose longest (text-to-image) states are `length` long runs at: its bucket,
        or `length` itself without buckets. A ValueError naming the fix when no bucket holds it."""
        return text_bucket(length, self.text_buckets) if self.text_buckets else int(length)

    def check_memory(self, batch: int, height: int, width: int, *, cfg: bool = False, text_tokens: int = 0,
                     condition_sizes: Sequence[tuple[int, int]] = ()) -> None:
        """Raises `memory.MemoryBudgetError` when sampling `batch` images of height x width (CFG: a doubled
        denoising batch) is estimated to need more memory than the device running it has free (`sampling/memory.py`
        says what is counted). text_tokens: the prompt states' length when known (else the smallest bucket is
        assumed: a lower bound); condition_sizes: (height, width) of each resized condition image."""
        text = int(text_tokens)
        if self.text_buckets:
            text = next((b for b in self.text_buckets if b >= text), text)
        if self.text_pad_tokens:
            text = -(-text // self.text_pad_tokens) * self.text_pad_tokens
        device, shards = jax.devices()[0], 1
        if self.mesh is not None:
            device = self.mesh.devices.flat[0]
            sizes = dict(zip(self.mesh.axis_names, self.mesh.devices.shape))
            shards = int(sizes.get("data", 1)) * int(sizes.get("fsdp", 1))
        memory.check(self.transformer.dit_config, self.vae.vae_config, batch=int(batch), height=int(height),
                     width=int(width), device=device, cfg=bool(cfg), text_tokens=text,
                     condition_sizes=tuple(condition_sizes), batch_shards=shards)

    # ------------------------------------------------------------------------------------- jitted programs
    def _denoise(self, variables, latents, image_latents, text, text_mask, neg_text, neg_mask, sigmas, timesteps,
                 num_steps, guidance, text_shift=None, neg_shift=None, *, spec: SamplerSpec):
        """latents (B, N, C) noise -> (B, N, C) after `num_steps` Euler steps.

        image_latents (B, N_cond, C) or None; text (B, L, D), text_mask (B, L) or None; neg_* the same for the
        negative branch (None without CFG); sigmas (bucket,) float32 padded with zeros; timesteps (bucket,);
        num_steps () int32; guidance () float32; text_shift / neg_shift (B,) int32 or None: bucket-padding tokens
        per row, the DiT's `target_frame_shift`.
        """
        self.num_traces += 1
        module = self.transformer.module
        batch, n_target = latents.shape[:2]
        dtype = latents.dtype

        def dit(hidden, enc, enc_mask, t, img_mask, mode, cache=None, shift=None):
            return module.apply(variables, hidden, enc, t, spec.img_shapes, img_mask,
                                encoder_hidden_states_mask=enc_mask, kv_cache_mode=mode, kv_cache=cache,
                                target_frame_shift=shift)

        def with_condition(x):
            if image_latents is None:
                return x
            cond = image_latents.astype(x.dtype)
            if cond.shape[0] != x.shape[0]:  # CFG as one doubled batch: both halves see the same images
                cond = jnp.concatenate([cond, cond], axis=0)
            return jnp.concatenate([cond, x], axis=1)

        def model_time(i, n):
            t = (timesteps[i].astype(dtype) / 1000).astype(dtype)
            return jnp.broadcast_to(t, (n,))

        if spec.cfg == "batched":
            both_text = jnp.concatenate([text, neg_text], axis=0)
            both_mask = None
            if text_mask is not None or neg_mask is not None:
                ones = lambda m, ref: jnp.ones(ref.shape[:2], jnp.int32) if m is None else m.astype(jnp.int32)
                both_mask = jnp.concatenate([ones(text_mask, text), ones(neg_mask, neg_text)], axis=0)
            both_shift = None if text_shift is None else jnp.concatenate([text_shift, neg_shift])

        def combine(cond, neg):
            return neg + guidance.astype(cond.dtype) * (cond - neg)

        def first_velocity(x):
            t = model_time(0, batch)
            if spec.cfg == "batched":
                hidden = with_condition(jnp.concatenate([x, x], axis=0))
                out, kv = dit(hidden, both_text, both_mask, jnp.concatenate([t, t]), spec.cond_mask, "extract",
                              shift=both_shift)
                out = out[:, -n_target:]
                return combine(out[:batch], out[batch:]), (kv,)
            out, kv = dit(with_condition(x), text, text_mask, t, spec.cond_mask, "extract", shift=text_shift)
            v = out[:, -n_target:]
            if spec.cfg == "split":
                neg_out, neg_kv = dit(with_condition(x), neg_text, neg_mask, t, spec.neg_mask, "extract",
                                      shift=neg_shift)
                return combine(v, neg_out[:, -n_target:]), (kv, neg_kv)
            return v, (kv,)

        def cached_velocity(x, i, caches):
            t = model_time(i, batch)
            if spec.cfg == "batched":
                out = dit(jnp.concatenate([x, x], axis=0), None, None, jnp.concatenate([t, t]), spec.cond_mask,
                          "cached", caches[0], both_shift)
                return combine(out[:batch], out[batch:])
            v = dit(x, None, None, t, spec.cond_mask, "cached", caches[0], text_shift)
            if spec.cfg == "split":
                return combine(v, dit(x, None, None, t, spec.neg_mask, "cached", caches[1], neg_shift))
            return v

        def tick(i):
            if spec.progress:
                jax.debug.callback(self._progress.tick, i)

        velocity, caches = first_velocity(latents)
        latents = sched.euler_step(latents, velocity, sigmas[0], sigmas[1])
        tick(0)

        def body(i, x):
            v = cached_velocity(x, i, caches)
            x = sched.euler_step(x, v, sigmas[i], sigmas[i + 1])
            tick(i)
            return x

        return jax.lax.fori_loop(1, num_steps, body, latents)

    def _decode(self, params, latents, mean, std, *, height, width):
        """Packed normalised latents (B, N, C) -> images (B, H, W, C_out) float32 in [0, 1]."""
        self.num_decode_traces += 1
        z = latent_utils.unpack(latents, height, width).astype(jnp.float32) * std + mean
        z = z.astype(self.vae.vae_config.dtype)
        x = self.vae.module.apply({"params": params}, z, method="decode")
        return jnp.clip(x.astype(jnp.float32) * 0.5 + 0.5, 0.0, 1.0)

    def _batch_sharding(self):
        if self.mesh is None:
            return None
        from jax.sharding import NamedSharding, PartitionSpec

        return NamedSharding(self.mesh, PartitionSpec(("data", "fsdp")))

    def _place(self, x):
        sharding = self._batch_sharding()
        if x is None or sharding is None:
            return x
        return jax.device_put(x, sharding)

    def _mesh_context(self):
        import contextlib

        if self.mesh is None:
            return contextlib.nullcontext()
        import flax.linen as nn

        from qwenimage_jax.parallel.rules import ambient_rules

        stack = contextlib.ExitStack()
        stack.enter_context(jax.set_mesh(self.mesh))
        stack.enter_context(nn.logical_axis_rules(ambient_rules()))  # the DiT constrains its activations by these
        return stack

    def decode_latents(self, latents, height: int, width: int) -> np.ndarray:
        """Packed latents (B, N, C) -> (B, H, W, C_out) float32 numpy in [0, 1] (one jitted, batched VAE decode)."""
        with self._mesh_context():
            out = self._decode_jit(self.vae.params, self._place(latents), self.vae.latents_mean,
                                   self.vae.latents_std, height=height, width=width)
        return np.asarray(out)

    def _bucket_prompts(self, cond, neg):
        """Pads the conditional and (optional) negative (states, mask, image_pad_mask) to one shared bucket: the
        smallest of `text_buckets` that holds the longest prompt's text tokens (image slots come on top, since
        they are fixed by the condition images). Each branch gains its per-row shift (B,) int32: the tokens it was
        padded by, which the DiT takes off the target's RoPE frame, so the result equals the unpadded call."""
        branches = [b for b in (cond, neg) if b is not None]
        slots = max(int(np.asarray(p)[0].sum()) for _, _, p in branches)
        length = slots + text_bucket(max(t.shape[1] for t, _, _ in branches) - slots, self.text_buckets)
        out = []
        for text, mask, pad_mask in branches:
            shift = jnp.full((text.shape[0],), length - text.shape[1], jnp.int32)
            out.append(_pad_branch(text, mask, pad_mask, length) + (shift,))
        return out[0], (out[1] if neg is not None else None)

    # ---------------------------------------------------------------------------------------------- call
    def __call__(self, prompt: str | list[str] | None = None, image=None, negative_prompt: str | list[str] | None = None,
                 true_cfg_scale: float = 1.0, height: int | None = None, width: int | None = None,
                 num_inference_steps: int | None = None, sigmas: Sequence[float] | None = None,
                 num_images_per_prompt: int = 1, latents=None, prompt_embeds=None, prompt_embeds_mask=None,
                 negative_prompt_embeds=None, negative_prompt_embeds_mask=None, output_type: str = "pil",
                 return_dict: bool = True, output_resolution: int = 1024, seed: int | None = None,
                 rng: jax.Array | None = None, progress: bool = True, image_pad_mask=None,
                 negative_image_pad_mask=None, prompt_lengths: Sequence[int] | None = None,
                 negative_prompt_lengths: Sequence[int] | None = None, memory_check: bool = True):
        """Generates images; arguments as diffusers' `QwenImage21Pipeline.__call__` plus `seed`/`rng` (noise when
        `latents` is None; default seed 0), `progress` (tqdm bar over steps) and, for editing from pre-computed
        embeddings, `image_pad_mask`/`negative_image_pad_mask`. Returns `QwenImagePipelineOutput(images)` or
        `(images,)`.

        prompt_lengths / negative_prompt_lengths: one int per prompt (repeated over num_images_per_prompt), the
        length of that prompt's states alone (what `encode_prompt` returns for it by itself: text tokens, image
        slots and `text_pad_tokens` padding). The target's RoPE frame starts after the text, so by default it
        follows the batch's longest prompt (as in diffusers); with these it follows each row's own prompt, and
        every row is the image a call with that prompt alone gives (`qwenimage-jax sample --prompts-file` uses it:
        per-prompt seeds through `latents`).

        num_inference_steps: None runs the model's own grid (model_index.json `sample_sigmas`, a distilled model)
        or 40 steps; another count runs the generic schedule (with a warning on a distilled model). Bad arguments
        (steps outside 1..1000, non-decreasing sigmas, empty or non-string prompts, NaN/Inf latents or
        embeddings, sizes beyond the RoPE range, ...) are a ValueError before anything runs.

        memory_check: estimate the call's peak memory (`sampling/memory.py`) and raise `MemoryBudgetError` (an
        InputError) naming the largest size and batch that fit when it exceeds what the device has free, before
        the text encoder, the noise or the sampler run; False skips it (`sample --no-memory-check`)."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r}; choose one of {OUTPUT_TYPES}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass either `prompt` or `prompt_embeds`, not both")
        if prompt is None and prompt_embeds is None:
            raise ValueError("pass one of `prompt` or `prompt_embeds`")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) \
                or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt={num_images_per_prompt!r}; it must be an integer >= 1")
        checks.check_prompts(prompt, "prompt")
        checks.check_prompts(negative_prompt, "negative_prompt")
        checks.check_guidance(true_cfg_scale)
        for name, value in (("latents", latents), ("prompt_embeds", prompt_embeds),
                            ("negative_prompt_embeds", negative_prompt_embeds)):
            checks.check_finite(value, name)
        num_steps, grid = checks.resolve_steps(num_inference_steps, sigmas, self.sample_sigmas)
        if height is not None or width is not None:    # 0 is an error, not "the default"
            latent_utils.check_size(32 if height is None else height, 32 if width is None else width)
            latent_utils.check_rope_range(height or 0, width or 0)

        # 1. condition images: one resize feeds the text encoder and the VAE.
        conditions = []
        if image is not None:
            raw = image if isinstance(image, list) else [image]
            if not raw:
                raise ValueError("`image` is an empty list; pass None for text-to-image")
            if len(raw) > 10:
                raise ValueError(f"{len(raw)} condition images given; Qwen-Image-2 takes at most 10")
            pil = [image_utils.to_pil(img) for img in raw]
            area = output_resolution * output_resolution
            calc_w, calc_h = image_utils.calculate_dimensions(area, pil[-1].size[0] / pil[-1].size[1])
            height, width = height or calc_h, width or calc_w
            conditions = [image_utils.prepare_condition_image(img, area, self.vae_channels) for img in pil]
            for i, cond in enumerate(conditions):
                latent_utils.check_rope_range(cond.size[1], cond.size[0], f"condition image {i} (resized)")
        height, width = height or output_resolution, width or output_resolution
        latent_utils.check_size(height, width)
        latent_utils.check_rope_range(height, width)

        if isinstance(prompt, str):
            batch_size = 1
        elif prompt is not None:
            batch_size = len(prompt)
        else:
            batch_size = prompt_embeds.shape[0]
        total = batch_size * num_images_per_prompt
        has_neg = negative_prompt is not None or negative_prompt_embeds is not None
        do_cfg = true_cfg_scale > 1 and has_neg
        if memory_check and total > 0:   # before the text encoder, the noise or the sampler allocate or compile
            # anything (0 rows of prompt_embeds: named by encode_prompt's shape check)
            shapes = [tuple(getattr(e, "shape", np.shape(e))) for e in (prompt_embeds, negative_prompt_embeds
                                                                        if do_cfg else None) if e is not None]
            given = [int(shape[1]) for shape in shapes if len(shape) == 3]   # other shapes: encode_prompt names them
            self.check_memory(total, height, width, cfg=do_cfg, text_tokens=max(given, default=0),
                              condition_sizes=[(c.size[1], c.size[0]) for c in conditions])

        # 2. prompt embeddings
        vlm_images = [c.vlm for c in conditions] or None
        if true_cfg_scale > 1 and not has_neg:
            warnings.warn(f"true_cfg_scale={true_cfg_scale} but no negative prompt was given, so classifier-free "
                          "guidance is off; pass negative_prompt (e.g. ' ') to enable it", stacklevel=2)
        elif true_cfg_scale <= 1 and has_neg:
            warnings.warn("a negative prompt was given but true_cfg_scale <= 1, so classifier-free guidance is off",
                          stacklevel=2)
        text, text_mask, pad_mask = self.encode_prompt(prompt, vlm_images, num_images_per_prompt, prompt_embeds,
                                                       prompt_embeds_mask, image_pad_mask)
        neg_text = neg_mask = neg_pad_mask = None
        if do_cfg:
            if negative_prompt is not None and negative_prompt_embeds is None:
                negative_prompt = [negative_prompt] * batch_size if isinstance(negative_prompt, str) \
                    else list(negative_prompt)
            neg_text, neg_mask, neg_pad_mask = self.encode_prompt(
                negative_prompt, vlm_images, num_images_per_prompt, negative_prompt_embeds,
                negative_prompt_embeds_mask, negative_image_pad_mask if negative_image_pad_mask is not None
                else (image_pad_mask if negative_prompt_embeds is not None else None))
            if neg_text.shape[0] != text.shape[0]:
                raise ValueError(f"negative prompt batch {neg_text.shape[0] // num_images_per_prompt} does not match "
                                 f"the prompt batch {batch_size}; pass one negative prompt or one per prompt")
        if text.shape[0] != total:
            raise ValueError(f"prompt embeddings hold {text.shape[0]} rows, expected {total}")
        own = _row_lengths(prompt_lengths, "prompt_lengths", batch_size, num_images_per_prompt, text.shape[1])
        neg_own = None
        if do_cfg:
            neg_own = _row_lengths(negative_prompt_lengths, "negative_prompt_lengths", batch_size,
                                   num_images_per_prompt, neg_text.shape[1])
        text_shift = neg_shift = None
        if self.text_buckets:
            (text, text_mask, pad_mask, text_shift), neg = self._bucket_prompts(
                (text, text_mask, pad_mask), (neg_text, neg_mask, neg_pad_mask) if do_cfg else None)
            if neg is not None:
                neg_text, neg_mask, neg_pad_mask, neg_shift = neg
        if own is not None or neg_own is not None:   # each row's frame after its own prompt (see the docstring)
            def shift_for(rows, length, current):
                if rows is not None:
                    return jnp.asarray(length - rows, jnp.int32)
                return current if current is not None else jnp.zeros((total,), jnp.int32)

            text_shift = shift_for(own, text.shape[1], text_shift)
            if do_cfg:
                neg_shift = shift_for(neg_own, neg_text.shape[1], neg_shift)

        # 3. latents
        h, w = latent_utils.latent_grid(height, width)
        n_target = h * w
        if latents is None:
            key = rng if rng is not None else jax.random.key(0 if seed is None else seed)
            latents = latent_utils.initial_noise(key, total, height, width, self.latent_channels, self.dtype)
        else:
            latents = _as_array(latents).astype(self.dtype)
            expected = (total, n_target, self.latent_channels)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents shape {tuple(latents.shape)} != {expected} (batch, (H/16)*(W/16), "
                                 f"channels), packed as the reference packs them")
        image_latents = None
        if conditions:
            packed = []
            for cond in conditions:
                with self._mesh_context():
                    z = self.vae.encode(jnp.asarray(cond.vae[None], self.vae.vae_config.param_dtype), normalize=True)
                packed.append(latent_utils.pack(z))
            image_latents = jnp.broadcast_to(jnp.concatenate(packed, axis=1).astype(self.dtype),
                                             (total,) + jnp.concatenate(packed, axis=1).shape[1:])

        # 4. schedule (host) and the static layout
        sigma_grid, timesteps = sched.flow_match_sigmas(num_steps, n_target, self.scheduler_config, sigmas=grid)
        steps = len(timesteps)
        bucket = -(-(steps + 1) // SIGMA_BUCKET) * SIGMA_BUCKET
        sigma_pad = np.zeros((bucket,), np.float32)
        sigma_pad[:steps + 1] = sigma_grid
        time_pad = np.zeros((bucket,), np.float32)
        time_pad[:steps] = timesteps
        img_shapes = tuple((1, c.size[1] // 16, c.size[0] // 16) for c in conditions) + ((1, h, w),)
        cond_layout = _layout_mask(pad_mask, n_target)
        neg_layout = _layout_mask(neg_pad_mask, n_target) if do_cfg else None
        cfg_mode = "none" if not do_cfg else ("batched" if neg_layout == cond_layout else "split")
        progress = bool(progress) and self.executable is None   # a saved program has no host callback
        spec = SamplerSpec(img_shapes, cond_layout, neg_layout, cfg_mode, progress)

        if self.mesh is not None:
            shards = dict(zip(self.mesh.axis_names, self.mesh.devices.shape))
            parts = shards.get("data", 1) * shards.get("fsdp", 1)
            if total % parts:
                raise ValueError(f"batch {total} (prompts x num_images_per_prompt) is not divisible by the mesh's "
                                 f"data x fsdp = {parts}; use a multiple of {parts}")

        # 5. the jitted loop
        args = [self._place(a) for a in (latents, image_latents, text, text_mask, neg_text, neg_mask)]
        shifts = [self._place(a) for a in (text_shift, neg_shift)]
        bar = None
        if progress:
            from tqdm.auto import tqdm
            bar = tqdm(total=steps, desc="sampling", unit="step")
        self._progress.bar = bar
        try:
            with self._mesh_context():
                call_args = (self.transformer.variables, *args, jnp.asarray(sigma_pad), jnp.asarray(time_pad),
                             jnp.asarray(steps, jnp.int32), jnp.asarray(true_cfg_scale, jnp.float32), *shifts)
                if self.executable is not None:
                    out = self._executable_for(call_args, spec)(*call_args)
                else:
                    out = self._denoise_jit(*call_args, spec=spec)
                out = jax.block_until_ready(out)
        finally:
            if bar is not None:
                jax.effects_barrier()
                bar.close()
            self._progress.bar = None

        # 6. decode
        if output_type == "latent":
            result = out
        else:
            result = self.decode_latents(out, height, width)
            if output_type == "pil":
                result = image_utils.numpy_to_pil(result)
        if not return_dict:
            return (result,)
        return QwenImagePipelineOutput(images=result)
