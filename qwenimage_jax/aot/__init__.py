"""Ahead-of-time compilation of the project's jitted programs for a Cloud TPU topology, on a CPU-only host.

    qwenimage-jax aot --config configs/dit_7b_train.py --topology v5p-128

Each builder returns THE jitted function the trainer or sampler runs (built by the same library call:
`training.dit.make_train_step`, `training.distill.make_distill_step`, `training.vae.build`, the pipeline's
`_denoise_jit`, the text encoder's `_forward`) together with abstract arguments: the state from
`jax.eval_shape` with the rule-derived shardings and a batch of ShapeDtypeStructs split over (data, fsdp). No
weights, no data. `compile_program` lowers and compiles it for the topology's compile-only devices and reads the
compiler's per-chip memory analysis; a program larger than the chip's HBM is refused by the compiler
(RESOURCE_EXHAUSTED), which becomes a readable "does not fit" result.

FLOPs are analytic (documented per program): XLA's cost analysis counts a while-loop body (the scanned layer
stack, the sampling loop) once.

    program.py    Program, Report, per-chip argument bytes, the builders' shared helpers
    flops.py      analytic DiT FLOPs, FLOPs counted from a jaxpr
    trainers.py   train-dit, train-lora, distill, train-vae
    inference.py  sample, encode-prompt
    dispatch.py   program_kind, build
    compiler.py   compile_program, save_program (for this process's devices), save_executable, load_executable

Layering: this package imports sampling, text and training (it compiles their programs); only commands import it.
"""
from qwenimage_jax.aot.compiler import compile_program, load_executable, save_executable, save_program  # noqa: F401
from qwenimage_jax.aot.dispatch import PROGRAMS, build, program_kind  # noqa: F401
from qwenimage_jax.aot.flops import dit_forward_flops, jaxpr_flops  # noqa: F401
from qwenimage_jax.aot.inference import build_encode_prompt, build_sample  # noqa: F401
from qwenimage_jax.aot.program import GIB, Program, Report, argument_bytes  # noqa: F401
from qwenimage_jax.aot.trainers import (  # noqa: F401
    build_distill,
    build_train_dit,
    build_train_lora,
    build_train_vae,
)
