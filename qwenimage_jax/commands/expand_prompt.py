"""`qwenimage-jax expand-prompt --model PATH "a cat"`: expand a short prompt with a decoder LM.

The model is any Qwen3-VL directory (transformers format or our Orbax conversion) with its tokenizer beside it or
given by --tokenizer. Qwen's official enhancer (a Qwen3.5 fine-tune) plugs in through `text.generate.Decoder`.

By default the expansion keeps what the prompt states (`text.expand`; the small world's colour, shape, count, size,
position and background words, read from the prompt): decoding copies the stated attribute words (--constrain), and
an expansion that still changes or drops one is sampled again (--retries) and then replaced by the prompt as written
(--keep-stated), with a note on stderr. The answer is printed once it is checked; with --no-keep-stated the tokens
are printed as they are generated (KV-cache decode in jitted chunks of --chunk tokens).
"""
from __future__ import annotations

import argparse
import sys

from qwenimage_jax.errors import InputValueError


def add_arguments(parser):
    parser.add_argument("prompt", nargs="+", help="the short prompt (several words are joined with spaces)")
    parser.add_argument("--model", required=True, help="Qwen3-VL model directory")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory (default: the model dir, or a "
                                                          "sibling tokenizer/ or processor/ dir)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunk", type=int, default=8, help="tokens decoded per jitted call between prints "
                                                             "(--no-keep-stated)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--system", default=None, help="replace the built-in rewriting instruction")
    parser.add_argument("--keep-stated", action=argparse.BooleanOptionalAction, default=True,
                        help="print the prompt as written when every try changes or drops what it states")
    parser.add_argument("--constrain", action=argparse.BooleanOptionalAction, default=True,
                        help="decoding copies the stated attribute words")
    parser.add_argument("--retries", type=int, default=3,
                        help="with --keep-stated and sampling: further tries (seed + k) before falling back")


def run(args, out=None, err=None):
    import jax.numpy as jnp

    from qwenimage_jax.checkpoints import load_text_encoder
    from qwenimage_jax.text.expand import expand_checked, stream_expansion

    out, err = out or sys.stdout, err or sys.stderr
    if args.retries < 0:
        raise InputValueError(f"--retries {args.retries}: pass 0 or more further tries")
    encoder = load_text_encoder(args.model, dtype=getattr(jnp, args.dtype), tokenizer_path=args.tokenizer)
    prompt = " ".join(args.prompt)
    if not args.keep_stated:
        for piece in stream_expansion(encoder, prompt, args.max_new_tokens, chunk=args.chunk,
                                      temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                                      system=args.system, constrain=args.constrain):
            out.write(piece)
            out.flush()
        out.write("\n")
        out.flush()
        return 0
    result = expand_checked(encoder, [prompt], args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, system=args.system, constrain=args.constrain, retries=args.retries)
    if result.fell_back[0]:
        why = ", ".join(result.first_contradictions[0]) or "empty answer"
        tries = f"{result.tries[0]} {'try' if result.tries[0] == 1 else 'tries'}"
        err.write(f"expand-prompt: {tries} changed what the prompt states (first: {why}); "
                  "printing the prompt as written\n")
    out.write(result.texts[0] + "\n")
    out.flush()
    return 0
