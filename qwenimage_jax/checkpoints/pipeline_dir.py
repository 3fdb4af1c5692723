"""Pipeline directories: the one writer of `model_index.json` (+ `scheduler/`), and a pipeline dir from our DiT.

    write_pipeline_index(dst, sample_sigmas=None, scheduler_config=None, text_pad_tokens=None) -> dst
        model_index.json listing the components present in dst (absent ones as [null, null]) with
        `sample_sigmas` (like the Turbo release), and scheduler/scheduler_config.json unless dst has a scheduler/.
    write_pipeline_dir(dst, params, dit_config, sample_sigmas=None, components=None, scheduler_config=None)
        A `QwenImage21Pipeline` directory: transformer/ exported from params, the other components copied (or
        symlinked) from existing directories, then `write_pipeline_index`.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable, Mapping

from qwenimage_jax.checkpoints.exporters import diffusers_version, export_transformer

# The values of Qwen/Qwen-Image-2.1's (and 1.0's) scheduler/scheduler_config.json that the sampler uses, defined
# once here (sampling/scheduler.py imports them); the released file (REFERENCE.md 2.4) adds the class name.
QWEN_IMAGE_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
    base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    invert_sigmas=False, stochastic_sampling=False, use_karras_sigmas=False, use_exponential_sigmas=False,
    use_beta_sigmas=False)
SCHEDULER_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", **QWEN_IMAGE_SCHEDULER_CONFIG}
# model_index.json entries of the pipeline's components: (library, class).
PIPELINE_COMPONENTS = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "vae": ["diffusers", "AutoencoderKLQwenImage21"],
    "text_encoder": ["transformers", "Qwen3VLForConditionalGeneration"],
    "processor": ["transformers", "Qwen3VLProcessor"],
    "transformer": ["diffusers", "QwenImage21Transformer2DModel"],
}


def write_pipeline_index(dst: str, sample_sigmas: Iterable[float] | None = None,
                         scheduler_config: Mapping | None = None, text_pad_tokens: int | None = None) -> str:
    """model_index.json (+ scheduler/ when dst has none) for the components present in `dst`; returns `dst`.

    sample_sigmas: the pipeline's default sigma grid without the terminal 0 (diffusers applies the scheduler's mu
        shift and terminal stretch to it, exactly as to its linspace default); None = the base model's behaviour.
    scheduler_config: written to scheduler/ when dst has none (default: the released config).
    text_pad_tokens: (our key) the DiT was trained on text states right-padded to a multiple of this many tokens;
        the pipeline pads prompts the same way (the image's RoPE frame starts after the text). None: no padding.
    """
    if not os.path.isdir(os.path.join(dst, "scheduler")):
        os.makedirs(os.path.join(dst, "scheduler"))
        with open(os.path.join(dst, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
            json.dump(dict(scheduler_config or SCHEDULER_CONFIG), f, indent=2)
    index: dict[str, Any] = {"_class_name": "QwenImage21Pipeline", "_diffusers_version": diffusers_version()}
    for name, entry in PIPELINE_COMPONENTS.items():
        index[name] = list(entry) if os.path.isdir(os.path.join(dst, name)) else [None, None]
    index["sample_sigmas"] = None if sample_sigmas is None else [float(s) for s in sample_sigmas]
    if text_pad_tokens is not None:
        index["text_pad_tokens"] = int(text_pad_tokens)
    with open(os.path.join(dst, "model_index.json"), "w", encoding="utf-8") as f:
        json.dump(index, f, indent=2)
    return dst


def write_pipeline_dir(dst: str, params: Mapping, config, sample_sigmas: Iterable[float] | None = None,
                       components: Mapping[str, str] | None = None, scheduler_config: Mapping | None = None,
                       dtype: Any = "float32", link: bool = False) -> str:
    """A `QwenImage21Pipeline` directory with our transformer; returns `dst`.

    components: {"vae": DIR, "text_encoder": DIR, "processor": DIR, "scheduler": DIR} copied (or symlinked with
        `link=True`) into dst; absent entries are written as null in model_index.json (pass them at load time).
    """
    components = dict(components or {})
    unknown = sorted(set(components) - set(PIPELINE_COMPONENTS) - {"transformer"})
    if unknown or "transformer" in components:
        raise ValueError(f"components {unknown or ['transformer']} not allowed; give any of "
                         f"{sorted(set(PIPELINE_COMPONENTS) - {'transformer'})} (the transformer comes from params)")
    os.makedirs(dst, exist_ok=True)
    export_transformer(params, config, os.path.join(dst, "transformer"), dtype=dtype)
    for name, src in components.items():
        target = os.path.join(dst, name)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"component {name!r}: {src!r} is not a directory")
        if link:
            os.symlink(os.path.abspath(src), target)
        else:
            shutil.copytree(src, target)
    return write_pipeline_index(dst, sample_sigmas, scheduler_config)


def read_sample_sigmas(pipeline_dir: str) -> list[float] | None:
    """`sample_sigmas` of a pipeline directory's model_index.json (None when absent or null)."""
    with open(os.path.join(pipeline_dir, "model_index.json"), encoding="utf-8") as f:
        return json.load(f).get("sample_sigmas")
