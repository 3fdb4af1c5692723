"""AOT builders of the inference programs: the pipeline's jitted sampling loop (`sample`) and the Qwen3-VL prompt
encoding (`encode-prompt`), with abstract bf16 weights."""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from qwenimage_jax.aot.flops import dit_forward_flops
from qwenimage_jax.aot.program import Program, _abstract, _mesh_context, _MeshCall, _params, argument_bytes

def build_sample(config, mesh, resolution: int = 1024, steps: int = 40, cfg_scale: float = 1.0,
                 batch: int | None = None, prompt_tokens: int = 128) -> Program:
    """The pipeline's jitted sampling loop (`QwenImagePipeline._denoise_jit`): step 0 extracts the text K/V prefix,
    the other steps run cached on the target tokens; CFG as one doubled batch. Abstract bf16 weights."""
    from qwenimage_jax.models.dit import DiT, DiTConfig, Transformer, abstract_params, param_shardings
    from qwenimage_jax.models.vae import VAE, QwenImageVAE, VAEConfig
    from qwenimage_jax.sampling import pipeline as pl
    from qwenimage_jax.sampling import scheduler as sched
    from qwenimage_jax.training.state import abstract_state

    dtype = jnp.dtype(config.get("dtype", "bfloat16"))
    cfg = DiTConfig.from_diffusers(dict(config.model), dtype=dtype,
                                   param_dtype=jnp.dtype(config.get("param_dtype", "bfloat16")),
                                   attention=config.get("attention", "xla"), remat=config.get("remat", "none"))
    from qwenimage_jax.checkpoints import quantize as quant

    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = int(batch or n_batch)
    mode = quant.check_mode(config.get("quantize", "none"))
    module = DiT(cfg)
    with _mesh_context(mesh):
        params = abstract_state(abstract_params(cfg), param_shardings(cfg, mesh))
        if mode is not None:  # weight-only quantized block kernels, placed as the loader places them
            quantizer = quant.transformer_quantizer(module, mode, mesh)
            module, params = quantizer[0], quant.abstract_quantized(quantizer, params, cfg.dtype)
    # the loop never touches the VAE; the pipeline only reads its latent width
    vae_cfg = VAEConfig(z_dim=cfg.in_channels, latents_mean=(0.0,) * cfg.in_channels,
                        latents_std=(1.0,) * cfg.in_channels)
    vae = VAE(QwenImageVAE(vae_cfg), None, {"z_dim": cfg.in_channels, "in_channels": 3})
    transformer = Transformer(DiT(cfg), params, cfg.to_diffusers(), mesh=mesh)
    transformer.module = module
    pipe = pl.QwenImagePipeline(transformer, vae, mesh=mesh)
    h = w = resolution // 16
    n_target = h * w
    _, timesteps = sched.flow_match_sigmas(steps, n_target, pipe.scheduler_config)
    n_steps = len(timesteps)
    bucket = -(-(n_steps + 1) // pl.SIGMA_BUCKET) * pl.SIGMA_BUCKET
    do_cfg = cfg_scale > 1
    layout = pl._layout_mask(np.zeros((1, prompt_tokens), bool), n_target)
    spec = pl.SamplerSpec(((1, h, w),), layout, layout if do_cfg else None, "batched" if do_cfg else "none", False)
    bs = NamedSharding(mesh, P(("data", "fsdp")))
    rep = NamedSharding(mesh, P())
    # as the pipeline calls it with prompt-length buckets (its default): states padded to the bucket, their
    # (B, L) int32 mask and each row's padding shift (B,) int32, for the negative branch too under CFG
    text = _abstract((batch, prompt_tokens, cfg.context_in_dim), dtype, bs)
    mask = _abstract((batch, prompt_tokens), jnp.int32, bs)
    shift = _abstract((batch,), jnp.int32, bs)
    args = ({"params": params}, _abstract((batch, n_target, cfg.in_channels), dtype, bs), None, text, mask,
            text if do_cfg else None, mask if do_cfg else None, _abstract((bucket,), jnp.float32, rep),
            _abstract((bucket,), jnp.float32, rep), _abstract((), jnp.int32, rep), _abstract((), jnp.float32, rep),
            shift, shift if do_cfg else None)
    branches = 2 if do_cfg else 1
    seq = n_target + prompt_tokens
    per_image = branches * (dit_forward_flops(cfg, seq, seq, prompt_tokens)
                            + (n_steps - 1) * dit_forward_flops(cfg, n_target, seq, 0))
    return Program("sample", f"sampler {resolution}², {n_steps} steps, CFG {'on (batched)' if do_cfg else 'off'}, "
                   f"KV prefix of {prompt_tokens} text tokens, batch {batch}, DiT {_params(params)} params "
                   f"{jnp.dtype(cfg.param_dtype).name}{f' with {mode} block kernels' if mode else ''}, "
                   f"attention {cfg.attention}",
                   _MeshCall(pipe._denoise_jit, mesh), args, {"spec": spec}, mesh, batch * per_image,
                   "analytic: 1 full forward + (steps - 1) cached target-token forwards per branch",
                   argument_bytes(args), ("shard the DiT weights: --config.mesh.fsdp=N (or tensor=N)",
                                          "a smaller batch per chip"), unit="sampling call")


def build_encode_prompt(config, mesh, batch: int | None = None, prompt_tokens: int | None = None) -> Program:
    """Qwen3-VL prompt encoding (`TextEncoder._forward`, last-layer pre-norm states, no logits)."""
    from qwenimage_jax.models.qwen3_vl.model import abstract_params, build_module
    from qwenimage_jax.text.encoder import TextEncoder
    from qwenimage_jax.parallel.rules import logical_shardings
    from qwenimage_jax.training.state import abstract_state

    from qwenimage_jax.checkpoints import quantize as quant

    dtype = jnp.dtype(config.get("dtype", "bfloat16"))
    hf_config = {"text_config": dict(config.text_config)}
    module = build_module(hf_config, dtype, with_vision=False)
    boxed = abstract_params(module, hf_config)
    mode = quant.check_mode(config.get("quantize", "none"))
    with _mesh_context(mesh):
        params = abstract_state(boxed, logical_shardings(boxed, mesh))
        if mode is not None:
            quantizer = quant.text_encoder_quantizer(module, hf_config, mode, mesh)
            module, params = quantizer[0], quant.abstract_quantized(quantizer, params, dtype)
    encoder = TextEncoder(module, params, hf_config, mesh)
    n_batch = mesh.shape["data"] * mesh.shape["fsdp"]
    batch = int(batch or config.get("batch_size", 0) or n_batch)
    length = int(prompt_tokens or config.get("prompt_tokens", 256))
    bs = NamedSharding(mesh, P(("data", "fsdp")))
    ids = _abstract((batch, length), jnp.int32, bs)
    pos = _abstract((3, batch, length), jnp.int32, NamedSharding(mesh, P(None, ("data", "fsdp"))))
    args = (params, ids, ids, pos, None, None, False)
    t = module.text_config
    q_dim, kv_dim = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    per_token = t.num_hidden_layers * (2 * t.hidden_size * (2 * q_dim + 2 * kv_dim)
                                       + 6 * t.hidden_size * t.intermediate_size + 4 * length * q_dim)
    return Program("encode-prompt", f"Qwen3-VL text encoder {_params(params)} params {dtype.name}"
                   f"{f' with {mode} decoder kernels' if mode else ''}, {length} tokens, batch {batch}", _MeshCall(encoder._forward, mesh), args, {}, mesh,
                   float(batch * length * per_token),
                   "analytic: projections + SwiGLU + full-square attention, no lm_head",
                   argument_bytes(args), ("shard the weights: --config.mesh.fsdp=N or tensor=N",), unit="call")
