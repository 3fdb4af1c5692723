"""`TextEncoder`: a loaded Qwen3-VL (`models.qwen3_vl.Qwen3VL` + params) with its tokenizer and image processor,
and jitted `encode` / `logits` / `encode_prompt` / `generate`. Built by `checkpoints.load("text_encoder", path)`.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.models.component import Component
from qwenimage_jax.models.qwen3_vl.config import TextConfig
from qwenimage_jax.models.qwen3_vl.model import Qwen3VL
from qwenimage_jax.models.qwen3_vl.text import init_kv_cache

Dtype = Any


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
            # by name: a quantized module (checkpoints/quantize.py) overrides `step` in a subclass
            return self.module.apply({"params": params}, input_ids, positions, kv_mask, cache, cache_index, extra,
                                     method="step")

    def _rope_index(self, input_ids, attention_mask, image_grid_thw):
        """((3, B, S) position ids as transformers' forward builds them, rope deltas (B,))."""
        b, s = input_ids.shape
        if image_grid_thw is None:  # text only: arange(S), pads included; no delta
            return np.broadcast_to(np.arange(s, dtype=np.int32)[None, None], (3, b, s)), np.zeros((b,), np.int32)
        from qwenimage_jax.text import processor as vl_processor
        ids = self.module.ids
        image_mask = np.asarray(input_ids) == ids.image_token_id
        position_ids, deltas = vl_processor.get_rope_index(
            np.asarray(input_ids), np.asarray(attention_mask), np.asarray(image_grid_thw),
            image_token_id=ids.image_token_id, vision_start_token_id=ids.vision_start_token_id,
            spatial_merge_size=self.config.get("vision_config", {}).get("spatial_merge_size", 2),
            mm_token_type_ids=image_mask.astype(np.int32))
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
            from qwenimage_jax.text.processor import ImageProcessor
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

    def encode_prompt(self, prompts, images: Optional[Sequence[Any]] = None, pad_to_multiple: Optional[int] = None,
                      bucket: Optional[Callable[[int], int]] = None):
        """(prompt_embeds (B, L, D), mask (B, L) int32 or None when all ones, image_pad_mask (B, L) bool), built as
        diffusers' QwenImage21Pipeline does: raw template, left padding, pre-norm last layer, valid tokens only,
        system turn dropped, right-padded to the batch maximum.

        pad_to_multiple: extra left padding of the encoder input up to a multiple of this many tokens, so prompts of
        nearby lengths share one compiled program. Outputs keep their shapes; values move by float rounding only
        (RoPE sees offsets within a row), not bit-exact to the pipeline — leave None for exact replication.
        bucket: maps the longest prompt's text-token count (system turn dropped, image slots not counted) to a
        padded count; the encoder input is right-padded by the difference, so every prompt of a bucket runs one
        compiled program. The pads come after every real token and are masked, so causal attention leaves the
        outputs as they were (returned at the batch maximum, as without it).
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
        drop = templates.drop_index(self.tokenizer)
        image_id = self.module.ids.image_token_id
        if bucket is not None:
            tokens = int((mask.sum(1) - drop - ((input_ids == image_id) & (mask > 0)).sum(1)).max())
            extra = int(bucket(tokens)) - tokens
            input_ids = np.pad(input_ids, ((0, 0), (0, extra)), constant_values=self.tokenizer.pad_token_id or 0)
            mask = np.pad(mask, ((0, 0), (0, extra)))
        hidden = np.asarray(self.encode(input_ids, mask, pixel_values, grid))
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
                 pixel_values=None, image_grid_thw=None, constrain=None, constrain_data=None):
        """New token ids (B, max_new_tokens) int32 for left-padded prompts (rows padded after a stop token);
        prompts may hold images (pixel_values + image_grid_thw as the processor gives them); constrain /
        constrain_data: constrained decoding (`text.generate`)."""
        from qwenimage_jax.text.generate import generate
        ids, mask, extra, offset = self._generation_inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        with self._context():
            return generate(self.decoder, self.params, ids, mask, max_new_tokens, temperature, top_p, seed,
                            stop_token_ids, pad_token_id, prefill_extra=extra, position_offset=offset,
                            constrain=constrain, constrain_data=constrain_data)

    def stream(self, input_ids, attention_mask, max_new_tokens: int, chunk: int = 8, pixel_values=None,
               image_grid_thw=None, **kwargs):
        """Like `generate`, yielding numpy (B, n) blocks of new ids as they are produced."""
        from qwenimage_jax.text.generate import stream
        ids, mask, extra, offset = self._generation_inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        with self._context():
            yield from stream(self.decoder, self.params, ids, mask, max_new_tokens, chunk=chunk,
                              prefill_extra=extra, position_offset=offset, **kwargs)
