"""Weight-only post-training quantization of the DiT and the Qwen3-VL text decoder with qwix (int8 / fp8 / int4).

    quantize_transformer(transformer, "int8")      # models.dit.Transformer, in place; returns it
    quantize_text_encoder(text_encoder, "int8")    # text.encoder.TextEncoder, in place; returns it
    qmodule, qparams = quantize_module(module, params, mode, init=..., layers=..., compute_dtype=...)

qwix does the work: `qwix.quantize_model` wraps the Linen module so that, inside its methods, every
`jax.lax.dot_general` of a module whose path matches a rule reads its kernel as a quantized `QArray` (one scale
per output channel, or per group of 128 inputs for int4) and dequantizes it into the matmul. Activations stay
in the compute dtype (weight-only), so the saving is memory: int8/fp8 kernels take half the bytes of bf16, int4
a quarter.

What is quantized: the matmul kernels inside the repeated blocks, which hold nearly all the weights (DiT: the
attention q/k/v/out and the SwiGLU projections of every block; text decoder: q/k/v/o and gate/up/down of every
layer). What stays in its dtype, and why:
  * norms, biases: tiny, and a norm scale's error multiplies every channel.
  * the DiT's img_in / txt_in / timestep MLP / shared modulation / norm_out / proj_out: together about 2% of the
    release DiT. The modulation sets the scale and gate of every block at once, and proj_out writes the velocity
    itself; quantizing them costs quality everywhere for a little memory.
  * token embeddings and lm_head (a gather and the vocabulary logits, which only prompt expansion reads) and the
    vision tower (run once per condition image): outside the layers that are run for every token.
  * the VAE is not touched.

Scanned layers: both stacks are `nn.scan`s. qwix intercepts inside the scan body without help (the module path
is `blocks/attn/to_q` as for any submodule), and `module.init` under the quantized module yields, per kernel, a
`WithAux(QArray, how)` stacked on the layers axis. `how` describes ONE layer's kernel, so `qwix.quantize_params`
would compute scales across layers for a stacked kernel; `quantize_module` therefore vmaps qwix's own quantizer
over the layers axis of scanned kernels (named "layers" by the scan's `metadata_params`) instead.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from qwenimage_jax.errors import MissingPackageError

MODES = ("int8", "fp8", "int4")
QTYPES = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn, "int4": jnp.int4}
# int4: one scale per 128 inputs along the contraction (standard group-wise int4; the release's contractions are
# multiples of 128). A model with a contraction that 128 does not divide falls back to one scale per channel.
INT4_TILE = 128

# The kernels that are quantized (module paths, qwix rule regexes): see the module docstring for what is not.
DIT_LAYERS = r"blocks/(attn/(to_q|to_k|to_v|to_out)|mlp/(gate_layer|proj|out))"
TEXT_LAYERS = r"language_model/layers/(self_attn/(q_proj|k_proj|v_proj|o_proj)|mlp/(gate_proj|up_proj|down_proj))"


def check_mode(mode: str | None) -> str | None:
    """None / "none" -> None; a mode in MODES -> itself; anything else is a ValueError naming the choices."""
    if mode is None or mode == "none":
        return None
    if mode not in MODES:
        raise ValueError(f"quantize={mode!r}; choose one of none, {', '.join(MODES)}")
    return mode


def _qwix():
    try:
        import qwix
    except ImportError:
        raise MissingPackageError("quantization needs qwix: pip install 'qwenimage-jax[quant]' (qwix==0.1.8)") \
            from None
    return qwix


def _provider(mode: str, layers: str, tile: int | None):
    qwix = _qwix()
    # op_names: only the kernels' dot_general; the attention einsums of a matched module (none today) stay float.
    rule = qwix.QtRule(module_path=layers, op_names=("dot_general",), weight_qtype=QTYPES[mode], tile_size=tile)
    return qwix.PtqProvider([rule])


def _is_scanned(aux) -> bool:
    """A kernel stacked by nn.scan: its box names start with the scan's partition name ("layers")."""
    names = getattr(aux.array.qvalue, "names", None) or ()
    return len(names) > 0 and names[0] == "layers"


