"""KV-cache generation (prefill + lax.while_loop decode in one jit) against transformers' `generate` on tiny
random Qwen3-VL models; sampling reproducibility, top-p against transformers' warper, stop tokens, streaming."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from qwenimage_jax.checkpoints import load_text_encoder
from qwenimage_jax.text.generate import sample_next
from qwenimage_jax.testing.tokenizer import build_tiny_tokenizer, special_token_ids
from tests.qwen3_vl_tiny import TEXT_CONFIGS, build_reference

NAMES = sorted(TEXT_CONFIGS)
PAD = 400  # <|endoftext|> in the tiny tokenizer (asserted below)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("qwen3_vl_generate"))
    ids = special_token_ids(build_tiny_tokenizer(os.path.join(root, "tokenizer")))
    assert ids["<|endoftext|>"] == PAD
    models, encoders, paths = {}, {}, {}
    for i, name in enumerate(NAMES):
        # larger weights give peaked, seed-dependent next-token distributions
        model, path = build_reference(root, name, ids, seed=10 + i, noise=0.3)
        models[name], encoders[name] = model, load_text_encoder(path)
        paths[name] = path
    return models, encoders, paths


def _prompts():
    """Two prompts of different lengths, left padded."""
    ids = np.array([[PAD, PAD, PAD, PAD, PAD, 21, 5, 77, 140],
                    [9, 33, 250, 17, 4, 60, 61, 62, 63]], np.int64)
    return ids, (ids != PAD).astype(np.int64)


def _hf_generate(model, ids, mask, max_new_tokens, **kwargs):
    with torch.no_grad():
        out = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=PAD, **kwargs)
    return out[:, ids.shape[1]:].numpy()


@pytest.mark.parametrize("name", NAMES)
def test_greedy_20_tokens_equal_transformers_generate(setup, name):
    models, encoders, _ = setup
    ids, mask = _prompts()
    ref = _hf_generate(models[name], ids, mask, 20, eos_token_id=None)
    ours = np.asarray(encoders[name].generate(ids, mask, max_new_tokens=20))
    assert ref.shape == (2, 20)
    np.testing.assert_array_equal(ours, ref)
    assert len(set(ours[0].tolist())) > 3  # a non-degenerate continuation


def test_greedy_with_stop_token_equals_transformers_eos_padding(setup):
    models, encoders, _ = setup
    ids, mask = _prompts()
    free = np.asarray(encoders["tied_gqa2"].generate(ids, mask, max_new_tokens=20))
    stop = int(free[0, 5])  # row 0 stops at step 5 (or earlier if the token repeats)
    ref = _hf_generate(models["tied_gqa2"], ids, mask, 20, eos_token_id=stop)
    ours = np.asarray(encoders["tied_gqa2"].generate(ids, mask, max_new_tokens=20, stop_token_ids=[stop],
                                                     pad_token_id=PAD))
    np.testing.assert_array_equal(ours[:, :ref.shape[1]], ref)
    np.testing.assert_array_equal(ours[:, ref.shape[1]:], PAD)
    first = list(ours[0]).index(stop)
    assert first <= 5 and (ours[0, first + 1:] == PAD).all()


def test_sampling_is_reproducible_and_respects_stop_tokens(setup):
    _, encoders, _ = setup
    enc = encoders["untied_gqa3"]
    ids, mask = _prompts()
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.9)
    a = np.asarray(enc.generate(ids, mask, seed=1, **kwargs))
    b = np.asarray(enc.generate(ids, mask, seed=1, **kwargs))
    c = np.asarray(enc.generate(ids, mask, seed=2, **kwargs))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    greedy = np.asarray(enc.generate(ids, mask, max_new_tokens=16))
    assert (a != greedy).any()
    stop = int(a[1, 3])
    stopped = np.asarray(enc.generate(ids, mask, seed=1, stop_token_ids=[stop], pad_token_id=PAD, **kwargs))
    for row in range(2):
        hits = np.flatnonzero(a[row] == stop)
        if hits.size == 0:
            np.testing.assert_array_equal(stopped[row], a[row])
        else:
            end = hits[0] + 1  # same draws up to and including the stop token, pads after
            np.testing.assert_array_equal(stopped[row, :end], a[row, :end])
            assert (stopped[row, end:] == PAD).all()
    assert (stopped[1, 4:] == PAD).all()
    # top_p so small that only the most likely token survives: sampling == greedy
    tiny = np.asarray(enc.generate(ids, mask, max_new_tokens=16, temperature=0.7, top_p=1e-6, seed=3))
    np.testing.assert_array_equal(tiny, greedy)


def test_top_p_keeps_the_same_tokens_as_transformers_warper():
    from transformers.generation.logits_process import TopPLogitsWarper

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(4, 50)).astype(np.float32) * 3
    for top_p in (0.3, 0.8, 0.95):
        ref = TopPLogitsWarper(top_p)(None, torch.from_numpy(logits)).numpy()
        draws = np.stack([np.asarray(sample_next(jnp.asarray(logits), k, 1.0, top_p))
                          for k in jax.random.split(jax.random.PRNGKey(0), 400)])
        allowed = np.isfinite(ref)
        for row in range(4):
            drawn = set(draws[:, row].tolist())
            assert drawn <= set(np.flatnonzero(allowed[row]).tolist())
            if allowed[row].sum() <= 3:  # small kept sets are fully visited in 400 draws
                assert drawn == set(np.flatnonzero(allowed[row]).tolist())


def test_stream_yields_the_generate_tokens(setup):
    _, encoders, _ = setup
    enc = encoders["tied_gqa2"]
    ids, mask = _prompts()
    chunks = list(enc.stream(ids, mask, max_new_tokens=20, chunk=6))
    assert [c.shape[1] for c in chunks] == [6, 6, 6, 2]
    np.testing.assert_array_equal(np.concatenate(chunks, axis=1), np.asarray(enc.generate(ids, mask, 20)))


def test_right_padding_is_rejected(setup):
    _, encoders, _ = setup
    ids = np.array([[5, 6, PAD]]); mask = np.array([[1, 1, 0]])
    with pytest.raises(ValueError, match="LEFT-padded"):
        encoders["tied_gqa2"].generate(ids, mask, max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        encoders["tied_gqa2"].generate(ids[:, :2], mask[:, :2], max_new_tokens=0)


def test_expand_prompt_command_prints_the_generated_text(tmp_path, capsys):
    import argparse

    from qwenimage_jax.commands import expand_prompt
    from qwenimage_jax.testing.tokenizer import build_tiny_tokenizer, special_token_ids
    from tests.qwen3_vl_tiny import build_reference

    tok = build_tiny_tokenizer(str(tmp_path / "tokenizer"))
    model, path = build_reference(str(tmp_path), "tied_gqa2", special_token_ids(tok), seed=3, noise=0.3)
    parser = argparse.ArgumentParser()
    expand_prompt.add_arguments(parser)
    args = parser.parse_args(["--model", path, "--tokenizer", tok, "--temperature", "0", "--max-new-tokens", "12",
                              "--chunk", "5", "--no-keep-stated", "a", "cat"])
    # --no-keep-stated: streamed as generated; "a cat" states no world attribute, so the constraint forces nothing
    assert expand_prompt.run(args) == 0
    printed = capsys.readouterr().out
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tok)
    from qwenimage_jax.text.templates import expand_messages
    ids = tokenizer.apply_chat_template(expand_messages("a cat"), add_generation_prompt=True, tokenize=True,
                                        return_dict=False)
    ref = _hf_generate(model, np.asarray([ids]), np.ones((1, len(ids)), np.int64), 12, eos_token_id=None)[0]
    stops = {tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")}
    kept = []
    for t in ref.tolist():
        if t in stops:
            break
        kept.append(t)
    assert printed == tokenizer.decode(kept, skip_special_tokens=True) + "\n"


def test_expand_prompts_batch_equals_transformers_greedy_per_prompt(tmp_path):
    """`text.expand.expand_prompts` on a left-padded batch of prompts of different lengths gives, row by row,
    transformers' greedy answer to each prompt's expansion chat alone, cut at the first stop token."""
    from transformers import AutoTokenizer

    from qwenimage_jax.testing.tokenizer import build_tiny_tokenizer, special_token_ids
    from qwenimage_jax.text.expand import expand_prompts, expansion_prompt_ids, stop_token_ids
    from tests.qwen3_vl_tiny import build_reference

    tok = build_tiny_tokenizer(str(tmp_path / "tokenizer"))
    model, path = build_reference(str(tmp_path), "tied_gqa2", special_token_ids(tok), seed=5, noise=0.3)
    encoder = load_text_encoder(path, tokenizer_path=tok)
    tokenizer = AutoTokenizer.from_pretrained(tok)
    prompts = ["a cat", "two small red squares on a gray background"]
    ours = expand_prompts(encoder, prompts, max_new_tokens=10)
    stops = set(stop_token_ids(tokenizer))
    assert {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")} <= stops
    for prompt, text in zip(prompts, ours):
        ids = expansion_prompt_ids(tokenizer, prompt)
        ref = _hf_generate(model, np.asarray([ids]), np.ones((1, len(ids)), np.int64), 10, eos_token_id=None)[0]
        kept = []
        for t in ref.tolist():
            if t in stops:
                break
            kept.append(t)
        assert text == tokenizer.decode(kept, skip_special_tokens=True).strip()
    with pytest.raises(TypeError, match="list of strings"):
        expand_prompts(encoder, "a cat")


def test_sharded_generation_equals_single_device(setup):
    from qwenimage_jax.parallel.mesh import make_mesh

    _, encoders, paths = setup
    sharded = load_text_encoder(paths["untied_gqa3"], mesh=make_mesh(fsdp=4, tensor=2))
    ids, mask = _prompts()
    np.testing.assert_array_equal(np.asarray(sharded.generate(ids, mask, max_new_tokens=8)),
                                  np.asarray(encoders["untied_gqa3"].generate(ids, mask, max_new_tokens=8)))


def test_greedy_with_images_equals_transformers_generate(tmp_path):
    """Prompts holding images of different sizes: vision embeddings, DeepStack and 3D positions in the prefill,
    rope deltas in the decode positions, left-padded batch of 2."""
    import torch
    from PIL import Image

    from qwenimage_jax.text.templates import build_prompt
    from qwenimage_jax.testing.tokenizer import build_tiny_processor, load_processor_without_torchvision

    proc_dir = build_tiny_processor(str(tmp_path / "processor"), patch_size=4)
    model, path = build_reference(str(tmp_path), "untied_gqa3", special_token_ids(proc_dir), seed=7, noise=0.3)
    enc = load_text_encoder(path, tokenizer_path=proc_dir)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, size=(20, 28, 3), dtype=np.uint8)),
              Image.fromarray(rng.integers(0, 255, size=(36, 16, 3), dtype=np.uint8))]
    texts = [build_prompt("a cat", 1), build_prompt("describe this picture in detail please", 1)]
    inputs = load_processor_without_torchvision(proc_dir)(text=texts, images=images, padding=True,
                                                          padding_side="left", return_tensors="pt")
    assert (inputs["attention_mask"][0] == 0).any()  # row 0 is left padded
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=PAD, eos_token_id=None)
    ref = ref[:, inputs["input_ids"].shape[1]:].numpy()
    ours = np.asarray(enc.generate(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), 12,
                                   pixel_values=inputs["pixel_values"].numpy(),
                                   image_grid_thw=inputs["image_grid_thw"].numpy()))
    np.testing.assert_array_equal(ours, ref)
    text_only = np.asarray(enc.generate(inputs["input_ids"].numpy(), inputs["attention_mask"].numpy(), 12))
    assert (text_only != ref).any()  # the image path matters
