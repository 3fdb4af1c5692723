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


def _leaves_equal(a, b):
    from qwix._src.providers.ptq import WithAux

    la = jax.tree.leaves(a, is_leaf=lambda x: isinstance(x, WithAux))
    lb = jax.tree.leaves(b, is_leaf=lambda x: isinstance(x, WithAux))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert type(x) is type(y)
        for u, v in zip(jax.tree.leaves(x), jax.tree.leaves(y)):
            assert u.dtype == v.dtype and u.shape == v.shape
            np.testing.assert_array_equal(np.asarray(u.astype(jnp.float32)), np.asarray(v.astype(jnp.float32)))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_loading_with_quantize_streams_each_kernel_and_equals_quantizing_after(mode, tmp_path, monkeypatch):
    """`load_transformer(path, quantize=mode)` quantizes each kernel as the checkpoint is read: the result equals
    quantizing the float model after loading (bitwise), and no float kernel outlives its own quantization (each is
    freed before the next tensor is read), so the float model never exists whole."""
    import gc
    import weakref

    from qwenimage_jax import checkpoints
    from qwenimage_jax.checkpoints import params as params_lib

    dst = str(tmp_path / "transformer")
    source = seeded_dit()
    checkpoints.export("transformer", source.params, source.dit_config, dst)
    after = quant.quantize_transformer(checkpoints.load("transformer", dst), mode)

    alive = []   # weak references to the float arrays handed to the quantizer, checked as the next one arrives
    real = params_lib.assemble_params

    def watching(*args, leaf_hook=None, **kwargs):
        def hook(path, value):
            gc.collect()
            assert all(ref() is None for ref in alive), "a float kernel outlived its quantization"
            out = leaf_hook(path, value)
            if out is not value:
                alive.append(weakref.ref(value))
            return out
        return real(*args, leaf_hook=hook if leaf_hook is not None else None, **kwargs)

    monkeypatch.setattr(params_lib, "assemble_params", watching)
    from qwenimage_jax.checkpoints import loaders
    monkeypatch.setattr(loaders, "assemble_params", watching)
    streamed = checkpoints.load("transformer", dst, quantize=mode)
    gc.collect()
    assert len(alive) == 7 and all(ref() is None for ref in alive)   # q, k, v, out, gate, proj, out of the stack
    _leaves_equal(streamed.params, after.params)
    hidden, text, t = dit_inputs()
    np.testing.assert_array_equal(np.asarray(streamed(hidden, text, t, SHAPES, MASK).sample),
                                  np.asarray(after(hidden, text, t, SHAPES, MASK).sample))


def test_text_encoder_loaded_with_quantize_equals_quantizing_after(text_float):
    from qwenimage_jax import checkpoints

    load, prompts, states, ids, tokens = text_float
    after = quant.quantize_text_encoder(load(), "int8")
    streamed = checkpoints.load("text_encoder", os.path.join(TINY_WORLD_DIR, "text_encoder"),
                                tokenizer_path=os.path.join(TINY_WORLD_DIR, "processor"), quantize="int8")
    _leaves_equal(streamed.params, after.params)
    np.testing.assert_array_equal(np.asarray(streamed.encode_prompt(prompts)[0]),
                                  np.asarray(after.encode_prompt(prompts)[0]))


