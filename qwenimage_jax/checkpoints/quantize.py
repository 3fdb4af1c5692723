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
import os
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def leaf_quantizer(module: nn.Module, mode: str, *, init: Callable[[nn.Module], Any], layers: str,
                   compute_dtype: Any, methods: Sequence[str] = ("__call__",), mesh=None):
    """-> (quantized module, quantize(path, value) -> value, {path: abstract WithAux} of the kernels it
    quantizes) for `mode`.

    `quantize` takes one float leaf by its flax path and returns its quantized `WithAux` (or the value itself for
    a leaf outside `layers`), so a loader can quantize each tensor as it is read and never hold the whole float
    model (`assemble_params(leaf_hook=...)`). See `quantize_module` for the arguments.
    """
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
    targets = {path: aux for path, aux in
               flax.traverse_util.flatten_dict(abstract, is_leaf=lambda _, x: isinstance(x, WithAux)).items()
               if isinstance(aux, WithAux)}

    programs = {}  # one jitted quantizer per (how, scanned, placement): same-shaped kernels (q/k/v) share it

    def program(aux, sharding):
        key = (repr(aux.how), _is_scanned(aux), repr(sharding))
        if key not in programs:
            quant = functools.partial(qarray.quantize, how=aux.how)
            if _is_scanned(aux):
                quant = jax.vmap(quant)  # `how` describes one layer: scales per layer, never across layers

            def quantize_leaf(x):
                return quant(x).astype(compute_dtype)  # QArray.astype casts the scale (the dequantized dtype)

            programs[key] = jax.jit(quantize_leaf, out_shardings=None if sharding is None else sharding.array)
        return programs[key]

    def quantize(path, value):
        aux = targets.get(tuple(path))
        if aux is None:
            return value
        return WithAux(program(aux, shardings.get(tuple(path)))(value), aux.how)

    quantize.shardings = {path: shardings[path].array for path in targets if path in shardings}
    return qmodule, quantize, targets


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
    return quantize_tree(leaf_quantizer(module, mode, init=init, layers=layers, compute_dtype=compute_dtype,
                                         methods=methods, mesh=mesh), params)


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


def transformer_quantizer(module, mode: str, mesh=None):
    """`leaf_quantizer` for a `models.dit.DiT` module (its DIT_LAYERS): what `load_transformer(quantize=...)`
    streams the checkpoint through."""
    from qwenimage_jax.models.dit import _dummy_inputs, _init_module, ambient_batch_parallelism

    cfg = module.config
    init_config = _init_module(cfg).config  # einsum attention, no remat: traces on any host, same params
    n_batch = ambient_batch_parallelism()   # under a trainer's mesh the batch must split over data x fsdp

    def init(qmodule):
        return qmodule.clone(config=init_config).init(jax.random.key(0), *_dummy_inputs(cfg, n_batch))["params"]

    return leaf_quantizer(module, mode, init=init, layers=DIT_LAYERS, compute_dtype=cfg.dtype, mesh=mesh)


def text_encoder_quantizer(module, hf_config, mode: str, mesh=None):
    """`leaf_quantizer` for a Qwen3-VL module (its TEXT_LAYERS; "step", prompt expansion's entry point, included)."""
    from qwenimage_jax.models.qwen3_vl.model import abstract_params

    # "step" is the generation entry point (prompt expansion); embed_inputs touches no quantized kernel
    return leaf_quantizer(module, mode, init=lambda qm: abstract_params(qm, hf_config), layers=TEXT_LAYERS,
                          compute_dtype=module.dtype, methods=("__call__", "step"), mesh=mesh)


def quantize_tree(quantizer, params):
    """(quantized module, quantized params) from a `leaf_quantizer` result and a float params tree."""
    qmodule, quantize, quantized = quantizer
    flat = flax.traverse_util.flatten_dict(params)
    unmatched = sorted(set(quantized) - set(flat))
    if unmatched:
        raise ValueError(f"quantization expected kernels the params do not hold: {unmatched[:3]}")
    return qmodule, flax.traverse_util.unflatten_dict({path: quantize(path, value) for path, value in flat.items()})


def quantize_transformer(transformer, mode: str | None):
    """Quantizes a loaded `models.dit.Transformer` in place (module and params); returns it. mode None: unchanged.
    Unfused LoRA adapters may be loaded afterwards (they run in float beside the quantized kernels).
    `load_transformer(path, quantize=mode)` does the same while reading the checkpoint (one float tensor at a time)."""
    mode = check_mode(mode)
    if mode is None:
        return transformer
    if is_quantized(transformer.params):
        raise ValueError("the transformer is already quantized")
    if transformer.lora is not None:
        raise ValueError("quantize the transformer before loading LoRA adapters")
    transformer.module, transformer.params = quantize_tree(
        transformer_quantizer(transformer.module, mode, transformer.mesh), transformer.params)
    return transformer


