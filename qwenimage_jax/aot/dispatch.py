"""Which program a config describes, and `build`: the Program of that kind on a mesh from config.mesh."""
from __future__ import annotations

from qwenimage_jax.aot.inference import build_encode_prompt, build_sample
from qwenimage_jax.aot.program import Program
from qwenimage_jax.aot.trainers import build_distill, build_train_dit, build_train_lora, build_train_vae

PROGRAMS = ("train-dit", "train-lora", "distill", "train-vae", "sample", "encode-prompt")


def program_kind(config) -> str:
    """Which program a config describes: distill (dmd + teacher), train-vae (vae + losses), train-dit
    (model + optimizer), encode-prompt (text_config), sample (a DiT model shape without an optimizer)."""
    if "dmd" in config and "teacher" in config:
        return "distill"
    if "lora" in config and "base" in config:
        return "train-lora"
    if "vae" in config and "losses" in config:
        return "train-vae"
    if "text_config" in config:
        return "encode-prompt"
    if "model" in config and "optimizer" in config:
        return "train-dit"
    if "model" in config:
        return "sample"
    raise ValueError("cannot tell which program this config describes (expected a train-dit, distill, train-vae, "
                     "DiT model or text-encoder config); pass --program")


def build(config, devices, kind: str | None = None, *, resolution: int | None = None, steps: int = 40,
          cfg_scale: float = 1.0, batch: int | None = None, prompt_tokens: int | None = None) -> Program:
    """The Program of `kind` (default: from the config) on a mesh from config.mesh over `devices`."""
    from qwenimage_jax.parallel.mesh import mesh_from_config

    kind = kind or program_kind(config)
    if kind not in PROGRAMS:
        raise ValueError(f"unknown program {kind!r}; choose one of {PROGRAMS}")
    if kind == "train-vae":
        return build_train_vae(config, devices, resolution)
    mesh = mesh_from_config(config.mesh, devices)
    if kind == "train-dit":
        return build_train_dit(config, mesh, resolution or 1024)
    if kind == "distill":
        return build_distill(config, mesh, resolution or 1024)
    if kind == "train-lora":
        return build_train_lora(config, mesh, resolution or 1024)
    if kind == "sample":
        return build_sample(config, mesh, resolution or 1024, steps, cfg_scale, batch, prompt_tokens or 128)
    return build_encode_prompt(config, mesh, batch, prompt_tokens)
