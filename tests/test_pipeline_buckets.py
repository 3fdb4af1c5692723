"""Prompt-length buckets: prompts of one bucket share one compiled sampler (and one text-encoder program), the
bucket padding leaves the output as the unpadded call gives it (the target's RoPE frame is moved back by the
padding), and a prompt longer than the largest bucket is one clear error."""
import numpy as np
import pytest

from tests.conftest import max_rel_err
from qwenimage_jax.testing.pipeline import TEXT_HIDDEN, build_reference_pipeline

SIZE = dict(height=64, width=64)


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    _, path, _ = build_reference_pipeline(str(tmp_path_factory.mktemp("qwenimage21")), with_text_encoder=True)
    return path


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    import jax.numpy as jnp

    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(pipe_dir, dtype=jnp.float32)


def _embeds(batch, length, valid, seed):
    rng = np.random.default_rng(seed)
    embeds = rng.standard_normal((batch, length, TEXT_HIDDEN)).astype(np.float32)
    mask = np.zeros((batch, length), np.int32)
    for b, n in enumerate(valid):
        mask[b, :n] = 1
        embeds[b, n:] = 0
    return embeds, mask


def _latents(pipe, buckets, **kwargs):
    saved = pipe.text_buckets
    pipe.text_buckets = buckets
    try:
        return np.asarray(pipe(output_type="latent", num_inference_steps=3, seed=2, progress=False, **SIZE,
                               **kwargs).images)
    finally:
        pipe.text_buckets = saved


def test_bucketed_call_equals_the_unpadded_call(pipe):
    """Two prompts (7 and 5 valid of 7 positions) and a 5-token negative prompt: unbucketed, the branches differ in
    length (two DiT calls per step); bucketed, both sit in the 64-token bucket (one doubled batch) and each row's
    target RoPE frame is moved back by its padding. Padding by hand without that shift changes the image."""
    embeds, mask = _embeds(2, 7, [7, 5], seed=0)
    neg, neg_mask = _embeds(1, 5, [5], seed=1)
    kwargs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=np.repeat(neg, 2, 0),
                  negative_prompt_embeds_mask=np.repeat(neg_mask, 2, 0), true_cfg_scale=3.0)
    unbucketed = _latents(pipe, None, **kwargs)
    bucketed = _latents(pipe, (64,), **kwargs)
    assert max_rel_err(bucketed, unbucketed) <= 1e-5
    padded = dict(kwargs, prompt_embeds=np.pad(embeds, ((0, 0), (0, 57), (0, 0))),
                  prompt_embeds_mask=np.pad(mask, ((0, 0), (0, 57))))
    assert max_rel_err(_latents(pipe, None, **padded), unbucketed) > 1e-3  # the frame follows the padded length


def test_bucketed_editing_equals_the_unpadded_call(pipe):
    """Condition-image slots inside the prompt: the bucket counts text tokens only, the padding goes after the
    whole prompt, and only the target's frame moves."""
    from PIL import Image

    rng = np.random.default_rng(0)
    condition = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    embeds, mask = _embeds(1, 9, [9], seed=2)
    neg, neg_mask = _embeds(1, 11, [11], seed=3)
    slots = np.zeros((1, 9), bool)
    slots[0, 2:6] = True
    neg_slots = np.zeros((1, 11), bool)
    neg_slots[0, 2:6] = True
    kwargs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, image=condition, image_pad_mask=slots,
                  negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask,
                  negative_image_pad_mask=neg_slots, true_cfg_scale=2.0, output_resolution=64)
    assert max_rel_err(_latents(pipe, (8, 16), **kwargs), _latents(pipe, None, **kwargs)) <= 1e-5