@pytest.mark.parametrize("mode", quant.MODES)
def test_a_saved_quantized_transformer_loads_back_bitwise_without_quantizing_again(mode, tmp_path, monkeypatch):
    """save_quantized writes the quantized values and scales (int4 packed two per byte); loading the directory
    gives the same leaves and the same velocity, and never calls the quantizer. Asking for another mode is one
    clear error; a float model cannot be saved as quantized."""
    from qwenimage_jax import checkpoints

    dst = str(tmp_path / "transformer")
    source = seeded_dit()
    checkpoints.export("transformer", source.params, source.dit_config, dst)
    with pytest.raises(ValueError, match="load it with quantize='int8'"):
        quant.save_quantized(checkpoints.load("transformer", dst), str(tmp_path / "float"))
    quantized = checkpoints.load("transformer", dst, quantize=mode)
    saved = quant.save_quantized(quantized, str(tmp_path / f"saved_{mode}"))
    kernel_bytes = os.path.getsize(os.path.join(saved, quant.SAVED_FILE))
    float_bytes = sum(os.path.getsize(os.path.join(dst, f)) for f in os.listdir(dst) if f.endswith(".safetensors"))
    sizes = quant.param_bytes(quantized.params)
    assert kernel_bytes < float_bytes * {"int8": 0.6, "fp8": 0.6, "int4": 0.45}[mode]
    assert abs(kernel_bytes - sum(sizes.values())) < 0.01 * kernel_bytes   # the quantized size on disk

    real_quantizer = quant.leaf_quantizer

    def quantizer_that_must_not_run(*args, **kwargs):   # the layout is read from it, no kernel is quantized
        qmodule, quantize, targets = real_quantizer(*args, **kwargs)

        def refuse(path, value):
            raise AssertionError(f"a saved quantized model was quantized again ({path})")

        refuse.shardings = quantize.shardings
        return qmodule, refuse, targets

    monkeypatch.setattr(quant, "leaf_quantizer", quantizer_that_must_not_run)
    loaded = checkpoints.load("transformer", saved)
    _leaves_equal(loaded.params, quantized.params)
    hidden, text, t = dit_inputs()
    np.testing.assert_array_equal(np.asarray(loaded(hidden, text, t, SHAPES, MASK).sample),
                                  np.asarray(quantized(hidden, text, t, SHAPES, MASK).sample))
    other = "fp8" if mode != "fp8" else "int8"
    with pytest.raises(ValueError, match=f"holds {mode} weights but quantize='{other}'"):
        checkpoints.load("transformer", saved, quantize=other)
    assert checkpoints.load("transformer", saved, quantize=mode).module is not None


def test_a_saved_quantized_text_encoder_loads_back_bitwise(text_float, tmp_path):
    from qwenimage_jax import checkpoints

    load, prompts, states, ids, tokens = text_float
    quantized = quant.quantize_text_encoder(load(), "int8")
    saved = quant.save_quantized(quantized, str(tmp_path / "text_encoder"))
    loaded = checkpoints.load("text_encoder", saved, tokenizer_path=os.path.join(TINY_WORLD_DIR, "processor"))
    _leaves_equal(loaded.params, quantized.params)
    np.testing.assert_array_equal(np.asarray(loaded.encode_prompt(prompts)[0]),
                                  np.asarray(quantized.encode_prompt(prompts)[0]))


def test_cli_convert_quantize_writes_a_model_that_samples_as_quantizing_on_load(tmp_path, capsys):
    """`convert --component transformer --quantize int8` writes the saved quantized DiT; a model directory whose
    transformer/ is that directory samples the same image as `sample --quantize int8` on the float model, without
    --quantize. --quantize on the VAE is one input error (exit 4) before anything is read."""
    import shutil

    from PIL import Image

    from qwenimage_jax import cli

    model = tmp_path / "model"
    shutil.copytree(TINY_WORLD_DIR, model, ignore=shutil.ignore_patterns("transformer"))
    assert cli.main(["convert", "--component", "transformer", "--quantize", "int8",
                     os.path.join(TINY_WORLD_DIR, "transformer"), str(model / "transformer")]) == 0
    assert "(int8)" in capsys.readouterr().out
    configs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
    common = ["--prompt", "a red circle", "--config", f"{configs}/sampling.py:tiny", "--resolution", "32",
              "--no-progress"]
    assert cli.main(["sample", "--model", str(model), *common, "--out", str(tmp_path / "saved.png")]) == 0
    assert cli.main(["sample", "--model", str(TINY_WORLD_DIR), *common, "--quantize", "int8",
                     "--out", str(tmp_path / "onload.png")]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "saved.png")),
                                  np.asarray(Image.open(tmp_path / "onload.png")))
    capsys.readouterr()
    assert cli.main(["convert", "--component", "vae", "--quantize", "int8", os.path.join(TINY_WORLD_DIR, "vae"),
                     str(tmp_path / "vae")]) == 4
    assert "applies to --component transformer or text_encoder" in capsys.readouterr().err
    assert not (tmp_path / "vae").exists()