def quantize_text_encoder(text_encoder, mode: str | None):
    """Quantizes a loaded `text.encoder.TextEncoder`'s decoder layers in place; returns it. mode None: unchanged.
    `load_text_encoder(path, quantize=mode)` does the same while reading the checkpoint."""
    mode = check_mode(mode)
    if mode is None:
        return text_encoder
    if is_quantized(text_encoder.params):
        raise ValueError("the text encoder is already quantized")
    text_encoder.module, text_encoder.params = quantize_tree(
        text_encoder_quantizer(text_encoder.module, text_encoder.config, mode, text_encoder.mesh),
        text_encoder.params)
    return text_encoder


# ------------------------------------------------------------------------------------------ saved quantized models
SAVED_MARKER = "_qwenimage_jax_quantized"   # config.json field of a directory written by `save_quantized`
SAVED_FORMAT = 1
SAVED_FILE = "quantized.safetensors"


def saved_mode(config: dict) -> str | None:
    """The mode a `save_quantized` directory's config.json records, None for a float checkpoint."""
    marker = config.get(SAVED_MARKER)
    return marker.get("mode") if isinstance(marker, dict) else None


def check_saved(path: str, config: dict, requested: str | None) -> str:
    """The saved mode of `path`, after checking that `requested` (None: take it as saved) agrees with it and that
    this version reads its format."""
    marker = config[SAVED_MARKER]
    if marker.get("format") != SAVED_FORMAT:
        raise ValueError(f"{path}: a quantized checkpoint of format {marker.get('format')!r}; this version reads "
                         f"format {SAVED_FORMAT}: quantize the float model again")
    mode = marker.get("mode")
    if mode not in MODES:
        raise ValueError(f"{path}/config.json: {SAVED_MARKER}.mode is {mode!r}, not one of {', '.join(MODES)}")
    if requested is not None and requested != mode:
        raise ValueError(f"{path} holds {mode} weights but quantize={requested!r} was asked for; load it with "
                         f"quantize={mode!r} (or none: it loads as saved), or quantize the float model to "
                         f"{requested} instead")
    return mode


