"""Qwen3-VL as the frozen Qwen-Image-2 text encoder: the composed Linen module (token embeddings, image embeddings
scattered into `<|image_pad|>` slots, DeepStack, text decoder) and `TextEncoder`, the loaded object with jitted
`encode` / `logits` / `encode_prompt` / `generate`.

The vision tower (`vision.py`, `Qwen3VLVisionModel`) and the rope index (`processor.get_rope_index`) are imported
lazily, so text-only use works without them.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.models.component import Component
from qwenimage_jax.models.qwen3_vl.config import (MultimodalIds, TextConfig, multimodal_ids_from_hf,
                                                  text_config_from_hf)
from qwenimage_jax.models.qwen3_vl.text import TextDecoder, init_kv_cache

Dtype = Any


def _vision_module():
    """The vision engineer's module, or None when `vision.py` is not there yet."""
    import importlib
    import importlib.util
    name = "qwenimage_jax.models.qwen3_vl.vision"
    if importlib.util.find_spec(name) is None:
        return None
    return importlib.import_module(name)


def _vision_config_from_hf(vision, hf_vision: dict):
    for name in ("vision_config_from_hf", "config_from_hf"):
        if hasattr(vision, name):
            return getattr(vision, name)(hf_vision)
    cls = vision.VisionConfig
    if hasattr(cls, "from_hf"):
        return cls.from_hf(hf_vision)
    import dataclasses
    fields = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in hf_vision.items() if k in fields})


def _call_with_accepted(fn, available: dict):
    """Calls fn with the entries of `available` its signature accepts (by name)."""
    import inspect
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(**available)
    return fn(**{k: v for k, v in available.items() if k in params})


def _rgb_over_white(image):
    """PIL/numpy image -> RGB PIL image; RGBA is composited over white (Qwen-Image-2's VLM input)."""
    from PIL import Image
    if not isinstance(image, Image.Image):
        image = Image.fromarray(np.asarray(image))
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.getchannel("A"))
        return white
    return image


def scatter_image_tokens(text_embeds: jax.Array, image_mask: jax.Array, image_embeds: jax.Array) -> jax.Array:
    """`masked_scatter`: rows of image_embeds (N, D) fill the True slots of image_mask (B, S) in row-major order.

    text_embeds (B, S, D) -> (B, S, D). Also used for DeepStack rows with zeros as `text_embeds`.
    """
    flat = image_mask.reshape(-1)
    index = jnp.clip(jnp.cumsum(flat) - 1, 0, max(image_embeds.shape[0] - 1, 0))
    gathered = image_embeds[index].reshape(text_embeds.shape).astype(text_embeds.dtype)
    return jnp.where(image_mask[..., None], gathered, text_embeds)


class Qwen3VL(nn.Module):
    """`Qwen3VLForConditionalGeneration` without the video path. Params: language_model (+ visual)."""
    text_config: TextConfig
    ids: MultimodalIds = MultimodalIds()
    vision_config: Any = None  # the vision module's config, or None for a text-only module
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        self.language_model = TextDecoder(self.text_config, self.dtype, self.param_dtype)
        if self.vision_config is not None:
            vision = _vision_module()
            self.visual = vision.Qwen3VLVisionModel(self.vision_config, dtype=self.dtype,
                                                    param_dtype=self.param_dtype)

    def embed_inputs(self, input_ids, pixel_values=None, grid_thw=None):
        """input_ids (B, S) [+ pixel_values (N_patches, C*T*P*P), grid_thw static ((t, h, w), ...)] ->
        (inputs_embeds (B, S, D), deepstack (K, B, S, D) or None)."""
        embeds = self.language_model.embed(input_ids)
        if pixel_values is None:
            return embeds, None
        if self.vision_config is None:
            raise ValueError("this text encoder was built without a vision tower; cannot take pixel_values")
        image_embeds, deepstack = self.visual(pixel_values, grid_thw)
        image_mask = input_ids == self.ids.image_token_id
        embeds = scatter_image_tokens(embeds, image_mask, image_embeds)
        if not deepstack:
            return embeds, None
        zeros = jnp.zeros_like(embeds)
        dense = jnp.stack([scatter_image_tokens(zeros, image_mask, d) for d in deepstack])
        return embeds, dense

    def __call__(self, input_ids, attention_mask, position_ids, pixel_values=None, grid_thw=None,
                 compute_logits=True):
        """input_ids/attention_mask (B, S); position_ids (3, B, S) -> dict(pre_norm (B, S, D), logits (B, S, V))."""
        embeds, deepstack = self.embed_inputs(input_ids, pixel_values, grid_thw)
        return self.language_model(embeds, position_ids, attention_mask, deepstack, compute_logits=compute_logits)

    def step(self, input_ids, positions, kv_mask, cache, cache_index, extra=None):
        """Generation step (see `text.generate.Decoder`): logits (B, T, V), cache.

        extra: None, or {"position_ids": (3, B, T)} and/or {"inputs_embeds": (B, T, D), "deepstack": (K, B, T, D)}.
        """
        extra = extra or {}
        embeds = extra.get("inputs_embeds")
        if embeds is None:
            embeds = self.language_model.embed(input_ids)
        position_ids = extra.get("position_ids", positions)
        out = self.language_model(embeds, position_ids, None, extra.get("deepstack"), cache=cache,
                                  cache_index=cache_index, kv_mask=kv_mask)
        return out["logits"], out["cache"]