def quantize_module(module: nn.Module, params: Any, mode: str, *, init: Callable[[nn.Module], Any], layers: str,
                    compute_dtype: Any, methods: Sequence[str] = ("__call__",), mesh=None):
    """(Linen module, float params) -> (quantized module, quantized params) for `mode` in MODES.

    init(module) -> params: a traced init of `module` (run under `jax.eval_shape`, nothing is allocated); it only
        has to reach the layers to quantize. layers: regex of the module paths whose kernels are quantized.
    compute_dtype: the scales' dtype, so a kernel dequantizes straight into the matmul's dtype.
    methods: the module's entry points (`apply(..., method="step")` must name one of them by string).
    Params outside `layers` are returned as they are (the same arrays). With `mesh`, quantized kernels are placed
    by the logical rules like the float ones (a scale is sharded like its kernel's output axes).
    """
    mode = check_mode(mode)
    if mode is None:
        return module, params
    qwix = _qwix()
    from qwix._src.core import qarray
    from qwix._src.providers.ptq import WithAux

    # int4 is group-wise where every matched contraction divides into INT4_TILE groups, else per channel
    tiles = (INT4_TILE, None) if mode == "int4" else (None,)
    for tile in tiles:
        provider = _provider(mode, layers, tile)
        try:
            abstract = jax.eval_shape(lambda: init(qwix.quantize_model(module, provider, methods=methods)))
            break
        except ValueError as err:
            if tile is None or "cannot be tiled" not in str(err):
                raise
    qmodule = qwix.quantize_model(module, provider, methods=methods)

    shardings = {}
    if mesh is not None:
        from qwenimage_jax.parallel.rules import logical_shardings

        shardings = flax.traverse_util.flatten_dict(logical_shardings(abstract, mesh),
                                                    is_leaf=lambda _, x: isinstance(x, WithAux))
    targets = flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: isinstance(x, WithAux))
    flat = flax.traverse_util.flatten_dict(params)
    out = {}
    for path, value in flat.items():
        aux = targets.get(path)
        if not isinstance(aux, WithAux):
            out[path] = value
            continue
        quant = functools.partial(qarray.quantize, how=aux.how)
        if _is_scanned(aux):
            quant = jax.vmap(quant)  # `how` describes one layer: scales per layer, never across layers

        def quantize_leaf(x, quant=quant):
            return quant(x).astype(compute_dtype)  # QArray.astype casts the scale (the dequantized dtype)

        sharding = shardings.get(path)
        out[path] = WithAux(jax.jit(quantize_leaf, out_shardings=None if sharding is None else sharding.array)(value),
                            aux.how)
    unmatched = [p for p, a in targets.items() if isinstance(a, WithAux) and p not in flat]
    if unmatched:
        raise ValueError(f"quantization expected kernels the params do not hold: {unmatched[:3]}")
    return qmodule, flax.traverse_util.unflatten_dict(out)


def param_bytes(params: Any) -> dict[str, int]:
    """{"quantized": bytes of the quantized kernels (values at their bit width + scales), "float": the rest}.
    int4 counts half a byte per value: what the kernels take where XLA packs them (TPU, GPU)."""
    from qwix._src.providers.ptq import WithAux

    totals = {"quantized": 0, "float": 0}
    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, WithAux)):
        key = "quantized" if isinstance(leaf, WithAux) else "float"
        totals[key] += sum(x.size * jax.dtypes.itemsize_bits(x.dtype) // 8 for x in jax.tree.leaves(leaf))
    return totals


def is_quantized(params: Any) -> bool:
    """Whether the tree holds a quantized kernel (False without qwix installed: nothing can be quantized)."""
    try:
        from qwix._src.providers.ptq import WithAux
    except ImportError:
        return False
    return any(isinstance(x, WithAux) for x in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, WithAux)))


def quantize_transformer(transformer, mode: str | None):
    """Quantizes a loaded `models.dit.Transformer` in place (module and params); returns it. mode None: unchanged.
    Unfused LoRA adapters may be loaded afterwards (they run in float beside the quantized kernels)."""
    from qwenimage_jax.models.dit import _dummy_inputs, _init_module

    if check_mode(mode) is None:
        return transformer
    if is_quantized(transformer.params):
        raise ValueError("the transformer is already quantized")
    if transformer.lora is not None:
        raise ValueError("quantize the transformer before loading LoRA adapters")
    cfg = transformer.dit_config
    init_config = _init_module(cfg).config  # einsum attention, no remat: traces on any host, same params

    def init(qmodule):
        return qmodule.clone(config=init_config).init(jax.random.key(0), *_dummy_inputs(cfg))["params"]

    transformer.module, transformer.params = quantize_module(
        transformer.module, transformer.params, mode, init=init, layers=DIT_LAYERS, compute_dtype=cfg.dtype,
        mesh=transformer.mesh)
    return transformer


def quantize_text_encoder(text_encoder, mode: str | None):
    """Quantizes a loaded `text.encoder.TextEncoder`'s decoder layers in place; returns it. mode None: unchanged."""
    from qwenimage_jax.models.qwen3_vl.model import abstract_params

    if check_mode(mode) is None:
        return text_encoder
    if is_quantized(text_encoder.params):
        raise ValueError("the text encoder is already quantized")
    # "step" is the generation entry point (prompt expansion); embed_inputs touches no quantized kernel
    text_encoder.module, text_encoder.params = quantize_module(
        text_encoder.module, text_encoder.params, mode, init=lambda qm: abstract_params(qm, text_encoder.config),
        layers=TEXT_LAYERS, compute_dtype=text_encoder.module.dtype, methods=("__call__", "step"),
        mesh=text_encoder.mesh)
    return text_encoder
