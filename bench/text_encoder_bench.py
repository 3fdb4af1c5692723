"""Text-encoder benchmark: prompt-encoding latency and greedy decode tokens/s, our jitted Flax Qwen3-VL vs
transformers eager, on the same random weights, measured in one run.

    python bench/text_encoder_bench.py            # CPU, a small-but-not-trivial config, prints ratios
    python bench/text_encoder_bench.py --gpu      # Qwen3-VL-8B text shape, random bf16 weights, ours only
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CPU_CONFIG = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=64, mrope_section=[12, 10, 10])
GPU_CONFIG = dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                  num_attention_heads=32, num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20])


def _median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _hf_config(spec, tie=False):
    from transformers import Qwen3VLConfig

    spec = dict(spec)
    section = spec.pop("mrope_section")
    return Qwen3VLConfig(
        text_config=dict(**spec, rope_parameters={"rope_type": "default", "rope_theta": 5_000_000.0,
                                                  "mrope_interleaved": True, "mrope_section": section}),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           out_hidden_size=spec["hidden_size"], num_position_embeddings=16,
                           deepstack_visual_indexes=[0]),
        image_token_id=spec["vocab_size"] - 1, video_token_id=spec["vocab_size"] - 2,
        vision_start_token_id=spec["vocab_size"] - 3, vision_end_token_id=spec["vocab_size"] - 4,
        tie_word_embeddings=tie)


def bench_cpu(batch, prompt_len, new_tokens, repeats):
    import jax
    import numpy as np
    import torch
    from transformers import Qwen3VLForConditionalGeneration

    from qwenimage_jax.checkpoints import load_text_encoder

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(_hf_config(CPU_CONFIG)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        ours = load_text_encoder(tmp)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, CPU_CONFIG["vocab_size"] - 8, size=(batch, prompt_len))
    mask = np.ones_like(ids)
    mask[0, : prompt_len // 4] = 0  # left-padded batch
    t_ids, t_mask = torch.from_numpy(ids), torch.from_numpy(mask)
    norm = model.model.language_model.norm

    def ref_encode():
        handle = norm.register_forward_hook(lambda m, a, o: a[0])
        with torch.no_grad():
            model(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True).hidden_states[-1]
        handle.remove()

    def ours_encode():
        jax.block_until_ready(ours.encode(ids, mask))

    def ref_generate():
        with torch.no_grad():
            return model.generate(input_ids=t_ids, attention_mask=t_mask, max_new_tokens=new_tokens,
                                  min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=None)

    def ours_generate():
        return np.asarray(ours.generate(ids, mask, max_new_tokens=new_tokens))

    start = time.perf_counter(); ours_encode(); compile_encode = time.perf_counter() - start
    start = time.perf_counter(); ours_generate(); compile_gen = time.perf_counter() - start
    ref_encode(); ref_generate()
    same = bool((ours_generate() == ref_generate()[:, prompt_len:].numpy()).all())
    t_ref_enc, t_ours_enc = _median_time(ref_encode, repeats), _median_time(ours_encode, repeats)
    t_ref_gen, t_ours_gen = _median_time(ref_generate, max(1, repeats // 2)), _median_time(ours_generate,
                                                                                        max(1, repeats // 2))
    tokens = batch * new_tokens
    print(f"config: {CPU_CONFIG}  batch={batch} prompt={prompt_len} new_tokens={new_tokens} "
          f"devices={jax.devices()[0].platform} torch_threads={torch.get_num_threads()}")
    print(f"first call (compile) ours: encode {compile_encode:.2f}s, generate {compile_gen:.2f}s")
    print(f"{'':24s}{'transformers eager':>20s}{'ours (jit)':>14s}{'speed-up':>10s}")
    print(f"{'encode latency (ms)':24s}{t_ref_enc * 1e3:20.1f}{t_ours_enc * 1e3:14.1f}{t_ref_enc / t_ours_enc:9.2f}x")
    print(f"{'greedy decode (tok/s)':24s}{tokens / t_ref_gen:20.1f}{tokens / t_ours_gen:14.1f}"
          f"{t_ref_gen / t_ours_gen:9.2f}x")
    print(f"greedy tokens identical to transformers: {same}")


def bench_gpu(batch, prompt_len, new_tokens, repeats):
    import jax
    import jax.numpy as jnp
    import numpy as np

    from qwenimage_jax.models.qwen3_vl.config import text_config_from_hf
    from qwenimage_jax.models.qwen3_vl.model import Qwen3VL
    from qwenimage_jax.text.encoder import TextEncoder

    hf = _hf_config(GPU_CONFIG).to_dict()
    module = Qwen3VL(text_config_from_hf(hf), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    ids0 = jnp.zeros((1, 4), jnp.int32)
    init = jax.jit(lambda key: module.init(key, ids0, jnp.ones_like(ids0), jnp.zeros((3, 1, 4), jnp.int32))["params"])
    start = time.perf_counter()
    params = jax.block_until_ready(init(jax.random.PRNGKey(0)))
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, params,
                          is_leaf=lambda x: hasattr(x, "value"))
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"8B text shape: {n_params / 1e9:.2f}B params (bf16), init {time.perf_counter() - start:.1f}s on "
          f"{jax.devices()[0].device_kind}")
    enc = TextEncoder(module, params, hf)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 150000, size=(batch, prompt_len))
    mask = np.ones_like(ids)

    def encode():
        jax.block_until_ready(enc.encode(ids, mask))

    def generate():
        return np.asarray(enc.generate(ids, mask, max_new_tokens=new_tokens))

    start = time.perf_counter(); encode(); c1 = time.perf_counter() - start
    start = time.perf_counter(); generate(); c2 = time.perf_counter() - start
    t_enc = _median_time(encode, repeats)
    t_gen = _median_time(generate, max(1, repeats // 2))
    t_prefill = t_enc  # prefill ~ one encode of the prompt
    print(f"batch={batch} prompt={prompt_len} new_tokens={new_tokens}; compile+first: encode {c1:.1f}s, "
          f"generate {c2:.1f}s")
    print(f"encode latency: {t_enc * 1e3:.1f} ms ({batch * prompt_len / t_enc:.0f} prompt tok/s)")
    print(f"generate: {t_gen:.2f}s total, ~{batch * new_tokens / max(t_gen - t_prefill, 1e-9):.1f} decode tok/s "
          f"(batch {batch})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="8B shape on the accelerator, ours only")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=None)
    parser.add_argument("--new-tokens", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.gpu:
        bench_gpu(args.batch, args.prompt_len or 512, args.new_tokens or 64, args.repeats)
    else:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        bench_cpu(args.batch, args.prompt_len or 128, args.new_tokens or 32, args.repeats)


if __name__ == "__main__":
    main()
