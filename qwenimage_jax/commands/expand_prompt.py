"""`qwenimage-jax expand-prompt --model PATH "a cat"`: expand a short prompt with a decoder LM, printing tokens as
they are generated (KV-cache decode in jitted chunks).

The model is any Qwen3-VL directory (transformers format or our Orbax conversion) with its tokenizer beside it or
given by --tokenizer. Qwen's official enhancer (a Qwen3.5 fine-tune) plugs in through `text.generate.Decoder`.
"""
from __future__ import annotations

import sys


def add_arguments(parser):
    parser.add_argument("prompt", nargs="+", help="the short prompt (several words are joined with spaces)")
    parser.add_argument("--model", required=True, help="Qwen3-VL model directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model dir, or a "
                                                          "sibling tokenizer/ or processor/ dir)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=8, help="tokens decoded per jitted call between prints")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--system", default=None, help="replace the built-in rewriting instruction")


def run(args, out=None):
    import jax.numpy as jnp

    from qwenimage_jax.checkpoints import load_text_encoder
    from qwenimage_jax.text.expand import stream_expansion

    out = out or sys.stdout
    encoder = load_text_encoder(args.model, dtype=getattr(jnp, args.dtype), tokenizer_path=args.tokenizer)
    for piece in stream_expansion(encoder, " ".join(args.prompt), args.max_new_tokens, chunk=args.chunk,
                                  temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                  system=args.system):
        out.write(piece)
        out.flush()
    out.write("\n")
    out.flush()
    return 0
