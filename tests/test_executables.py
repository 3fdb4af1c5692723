"""A saved executable runs in place of the trainer's compile (`--config.executable`, what `aot --save` writes), and
one that cannot run here is one clear error before training: other arguments (another batch), other versions,
other devices, not an executable at all."""
import os
import pickle

import numpy as np

import jax
import pytest

from qwenimage_jax.errors import InputValueError
from qwenimage_jax.checkpoints import executables
from qwenimage_jax.training import dit as dit_trainer
from tests.dit_train_fixtures import tiny_config, write


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 3-step run whose compiled step is captured and saved (as `aot --save` would save it)."""
    root = tmp_path_factory.mktemp("exe")
    data = write(root / "data", n=16)
    captured = []

    def spy(step, state, batch, key, *trailing, executable=""):
        exe = step.lower(state, batch, key, *trailing).compile()
        captured.append(exe)
        return dit_trainer.bind(exe, *trailing)

    mp = pytest.MonkeyPatch()
    mp.setattr(dit_trainer, "compiled", spy)
    # compiled fresh even where another test left a persistent compilation cache on: what the cache hands back
    # does not serialize whole (see `executables.uncached_compiles`)
    with executables.uncached_compiles():
        run = dit_trainer.train(tiny_config(data, steps=3, export=False), str(root / "compiled"))
    mp.undo()
    assert len(captured) == 1                           # one layout, compiled once at start
    path = str(root / "step.xla")
    assert f"{jax.device_count()} x cpu" in executables.save_executable(captured[0], path)
    return data, path, run


def test_a_saved_step_trains_like_the_compiled_one(saved, tmp_path):
    data, path, run = saved
    loaded = dit_trainer.train(tiny_config(data, steps=3, export=False, executable=path), str(tmp_path / "run"))
    for step in (1, 2, 3):
        assert loaded["losses"][step] == pytest.approx(run["losses"][step], abs=1e-6), step


def test_an_executable_for_other_arguments_is_refused_before_training(saved, tmp_path):
    data, path, _ = saved
    config = tiny_config(data, steps=3, export=False, executable=path, batch_size=16)
    with pytest.raises(InputValueError, match="was compiled for other arguments.*first that differs"):
        dit_trainer.train(config, str(tmp_path / "run"))
    assert not os.path.exists(tmp_path / "run" / "checkpoints" / "1")


@pytest.mark.parametrize("change, message", [
    (lambda d: d["versions"].update(jax="0.0.1"), r"was compiled by jax 0\.0\.1 \(here " + jax.__version__),
    (lambda d: d["target"].update(device_kind="TPU v5", num_devices=128, topology="v5p-256"),
     r"was compiled for 128 x TPU v5 \(v5p-256\), this process has " + f"{jax.device_count()} x cpu"),
])
def test_an_executable_from_other_versions_or_devices_names_the_difference(saved, tmp_path, change, message):
    _, path, _ = saved
    data = pickle.load(open(path, "rb"))
    change(data)
    other = str(tmp_path / "other.xla")
    pickle.dump(data, open(other, "wb"))
    with pytest.raises(InputValueError, match=message):
        executables.load_executable(other)


def test_a_file_that_is_no_executable_is_one_error(tmp_path):
    bad = tmp_path / "bad.xla"
    bad.write_bytes(b"not a pickle")
    with pytest.raises(InputValueError, match="not an executable saved by `aot --save`"):
        executables.load_executable(str(bad))
    with pytest.raises(InputValueError, match="does not exist"):
        executables.load_executable(str(tmp_path / "missing.xla"))


# ------------------------------------------------------------------------------- the sampler (`sample --executable`)
@pytest.fixture(scope="module")
def saved_sampler(tmp_path_factory):
    """A tiny pipeline and the sampling loop aot's `sample` builder makes for its config (one CPU device, 32 px,
    CFG, the 64-token prompt bucket), compiled and saved."""
    import ml_collections

    from qwenimage_jax import aot
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline
    from qwenimage_jax.testing.pipeline import build_reference_pipeline

    root = tmp_path_factory.mktemp("sampler")
    _, path, _ = build_reference_pipeline(str(root), with_text_encoder=True)
    model = {k: v for k, v in QwenImagePipeline.from_pretrained(path).transformer.config.items()
             if not k.startswith("_")}
    config = ml_collections.ConfigDict(dict(model=model, dtype="float32", param_dtype="float32", attention="xla",
                                            remat="none", quantize="none", mesh=dict(data=1, fsdp=1, tensor=1)))
    program = aot.build(config, jax.devices()[:1], "sample", resolution=32, steps=2, cfg_scale=3.0,
                        prompt_tokens=64)
    exe = str(root / "sampler.xla")
    assert "1 x cpu" in aot.save_program(program, exe)
    return path, exe


def _sample(pipe, **kw):
    args = dict(prompt="a red fox", negative_prompt=" ", true_cfg_scale=3.0, num_inference_steps=2, height=32,
                width=32, seed=3, output_type="latent", progress=False)
    return np.asarray(pipe(**{**args, **kw}).images)


def test_a_saved_sampler_samples_what_the_compiled_one_does(saved_sampler):
    """aot's sampler program is the pipeline's own call (bucketed prompt, mask, RoPE shift, CFG): loaded, it gives
    the jitted loop's latents, for any seed and step count that fit its sigma bucket, without tracing."""
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    path, exe = saved_sampler
    pipe = QwenImagePipeline.from_pretrained(path)
    expected = {seed: _sample(pipe, seed=seed) for seed in (3, 4)}
    expected["steps"] = _sample(pipe, num_inference_steps=3)
    pipe.use_executable(exe)
    traces = pipe.num_traces
    for seed in (3, 4):
        np.testing.assert_allclose(_sample(pipe, seed=seed), expected[seed], rtol=0, atol=1e-6)
    np.testing.assert_allclose(_sample(pipe, num_inference_steps=3), expected["steps"], rtol=0, atol=1e-6)
    assert pipe.num_traces == traces                    # nothing was traced or compiled


def test_a_saved_sampler_refuses_another_shape_or_program(saved_sampler, tmp_path):
    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    path, exe = saved_sampler
    pipe = QwenImagePipeline.from_pretrained(path)
    pipe.use_executable(exe)
    with pytest.raises(InputValueError, match=r"compiled for other arguments.*\(1, 4, 8\).*\(1, 16, 8\)"):
        _sample(pipe, height=64, width=64)                 # another resolution: another latent shape
    with pytest.raises(InputValueError, match="compiled for other arguments"):
        _sample(pipe, true_cfg_scale=1.0, negative_prompt=None)   # CFG off: no negative branch
    data = pickle.load(open(exe, "rb"))
    data["meta"]["program"] = "train-dit"
    other = str(tmp_path / "other.xla")
    pickle.dump(data, open(other, "wb"))
    pipe.use_executable(other)
    with pytest.raises(InputValueError, match="was compiled for program train-dit, this call needs sample"):
        _sample(pipe)


def test_sample_names_a_missing_executable_before_loading_the_model(tmp_path, capsys):
    from qwenimage_jax import cli

    code = cli.main(["sample", "--model", str(tmp_path / "absent"), "--prompt", "a", "--out", str(tmp_path / "a.png"),
                     "--executable", str(tmp_path / "none.xla")])
    err = capsys.readouterr().err
    assert code == InputValueError.exit_code and "--executable" in err and "none.xla' does not exist" in err
    assert "absent" not in err
