"""`qwenimage-jax eval-t2i --model PATH --steps N --num-prompts K [--split heldout] [--expand]`: the small world's
GenEval (`qwenimage_jax.evals.t2i`). Generates one image per world caption with the pipeline and prints the judge's per-attribute accuracy.

Prompts are world scenes the DiT never saw (eval seed 1000; `--split heldout`: every scene has one of the held-out
(shape, colour) compositions, `train`: only compositions seen in training). The table also gives the judge's score
of the world's own renderings of the same scenes (ground truth: the ceiling). With `--expand` the short, casual
prompts (`data/prompts.py`) are generated twice, as written and after the model's prompt expander
(`PATH/expander`), each judged on what the short prompt states; the table adds how often the expansions change or
drop what the short prompt states (overall and per attribute, `data.prompts.contradictions`) and how often one
was replaced by the prompt as written (`--no-keep-stated`, `--no-constrain` turn the two levers off).

    qwenimage-jax eval-t2i --model qwenimage_jax/assets/tiny_world --steps 40 --num-prompts 64 --split heldout
"""
from __future__ import annotations

import argparse
import sys

from qwenimage_jax.io_utils import write_json


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="diffusers-format directory (e.g. the shipped tiny_world)")
    parser.add_argument("--transformer", default="transformer",
                        help="transformer subfolder of --model (e.g. teacher/transformer in the shipped tiny_world)")
    parser.add_argument("--steps", type=int, default=None,
                        help="sampling steps (default: the model's sample_sigmas when it has them, else 40)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--split", default="heldout", choices=["heldout", "train", "novel"],
                        help="heldout: compositions kept out of all training; train: seen compositions; novel: purple "
                             "backgrounds, which only the LoRA demonstration (configs/world_lora.py) trains on")
    parser.add_argument("--lora", default=None, help="a LoRA adapter (directory or .safetensors) to load first")
    parser.add_argument("--lora-scale", type=float, default=1.0)
    parser.add_argument("--expand", action="store_true", help="also score short prompts with/without expansion")
    parser.add_argument("--keep-stated", action=argparse.BooleanOptionalAction, default=True,
                        help="with --expand: an expansion that changes or drops what the short prompt states is "
                             "replaced by the prompt as written (the fallback rate is reported)")
    parser.add_argument("--constrain", action=argparse.BooleanOptionalAction, default=True,
                        help="with --expand: decoding copies the stated colour/shape/count/size/position/background "
                             "words (text.expand.constrain_attributes)")
    parser.add_argument("--cfg", type=float, default=None,
                        help="true CFG scale (negative prompt ' '); 1 = off (default: 1 for a distilled model with "
                             "sample_sigmas, else 4)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="noise seed")
    parser.add_argument("--json", default=None, help="also write the figures to this JSON file")
    parser.add_argument("--quantize", default="none", choices=["none", "int8", "fp8", "int4"],
                        help="weight-only quantization of the DiT and text encoder (docs/quantization.md)")


def run(args, out=None):
    from qwenimage_jax.evals import t2i
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    out = out or sys.stdout
    pipe = QwenImagePipeline.from_pretrained(args.model, transformer_subfolder=args.transformer, quantize=args.quantize)
    if args.lora:
        pipe.load_lora_weights(args.lora, adapter_name="eval", scale=args.lora_scale)
    steps, cfg = t2i.sampling_defaults(pipe, args.steps, args.cfg)
    result = t2i.evaluate(pipe, args.model, args.split, args.num_prompts, steps, t2i.model_size(args.model), cfg,
                          args.seed, args.batch_size, args.expand, keep_stated=args.keep_stated,
                          constrain=args.constrain)
    out.write(t2i.format_table(result) + "\n")
    if args.json:
        write_json(args.json, {k: v for k, v in result.items() if k != "images"}, indent=1)
    return 0
