"""LoRA parity with diffusers + peft (fp32): random adapters made with peft on the tiny reference transformer and
saved by diffusers' `save_lora_weights` (and by peft's `save_pretrained`), loaded by both pipelines; the
denoised latents must agree unfused, fused, with two adapters and their weights, and after unfuse / unload."""
import os

import numpy as np
import pytest
import torch

from tests.conftest import max_rel_err
from qwenimage_jax.testing.pipeline import TEXT_HIDDEN, build_reference_pipeline, reference_noise

HEIGHT, WIDTH = 64, 64
STEPS = 3
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
ALL_LINEARS = ATTN + ["img_mlp.proj", "img_mlp.gate_layer", "img_mlp.out", "modulation.1", "txt_in.in_layer",
                      "txt_in.out_layer", "img_in", "proj_out", "norm_out.linear",
                      "time_text_embed.timestep_embedder.linear_1"]


def _make_adapter(transformer, name, target_modules, rank, alpha, seed, directory, peft_format=False, gain=3.0):
    """A peft adapter with random A and B (init_lora_weights=False, then scaled so it visibly moves the
    output), saved the way diffusers (or peft) saves it; removed from `transformer` again."""
    from diffusers import QwenImage21Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_modules, init_lora_weights=False)
    torch.manual_seed(seed)
    transformer.add_adapter(config, adapter_name=name)
    state = get_peft_model_state_dict(transformer, adapter_name=name)
    state = {k: v * gain for k, v in state.items()}
    transformer.delete_adapters(name)
    os.makedirs(directory, exist_ok=True)
    if peft_format:
        import json

        from safetensors.torch import save_file

        save_file({f"base_model.model.{k}": v.contiguous() for k, v in state.items()},
                  os.path.join(directory, "adapter_model.safetensors"))
        with open(os.path.join(directory, "adapter_config.json"), "w") as f:
            json.dump({"r": rank, "lora_alpha": alpha, "target_modules": target_modules, "peft_type": "LORA"}, f)
    else:
        meta = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.to_dict().items()}
        QwenImage21Pipeline.save_lora_weights(directory, transformer_lora_layers=state,
                                              transformer_lora_adapter_metadata=meta)
    return directory


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    import jax.numpy as jnp

    from qwenimage_jax.sampling.pipeline import QwenImagePipeline

    root = tmp_path_factory.mktemp("lora")
    ref, path, _ = build_reference_pipeline(str(root / "ref"), with_text_encoder=False)
    adapters = {
        "attn": _make_adapter(ref.transformer, "attn", ATTN, 4, 8, 1, str(root / "attn")),
        "all": _make_adapter(ref.transformer, "all", ALL_LINEARS, 2, 3, 2, str(root / "all"), gain=1.0),
        "peft": _make_adapter(ref.transformer, "peft", ["to_v", "img_mlp.out"], 3, 6, 3, str(root / "peft"),
                              peft_format=True),
    }
    ours = QwenImagePipeline.from_pretrained(path, dtype=jnp.float32, load_text_encoder=False)
    return ref, ours, adapters