def _pack_int4(values: np.ndarray) -> np.ndarray:
    """Two's-complement int4 values -> bytes, two per byte (low nibble first), flattened."""
    flat = values.astype(np.int8).ravel()
    if flat.size % 2:
        flat = np.concatenate([flat, np.zeros(1, np.int8)])
    nibbles = (flat & 0x0F).astype(np.uint8)
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _unpack_int4(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    import ml_dtypes

    nibbles = np.stack([packed & 0x0F, packed >> 4], axis=-1).ravel()[:int(np.prod(shape))].astype(np.int8)
    return np.where(nibbles >= 8, nibbles - 16, nibbles).astype(ml_dtypes.int4).reshape(shape)


def _saved_tensors(params):
    """(key, numpy array) of every leaf: float leaves as they are, a quantized kernel as KEY/qvalue (int4 packed
    two per byte) and KEY/scale."""
    from qwix._src.providers.ptq import WithAux

    flat = flax.traverse_util.flatten_dict(params, is_leaf=lambda _, x: isinstance(x, WithAux))
    for path, leaf in flat.items():
        key = "/".join(path)
        if isinstance(leaf, WithAux):
            qvalue = np.asarray(jax.device_get(leaf.array.qvalue))
            yield key + "/qvalue", _pack_int4(qvalue) if qvalue.dtype.name == "int4" else qvalue
            yield key + "/scale", np.asarray(jax.device_get(leaf.array.scale))
        else:
            yield key, np.asarray(jax.device_get(leaf))


def save_quantized(component, dst: str, *, overwrite: bool = False) -> str:
    """Writes a quantized `Transformer` or `TextEncoder` (from `load_*(..., quantize=mode)`) to `dst`: its
    config.json (with the mode recorded) and `quantized.safetensors` holding the quantized values and scales, so
    `load_transformer(dst)` / `load_text_encoder(dst)` read it back without quantizing again (bitwise the same
    weights). Written beside `dst` and renamed into place; a `dst` that holds files needs `overwrite`."""
    import json

    from qwenimage_jax.checkpoints.safetensors_io import write_safetensors
    from qwenimage_jax.io_utils import atomic_dir

    if not is_quantized(component.params):
        raise ValueError("save_quantized writes a quantized model; load it with quantize='int8' (or fp8, int4) "
                         "first, or export the float model with checkpoints.export")
    mode = _mode_of(component.params)
    kind = "transformer" if hasattr(component, "dit_config") else "text_encoder"
    config = dict(component.config)
    config[SAVED_MARKER] = {"mode": mode, "format": SAVED_FORMAT, "component": kind}
    with atomic_dir(dst, overwrite=overwrite) as tmp:
        write_safetensors(os.path.join(tmp, SAVED_FILE), list(_saved_tensors(component.params)),
                          metadata={"quantized": mode})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
    return dst


def _mode_of(params) -> str:
    from qwix._src.providers.ptq import WithAux

    for leaf in jax.tree.leaves(params, is_leaf=lambda x: isinstance(x, WithAux)):
        if isinstance(leaf, WithAux):
            name = jnp.dtype(leaf.array.qvalue.dtype).name
            return {"int8": "int8", "float8_e4m3fn": "fp8", "int4": "int4"}[name]
    raise ValueError("no quantized kernel in the params")


def load_saved(path: str, quantizer, float_abstract: Any, dtype: Any, shardings: Any = None,
               scale_dtype: Any = None) -> Any:
    """The params tree of a `save_quantized` directory: float leaves cast to `dtype`, each quantized kernel
    rebuilt as qwix's `WithAux(QArray)` from its saved values and scales (`quantizer`: the `leaf_quantizer` of
    the model and mode, whose abstract kernels give the layout; scales in `scale_dtype`, the compute dtype, default
    `dtype`). Every key is checked against the model."""
    from qwix._src.core import qarray
    from qwix._src.providers.ptq import WithAux

    from qwenimage_jax.checkpoints.params import unbox_abstract
    from qwenimage_jax.checkpoints.safetensors_io import SafetensorsReader, WeightFileError

    _, quantize, targets = quantizer
    reader = SafetensorsReader(os.path.join(path, SAVED_FILE))
    expected = flax.traverse_util.flatten_dict(unbox_abstract(float_abstract))
    flat_shardings = flax.traverse_util.flatten_dict(shardings) if shardings is not None else {}
    wanted = set()
    for p in expected:
        key = "/".join(p)
        wanted |= {key + "/qvalue", key + "/scale"} if p in targets else {key}
    have = set(reader.keys())
    if wanted != have:
        missing, extra = sorted(wanted - have), sorted(have - wanted)
        raise WeightFileError(f"{path}/{SAVED_FILE} does not match this model: "
                              + (f"missing {missing[:5]} " if missing else "")
                              + (f"unexpected {extra[:5]}" if extra else "")
                              + "; it was saved from another config: quantize the float model again")
    out = {}
    for p, leaf in expected.items():
        key = "/".join(p)
        sharding = flat_shardings.get(p)
        if p not in targets:
            value = np.asarray(reader[key]).astype(jnp.dtype(dtype), copy=False)
            out[p] = jax.device_put(value, sharding) if sharding is not None else jax.device_put(value)
            continue
        aux = targets[p]
        layout = _layout(aux)   # QArray of ShapeDtypeStructs
        qtype = layout.qtype
        qvalue = reader[key + "/qvalue"]
        if jnp.dtype(qtype).name == "int4":
            qvalue = _unpack_int4(np.asarray(qvalue), tuple(layout.qvalue.shape))
        scale = np.asarray(reader[key + "/scale"]).astype(jnp.dtype(scale_dtype or dtype))
        if tuple(qvalue.shape) != tuple(layout.qvalue.shape) or tuple(scale.shape) != tuple(layout.scale.shape):
            raise WeightFileError(f"{path}/{SAVED_FILE}: {key} has shape {tuple(qvalue.shape)} / scale "
                                  f"{tuple(scale.shape)}, the model expects {tuple(layout.qvalue.shape)} / "
                                  f"{tuple(layout.scale.shape)}; quantize the float model again")
        array = qarray.QArray(qvalue=jnp.asarray(qvalue), scale=jnp.asarray(scale), zero_point=None, qtype=qtype)
        if p in quantize.shardings:  # placed as the quantizer places a freshly quantized kernel
            array = jax.device_put(array, quantize.shardings[p])
        out[p] = WithAux(array, aux.how)
    return flax.traverse_util.unflatten_dict(out)


def _layout(aux):
    """The QArray of ShapeDtypeStructs inside an abstract kernel, its logical-axis boxes taken off without
    `nn.meta.unbox` (which, under a mesh, would constrain the shapes' shardings)."""
    box = nn.meta.AxisMetadata
    return jax.tree.map(lambda x: x.value if isinstance(x, box) else x, aux.array, is_leaf=lambda x: isinstance(x, box))


def abstract_quantized(quantizer, abstract: Any, scale_dtype: Any) -> Any:
    """`abstract` (an unboxed ShapeDtypeStruct tree of the float params, shardings optional) with each kernel the
    quantizer covers replaced by its abstract `WithAux(QArray)` (values at the mode's dtype, scales in
    `scale_dtype`, placed as the quantizer places them): what ahead-of-time compilation of a quantized model
    takes, nothing allocated."""
    from qwix._src.providers.ptq import WithAux

    _, quantize, targets = quantizer
    flat = flax.traverse_util.flatten_dict(abstract)
    out = {}
    for path, leaf in flat.items():
        if path not in targets:
            out[path] = leaf
            continue
        layout = _layout(targets[path])
        shardings = quantize.shardings.get(path)
        qvalue_sharding = getattr(shardings, "qvalue", None)
        scale_sharding = getattr(shardings, "scale", None)
        array = layout.replace(
            qvalue=jax.ShapeDtypeStruct(layout.qvalue.shape, layout.qvalue.dtype, sharding=qvalue_sharding),
            scale=jax.ShapeDtypeStruct(layout.scale.shape, jnp.dtype(scale_dtype), sharding=scale_sharding))
        out[path] = WithAux(array, targets[path].how)
    return flax.traverse_util.unflatten_dict(out)
