"""Weight-only quantization (checkpoints/quantize.py, qwix): the DiT's velocity and the text encoder's states stay
close to float for every mode, the kernels really are int8 / fp8 / int4, a mesh places them, and `sample
--quantize int8` runs the shipped tiny world.

The PSNR floors are the values measured here (bench/quantize_quality.py writes them to docs/quantize_quality.json)
less a margin of about 10 dB: a regression (a kernel quantized across layers, scales in the wrong dtype) costs far
more than that.
"""
from __future__ import annotations

import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenimage_jax.checkpoints import quantize as quant
from qwenimage_jax.commands.demo import TINY_WORLD_DIR
from qwenimage_jax.testing.quantize import MASK, SHAPES, dit_inputs, psnr, seeded_dit

# measured (docs/quantize_quality.json): velocity int8 49.7 dB, fp8 38.1, int4 26.5; this test's text states
# (tiny world) int8 ~60, fp8 ~46, int4 ~36
VELOCITY_FLOOR = {"int8": 40.0, "fp8": 29.0, "int4": 19.0}
TEXT_FLOOR = {"int8": 50.0, "fp8": 36.0, "int4": 26.0}
BITS = {"int8": 8, "fp8": 8, "int4": 4}
pytestmark = pytest.mark.filterwarnings("ignore:'VariableState' was removed")  # inside qwix 0.1.8, harmless


@pytest.fixture(scope="module")
def float_velocity():
    return np.asarray(seeded_dit()(*dit_inputs(), SHAPES, MASK).sample)


@pytest.mark.parametrize("mode", quant.MODES)
def test_dit_velocity_close_to_float_and_kernels_shrink(mode, float_velocity):
    transformer = seeded_dit()
    float_bytes = quant.param_bytes(transformer.params)["float"]
    block_kernels = sum(x.nbytes for path, x in flax.traverse_util.flatten_dict(transformer.params["blocks"]).items()
                        if path[-1] == "kernel")
    quant.quantize_transformer(transformer, mode)
    velocity = transformer(*dit_inputs(), SHAPES, MASK).sample
    assert psnr(float_velocity, velocity) > VELOCITY_FLOOR[mode]

    kernel = transformer.params["blocks"]["mlp"]["proj"]["kernel"].array  # WithAux(QArray) stacked on layers
    assert kernel.qvalue.dtype == quant.QTYPES[mode] and kernel.qvalue.shape == (2, 256, 768)
    # one scale per layer and output channel; int4 also per 128-wide group of the contraction
    assert kernel.scale.shape == ((2, 2, 768) if mode == "int4" else (2, 1, 768))
    assert transformer.params["proj_out"]["kernel"].dtype == jnp.float32          # kept in float (docstring)
    assert transformer.params["blocks"]["attn"]["norm_q"]["scale"].dtype == jnp.float32
    sizes = quant.param_bytes(transformer.params)
    assert sizes["float"] == float_bytes - block_kernels                # everything else untouched
    # the block kernels take BITS/32 of their fp32 bytes, plus the scales (a few %)
    assert block_kernels * BITS[mode] / 32 < sizes["quantized"] < block_kernels * BITS[mode] / 32 * 1.1


def test_quantized_transformer_on_a_mesh_matches_single_device(float_velocity):
    from qwenimage_jax.parallel.mesh import make_mesh

    mesh = make_mesh(data=1, fsdp=2)
    transformer = quant.quantize_transformer(seeded_dit(mesh), "int8")
    kernel = transformer.params["blocks"]["attn"]["to_q"]["kernel"].array
    assert kernel.qvalue.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    single = quant.quantize_transformer(seeded_dit(), "int8")
    np.testing.assert_allclose(transformer(*dit_inputs(), SHAPES, MASK).sample,
                               single(*dit_inputs(), SHAPES, MASK).sample, atol=1e-5, rtol=1e-5)


def test_quantize_checks_mode_and_twice():
    assert quant.check_mode("none") is None and quant.check_mode(None) is None
    with pytest.raises(ValueError, match="choose one of none, int8, fp8, int4"):
        quant.check_mode("int3")
    transformer = quant.quantize_transformer(seeded_dit(), "int8")
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_transformer(transformer, "fp8")


@pytest.fixture(scope="module")
def text_float():
    from qwenimage_jax import checkpoints

    def load():
        return checkpoints.load("text_encoder", os.path.join(TINY_WORLD_DIR, "text_encoder"),
                                tokenizer_path=os.path.join(TINY_WORLD_DIR, "processor"))

    encoder = load()
    prompts = ["two red circles on the left and a blue square at the top, on a gray background."]
    states = np.asarray(encoder.encode_prompt(prompts)[0])
    ids = encoder.prepare_inputs(["a red circle"])
    tokens = np.asarray(encoder.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=4))
    return load, prompts, states, ids, tokens


@pytest.mark.parametrize("mode", quant.MODES)
def test_text_encoder_states_close_to_float(mode, text_float):
    load, prompts, states, ids, tokens = text_float
    encoder = quant.quantize_text_encoder(load(), mode)
    layer = encoder.params["language_model"]["layers"]["mlp"]["down_proj"]["kernel"].array
    assert layer.qvalue.dtype == quant.QTYPES[mode]
    assert encoder.params["language_model"]["embed_tokens"]["embedding"].dtype == jnp.float32
    assert psnr(states, encoder.encode_prompt(prompts)[0]) > TEXT_FLOOR[mode]
    # generation (prompt expansion) runs the quantized decoder through its `step` entry point
    generated = np.asarray(encoder.generate(ids["input_ids"], ids["attention_mask"], max_new_tokens=4))
    assert generated.shape == tokens.shape
    if mode == "int8":
        np.testing.assert_array_equal(generated, tokens)


def test_cli_sample_quantize_int8_on_the_tiny_world(tmp_path, capsys):
    from PIL import Image

    from qwenimage_jax import cli

    out = tmp_path / "q.png"
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    assert cli.main(["sample", "--model", str(TINY_WORLD_DIR), "--prompt", "a red circle", "--config",
                     f"{configs}/sampling.py:tiny", "--resolution", "32", "--quantize", "int8", "--out", str(out),
                     "--no-progress"]) == 0
    image = np.asarray(Image.open(out))
    assert image.shape[:2] == (32, 32) and image.std() > 0
    assert "wrote" in capsys.readouterr().out


def test_lora_runs_unfused_beside_quantized_kernels_and_fusing_is_refused():
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    kwargs = dict(prompt="a red circle", height=32, width=32, num_inference_steps=2, output_type="np",
                  progress=False)
    images = {}
    for mode in (None, "int8"):
        pipe = QwenImagePipeline.from_pretrained(str(TINY_WORLD_DIR), transformer_subfolder="teacher/transformer",
                                                 quantize=mode)
        pipe.load_lora_weights(os.path.join(TINY_WORLD_DIR, "lora_purple"), adapter_name="purple")
        images[mode] = np.asarray(pipe(**kwargs).images)
    assert psnr(images[None], images["int8"]) > 40   # the adapter's image, as in float
    with pytest.raises(ValueError, match="fuse_lora needs float kernels"):
        pipe.fuse_lora()
