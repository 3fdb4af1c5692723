"""The sampler's program structure: one jit for the whole loop, no recompiles for repeated calls or other step
counts, the progress callback, batch sharding over the mesh, and clear input errors."""
import numpy as np
import pytest

from tests.conftest import max_rel_err
from qwenimage_jax.testing.pipeline import TEXT_HIDDEN, build_reference_pipeline

HEIGHT, WIDTH = 64, 64


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    _, path, _ = build_reference_pipeline(str(tmp_path_factory.mktemp("qwenimage21")), with_text_encoder=False)
    return path


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    import jax.numpy as jnp

    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    return QwenImagePipeline.from_pretrained(pipe_dir, dtype=jnp.float32)


def _embeds(batch=1, length=5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, length, TEXT_HIDDEN)).astype(np.float32)


def test_repeated_calls_and_step_counts_share_one_compile(pipe):
    embeds = _embeds()
    traces, decodes = pipe.num_traces, pipe.num_decode_traces
    first = pipe(prompt_embeds=embeds, height=HEIGHT, width=WIDTH, num_inference_steps=4, seed=0,
                 output_type="np", progress=False).images
    assert pipe.num_traces == traces + 1 and pipe.num_decode_traces == decodes + 1
    cache_size = pipe._denoise_jit._cache_size()
    again = pipe(prompt_embeds=embeds, height=HEIGHT, width=WIDTH, num_inference_steps=4, seed=0,
                 output_type="np", progress=False).images
    other_seed = pipe(prompt_embeds=_embeds(seed=1), height=HEIGHT, width=WIDTH, num_inference_steps=4, seed=5,
                      output_type="np", progress=False).images
    for steps in (3, 8):  # one sigma bucket (<= 15 steps): the step count is a traced value
        pipe(prompt_embeds=embeds, height=HEIGHT, width=WIDTH, num_inference_steps=steps, output_type="np",
             progress=False)
    pipe(prompt_embeds=embeds, height=HEIGHT, width=WIDTH, sigmas=[1.0, 0.9, 0.6, 0.3], output_type="np",
         progress=False)
    assert pipe.num_traces == traces + 1, "a repeated call with the same shapes recompiled the sampler"
    assert pipe._denoise_jit._cache_size() == cache_size
    assert pipe.num_decode_traces == decodes + 1
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other_seed)


def test_loop_is_one_program_with_the_prefix_computed_once(pipe):
    """The jaxpr of the sampler holds one while loop; the "extract" (full-sequence) DiT call sits outside it and
    only "cached" calls (target tokens only) inside."""
    import jax
    import jax.numpy as jnp

    from qwenimage_jax.sampling.pipeline import SamplerSpec

    text = jnp.asarray(_embeds(length=5))
    n = (HEIGHT // 16) * (WIDTH // 16)
    spec = SamplerSpec(((1, 4, 4),), (False,) * 5 + (True,) * (n // 4), None, "none", False)
    latents = jnp.zeros((1, n, 8), jnp.float32)
    jaxpr = jax.make_jaxpr(lambda p, x, t, s, ts: pipe._denoise(p, x, None, t, None, None, None, s, ts,
                                                                jnp.int32(4), jnp.float32(1), spec=spec))(
        pipe.transformer.variables, latents, text, jnp.zeros((16,)), jnp.zeros((16,)))
    loops = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "while"]
    assert len(loops) == 1
    body = str(loops[0].params["body_jaxpr"])
    seq_len = 5 + n  # text + target tokens: only the prefix pass sees the whole joint sequence
    assert f"1,{seq_len},32" not in body.replace(" ", "") and f"1,{n},32" in body.replace(" ", "")
    outside = "".join(str(e) for e in jaxpr.jaxpr.eqns if e.primitive.name != "while").replace(" ", "")
    assert f"1,{seq_len},32" in outside


def test_progress_bar_ticks_once_per_step(pipe, monkeypatch):
    import tqdm.auto

    updates = []

    class FakeBar:
        def __init__(self, total, **kwargs):
            self.total = total

        def update(self, n=1):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", FakeBar)
    pipe(prompt_embeds=_embeds(), height=HEIGHT, width=WIDTH, num_inference_steps=5, output_type="latent",
         progress=True)
    assert sum(updates) == 5


def test_sharded_batch_matches_single_device(pipe, pipe_dir):
    import jax
    import jax.numpy as jnp

    from qwenimage_jax.parallel.mesh import make_mesh
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    mesh = make_mesh(data=4, fsdp=1, tensor=2)
    sharded = QwenImagePipeline.from_pretrained(pipe_dir, dtype=jnp.float32, mesh=mesh)
    embeds = _embeds(batch=2, length=6, seed=3)
    neg = _embeds(batch=1, length=6, seed=4)
    kwargs = dict(prompt_embeds=embeds, negative_prompt_embeds=np.repeat(neg, 2, axis=0), true_cfg_scale=3.0,
                  num_images_per_prompt=2, height=HEIGHT, width=WIDTH, num_inference_steps=3, seed=7,
                  progress=False)
    latents = sharded(output_type="latent", **kwargs).images
    assert latents.shape[0] == 4
    assert latents.sharding.spec[0] in (("data", "fsdp"), "data", ("data",))
    assert len({s.device for s in latents.addressable_shards}) == 8
    reference = pipe(output_type="latent", **kwargs).images
    assert max_rel_err(np.asarray(latents), np.asarray(reference)) <= 1e-5
    images = sharded(output_type="np", **kwargs).images
    assert max_rel_err(images, pipe(output_type="np", **kwargs).images) <= 1e-5
    with pytest.raises(ValueError, match="divisible"):
        sharded(prompt_embeds=embeds, height=HEIGHT, width=WIDTH, num_inference_steps=2, progress=False)


def test_bad_inputs_have_clear_errors(pipe):
    with pytest.raises(ValueError, match="height 100 is not a positive multiple of 32; use 96 or 128"):
        pipe(prompt_embeds=_embeds(), height=100, width=64, progress=False)
    with pytest.raises(ValueError, match="no text encoder"):
        pipe(prompt="a cat", height=64, width=64, progress=False)
    with pytest.raises(ValueError, match="either `prompt` or `prompt_embeds`"):
        pipe(prompt="a cat", prompt_embeds=_embeds(), progress=False)
    with pytest.raises(ValueError, match="latents shape"):
        pipe(prompt_embeds=_embeds(), height=64, width=64, latents=np.zeros((1, 5, 8), np.float32), progress=False)
    with pytest.raises(ValueError, match="output_type"):
        pipe(prompt_embeds=_embeds(), output_type="pt")
    with pytest.raises(ValueError, match="image_pad_mask"):
        from PIL import Image
        pipe(prompt_embeds=_embeds(), image=Image.new("RGB", (64, 64)), progress=False)
