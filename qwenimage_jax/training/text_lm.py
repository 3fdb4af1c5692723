"""Tiny Qwen3-VL-architecture language models for the small world: tokenizer, next-token pretraining, prompt expansion.

Three steps, each a plain function (the recipe that chains them is `qwenimage_jax.recipes.world`):

  * `build_tokenizer(dir, texts)`: a byte-level BPE trained on the world's captions and prompt templates, plus
    Qwen's special tokens and a chat template with the same output as Qwen3-VL's for text messages, saved as a
    transformers `Qwen2TokenizerFast` directory.
  * `train_lm(config, tokenizer, sequences, ...)`: jitted AdamW next-token prediction of our Flax `Qwen3VL` module
    (text path) on left-padded token sequences with a per-token loss mask. Pretraining uses the world's rich captions
    in the Qwen-Image-2 encoder template (so the text encoder's states are trained on exactly what it will read);
    fine-tuning on (short prompt -> rich caption) chats, loss on the answer only, gives the prompt expander.
  * `save_text_model(params, hf_config, dir, tokenizer_dir)`: a transformers `Qwen3VLForConditionalGeneration`
    directory (config.json + model.safetensors + tokenizer files). The vision tower is untrained (seeded init):
    the world's text encoder only reads text.
"""
from __future__ import annotations

import contextlib
import json
import os
from typing import Callable, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.text.expand import expansion_prompt_ids

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)

# Same rendering as Qwen3-VL's chat template for string / text-image-video content lists (no tools, no thinking).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for content in message['content'] -%}"
    "{%- if content['type'] == 'image' or 'image' in content -%}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' -}}"
    "{%- elif content['type'] == 'video' or 'video' in content -%}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' -}}"
    "{%- elif 'text' in content -%}{{- content['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


# ------------------------------------------------------------------------------------------------ data
def world_text_pairs(num: int, seed: int = 0, split: str = "train") -> list[tuple[str, str]]:
    """(rich caption, short prompt) for `num` random world scene contents of `split`.

    Text only: the scene content is sampled and captioned without rendering the image (rendering costs ~50 ms a
    scene on a loaded CPU; the caption depends on the content alone), so these pairs are not the WorldSource records.
    """
    return [(caption, short) for caption, short, _, _ in world_text_scenes(num, seed, split)]


def world_text_scenes(num: int, seed: int = 0, split: str = "train") -> list[tuple[str, str, object, dict]]:
    """`world_text_pairs` with each caption's Scene and attribute spans: (rich caption, short prompt, scene, spans)."""
    from qwenimage_jax.data import prompts, world

    rng = np.random.default_rng([seed, 7919, {"train": 0, "heldout": 1, "all": 2}[split]])
    out = []
    for _ in range(num):
        scene = world._sample_content(rng, split, 0.0)
        caption, spans = world.rich_caption_spans(scene, rng)
        out.append((caption, prompts.degrade_record(scene, rng)[0], scene, spans))
    return out


def tokenizer_corpus(pairs: Sequence[tuple[str, str]]) -> list[str]:
    """Everything the models will read: captions, short prompts and the fixed template/instruction strings."""
    from qwenimage_jax.text import templates

    fixed = [templates.SYSTEM_PROMPT, templates.EXPAND_SYSTEM_PROMPT, "system user assistant"] * 50
    return [c for c, _ in pairs] + [s for _, s in pairs] + fixed


