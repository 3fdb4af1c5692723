"""LoRA on the pipeline: diffusers' adapter methods (`load_lora_weights`, `set_adapters`, `fuse_lora`, ...).

    pipe = QwenImagePipeline.from_pretrained("Qwen-Image-2")
    pipe.load_lora_weights("style_lora/", adapter_name="style")              # diffusers / peft / kohya files
    pipe.load_lora_weights("subject.safetensors", adapter_name="subject", scale=0.8)
    pipe.set_adapters(["style", "subject"], adapter_weights=[1.0, 0.5])    # new values, same compiled sampler
    images = pipe("a cat").images
    pipe.fuse_lora(lora_scale=1.0); pipe.unfuse_lora(); pipe.unload_lora_weights()

Unfused adapters run inside the one jitted sampler as the transformer's `lora` collection (see `models.dit.Dense`):
all loaded adapters sit side by side on the rank axis with a per-column scale, so `set_adapters`, a new `scale`,
`disable_lora` or `enable_lora` change array values only and never recompile; loading or deleting an adapter
changes shapes and compiles once more. Fusing adds `lora_scale * weight * alpha / r * B A` into the kernels and takes
the adapter out of the unfused branch; unfusing subtracts the same product, and (as in diffusers) the adapter then
keeps `lora_scale * weight` as its weight.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from qwenimage_jax.checkpoints import lora as lora_io


@dataclasses.dataclass
class _Adapter:
    factors: dict            # {dense path: {"a", "b", "scale"}} (scale = alpha / r per rank column)
    weight: float            # the user's scale (set_adapters / load_lora_weights(scale=))
    source: str
    fused_weight: float = 0.0  # weight folded into the kernels by fuse_lora (0 when not fused)


class LoraMixin:
    """Adapter methods for a pipeline with a `.transformer` (models.dit.Transformer)."""

    # ------------------------------------------------------------------------------------------- bookkeeping
    @property
    def _adapters(self) -> dict[str, _Adapter]:
        if not hasattr(self, "_lora_adapters"):
            self._lora_adapters: dict[str, _Adapter] = {}
            self._lora_active: list[str] | None = None   # None: every loaded adapter
            self._lora_enabled = True
        return self._lora_adapters

    def _kernel_shapes(self) -> dict[tuple[str, ...], tuple[int, ...]]:
        import flax

        flat = flax.traverse_util.flatten_dict(self.transformer.params)
        return {tuple(p[:-1]): tuple(v.shape) for p, v in flat.items() if p[-1] == "kernel"}

    def _check_names(self, names: Sequence[str]) -> None:
        missing = [n for n in names if n not in self._adapters]
        if missing:
            raise ValueError(f"no adapter named {missing}; loaded adapters: {list(self._adapters)}")

    def _effective_weight(self, name: str) -> float:
        adapter = self._adapters[name]
        active = self._lora_active is None or name in self._lora_active
        return adapter.weight if (self._lora_enabled and active and adapter.fused_weight == 0.0) else 0.0

    def _refresh(self, shapes_changed: bool) -> None:
        """Rebuilds the transformer's `lora` collection: every loaded, unfused adapter side by side."""
        unfused = [(a.factors, self._effective_weight(n)) for n, a in self._adapters.items() if a.fused_weight == 0]
        tree = lora_io.combine(unfused)
        if tree is None:
            self.transformer.lora = None
            return
        if not shapes_changed and self.transformer.lora is not None:
            # only the scales differ: replace those leaves, keep the placed factors
            self.transformer.lora = _replace_scales(self.transformer.lora, tree)
            return
        self.transformer.lora = self._place_lora(tree)

    def _place_lora(self, tree):
        mesh = self.transformer.mesh
        if mesh is None:
            return jax.tree.map(jnp.asarray, tree)
        return jax.tree.map(lambda x, s: jax.device_put(x, s), tree, lora_shardings(self.transformer, tree))

    # ------------------------------------------------------------------------------------------------ loading
    def load_lora_weights(self, pretrained_model_name_or_path_or_dict, adapter_name: str | None = None, *,
                          scale: float = 1.0, weight_name: str | None = None) -> str:
        """Loads an adapter (a diffusers `save_lora_weights` directory or file, a peft `save_pretrained`
        directory, a kohya/ComfyUI safetensors file, or a `{key: array}` dict) as `adapter_name` (default
        "default_N") with weight `scale`. As in diffusers, the new adapter becomes the only active one (combine
        several with `set_adapters`). Returns the adapter's name."""
        adapters = self._adapters
        name = adapter_name or f"default_{len(adapters)}"
        if name in adapters:
            raise ValueError(f"an adapter named {name!r} is already loaded; pick another adapter_name or "
                             f"delete_adapters({name!r}) first")
        torch_lora = lora_io.read_lora(pretrained_model_name_or_path_or_dict, self.transformer.dit_config,
                                       weight_name=weight_name)
        factors = lora_io.to_factors(torch_lora, self.transformer.dit_config, self._kernel_shapes())
        adapters[name] = _Adapter(factors, float(scale), torch_lora.source)
        self._lora_active = [name]
        self._refresh(shapes_changed=True)
        return name

    def set_adapters(self, adapter_names: str | Sequence[str], adapter_weights: float | Sequence[float] | None = None):
        """Makes exactly `adapter_names` active (the others contribute nothing) with `adapter_weights`."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        if adapter_weights is None:
            weights = [self._adapters[n].weight for n in names]
        elif isinstance(adapter_weights, (int, float)):
            weights = [float(adapter_weights)] * len(names)
        else:
            weights = [float(w) for w in adapter_weights]
            if len(weights) != len(names):
                raise ValueError(f"{len(names)} adapter names but {len(weights)} adapter_weights")
        for n, w in zip(names, weights):
            self._adapters[n].weight = w
        self._lora_active = names
        self._refresh(shapes_changed=False)

    def get_active_adapters(self) -> list[str]:
        self._adapters  # noqa: B018 (initialises the bookkeeping)
        if not self._lora_enabled:
            return []
        return list(self._adapters) if self._lora_active is None else list(self._lora_active)

    def get_list_adapters(self) -> dict[str, list[str]]:
        return {"transformer": list(self._adapters)} if self._adapters else {}

    def disable_lora(self) -> None:
        self._adapters  # noqa: B018 (initialises the bookkeeping)
        self._lora_enabled = False
        self._refresh(shapes_changed=False)

    def enable_lora(self) -> None:
        self._adapters  # noqa: B018
        self._lora_enabled = True
        self._refresh(shapes_changed=False)

    def delete_adapters(self, adapter_names: str | Sequence[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._check_names(names)
        for n in names:
            if self._adapters[n].fused_weight:
                raise ValueError(f"adapter {n!r} is fused into the weights; unfuse_lora() before deleting it")
            del self._adapters[n]
            if self._lora_active is not None and n in self._lora_active:
                self._lora_active.remove(n)
        self._refresh(shapes_changed=True)

    def unload_lora_weights(self) -> None:
        """Unfuses what is fused and removes every adapter: the transformer is the base model again."""
        if any(a.fused_weight for a in self._adapters.values()):
            self.unfuse_lora()
        self._adapters.clear()
        self._lora_active, self._lora_enabled = None, True
        self._refresh(shapes_changed=True)

    # ------------------------------------------------------------------------------------------------ fusing
    def fuse_lora(self, components: Sequence[str] = ("transformer",), lora_scale: float = 1.0,
                  safe_fusing: bool = False, adapter_names: Sequence[str] | None = None) -> None:
        """Adds `lora_scale * weight * alpha / r * B A` of the active (or named) adapters into the kernels."""
        if "transformer" not in components:
            return
        from qwenimage_jax.checkpoints.quantize import is_quantized

        if is_quantized(self.transformer.params):
            raise ValueError("fuse_lora needs float kernels and this transformer is quantized; run the adapters "
                             "unfused (they stay in float beside the quantized kernels)")
        names = list(adapter_names) if adapter_names is not None else self.get_active_adapters()
        self._check_names(names)
        names = [n for n in names if not self._adapters[n].fused_weight]
        params = self.transformer.params
        for n in names:
            adapter = self._adapters[n]
            w = lora_scale * adapter.weight
            params = _add_deltas(params, adapter.factors, w, check_finite=safe_fusing, name=n)
            # as in diffusers (peft scales the layer before merging), the adapter keeps weight x lora_scale
            # once unfused again
            adapter.weight = adapter.fused_weight = w
        self.transformer.params = params
        self._refresh(shapes_changed=True)

    def unfuse_lora(self, components: Sequence[str] = ("transformer",)) -> None:
        if "transformer" not in components:
            return
        params = self.transformer.params
        for adapter in self._adapters.values():
            if adapter.fused_weight:
                params = _add_deltas(params, adapter.factors, -adapter.fused_weight)
                adapter.fused_weight = 0.0
        self.transformer.params = params
        self._refresh(shapes_changed=True)


def _add_deltas(params, factors: Mapping, weight: float, check_finite: bool = False, name: str = ""):
    params = jax.tree.map(lambda x: x, params)  # shallow copy of the nesting (leaves shared)
    for path, f in factors.items():
        node = params
        for key in path:
            node = node[key]
        kernel = node["kernel"]
        delta = lora_io.kernel_delta(f, weight)
        if check_finite and not np.isfinite(delta).all():
            raise ValueError(f"adapter {name!r} gives non-finite weights at {'/'.join(path)}; not fused")
        delta = jax.device_put(delta.astype(kernel.dtype), getattr(kernel, "sharding", None))
        node["kernel"] = (kernel.astype(jnp.float32) + delta.astype(jnp.float32)).astype(kernel.dtype)
    return params


def _replace_scales(old, new):
    """Replaces the `scale` leaves of `old` by those of `new` (same structure), placed like the old ones."""
    out = {}
    for key, value in new.items():
        if isinstance(value, dict) and "scale" not in value:
            out[key] = _replace_scales(old[key], value)
        else:
            scale = value["scale"]
            sharding = getattr(old[key]["scale"], "sharding", None)
            out[key] = dict(old[key], scale=jax.device_put(jnp.asarray(scale), sharding))
    return out


def lora_shardings(transformer, tree):
    """NamedShardings for a `lora` collection: the rank axis replicated, the other axes named like the base
    kernel's (so a factor lives where the slice of the kernel it adapts lives)."""
    import flax
    import flax.linen as nn
    from jax.sharding import NamedSharding

    from qwenimage_jax.models.dit import abstract_params
    from qwenimage_jax.parallel.rules import LOGICAL_RULES

    boxed = flax.traverse_util.flatten_dict(abstract_params(transformer.dit_config))
    mesh = transformer.mesh

    def spec(names):
        return NamedSharding(mesh, nn.logical_to_mesh_axes(names, LOGICAL_RULES))

    flat = flax.traverse_util.flatten_dict(tree)
    out = {}
    for path in {p[:-1] for p in flat}:
        names = tuple(boxed[path + ("kernel",)].names)
        lead = 1 if names[0] == "layers" else 0
        n_in = flat[path + ("a",)].ndim - 1 - lead
        out[path + ("a",)] = spec(names[:lead + n_in] + ("lora_rank",))
        out[path + ("b",)] = spec(names[:lead] + ("lora_rank",) + names[lead + n_in:])
        out[path + ("scale",)] = spec(names[:lead] + ("lora_rank",))
    return flax.traverse_util.unflatten_dict(out)
