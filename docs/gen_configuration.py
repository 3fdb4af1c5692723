"""Regenerates docs/configuration.md from configs/*.py (the default `get_config()` of each) and the key glossary below.

    python docs/gen_configuration.py        # then review `git diff docs/configuration.md`
"""
import importlib.util
import json
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(REPO, "docs", "configuration.md")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", os.path.join(REPO, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat(d, prefix=""):
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def _configs():
    res = {}
    for f in sorted(os.listdir(os.path.join(REPO, "configs"))):
        if f.endswith(".py"):
            module = _load(f[:-3])
            c = module.get_config()
            d = c.to_dict() if hasattr(c, "to_dict") else dict(c)
            res[f[:-3]] = dict(doc=(module.__doc__ or "").strip(), keys=_flat(d))
    return json.loads(json.dumps(res, default=repr))


G = {
 # common
 "seed": "Random seed of parameter init, data order and step keys (step key = fold_in(seed, step)).",
 "steps": "Training: number of optimizer steps (DMD: student updates). Sampling presets: denoising steps.",
 "total_steps": "VAE trainer: number of optimizer steps (resumes count towards it).",
 "batch_size": "Global batch size (split over the `data` x `fsdp` mesh axes and over hosts).",
 "grad_accum": "DiT trainer: micro-batches accumulated per optimizer step (batch_size is split into this many).",
 "compute_dtype": "Activation / matmul dtype of the trained model (`float32` on CPU, `bfloat16` on accelerators); parameters and optimizer state stay fp32.",
 "dtype": "Model/sampling compute dtype (`bfloat16` or `float32`).",
 "param_dtype": "Dtype parameters are stored/loaded in.",
 "teacher_param_dtype": "DMD: dtype of the frozen teacher's parameters.",
 "remat": "Rematerialisation policy of the scanned DiT blocks: `none`, `full`, `dots`, `dots_no_batch` (VAE trainer: bool).",
 "attention": "DiT attention backend: `xla` (anywhere), `cudnn` (GPU), `splash` (TPU), `dot_product_attention`.",
 "mesh.data": "Mesh axis `data` (pure data parallel); -1 = all remaining devices.",
 "mesh.fsdp": "Mesh axis `fsdp` (data parallel + parameters sharded over `embed`); -1 = all remaining devices.",
 "mesh.tensor": "Mesh axis `tensor` (heads / MLP / vocab split, Megatron style).",
 "ema_decay": "Decay of the parameter EMA kept in the train state (0 disables; exports use the EMA when kept).",
 "log_every": "Steps between scalar logs (TensorBoard via tensorboardX + console).",
 "on_nonfinite": "DiT, LoRA, distillation and VAE trainers: a step whose loss or gradient norm is NaN/Inf is never applied; `stop` raises naming the step, the batch and the last good checkpoint, `skip` logs, counts and goes on until `nonfinite_in_a_row` steps in a row were non-finite, then stops the same way (docs/reliability.md).",
 "nonfinite_in_a_row": "DiT, LoRA, distillation and VAE trainers with `on_nonfinite=skip`: this many non-finite steps in a row (default 10 when the key is absent; at least 1) stop the run with `NonFiniteError` naming the step, since by then the cause is the learning rate, the data or the weights rather than one bad batch.",
 "progress": "Show a tqdm progress bar on process 0.",
 "peak_flops_per_device": "Peak FLOP/s of one device for the logged MFU (e.g. 989e12 H100/H200 bf16, 459e12 TPU v5p); 0 disables MFU.",
 "sharding_rules": "Which logical-axis rules table places weights and activations (parallel/rules.py RULE_PRESETS): fsdp (default: weights over fsdp/tensor), replicated (pure data parallel), tensor (heads/mlp only, no per-step weight all-gather).",
 "base": "LoRA trainer: the frozen base model's transformer/ directory (diffusers or Orbax).",
 "base_dtype": "LoRA trainer: storage dtype of the frozen base (bfloat16 halves its memory; the factors stay fp32).",
 "lora.rank": "LoRA rank r of every adapted linear.",
 "lora.alpha": "LoRA alpha: the adapter's output is scaled by alpha / r (peft's lora_alpha).",
 "lora.dropout": "LoRA dropout on each adapted linear's input during training (peft's lora_dropout).",
 "lora.target_modules": "Which linears get an adapter, by diffusers module name or suffix (peft's rule), e.g. to_q, img_mlp.out, transformer_blocks.3.attn.to_v.",
 "init_from": "DiT trainer: a diffusers or Orbax transformer directory whose weights replace the random init (fine-tuning).",
 "flow.whiten": "Flow-matching loss in a whitened metric of the latents' per-token covariance, this exponent (0: plain MSE; training/latent_metric.py).",
 "flow.whiten_cap": "The whitened metric's weights are clipped to [1/cap, cap] before normalising to mean 1.",
 "cfg_dropout": "Probability of replacing a sample's text with the null text (trains the unconditional branch for CFG).",
 "image_size": "Pixel size of the world scenes this model is trained at.",
 "num_scenes": "World scenes cached as latents by the world recipe's cache stage.",
 "vocab_size": "BPE vocabulary size (regular tokens, before Qwen's special tokens).",
 "eval_captions": "Held-out-composition captions used for the reported text-model losses.",
 # optimizer
 "optimizer.learning_rate": "Learning rate: a float (constant) or a schedule dict (below).",
 "optimizer.learning_rate.name": "Schedule: `warmup_cosine`, `warmup_constant`, `constant`, ... (`training/schedules.py`).",
 "optimizer.learning_rate.peak_value": "Peak learning rate after warm-up.",
 "optimizer.learning_rate.warmup_steps": "Linear warm-up steps.",
 "optimizer.learning_rate.decay_steps": "Cosine decay length (steps after warm-up).",
 "optimizer.learning_rate.end_value": "Learning rate at the end of the decay.",
 "optimizer.b1": "AdamW beta1.", "optimizer.b2": "AdamW beta2.", "optimizer.eps": "AdamW epsilon.",
 "optimizer.weight_decay": "AdamW decoupled weight decay.",
 "optimizer.grad_clip_norm": "Global-norm gradient clipping (<= 0 disables).",
 "optimizer.clip_per_group": "Clip each top-level parameter group (e.g. `vae`, `proj`) on its own.",
 # checkpoint
 "checkpoint.every": "Steps between Orbax checkpoints (state + data iterator).",
 "checkpoint.keep": "Checkpoints kept.",
 "checkpoint.async_save": "Write checkpoints asynchronously.",
 "checkpoint_every": "VAE trainer: steps between Orbax checkpoints.",
 "keep_checkpoints": "VAE trainer: checkpoints kept.",
 "async_checkpoint": "VAE trainer: asynchronous checkpointing.",
 "donate_state": "Donate the train state buffers to the jitted step (halves peak memory).",
 "export": "DiT trainer: write the final (EMA) weights as a diffusers transformer dir, `WORKDIR/export/transformer` (single host).",
 "ablation_steps": "World DiT recipe: the step at which each VAE arm's DiT is exported and judged for the alignment ablation.",
 "losses.align.input_resolution": "VGG16 aligner: resize the images to this square side first (0 = as they come).",
 "losses.ffl": "Weight of the focal frequency loss (spectra of reconstruction and target, the worst frequencies weighted most); 0 = off.",
 "losses.patch_l2": "Weight of a linear read-out of each latent predicting its own r x r pixel patch (MSE); 0 = off.",
 "losses.edge_l1": "Weight of L1 between the reconstruction's and the target's pixel differences (edges); 0 = off.",
 "prompt_tokens": "Qwen3-VL aot config: prompt length (tokens) of the compiled prompt encoding.",
 "text_config.head_dim": "Qwen3-VL text decoder (transformers field names): attention head width.",
 "text_config.hidden_size": "Qwen3-VL text decoder: hidden width.",
 "text_config.intermediate_size": "Qwen3-VL text decoder: SwiGLU hidden width.",
 "text_config.num_attention_heads": "Qwen3-VL text decoder: query heads.",
 "text_config.num_hidden_layers": "Qwen3-VL text decoder: layers.",
 "text_config.num_key_value_heads": "Qwen3-VL text decoder: key/value heads (GQA).",
 "text_config.rms_norm_eps": "Qwen3-VL text decoder: RMSNorm epsilon.",
 "text_config.rope_parameters.mrope_interleaved": "Qwen3-VL text decoder: interleaved multimodal RoPE sections.",
 "text_config.rope_parameters.mrope_section": "Qwen3-VL text decoder: RoPE frequencies per (t, h, w) axis.",
 "text_config.rope_parameters.rope_theta": "Qwen3-VL text decoder: RoPE base.",
 "text_config.rope_parameters.rope_type": "Qwen3-VL text decoder: RoPE variant.",
 "text_config.tie_word_embeddings": "Qwen3-VL text decoder: lm_head shares the embedding matrix.",
 "text_config.vocab_size": "Qwen3-VL text decoder: vocabulary size.",
 "cooldown.steps": "World DiT recipe: steps of the last phase, from the stable phase's EMA weights (0: the stable weights ship).",
 "cooldown.learning_rate": "Cooldown: peak learning rate (fresh optimizer, warm-up 20 steps, then a cosine down).",
 "cooldown.end_value": "Cooldown: the learning rate it anneals to.",
 "time_budget_s": "Trainer loop: stop at a checkpoint after this many seconds of one call, as a SIGTERM would (0 = no limit); the next call resumes.",
 "init_from": "Start from these trained weights with a fresh optimizer (DiT: a transformer dir; VAE: an Orbax VAE export).",
 "init_from_parts": "VAE trainer: what `init_from` loads: `all`, or `encoder` (encoder and quant_conv; the decoder starts fresh and may differ in width).",
 "trainable": "VAE trainer: `all`; `decoder` (encoder and quant_conv frozen: the latent space stays put); `encoder` (the decoder frozen and never run: the latents trained on `losses.patch_l2` and alignment alone).",
 "eval.judge": "VAE trainer, world data: judge the reconstructions of whole scenes (`length`, `seed`, `split`, `size`) at each eval; None = off.",
 "eval.judge.*": "VAE trainer: the judged world scenes (`length`, `seed`, `split`, `size`).",
 "eval.readout": "VAE trainer, world data: the scenes (`length`, `seed`, `split`, `size`) a linear read-out of the latents is fitted on; logs eval/cell_readout_mse on the judged scenes and its references at step 0; None = off.",
 "eval.readout.*": "VAE trainer: the world scenes the latent read-out is fitted on (`length`, `seed`, `split`, `size`).",
 "pretrain.field_weight": "Text encoder: weight of the scene-field heads reading each stated attribute from the output states (0 = next-token prediction only).",
 "export_ema": "VAE trainer: export the EMA weights to `WORKDIR/vae_export` (Orbax) at the end.",
 # flow
 "flow.distribution": "Flow-matching time distribution: `logit_normal` or `uniform`.",
 "flow.mean": "Logit-normal mean.", "flow.std": "Logit-normal std.",
 "flow.shift": "Time shift: `tokens` (resolution-dependent mu shift as the scheduler) or `none`.",
 # data (DiT)
 "data.path": "Cached-latent dataset directory written by `qwenimage-jax cache-latents` (required).",
 "data.max_text_tokens": "Text states are padded/cut to this many tokens (fixes the compiled layout).",
 "data.seed": "Data shuffling seed.",
 "data.bucket_weights": "Optional sampling weights per resolution bucket (empty = proportional to size).",
 # data (VAE)
 "data.sources": "List of image sources with weights: `photos` (bundled, `exclude`), `synthetic_text`, `world`, `tfds`, ... (`data/images.py`).",
 "data.resolution": "Training crop size in pixels.",
 "data.aspect_ratios": "Crop aspect ratios sampled.",
 "data.min_scale": "Smallest crop scale relative to the image.", "data.max_scale": "Largest crop scale.",
 "data.ratio_jitter": "Multiplicative aspect-ratio jitter of crops.",
 "data.flip": "Random horizontal flips.",
 "data.num_threads": "grain worker threads (0 = in the main thread).", "data.prefetch": "grain prefetch buffer.",
 "eval.source.name": "Evaluation image source (`photos` or `world`).", "eval.source.names": "Photos used for eval.",
 "eval.source.dataset": "Eval dataset name.", "eval.source.length": "Eval scenes.", "eval.source.seed": "Eval seed.",
 "eval.source.size": "Eval scene size.", "eval.source.split": "World split (`train` / `heldout`).",
 "eval.resolution": "Eval crop size.", "eval.crops_per_image": "Eval crops per image.",
 "eval_every": "Steps between PSNR/SSIM evaluations (also logs the bicubic baseline once); 0 disables.",
 "image_every": "Steps between reconstruction image grids in TensorBoard; 0 disables.",
 # losses
 "losses.l1": "Weight of the L1 reconstruction loss.", "losses.l2": "Weight of the L2 loss.",
 "losses.lpips": "Weight of LPIPS-VGG (0 skips loading the LPIPS net).", "losses.kl": "Weight of the KL term.",
 "losses.sample_posterior": "Decode a posterior sample instead of the mean during training.",
 "losses.salient_l1": "Weight of L1 over the pixels that stand out from their image's background (per-channel median); 0 = off.",
 "losses.salient_threshold": "A pixel is salient when a channel differs from the image median by more than this ([-1, 1] range).",
 "losses.align.aligner": "Frozen feature network the latent is aligned to: `vgg16`, `dinov2`, `patches`.",
 "losses.align.layer": "Aligner layer (e.g. VGG `relu4_3`).", "losses.align.path": "Aligner weights path (DINOv2).",
 "losses.align.stride": "Patch aligner stride.",
 "losses.align.probe_only": "Ablation: the projection learns on stop-gradient latents; the VAE gets no alignment gradient.",
 "losses.align.weight": "Alignment loss weight schedule (`name`, `init_value`, `end_value`, `hold_steps`, `transition_steps` or `value`).",
 "losses.align.m_cos": "Cosine-similarity margin schedule of the alignment loss.",
 "losses.align.m_dist": "Distance-matrix margin schedule of the alignment loss.",
 # model / vae
 "model.*": "DiT: diffusers `QwenImage21Transformer2DModel` config fields (patch_size, in/out_channels, num_layers, attention_head_dim, num_attention_heads, context_in_dim, mlp_ratio, axes_dims_rope, eps, causal_condition); VAE configs: `AutoencoderKLQwenImage21` fields; text LM: Qwen3-VL text fields.",
 "vae.*": "VAE trainer: `AutoencoderKLQwenImage21` fields (base_dim, decoder_base_dim, z_dim, dim_mult, num_res_blocks, is_residual, in/out_channels, mid_attention, ...).",
 # distill
 "teacher": "DMD: the many-step teacher's transformer directory (diffusers or Orbax).",
 "student.num_steps": "DMD: steps of the student's grid.",
 "student.sample_sigmas": "DMD: pre-shift student sigmas (None = linspace(1, 1/n, n)); exported as `sample_sigmas`.",
 "student.backward_sim": "DMD: `euler` (what the pipeline runs) or `renoise`.",
 "dmd.weight": "DMD loss weight.", "dmd.t_min": "Lowest re-noising time.", "dmd.t_max": "Highest re-noising time.",
 "dmd.distribution": "Re-noising time distribution (`uniform` / `logit_normal`).", "dmd.mean": "Logit-normal mean.",
 "dmd.std": "Logit-normal std.", "dmd.shift": "Time shift (`none` / `tokens`).",
 "dmd.real_cfg_scale": "> 1 runs true CFG inside the real (teacher) score.",
 "fake.updates": "Fake-score updates per student update (DMD2's two time-scale rule).",
 "fake.optimizer.*": "Fake-score optimizer (as `optimizer.*`).", "fake.times": "Overrides of the re-noising times for the fake-score loss.",
 "regression.weight": "Weight of the paired regression to the teacher's ODE solution (0 disables).",
 "regression.teacher_steps": "Teacher steps for the regression target.", "regression.cfg_scale": "Teacher CFG for the regression target.",
 "regression.pairs": "A store of precomputed (noise, teacher ODE output) pairs (`distill-pairs`); set, the regression target is read from it and no ODE runs per update (empty: solved online).",
 "regression.num_pairs": "How many pairs `distill-pairs` solves (rows of the latent cache, each with its own seeded noise).",
 "student_steps": "One distillation per entry: the student step counts the world recipe trains (WORKDIR/distill_N).",
 "validation_prompts": "Held-out validation prompts the world recipe judges each student and the teacher on (its ship choice).",
 "ship_tolerance": "The world recipe ships the fewest-step student whose validation judge is within this of the teacher's, else the best one.",
 "scheduler": "Overrides of the released scheduler config.",
 "export.enabled": "Write the student as a diffusers pipeline directory at the end.", "export.dtype": "Export dtype.",
 "export.components": "Other pipeline components to copy/link into the export (e.g. {'vae': DIR}).",
 "export.link": "Symlink instead of copy the extra components.",
 # text lm
 "pretrain.*": "Text encoder next-token pretraining: num_captions, steps, batch_size, learning_rate, warmup_steps.",
 "expand.*": "Prompt-expander fine-tuning: num_pairs, steps, batch_size, learning_rate, warmup_steps.",
 # sampling
 "preset": "Preset name (`base`, `turbo`, `guided`, `tiny`).", "cfg": "True CFG scale (1 = off; needs a negative prompt).",
 "negative_prompt": "Negative prompt (\"\" = none).", "resolution": "Default output side and the area condition images are resized to.",
 "height": "Output height (0 = from resolution / the last condition image).", "width": "Output width (0 = as height).",
 "quantize": "Weight-only quantization of the DiT and text encoder: `none`, `int8`, `fp8`, `int4` (docs/quantization.md).",
}