def test_prompt_lengths_make_each_row_the_image_of_its_prompt_alone(pipe):
    """A batch of a 9- and a 4-token prompt (and negative prompts of 3 and 6): by default the short row's frame
    follows the batch's longest prompt, as in diffusers, and differs from the short prompt alone; with each
    row's own length (`prompt_lengths`) every row equals its call alone. The lengths are checked."""
    embeds, mask = _embeds(2, 9, [9, 4], seed=5)
    neg, neg_mask = _embeds(2, 6, [3, 6], seed=6)
    noise = np.random.default_rng(7).standard_normal((2, 4 * 4, pipe.latent_channels)).astype(np.float32)
    kwargs = dict(true_cfg_scale=2.5, num_inference_steps=3, output_type="latent", progress=False, **SIZE)
    batch = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=neg,
                 negative_prompt_embeds_mask=neg_mask, latents=noise, **kwargs)
    own = np.asarray(pipe(prompt_lengths=[9, 4], negative_prompt_lengths=[3, 6], **batch).images)
    shared = np.asarray(pipe(**batch).images)
    for row, (n, m) in enumerate(((9, 3), (4, 6))):
        alone = np.asarray(pipe(prompt_embeds=embeds[row:row + 1, :n], negative_prompt_embeds=neg[row:row + 1, :m],
                                latents=noise[row:row + 1], **kwargs).images)
        assert max_rel_err(own[row:row + 1], alone) <= 1e-5, row
    assert max_rel_err(shared[1:], own[1:]) > 1e-3, "the short row's frame did not move"
    with pytest.raises(ValueError, match=r"prompt_lengths=\[9, 10\]; give one length per prompt \(2\), each from 1 "
                                         r"to the states' length 9"):
        pipe(prompt_lengths=[9, 10], **batch)


def test_text_state_lengths_are_the_lengths_encode_prompt_gives(pipe):
    prompts = ["a cat", "", "a cat sitting on a red sofa next to a window, at night"]
    lengths = pipe.text_state_lengths(prompts)
    assert lengths == [pipe.encode_prompt(p)[0].shape[1] for p in prompts]
    assert [pipe.prompt_bucket(n) for n in lengths] == [64, 64, 64]
    saved = pipe.text_pad_tokens
    pipe.text_pad_tokens = 8
    try:
        assert pipe.text_state_lengths(prompts) == [pipe.encode_prompt(p)[0].shape[1] for p in prompts]
    finally:
        pipe.text_pad_tokens = saved


def test_prompts_of_one_bucket_compile_the_sampler_once(pipe_dir):
    """Three prompts of different token lengths in the 64-token bucket, then a new seed: one sampler compile and
    one text-encoder program (the negative prompt shares it). A prompt in the 128 bucket adds one of each."""
    import jax.numpy as jnp

    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    pipe = QwenImagePipeline.from_pretrained(pipe_dir, dtype=jnp.float32)  # fresh: its own compile counters
    prompts = ["a cat", "a cat sitting on a red sofa", "a cat sitting on a red sofa next to a window, at night"]
    lengths = [len(pipe.text_encoder.tokenizer(p)["input_ids"]) for p in prompts]
    assert len(set(lengths)) == 3 and max(lengths) < 50, lengths
    kwargs = dict(negative_prompt=" ", true_cfg_scale=2.0, num_inference_steps=2, output_type="latent",
                  progress=False, **SIZE)
    first = [np.asarray(pipe(p, seed=0, **kwargs).images) for p in prompts]
    again = np.asarray(pipe(prompts[0], seed=1, **kwargs).images)
    assert pipe.num_traces == 1, f"{pipe.num_traces} sampler compiles for one bucket"
    assert pipe._denoise_jit._cache_size() == 1
    assert pipe.text_encoder._forward._cache_size() == 1
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[0], again)

    long_prompt = " ".join(["a small red cat"] * 20)  # 80 words: the 128-token bucket
    pipe(long_prompt, seed=0, **kwargs)
    assert pipe.num_traces == 2 and pipe.text_encoder._forward._cache_size() == 2


def test_prompt_longer_than_the_largest_bucket_is_one_clear_error(pipe):
    embeds, mask = _embeds(1, 20, [20], seed=4)
    saved = pipe.text_buckets
    pipe.text_buckets = (8, 16)
    try:
        with pytest.raises(ValueError, match=r"the prompt has 20 text tokens, more than the largest prompt-length "
                                             r"bucket \(16\); shorten the prompt, or add a larger bucket: "
                                             r"pipe.text_buckets = \(8, 16, 32\)"):
            pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, progress=False, **SIZE)
        with pytest.raises(ValueError, match=r"more than the largest prompt-length bucket \(16\)"):
            pipe(" ".join(["a small red cat"] * 10), progress=False, **SIZE)  # raised before the encoder runs
    finally:
        pipe.text_buckets = saved
    with pytest.raises(ValueError, match="text_buckets"):
        type(pipe)(pipe.transformer, pipe.vae, text_buckets=(0, 64))
