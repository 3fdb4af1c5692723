"""Our params -> the reference's own directory format (what diffusers / transformers `from_pretrained` read).

Every exporter inverts the component's key plan with `params.iter_export_tensors`; none writes the inverse again.

    export_transformer(params, dit_config, dst, dtype="float32", max_shard_bytes=5 GiB) -> dst
        dst/config.json + diffusion_pytorch_model.safetensors (or numbered shards + .index.json); no torch needed
        (the DiT plan carries its reference shapes); one leaf at a time, at most one shard in host memory.
    export_vae(params, vae_config, dst, seed=0) -> dst
        a diffusers AutoencoderKLQwenImage21 directory; the reference model (torch) gives the shapes and the
        video-only temporal convs our image port does not have (they keep its seeded init).
    export_text_encoder(params, hf_config, dst, tokenizer_dir=None, seed=0) -> dst
        a transformers Qwen3VLForConditionalGeneration directory with our text weights (the vision tower keeps
        torch's seeded init) and the tokenizer files beside them.

Multi-host: call on a process whose devices can read every shard of `params` (leaves are `jax.device_get`).
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, Optional

import ml_dtypes
import numpy as np

from qwenimage_jax.checkpoints.params import iter_export_tensors
from qwenimage_jax.checkpoints.safetensors_io import write_safetensors, write_weights

SAFETENSORS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = SAFETENSORS_NAME + ".index.json"
_DTYPE_NAMES = {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def diffusers_version() -> str:
    """The installed diffusers' version for `_diffusers_version` fields (diffusers is optional at export time)."""
    try:
        from importlib.metadata import version
        return version("diffusers")
    except Exception:  # noqa: BLE001
        return "0.42.1"


def _np_dtype(dtype: Any):
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"dtype={dtype!r}; use one of {sorted(_DTYPE_NAMES)} or None")
        dtype = _DTYPE_NAMES[dtype]
    return None if dtype is None else np.dtype(dtype)


def _check_leaves(params: Mapping, plan: Mapping, what: str) -> None:
    """The params must be exactly the plan's leaves: an extra leaf would silently not be exported."""
    from qwenimage_jax.checkpoints.params import _flatten, unbox_abstract

    flat = _flatten(unbox_abstract(params))
    missing, extra = sorted(set(plan) - set(flat)), sorted(set(flat) - set(plan))
    if missing or extra:
        raise ValueError(f"params do not match the {what} layout: "
                         + (f"missing {['/'.join(p) for p in missing]} " if missing else "")
                         + (f"unexpected {['/'.join(p) for p in extra]}" if extra else ""))


# ---------------------------------------------------------------------------------------------------- transformer
def export_transformer(params: Mapping, config, dst: str, dtype: Any = "float32",
                       max_shard_bytes: int = 5 * 2 ** 30) -> str:
    """Writes `dst/config.json` + safetensors weights with the reference key names; returns `dst`.

    params: unboxed DiT params (any shardings). config: `DiTConfig`. dtype: "float32" | "bfloat16" | "float16"
    (or None to keep each leaf's dtype). Refuses to overwrite existing weights."""
    from qwenimage_jax.checkpoints.dit import dit_plan

    np_dtype = _np_dtype(dtype)
    plan = dit_plan(config)
    _check_leaves(params, plan, "DiT")
    write_weights(dst, iter_export_tensors(params, plan, dtype=np_dtype), SAFETENSORS_NAME[:-len(".safetensors")],
                  max_shard_bytes)
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(config.to_diffusers(), f, indent=2)
    return dst


# ------------------------------------------------------------------------------------------------------------ VAE
def export_vae(params: Mapping, config, dst: str, seed: int = 0) -> str:
    """Writes a diffusers `AutoencoderKLQwenImage21` directory (fp32); returns `dst`. config: `VAEConfig` or its
    diffusers dict (its latents_mean / latents_std are written as given)."""
    import torch
    from diffusers import AutoencoderKLQwenImage21

    from qwenimage_jax.checkpoints.vae import vae_plan
    from qwenimage_jax.models.vae import VAEConfig

    cfg = config if isinstance(config, VAEConfig) else VAEConfig.from_diffusers(dict(config))
    raw = cfg.to_diffusers()
    raw.pop("mid_attention", None)  # ours only: diffusers' constructor does not take it
    torch.manual_seed(seed)
    reference = AutoencoderKLQwenImage21(**{k: v for k, v in raw.items() if not k.startswith("_")})
    state = reference.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    tensors = dict(iter_export_tensors(params, vae_plan(cfg), shapes))
    # Temporal down/up-sampling convs act only on videos (T > 1); our image port has none, so they keep the
    # reference's seeded init (they never touch a single-frame image). Anything else missing is an error.
    extra = sorted(set(shapes) - set(tensors))
    unexpected = [k for k in extra if ".time_conv." not in k]
    if unexpected:
        raise KeyError(f"diffusers VAE keys the export does not fill: {unexpected[:8]}")
    tensors.update({k: state[k].detach().numpy() for k in extra})
    os.makedirs(dst, exist_ok=True)
    write_safetensors(os.path.join(dst, SAFETENSORS_NAME),
                      [(k, np.ascontiguousarray(v, np.float32)) for k, v in sorted(tensors.items())])
    raw["_diffusers_version"] = diffusers_version()
    with open(os.path.join(dst, "config.json"), "w", encoding="utf-8") as f:
        json.dump(raw, f, indent=2)
    return dst


# --------------------------------------------------------------------------------------------------- text encoder
def export_text_encoder(params: Mapping, config: Mapping, dst: str, tokenizer_dir: Optional[str] = None,
                        seed: int = 0) -> str:
    """Writes a transformers `Qwen3VLForConditionalGeneration` directory with our text weights; returns `dst`.

    params: a `Qwen3VL` params tree (its "language_model" subtree is exported). config: the transformers config
    dict. tokenizer_dir: its files are copied beside the weights."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    from qwenimage_jax.checkpoints.qwen3_vl_text import text_plan
    from qwenimage_jax.models.qwen3_vl.config import text_config_from_hf

    torch.manual_seed(seed)
    cfg = dict(config)
    reference = Qwen3VLForConditionalGeneration(Qwen3VLConfig(**{k: v for k, v in cfg.items()
                                                                 if k not in ("model_type", "architectures")}))
    state = reference.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    tensors = dict(iter_export_tensors(params["language_model"], text_plan(text_config_from_hf(cfg)), shapes))
    missing = [k for k in tensors if k not in state]
    if missing:
        raise KeyError(f"exported keys not in the reference model: {missing[:5]}")
    with torch.no_grad():
        for key, value in tensors.items():
            state[key].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    os.makedirs(dst, exist_ok=True)
    reference.save_pretrained(dst, safe_serialization=True)
    if tokenizer_dir is not None:
        for name in os.listdir(tokenizer_dir):
            shutil.copy(os.path.join(tokenizer_dir, name), os.path.join(dst, name))
    return dst
