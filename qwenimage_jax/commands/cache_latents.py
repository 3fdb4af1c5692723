"""`qwenimage-jax cache-latents --source world:2000 --vae VAE --text-encoder TE --out DIR`: DiT training data."""
from __future__ import annotations


def add_arguments(parser):
    parser.add_argument("--source", required=True,
                        help="world:N[:split[:size]] (the small world) or folder:DIR (images + captions.jsonl)")
    parser.add_argument("--vae", required=True, help="VAE directory (diffusers or our Orbax format)")
    parser.add_argument("--text-encoder", required=True, help="Qwen3-VL directory (with its tokenizer files)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer directory, if not inside --text-encoder")
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--shards", type=int, default=4, help="ArrayRecord shards per host")
    parser.add_argument("--batch", type=int, default=16, help="encoding batch size")


def run(args):
    from qwenimage_jax.data.cache_latents import cache_latents
    from qwenimage_jax.parallel.distributed import maybe_initialize

    maybe_initialize()
    meta = cache_latents(args.source, args.vae, args.text_encoder, args.out, num_shards=args.shards,
                         batch_size=args.batch, tokenizer_path=args.tokenizer)
    total = sum(meta["shards"].values())
    print(f"wrote {total} examples in {len(meta['shards'])} shards, {len(meta['buckets'])} layout bucket(s) "
          f"to {args.out}")
    return 0
