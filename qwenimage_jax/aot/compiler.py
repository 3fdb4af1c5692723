"""Lowers and compiles a `Program` for a TPU topology's compile-only devices, reads the compiler's per-chip memory
analysis into a `Report` (a refusal for memory becomes a "does not fit" result), and saves / loads the serialized
executable."""
from __future__ import annotations

import contextlib
import re
import time

import jax

from qwenimage_jax.aot.program import GIB, Program, Report, _mesh_context, argument_bytes
from qwenimage_jax.checkpoints.executables import (load_executable, program_meta,  # noqa: F401 (re-exported)
                                                   save_executable, uncached_compiles)

_OOM = re.compile(r"(RESOURCE_EXHAUSTED|exceeds available HBM|Ran out of memory|out of memory)", re.I)
_SIZE = r"([0-9.]+)\s*([KMGT]?)i?B?"


def _to_bytes(value: str, unit: str) -> float:
    return float(value) * {"": 1, "K": 1024, "M": 1024 ** 2, "G": 1024 ** 3, "T": 1024 ** 4}[unit.upper()]


def _needed_bytes(message: str) -> float | None:
    """The per-chip bytes a refused program asked for, from the compiler's message, e.g. "the total memory
    required for HLO temporaries (81.57G) exceeds available HBM (15.75G)" or "Used 158.2G of 15.75G hbm"."""
    for pattern in (r"\(" + _SIZE + r"\)\s*exceeds available HBM", r"[Uu]sed\s+" + _SIZE + r"\s+of\s+",
                    r"requires?\s+" + _SIZE):
        m = re.search(pattern, message)
        if m:
            return _to_bytes(m.group(1), m.group(2))
    return None


def compile_program(program: Program, topology, save: str | None = None) -> Report:
    """Lowers + compiles `program` for `topology` (a `parallel.topology.Topology`); a refusal for memory
    becomes a Report with fits=False, any other compiler error propagates."""
    mesh = program.mesh
    capacity = topology.spec.hbm_gib * GIB
    base = dict(kind=program.kind, description=program.description, topology=topology.describe(),
                chips=topology.chips, mesh={k: int(v) for k, v in mesh.shape.items()}, capacity_bytes=capacity,
                flops_per_chip=program.flops / topology.chips, flops_note=program.flops_note,
                peak_flops_per_chip=topology.spec.peak_bf16_flops, chip=topology.spec.product, unit=program.unit,
                expected_argument_bytes=program.expected_argument_bytes)
    start = time.perf_counter()
    try:
        with _mesh_context(mesh):  # traced as the trainers call their steps: under the mesh and the rules
            lowered = program.fn.lower(*program.args, **program.kwargs)
        # a saved executable must be compiled fresh (one from the persistent cache does not serialize whole)
        with uncached_compiles() if save else contextlib.nullcontext():
            compiled = lowered.compile()
    except Exception as e:  # noqa: BLE001 - only memory refusals are results; the rest re-raise
        message = str(e)
        if not _OOM.search(message):
            raise
        return Report(**base, fits=False, compile_s=time.perf_counter() - start, needed_bytes=_needed_bytes(message),
                      error=message.strip().splitlines()[0] if message.strip() else type(e).__name__,
                      advice=program.hints)
    elapsed = time.perf_counter() - start
    mem = compiled.memory_analysis()
    arg, out = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    alias, temp = int(mem.alias_size_in_bytes), int(mem.temp_size_in_bytes)
    total = arg + out - alias + temp + int(getattr(mem, "generated_code_size_in_bytes", 0) or 0)
    fits = total <= capacity
    report = Report(**base, fits=fits, compile_s=elapsed, argument_bytes=arg, output_bytes=out, alias_bytes=alias,
                    temp_bytes=temp, total_bytes=total, needed_bytes=None if fits else float(total),
                    advice=() if fits else program.hints,
                    layout_argument_bytes=argument_bytes(program.args, compiled))
    if save:  # the executable for the topology's devices (checkpoints/executables.py checks them at load)
        report.saved = _save(compiled, program, save, topology.label)
    return report


def _save(compiled, program: Program, path: str, topology: str = "") -> str:
    """`save_executable` for the devices of `program`'s mesh, with its kind and static arguments as meta."""
    return save_executable(compiled, path, topology=topology, devices=list(program.mesh.devices.flat),
                           meta=program_meta(program.kind, program.kwargs))


def save_program(program: Program, path: str) -> str:
    """Compiles `program` for the devices of its own mesh (this process's: a GPU host saving the sampler it will
    run) and writes it as `compile_program(save=)` does; returns `save_executable`'s description."""
    with _mesh_context(program.mesh):
        lowered = program.fn.lower(*program.args, **program.kwargs)
    with uncached_compiles():
        compiled = lowered.compile()
    return _save(compiled, program, path)
