"""Compiled programs saved to a file and loaded by another process: what `qwenimage-jax aot --save FILE` writes for a
pod (compiled on a CPU host for the pod's topology) and what a trainer's `--config.executable=FILE` runs instead of
compiling its step.

    save_executable(compiled, "step.xla", topology="v5p-128")
    step = load_executable("step.xla", expect=(state, batch, key, null_text))   # checked, then callable

A serialized executable runs only where it was compiled for: the same jax/jaxlib (and libtpu) versions, the same
device kind and count. `load_executable` checks those, and (with `expect`) that the arguments it was compiled for
have the shapes and dtypes of the ones it will get, and says which differs and how to recompile, rather than
failing inside XLA.
"""
from __future__ import annotations

import contextlib
import pickle
from typing import Any

import jax

from qwenimage_jax.errors import InputValueError

FORMAT = 1


def _platform(devices=None) -> dict:
    devices = list(devices if devices is not None else jax.devices())
    return {"device_kind": devices[0].device_kind, "num_devices": len(devices), "platform": devices[0].platform}


def _versions() -> dict:
    import jaxlib

    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    try:
        import libtpu
        versions["libtpu"] = getattr(libtpu, "__version__", "unknown")
    except ImportError:
        pass
    return versions


@contextlib.contextmanager
def uncached_compiles():
    """Compiles inside the block skip the persistent compilation cache. An executable the cache handed back cannot
    be serialized whole (on CPU its payload lacks the compiled functions: "Function ... not found" when the loaded
    copy runs), so a program meant for `save_executable` is compiled fresh."""
    from jax._src import compilation_cache

    before = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    compilation_cache.reset_cache()
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", before)
        compilation_cache.reset_cache()


def save_executable(compiled, path: str, *, topology: str = "", devices=None, meta: dict | None = None) -> str:
    """Writes `compiled` (a `jax.stages.Compiled`) with its input/output trees, the versions that compiled it and
    the devices it is for (`devices`: the compile-only devices of a TPU topology; default this process's);
    returns a one-line description. `meta`: strings that say which program it is beyond its argument shapes
    (`program_meta`: the program kind and its static arguments), checked by `load_executable(meta=)`. Written under
    a temporary name and renamed. Compile it inside
    `uncached_compiles()`: one the persistent cache handed back does not serialize whole."""
    from jax.experimental import serialize_executable

    from qwenimage_jax.io_utils import atomic_path

    payload, in_tree, out_tree = serialize_executable.serialize(compiled)
    target = {**_platform(devices), "topology": topology}
    avals = [(tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(compiled.args_info)
             if hasattr(a, "shape")]
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump({"format": FORMAT, "executable": payload, "in_tree": in_tree, "out_tree": out_tree,
                     "versions": _versions(), "target": target, "arguments": avals,
                     "meta": dict(meta or {})}, f)
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    return (f"{path} ({len(payload) / 1e6:.1f} MB; {target['num_devices']} x {target['device_kind']}"
            f"{' (' + topology + ')' if topology else ''}; {versions})")


def _describe(target: dict) -> str:
    return f"{target['num_devices']} x {target['device_kind']}" + (f" ({target['topology']})"
                                                                    if target.get("topology") else "")


def program_meta(kind: str, static: dict | None = None) -> dict:
    """What a saved executable is beyond its argument shapes: the program `kind` ("sample", "train-dit", ...) and
    its static (compile-time) arguments, as text: a sampler's `SamplerSpec` (layout, CFG mode) is static, and two
    programs with the same argument shapes can differ in it."""
    return {"program": str(kind), "static": repr(sorted((static or {}).items()))}


def load_executable(path: str, expect: Any = None, backend=None, meta: dict | None = None, devices=None):
    """The callable saved by `save_executable`, after checking that it runs here: the versions that compiled it,
    the device kind and count, (given `expect`, the arguments it will be called with, arrays or
    ShapeDtypeStructs) their shapes and dtypes, and (given `meta`, from `program_meta`) the program and its static
    arguments. `devices`: those the call runs on (default: all of this process's). Each mismatch is one
    `InputValueError` naming the fix."""
    from jax.experimental import serialize_executable

    fix = (f"recompile it here (`qwenimage-jax aot ... --save {path}` on a host with this process's versions, for "
           "these devices) or drop the executable (the step is then compiled as usual)")
    try:
        with open(path, "rb") as f:
            data = pickle.load(f)
    except FileNotFoundError:
        raise InputValueError(f"executable {path!r} does not exist; write it with `qwenimage-jax aot ... --save "
                              f"{path}`") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as err:
        raise InputValueError(f"{path} is not an executable saved by `aot --save` ({type(err).__name__}: {err}); "
                              f"{fix}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputValueError(f"{path} was saved in another format (by another version of qwenimage-jax); {fix}")
    saved, here = data["versions"], _versions()
    wrong = [f"{k} {saved.get(k)} (here {here.get(k)})" for k in sorted(set(saved) | set(here))
             if k in saved and saved.get(k) != here.get(k)]
    if wrong:
        raise InputValueError(f"{path} was compiled by {', '.join(wrong)}; an executable runs only with the "
                              f"versions that compiled it: {fix}")
    target, current = data["target"], _platform(devices)
    if (target["device_kind"], target["num_devices"]) != (current["device_kind"], current["num_devices"]):
        raise InputValueError(f"{path} was compiled for {_describe(target)}, this process has "
                              f"{_describe(current)}; {fix}")
    if expect is not None:
        given = [(tuple(a.shape), str(a.dtype)) for a in jax.tree.leaves(expect) if hasattr(a, "shape")]
        if given != data["arguments"]:
            diff = next(((i, a, b) for i, (a, b) in enumerate(zip(data["arguments"], given)) if a != b),
                        (min(len(given), len(data["arguments"])), None, None))
            raise InputValueError(
                f"{path} was compiled for other arguments: {len(data['arguments'])} arrays, this call passes "
                f"{len(given)}; the first that differs (#{diff[0]}) was compiled as {diff[1]} and is {diff[2]} "
                f"here (another config, batch or layout); {fix}")
    saved_meta = data.get("meta", {})
    for key, value in (meta or {}).items():
        if saved_meta.get(key) != value:
            raise InputValueError(
                f"{path} was compiled for {key} {saved_meta.get(key, '(not recorded)')}, this call needs {value} "
                f"(another program, prompt bucket, CFG mode or layout); {fix}")
    placement = {} if devices is None else {"execution_devices": list(devices)}
    return serialize_executable.deserialize_and_load(data["executable"], data["in_tree"], data["out_tree"],
                                                     backend=backend, **placement)