r = _configs()

def desc(key):
    if key in G: return G[key]
    parts = key.split(".")
    for i in range(len(parts) - 1, 0, -1):
        p = ".".join(parts[:i])
        if p + ".*" in G: return G[p + ".*"]
        if p in G: return G[p]
    return ""

def fmt(v):
    s = json.dumps(v) if not isinstance(v, str) else v
    s = s if len(s) < 70 else s[:67] + "..."
    return "`" + s.replace("|", "\\|") + "`"

lines = ["# Configuration reference", "",
 "Every trainer and the `sample` command read an `ml_collections` config: `configs/<name>.py` defines",
 "`get_config(arg=None)` (some take an argument: `configs/sampling.py:tiny`, `configs/vae_train_tiny.py:test`).",
 "Override any key on the command line: `--config.optimizer.learning_rate.peak_value=3e-4`, `--config.mesh.fsdp=8`.",
 "",
 "This page was generated from the config files (default `get_config()` of each) by `python docs/gen_configuration.py`; the meaning of each",
 "key comes from the trainers that read it (`training/vae.py`, `training/dit.py`, `training/distill.py`,",
 "`training/text_lm.py`, `commands/sample.py`). Keys are listed per file with their default values.", "",
 "## Shared trainer keys (the one loop)", "",
 "`train-dit`, `train-lora` and `distill` run in `training/loop.py`, which reads these keys the same way in each:",
 "`steps` (stop there; resume continues to it), `log_every`, `progress`, `on_nonfinite` (`stop` | `skip`: a NaN/Inf",
 "step never reaches the state), `nonfinite_in_a_row` (how many non-finite steps in a row stop a `skip` run; default",
 "10; `train-vae` reads it too), `checkpoint.every` / `checkpoint.keep` / `checkpoint.async_save` (Orbax, with the",
 "data iterator, so a resume sees the same batches), `export` (a bool, or a dict with `enabled`), `mesh.*` and",
 "`sharding_rules`. `train-vae` still reads its own names (`total_steps`, `checkpoint_every`, `keep_checkpoints`,",
 "`async_checkpoint`); moving it onto the loop is open work.", "",
 "## Files", "", "| config | what it is |", "|---|---|"]
for n, v in r.items():
    first = v["doc"].split("\n\n")[0].replace("\n", " ")
    lines.append(f"| [`configs/{n}.py`](#{n}) | {first} |")
lines += ["", "## Key glossary", "", "| key | meaning |", "|---|---|"]
for k, d in G.items():
    lines.append(f"| `{k}` | {d} |")
for n, v in r.items():
    lines += ["", f"## {n}", "", "```", v["doc"], "```", "", "| key | default | meaning |", "|---|---|---|"]
    for k, val in v["keys"].items():
        lines.append(f"| `{k}` | {fmt(val)} | {desc(k)} |")
open(OUT, "w").write("\n".join(lines) + "\n")
missing = sorted({k for v in r.values() for k in v["keys"] if not desc(k)})
print("keys without description:", missing)