class TextEncoder(Component):
    """A loaded Qwen3-VL: `.module`, `.params`, `.config` (raw HF config dict) and jitted entry points.

    encode(ids, mask, pixel_values=None, image_grid_thw=None) -> pre-norm last-layer states (B, S, D)
    logits(...)                                              -> (B, S, vocab) fp32
    encode_prompt(prompts, images=None)                      -> (prompt_embeds, mask or None, image_pad_mask)
    generate(ids, mask, max_new_tokens, temperature=0, top_p=1, seed=0, stop_token_ids=None) -> (B, N) new ids
    """

    def __init__(self, module: Qwen3VL, params: Any, config: dict, mesh=None, tokenizer_path: Optional[str] = None,
                 image_processor_config: Optional[dict] = None):
        self.module = module
        self.params = params
        self.config = config
        self.mesh = mesh
        self.tokenizer_path = tokenizer_path
        self.image_processor_config = image_processor_config
        self._tokenizer = None
        self._image_processor = None
        self._forward = jax.jit(self._apply_forward, static_argnames=("grid_thw", "compute_logits"))
        self._embed = jax.jit(self._apply_embed, static_argnames=("grid_thw",))
        from qwenimage_jax.text.generate import Decoder
        self.decoder = Decoder(init_cache=self._init_cache, forward=self._apply_step)

    # ----------------------------------------------------------------------------------------------- internals
    @property
    def text_config(self) -> TextConfig:
        return self.module.text_config

    @property
    def model_config(self) -> TextConfig:
        return self.module.text_config

    @property
    def dtype(self):
        return self.module.dtype

    def _rules(self):
        from qwenimage_jax.parallel.rules import LOGICAL_RULES
        return nn.logical_axis_rules(LOGICAL_RULES)

    def _context(self):
        stack = contextlib.ExitStack()
        stack.enter_context(self._rules())
        if self.mesh is not None:
            stack.enter_context(jax.set_mesh(self.mesh) if hasattr(jax, "set_mesh") else self.mesh)
        return stack

    def _apply_forward(self, params, input_ids, attention_mask, position_ids, pixel_values, grid_thw,
                       compute_logits):
        with self._rules():
            return self.module.apply({"params": params}, input_ids, attention_mask, position_ids, pixel_values,
                                     grid_thw, compute_logits)

    def _init_cache(self, batch, max_length):
        return init_kv_cache(self.text_config, batch, max_length, self.dtype)

    def _apply_step(self, params, input_ids, positions, kv_mask, cache, cache_index, extra):
        with self._rules():
            return self.module.apply({"params": params}, input_ids, positions, kv_mask, cache, cache_index, extra,
                                     method=Qwen3VL.step)

    def _rope_index(self, input_ids, attention_mask, image_grid_thw):
        """((3, B, S) position ids as transformers' forward builds them, rope deltas (B,))."""
        b, s = input_ids.shape
        if image_grid_thw is None:  # text only: arange(S), pads included; no delta
            return np.broadcast_to(np.arange(s, dtype=np.int32)[None, None], (3, b, s)), np.zeros((b,), np.int32)
        from qwenimage_jax.models.qwen3_vl import processor as vl_processor
        ids = self.module.ids
        image_mask = np.asarray(input_ids) == ids.image_token_id
        available = dict(input_ids=np.asarray(input_ids), attention_mask=np.asarray(attention_mask),
                         image_grid_thw=np.asarray(image_grid_thw), mm_token_type_ids=image_mask.astype(np.int32),
                         image_token_id=ids.image_token_id, video_token_id=ids.video_token_id,
                         vision_start_token_id=ids.vision_start_token_id,
                         spatial_merge_size=self.config.get("vision_config", {}).get("spatial_merge_size", 2),
                         config=self.config)
        position_ids, deltas = _call_with_accepted(vl_processor.get_rope_index, available)
        return np.asarray(position_ids, np.int32), np.asarray(deltas, np.int32).reshape(b)

    def _check_inputs(self, input_ids, attention_mask, pixel_values, image_grid_thw):
        """Validated numpy ids/mask, pixel_values (or None) and the static grid tuple (or None)."""
        input_ids = np.asarray(input_ids, np.int32)
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must be (batch, tokens), got shape {input_ids.shape}")
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, np.int32)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {attention_mask.shape} != input_ids shape {input_ids.shape}")
        grid = None
        if pixel_values is not None:
            if image_grid_thw is None:
                raise ValueError("pixel_values given without image_grid_thw")
            grid = tuple(tuple(int(v) for v in row) for row in np.asarray(image_grid_thw))
            merge = self.config.get("vision_config", {}).get("spatial_merge_size", 2)
            expected = sum(t * h * w for t, h, w in grid) // (merge * merge)
            found = int((input_ids == self.module.ids.image_token_id).sum())
            if expected != found:
                raise ValueError(f"image_grid_thw {grid} gives {expected} image tokens but input_ids holds {found} "
                                 f"<|image_pad|> tokens; expand each placeholder with the processor")
            pixel_values = jnp.asarray(pixel_values, self.dtype)
        return input_ids, attention_mask, pixel_values, grid

    def _run(self, input_ids, attention_mask, pixel_values, image_grid_thw, compute_logits):
        input_ids, attention_mask, pixel_values, grid = self._check_inputs(input_ids, attention_mask, pixel_values,
                                                                           image_grid_thw)
        position_ids, _ = self._rope_index(input_ids, attention_mask, grid)
        with self._context():
            return self._forward(self.params, jnp.asarray(input_ids), jnp.asarray(attention_mask),
                                 jnp.asarray(position_ids), pixel_values, grid, compute_logits)

    def _apply_embed(self, params, input_ids, pixel_values, grid_thw):
        with self._rules():
            return self.module.apply({"params": params}, input_ids, pixel_values, grid_thw,
                                     method=Qwen3VL.embed_inputs)

    def _generation_inputs(self, input_ids, attention_mask, pixel_values, image_grid_thw):
        """ids, mask, prefill_extra and position_offset for `text.generate` (images: embeddings, DeepStack rows,
        3D prompt positions and rope deltas, as transformers' generate uses them)."""
        input_ids, attention_mask, pixel_values, grid = self._check_inputs(input_ids, attention_mask, pixel_values,
                                                                           image_grid_thw)
        if grid is None:
            return input_ids, attention_mask, None, None
        position_ids, deltas = self._rope_index(input_ids, attention_mask, grid)
        with self._context():
            embeds, deepstack = self._embed(self.params, jnp.asarray(input_ids), pixel_values, grid)
        extra = {"inputs_embeds": embeds, "deepstack": deepstack, "position_ids": jnp.asarray(position_ids)}
        return input_ids, attention_mask, extra, jnp.asarray(deltas)

    # ------------------------------------------------------------------------------------------------ public
    def encode(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """Pre-norm last decoder layer states (B, S, D) — the Qwen-Image-2 conditioning."""
        return self._run(input_ids, attention_mask, pixel_values, image_grid_thw, False)["pre_norm"]

    def logits(self, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None) -> jax.Array:
        """(B, S, vocab) fp32."""
        return self._run(input_ids, attention_mask, pixel_values, image_grid_thw, True)["logits"]

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            if self.tokenizer_path is None:
                raise FileNotFoundError("no tokenizer found beside the model; pass tokenizer_path= to "
                                        "checkpoints.load('text_encoder', ...) (a directory with tokenizer.json / tokenizer_config.json)")
            from transformers import AutoTokenizer
            self._tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_path)
        return self._tokenizer

    @property
    def image_processor(self):
        """Callable `(images=[...], return_tensors="np") -> {"pixel_values", "image_grid_thw"}` (with `.merge_size`).

        Default: our numpy port (`processor.ImageProcessor`) configured from the processor directory's
        preprocessor_config.json. Assign another implementation (e.g. transformers' image processor) to replace it.
        """
        if self._image_processor is None:
            if self.tokenizer_path is None or self.image_processor_config is None:
                raise FileNotFoundError("no preprocessor_config.json beside the tokenizer; cannot process images "
                                        "(pass tokenizer_path= a Qwen3-VL processor directory)")
            from qwenimage_jax.models.qwen3_vl.processor import ImageProcessor
            self._image_processor = ImageProcessor.from_pretrained(self.tokenizer_path)
        return self._image_processor

    @image_processor.setter
    def image_processor(self, value):
        self._image_processor = value

    def prepare_inputs(self, texts: Sequence[str], images: Optional[Sequence[Any]] = None) -> dict:
        """What `Qwen3VLProcessor(text=texts, images=images, padding=True, padding_side="left")` returns: each
        `<|image_pad|>` (in reading order over texts) expanded to its image's t*h*w/merge^2 tokens; numpy arrays."""
        from qwenimage_jax.text.templates import IMAGE_PAD

        texts = list(texts)
        out = {}
        if images:
            processed = self.image_processor(images=list(images), return_tensors="np")
            grid = np.asarray(processed["image_grid_thw"])
            merge = int(getattr(self.image_processor, "merge_size", None)
                        or self.config.get("vision_config", {}).get("spatial_merge_size", 2))
            counts = [int(np.prod(g)) // (merge * merge) for g in grid]
            placeholders = sum(t.count(IMAGE_PAD) for t in texts)
            if placeholders != len(counts):
                raise ValueError(f"{len(counts)} image(s) given but the texts hold {placeholders} {IMAGE_PAD} "
                                 f"placeholder(s)")
            expanded, k = [], 0
            for text in texts:
                pieces = text.split(IMAGE_PAD)
                joined = pieces[0]
                for piece in pieces[1:]:
                    joined += IMAGE_PAD * counts[k] + piece
                    k += 1
                expanded.append(joined)
            texts = expanded
            out["pixel_values"] = np.asarray(processed["pixel_values"])
            out["image_grid_thw"] = grid
        batch = self.tokenizer(texts, padding=True, padding_side="left", return_tensors="np")
        out["input_ids"] = np.asarray(batch["input_ids"], np.int64)
        out["attention_mask"] = np.asarray(batch["attention_mask"], np.int64)
        return out

    def encode_prompt(self, prompts, images: Optional[Sequence[Any]] = None, pad_to_multiple: Optional[int] = None):
        """(prompt_embeds (B, L, D), mask (B, L) int32 or None when all ones, image_pad_mask (B, L) bool), built as
        diffusers' QwenImage21Pipeline does: raw template, left padding, pre-norm last layer, valid tokens only,
        system turn dropped, right-padded to the batch maximum.

        pad_to_multiple: extra left padding of the encoder input up to a multiple of this many tokens, so prompts of
        nearby lengths share one compiled program. Outputs keep their shapes; values move by float rounding only
        (RoPE sees offsets within a row), not bit-exact to the pipeline — leave None for exact replication.
        """
        from qwenimage_jax.text import templates

        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts:
            raise ValueError("prompts is empty")
        num_images = 0 if images is None else len(images)
        texts = [templates.build_prompt(p, num_images) for p in prompts]
        condition = None
        if num_images:  # one set of images per prompt, RGBA composited over white (as the pipeline does)
            condition = [_rgb_over_white(img) for _ in prompts for img in images]
        batch = self.prepare_inputs(texts, condition)
        pixel_values, grid = batch.get("pixel_values"), batch.get("image_grid_thw")
        input_ids = np.asarray(batch["input_ids"], np.int32)
        mask = np.asarray(batch["attention_mask"], np.int32)
        if pad_to_multiple:
            extra = -input_ids.shape[1] % int(pad_to_multiple)
            pad_id = self.tokenizer.pad_token_id or 0
            input_ids = np.pad(input_ids, ((0, 0), (extra, 0)), constant_values=pad_id)
            mask = np.pad(mask, ((0, 0), (extra, 0)))
        hidden = np.asarray(self.encode(input_ids, mask, pixel_values, grid))
        drop = templates.drop_index(self.tokenizer)
        image_id = self.module.ids.image_token_id
        rows, pad_rows = [], []
        for b in range(len(prompts)):
            keep = mask[b].astype(bool)
            rows.append(hidden[b][keep][drop:])
            pad_rows.append((input_ids[b][keep] == image_id)[drop:])
        length = max(r.shape[0] for r in rows)
        embeds = np.zeros((len(rows), length, hidden.shape[-1]), hidden.dtype)
        out_mask = np.zeros((len(rows), length), np.int32)
        image_pad_mask = np.zeros((len(rows), length), bool)
        for b, (r, p) in enumerate(zip(rows, pad_rows)):
            embeds[b, :len(r)] = r
            out_mask[b, :len(r)] = 1
            image_pad_mask[b, :len(p)] = p
        return jnp.asarray(embeds), (None if out_mask.all() else jnp.asarray(out_mask)), jnp.asarray(image_pad_mask)

    def generate(self, input_ids, attention_mask, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, stop_token_ids: Optional[Sequence[int]] = None, pad_token_id: Optional[int] = None,
                 pixel_values=None, image_grid_thw=None):
        """New token ids (B, max_new_tokens) int32 for left-padded prompts (rows padded after a stop token);
        prompts may hold images (pixel_values + image_grid_thw as the processor gives them)."""
        from qwenimage_jax.text.generate import generate
        ids, mask, extra, offset = self._generation_inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        with self._context():
            return generate(self.decoder, self.params, ids, mask, max_new_tokens, temperature, top_p, seed,
                            stop_token_ids, pad_token_id, prefill_extra=extra, position_offset=offset)

    def stream(self, input_ids, attention_mask, max_new_tokens: int, chunk: int = 8, pixel_values=None,
               image_grid_thw=None, **kwargs):
        """Like `generate`, yielding numpy (B, n) blocks of new ids as they are produced."""
        from qwenimage_jax.text.generate import stream
        ids, mask, extra, offset = self._generation_inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        with self._context():
            yield from stream(self.decoder, self.params, ids, mask, max_new_tokens, chunk=chunk,
                              prefill_extra=extra, position_offset=offset, **kwargs)


def build_module(hf_config: dict, dtype=jnp.float32, param_dtype=None, with_vision: Optional[bool] = None) -> Qwen3VL:
    """Qwen3VL module from a transformers config dict; the vision tower is included when vision.py is present."""
    vision_cfg = None
    vision = _vision_module() if with_vision in (None, True) else None
    if with_vision and vision is None:
        raise ImportError("with_vision=True but qwenimage_jax.models.qwen3_vl.vision is not available")
    if vision is not None and "vision_config" in hf_config:
        vision_cfg = _vision_config_from_hf(vision, hf_config["vision_config"])
    return Qwen3VL(text_config_from_hf(hf_config), multimodal_ids_from_hf(hf_config), vision_cfg, dtype,
                   param_dtype if param_dtype is not None else dtype)


def abstract_params(module: Qwen3VL, hf_config: Optional[dict] = None):
    """Boxed (nn.Partitioned) ShapeDtypeStruct params tree, without allocating.

    With a vision tower, a dummy one-token image (grid (1, merge, merge)) is traced so its params exist too;
    hf_config supplies the patch geometry then.
    """
    ids = jnp.zeros((1, 4), jnp.int32)
    pos = jnp.zeros((3, 1, 4), jnp.int32)
    pixels = grid = None
    if module.vision_config is not None:
        vision = (hf_config or {}).get("vision_config", {})
        merge = vision.get("spatial_merge_size", 2)
        patch_dim = (vision.get("in_channels", 3) * vision.get("temporal_patch_size", 2)
                     * vision.get("patch_size", 16) ** 2)
        ids = ids.at[0, 1].set(module.ids.image_token_id)
        pixels = jnp.zeros((merge * merge, patch_dim), module.dtype)
        grid = ((1, merge, merge),)

    def init():
        return module.init(jax.random.PRNGKey(0), ids, jnp.ones((1, 4), jnp.int32), pos, pixels, grid,
                           compute_logits=True)["params"]

    return jax.eval_shape(init)