def _embeds(batch=1, length=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((batch, length, TEXT_HIDDEN), generator=gen), torch.ones((batch, length), dtype=torch.long)


def _latents(pipe, reference: bool, cfg: bool = False):
    embeds, mask = _embeds()
    noise = reference_noise(1, HEIGHT, WIDTH, seed=5)
    kwargs = dict(prompt_embeds=embeds, prompt_embeds_mask=mask, num_inference_steps=STEPS, height=HEIGHT,
                  width=WIDTH, output_type="latent")
    if cfg:
        neg, neg_mask = _embeds(seed=1)
        kwargs.update(negative_prompt_embeds=neg, negative_prompt_embeds_mask=neg_mask, true_cfg_scale=3.0)
    if reference:
        with torch.no_grad():
            return pipe(latents=noise.clone(), **kwargs).images.numpy()
    kwargs = {k: (v.numpy() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    return np.asarray(pipe(latents=noise.numpy(), progress=False, **kwargs).images)


def _clear(ref, ours):
    ref.unload_lora_weights()
    ours.unload_lora_weights()


def test_one_adapter_unfused_matches_diffusers(setup):
    ref, ours, adapters = setup
    base = _latents(ours, reference=False)
    try:
        ref.load_lora_weights(adapters["attn"], adapter_name="attn")
        ours.load_lora_weights(adapters["attn"], adapter_name="attn")
        expected, got = _latents(ref, True, cfg=True), _latents(ours, False, cfg=True)
        assert max_rel_err(got, expected) <= 1e-4
        assert max_rel_err(_latents(ours, False), base) > 1e-2  # the adapter changes the result
    finally:
        _clear(ref, ours)
    assert max_rel_err(_latents(ours, False), base) <= 1e-6  # unloading restores the base model


def test_every_linear_two_adapters_weights_and_fusing(setup):
    ref, ours, adapters = setup
    try:
        for pipe in (ref, ours):
            pipe.load_lora_weights(adapters["attn"], adapter_name="attn")
            pipe.load_lora_weights(adapters["all"], adapter_name="all")
        assert ours.get_active_adapters() == ref.get_active_adapters() == ["all"]  # loading activates the new one
        expected, got = _latents(ref, True), _latents(ours, False)
        assert max_rel_err(got, expected) <= 1e-4

        traces = ours.num_traces
        for pipe in (ref, ours):
            pipe.set_adapters(["attn", "all"], adapter_weights=[0.5, 1.5])
        expected, got = _latents(ref, True), _latents(ours, False)
        assert max_rel_err(got, expected) <= 1e-4
        for pipe in (ref, ours):
            pipe.set_adapters("all", adapter_weights=0.7)     # "attn" off
        expected, got = _latents(ref, True), _latents(ours, False)
        assert max_rel_err(got, expected) <= 1e-4
        assert ours.num_traces == traces, "changing adapter weights recompiled the sampler"

        for pipe in (ref, ours):
            pipe.set_adapters(["attn", "all"], adapter_weights=[0.5, 1.5])
            pipe.fuse_lora(lora_scale=0.8)
        assert ours.transformer.lora is None  # fused adapters leave the unfused branch
        expected, got = _latents(ref, True), _latents(ours, False)
        assert max_rel_err(got, expected) <= 1e-4
        for pipe in (ref, ours):
            pipe.unfuse_lora()
        expected, got = _latents(ref, True), _latents(ours, False)
        assert max_rel_err(got, expected) <= 1e-4
    finally:
        _clear(ref, ours)


def test_peft_directory_and_scale_argument(setup):
    """A peft `save_pretrained` directory (prefixed keys + adapter_config.json with alpha 6 / r 3), applied by
    peft itself on the reference side."""
    from peft import LoraConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    ref, ours, adapters = setup
    state = {k.removeprefix("base_model.model."): v
             for k, v in load_file(os.path.join(adapters["peft"], "adapter_model.safetensors")).items()}
    ref.transformer.add_adapter(LoraConfig(r=3, lora_alpha=6, target_modules=["to_v", "img_mlp.out"]),
                                adapter_name="p")
    set_peft_model_state_dict(ref.transformer, state, adapter_name="p")
    ref.transformer.set_adapters(["p"], weights=[0.6])
    try:
        ours.load_lora_weights(adapters["peft"], adapter_name="p", scale=0.6)
        expected, got = _latents(ref, True), _latents(ours, False)
        assert max_rel_err(got, expected) <= 1e-4
    finally:
        ref.transformer.delete_adapters("p")
        ours.unload_lora_weights()


def test_a_kohya_file_matches_diffusers_loading_the_same_file(setup, tmp_path):
    """A kohya-format file (flattened `lora_unet_*` names, lora_down / lora_up, a per-module `.alpha` of 6 with rank
    4, so the scale differs from the diffusers-format adapter's 8 / 4) loaded by diffusers' own
    `load_lora_weights` (its kohya converter) is the expected value; ours loads the same file."""
    from safetensors.numpy import load_file, save_file

    ref, ours, adapters = setup
    state = load_file(os.path.join(adapters["attn"], "pytorch_lora_weights.safetensors"))
    kohya = {}
    for key, value in state.items():
        module, kind = key.removeprefix("transformer.").rsplit(".lora_", 1)
        flat = "lora_unet_" + module.replace(".", "_")
        kohya[f"{flat}.lora_{'down' if kind.startswith('A') else 'up'}.weight"] = value
        kohya[f"{flat}.alpha"] = np.asarray(6.0, np.float32)
    path = str(tmp_path / "kohya.safetensors")
    save_file(kohya, path)
    base = _latents(ours, False)
    try:
        ref.load_lora_weights(path, adapter_name="kohya")
        ours.load_lora_weights(path, adapter_name="kohya")
        expected, got = _latents(ref, True), _latents(ours, False)
        assert max_rel_err(got, expected) <= 1e-4
        assert max_rel_err(got, base) > 1e-2  # the adapter is applied at all
    finally:
        _clear(ref, ours)


def test_unknown_and_mismatched_keys_are_one_error(setup, tmp_path):
    from safetensors.numpy import save_file

    from qwenimage_jax.checkpoints.lora import LoraKeyError

    _, ours, _ = setup
    bad = {"transformer.transformer_blocks.9.attn.to_q.lora_A.weight": np.zeros((2, 32), np.float32),
           "transformer.transformer_blocks.9.attn.to_q.lora_B.weight": np.zeros((32, 2), np.float32),
           "transformer.not_a_layer.lora_A.weight": np.zeros((2, 32), np.float32)}
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(LoraKeyError, match=r"2 key\(s\).*3 key|not LoRA factors") as err:
        ours.load_lora_weights(str(tmp_path / "bad.safetensors"))
    assert "not_a_layer" in str(err.value) and "transformer_blocks.9" in str(err.value)
    wrong = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": np.zeros((2, 48), np.float32),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": np.zeros((32, 2), np.float32)}
    save_file(wrong, str(tmp_path / "wrong.safetensors"))
    with pytest.raises(LoraKeyError, match="another model size|maps"):
        ours.load_lora_weights(str(tmp_path / "wrong.safetensors"))
    assert ours.transformer.lora is None and not ours.get_list_adapters()
    with pytest.raises(ValueError, match="no adapter named"):
        ours.set_adapters("missing")