def build_tokenizer(directory: str, texts: Iterable[str], vocab_size: int = 1024):
    """Trains a byte-level BPE (`vocab_size` regular tokens at most) + Qwen specials; saves and returns it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import Qwen2TokenizerFast

    os.makedirs(directory, exist_ok=True)
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    bpe.train_from_iterator(list(texts), trainer=trainer)
    bpe.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer = Qwen2TokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token=None, bos_token=None, clean_up_tokenization_spaces=False)
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(directory)
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
        f.write(CHAT_TEMPLATE)
    return tokenizer


def encoder_sequences(tokenizer, captions: Sequence[str]) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) of each caption in the Qwen-Image-2 encoder template, closed by <|im_end|>; loss on the
    user turn and after (the system turn is constant)."""
    from qwenimage_jax.text import templates

    drop = templates.drop_index(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for caption in captions:
        ids = tokenizer(templates.build_prompt(caption))["input_ids"]
        # the template ends with "<|im_start|>assistant\n"; predicting the caption's end is what matters
        ids = list(ids) + [end]
        out.append((ids, [0] * drop + [1] * (len(ids) - drop)))
    return out


# Scene-field targets of the text encoder's states (the auxiliary objective; `field_targets`): a head per field
# reads every token of a group phrase once the field's words have been read, and the background from its word
# on; the prompt's last token also predicts the whole scene (background + both group slots in caption order,
# class 0 = no such group).
LOCAL_HEADS = ("background", "colour", "shape", "count", "size", "position")
SUMMARY_HEADS = ("summary_background",) + tuple(f"slot{g}_{f}" for g in range(2) for f in LOCAL_HEADS[1:])


def head_classes() -> tuple[int, ...]:
    """Number of classes of each head of LOCAL_HEADS + SUMMARY_HEADS."""
    from qwenimage_jax.evals.text_probe import num_classes

    local = tuple(num_classes(f) for f in LOCAL_HEADS)
    return local + (local[0],) + tuple(num_classes(f) + 1 for _ in range(2) for f in LOCAL_HEADS[1:])


def field_targets(tokenizer, items: Sequence[tuple[str, object, dict]], length: int) -> np.ndarray:
    """Per-token class targets (N, length, heads) int32, -1 where a head has nothing to read, of each (caption,
    scene, spans) as `encoder_sequences` tokenizes it, left-padded to `length` like `pad_left`."""
    from qwenimage_jax.evals.text_probe import field_value, locate_tokens

    heads = LOCAL_HEADS + SUMMARY_HEADS
    out = np.full((len(items), length, len(heads)), -1, np.int32)
    for i, (caption, scene, spans) in enumerate(items):
        ids, token_at = locate_tokens(tokenizer, caption)
        n = len(ids) + 1  # encoder_sequences closes the prompt with <|im_end|>
        labels = out[i, length - n:]
        for g, group_spans in enumerate(spans["groups"]):
            last = token_at(group_spans["phrase"][1])
            for field in LOCAL_HEADS[1:]:
                if field in group_spans:
                    labels[token_at(group_spans[field][1]):last + 1, heads.index(field)] = field_value(scene, field, g)
        labels[token_at(spans["background"][1]):n - 1, heads.index("background")] = field_value(scene, "background")
        end = n - 2  # the prompt's last token: the last text state the DiT reads
        labels[end, heads.index("summary_background")] = field_value(scene, "background")
        for g in range(2):
            for field in LOCAL_HEADS[1:]:
                value = field_value(scene, field, g) + 1 if g < len(scene.groups) else 0
                labels[end, heads.index(f"slot{g}_{field}")] = value
    return out


def expansion_sequences(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) of (short prompt -> rich caption) chats; loss on the answer and its <|im_end|> only."""
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    out = []
    for rich, short in pairs:
        prompt = expansion_prompt_ids(tokenizer, short)
        answer = list(tokenizer(rich)["input_ids"]) + [end]
        out.append((prompt + answer, [0] * len(prompt) + [1] * len(answer)))
    return out


def pad_left(sequences: Sequence[tuple[list[int], list[int]]], length: int, pad_id: int):
    """-> ids (N, length) int32, attention (N, length) int32, loss mask (N, length) float32; left padded."""
    n = len(sequences)
    ids = np.full((n, length), pad_id, np.int32)
    attn = np.zeros((n, length), np.int32)
    loss = np.zeros((n, length), np.float32)
    for i, (seq, mask) in enumerate(sequences):
        if len(seq) > length:
            raise ValueError(f"sequence {i} has {len(seq)} tokens > length {length}; raise max_length")
        ids[i, length - len(seq):] = seq
        attn[i, length - len(seq):] = 1
        loss[i, length - len(seq):] = mask
    return ids, attn, loss


# ------------------------------------------------------------------------------------------------ model
def hf_config(tokenizer, model: dict) -> dict:
    """A transformers `Qwen3VLConfig` dict (text decoder from `model`, a minimal vision tower) for `tokenizer`."""
    tid = tokenizer.convert_tokens_to_ids
    vocab = int(np.ceil(len(tokenizer) / 64) * 64)
    hidden = int(model["hidden_size"])
    # tied input/output embeddings collapse words that nothing in the captions predicts (the world's independent,
    # uniform attributes) onto one output vector, and so one input vector; the world encoder unties them
    tie = bool(model.get("tie_word_embeddings", True))
    text = dict(model_type="qwen3_vl_text", vocab_size=vocab, hidden_size=hidden,
                intermediate_size=int(model["intermediate_size"]), num_hidden_layers=int(model["num_hidden_layers"]),
                num_attention_heads=int(model["num_attention_heads"]),
                num_key_value_heads=int(model["num_key_value_heads"]), head_dim=int(model["head_dim"]),
                hidden_act="silu", max_position_embeddings=int(model.get("max_position_embeddings", 1024)),
                rms_norm_eps=1e-6, attention_bias=False, attention_dropout=0.0, tie_word_embeddings=tie,
                rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0, "mrope_interleaved": True,
                                 "mrope_section": list(model["mrope_section"])},
                bos_token_id=None, eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"))
    vision = dict(model_type="qwen3_vl", depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                  temporal_patch_size=2, spatial_merge_size=2, in_channels=3, out_hidden_size=hidden,
                  num_position_embeddings=16, deepstack_visual_indexes=[], hidden_act="gelu_pytorch_tanh")
    return dict(model_type="qwen3_vl", architectures=["Qwen3VLForConditionalGeneration"], text_config=text,
                vision_config=vision, image_token_id=tid("<|image_pad|>"), video_token_id=tid("<|video_pad|>"),
                vision_start_token_id=tid("<|vision_start|>"), vision_end_token_id=tid("<|vision_end|>"),
                tie_word_embeddings=tie)


def text_module(config: dict):
    """Our Flax Qwen3VL (text path only) for a `hf_config` dict."""
    from qwenimage_jax.models.qwen3_vl.model import build_module

    return build_module(config, jnp.float32, with_vision=False)


def init_params(module, seed: int):
    """Jitted init of the text decoder params (unboxed)."""
    import flax.linen as nn

    ids = jnp.zeros((1, 4), jnp.int32)

    @jax.jit
    def init(key):
        return nn.meta.unbox(module.init(key, ids, jnp.ones((1, 4), jnp.int32), jnp.zeros((3, 1, 4), jnp.int32),
                                         compute_logits=True)["params"])

    return init(jax.random.PRNGKey(seed))


def init_field_heads(hidden_size: int, classes: Sequence[int], seed: int) -> list[dict]:
    """One linear head (kernel (D, C), bias (C,)) per scene field: the auxiliary readers of `train_lm`."""
    keys = jax.random.split(jax.random.PRNGKey(seed + 101), len(classes))
    return [{"kernel": jax.random.normal(k, (hidden_size, c), jnp.float32) / np.sqrt(hidden_size),
             "bias": jnp.zeros((c,), jnp.float32)} for k, c in zip(keys, classes)]


def field_loss(heads: list[dict], states: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy of each head's prediction from the RMS-normalised states (the DiT normalises the text
    states before reading them, so only their direction counts) where targets >= 0. states (B, L, D), targets
    (B, L, heads)."""
    from qwenimage_jax.models.layers import rms_normalize

    normed = rms_normalize(states.astype(jnp.float32), 1e-6)
    total = count = 0.0
    for h, head in enumerate(heads):
        logp = jax.nn.log_softmax(normed @ head["kernel"] + head["bias"], axis=-1)
        target = targets[..., h]
        valid = (target >= 0).astype(jnp.float32)
        nll = -jnp.take_along_axis(logp, jnp.maximum(target, 0)[..., None], axis=-1)[..., 0]
        total, count = total + (nll * valid).sum(), count + valid.sum()
    return total / jnp.maximum(count, 1.0)


class TrainingStopped(SystemExit):
    """`train_lm` stopped before its last step (a signal, or its time budget): the exit of a stage to re-run."""


class IndexBatches:
    """Batches of `batch_size` rows drawn with replacement from in-memory arrays by a seeded generator; the
    generator's state is the iterator's checkpoint (get_state / set_state, in the form grain's handler saves)."""

    def __init__(self, arrays: dict, batch_size: int, seed: int):
        self._arrays, self._batch_size = arrays, int(batch_size)
        self._rows = len(next(iter(arrays.values())))
        self._rng = np.random.default_rng(seed)

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        idx = self._rng.integers(0, self._rows, self._batch_size)
        return {k: v[idx] for k, v in self._arrays.items()}

    def get_state(self) -> bytes:
        return json.dumps(self._rng.bit_generator.state).encode()

    def set_state(self, state: bytes) -> None:
        self._rng.bit_generator.state = json.loads(state)

    def start_prefetch(self) -> None:  # grain's checkpoint handler calls it after a restore
        pass


def train_lm(module, params, data, *, steps: int, batch_size: int, learning_rate: float, warmup_steps: int = 50,
             weight_decay: float = 0.01, seed: int = 0, log: Optional[Callable[[str], None]] = print,
             log_every: int = 100, field_targets: Optional[np.ndarray] = None, field_weight: float = 1.0,
             workdir: Optional[str] = None, checkpoint_every: int = 500, time_budget_s: float = 0.0):
    """AdamW (warmup + cosine) next-token training on `data` = (ids, attention, loss_mask) (N, L) arrays, run by
    the shared training loop (training/loop.py: resume, SIGTERM, the NaN/Inf guard, metrics.jsonl).

    field_targets (N, L, heads) (`field_targets`): adds `field_weight` x the cross-entropy of linear heads reading
    the scene's fields from the output states, so the states must keep every attribute the caption states (next-token
    prediction alone does not: the world's attributes are independent and uniform, so nothing predicts them). The
    heads are trained alongside and discarded.

    workdir: where checkpoints (every `checkpoint_every` steps) and metrics.jsonl go; a second call with the same
    workdir resumes the run (None: a temporary directory, nothing kept). time_budget_s > 0: stop at a checkpoint
    after that long, as a SIGTERM does (the next call goes on). A run that stops before `steps` raises
    `TrainingStopped` (a SystemExit naming the step and the workdir) rather than return a half-trained model, so a
    recipe never exports one. `log` None: no progress bar.

    Returns (params, history list of (step, loss) at each log step, with (next-token, fields) after the loss
    when there are field targets).
    """
    import tempfile

    import ml_collections
    import optax

    from qwenimage_jax.training.guards import keep_finite
    from qwenimage_jax.training.loop import Task, run
    from qwenimage_jax.training.state import abstract_state

    ids_all, attn_all, mask_all = data
    n, length = ids_all.shape
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, None], (3, batch_size, length))
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, warmup_steps, max(steps, warmup_steps + 1),
                                                  learning_rate * 0.05)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b1=0.9, b2=0.98,
                                                                   weight_decay=weight_decay))
    with_fields = field_targets is not None
    targets_all = np.asarray(field_targets, np.int32) if with_fields else np.zeros((n, 1, 0), np.int32)

    def initial_state():
        trained = {"model": params}
        if with_fields:
            trained["heads"] = init_field_heads(module.text_config.hidden_size, head_classes(), seed)
        return {"params": trained, "opt_state": tx.init(trained)}

    def loss_fn(p, batch):
        out = module.apply({"params": p["model"]}, batch["ids"], batch["attn"], positions, compute_logits=True)
        logp = jax.nn.log_softmax(out["logits"][:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, batch["ids"][:, 1:, None], axis=-1)[..., 0]
        weight = batch["mask"][:, 1:]
        lm = (nll * weight).sum() / jnp.maximum(weight.sum(), 1.0)
        fields = field_loss(p["heads"], out["pre_norm"], batch["targets"]) if with_fields else jnp.zeros(())
        return lm + field_weight * fields, (lm, fields)

    @jax.jit
    def step(state, batch, key):  # noqa: ARG001 - the loop passes a key; this objective draws nothing
        (loss, (lm, fields)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"], batch)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}
        new_state, finite = keep_finite(state, new_state, loss, grad_norm)   # a NaN/Inf step changes nothing
        return new_state, {"loss": loss, "next_token": lm, "fields": fields, "grad_norm": grad_norm,
                           "finite": finite}

    batches = IndexBatches({"ids": ids_all, "attn": attn_all, "mask": mask_all, "targets": targets_all},
                           batch_size, seed)
    task = Task("text-lm", initial_state, abstract_state(initial_state), batches, lambda layout: step,
                lambda batch: None, lambda batch: {k: jnp.asarray(v) for k, v in batch.items()},
                jax.random.key(seed),
                postfix=lambda m: {"loss": f"{m['loss']:.4f}", **({"fields": f"{m['fields']:.4f}"}
                                                                   if with_fields else {})})
    config = ml_collections.ConfigDict(dict(steps=int(steps), log_every=int(log_every), progress=log is not None,
                                            checkpoint=dict(every=int(checkpoint_every), keep=1, async_save=False),
                                            export=False, time_budget_s=float(time_budget_s)))
    with tempfile.TemporaryDirectory() if workdir is None else contextlib.nullcontext(workdir) as directory:
        result = run(task, config, directory)
    if result["final_step"] < steps:   # a SIGTERM or the time budget: never hand back a half-trained model
        where = (f"its checkpoint is in {workdir}: call again with the same workdir (re-run the stage) to go on"
                 if workdir is not None else "it had no workdir, so nothing was kept")
        raise TrainingStopped(f"text-lm training stopped at step {result['final_step']} of {steps}; {where}")
    history = [(i, m["loss"]) + ((m["next_token"], m["fields"]) if with_fields else ())
               for i, m in sorted(result["metrics"].items())]
    if log is not None and history:
        log(f"step {history[-1][0]}/{steps} loss {history[-1][1]:.4f}")
    return result["state"]["params"]["model"], history


def eval_loss(module, params, data, batch_size: int = 64) -> float:
    """Mean masked next-token loss on (ids, attention, loss_mask)."""
    ids_all, attn_all, mask_all = data
    length = ids_all.shape[1]
    batch_size = min(batch_size, len(ids_all))

    @jax.jit
    def batch_loss(ids, attn, mask):
        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32)[None, None], (3,) + ids.shape)
        logits = module.apply({"params": params}, ids, attn, pos, compute_logits=True)["logits"]
        logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1)[..., 0]
        return (nll * mask[:, 1:]).sum(), mask[:, 1:].sum()

    total = count = 0.0
    for s in range(0, len(ids_all) - batch_size + 1, batch_size):
        a, b = batch_loss(ids_all[s:s + batch_size], attn_all[s:s + batch_size], mask_all[s:s + batch_size])
        total, count = total + float(a), count + float(b)
    return total / max(count, 1.0)


# ------------------------------------------------------------------------------------------------ export
def save_text_model(params, config: dict, directory: str, tokenizer_dir: Optional[str] = None, seed: int = 0) -> str:
    """Writes a transformers Qwen3VLForConditionalGeneration directory with our trained text weights (the vision
    tower keeps torch's seeded init) and, if given, the tokenizer files beside them."""
    from qwenimage_jax import checkpoints

    return checkpoints.export("text_encoder", params, config, directory, tokenizer_dir=tokenizer_dir, seed=seed)


def save_history(path: str, **histories) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(histories, f, indent=1)
