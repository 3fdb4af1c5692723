"""Ahead-of-time compilation for Cloud TPU topologies on this CPU host (libtpu's compile-only devices).

The tiny DiT train step (splash attention, so the kernel's TPU lowering and its backward blocks are compiled too)
and the tiny sampler compile for `v5:2x2x1` (4 v5p chips); the compiler's per-chip argument bytes equal the sum of
the argument shards that the sharding rules prescribe (padded to the compiled layouts' tiles), and a parameter's
shard is the rules' split of it. An oversized program ends in the readable "does not fit" line with a non-zero
exit, through `launch/tpu_pod.sh --dry-run`. Topology names (product and jax spellings) resolve to the right chip
counts; `launch/gpu_multinode.sh --dry-run` prints every node's command and environment.
"""
import json
import math
import os
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qwenimage_jax import cli
from qwenimage_jax.config_cli import load_config
from qwenimage_jax.parallel import topology as topo
from qwenimage_jax import aot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# a tiny DiT whose head_dim (128) suits the TPU splash kernel
TINY_SPLASH = ["--config.model.attention_head_dim=128", "--config.model.num_attention_heads=2",
               "--config.model.axes_dims_rope=[16, 56, 56]", "--config.attention=splash",
               "--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.compute_dtype=bfloat16"]


@pytest.fixture(scope="module")
def v5p_4():
    target = topo.resolve("v5:2x2x1")
    return target, topo.devices(target)


@pytest.fixture(scope="module")
def train_report(v5p_4):
    target, devices = v5p_4
    config = load_config("configs/dit_train_tiny.py", TINY_SPLASH)
    program = aot.build(config, devices, resolution=128)
    # conftest's "highest" matmul precision asks Mosaic for fp32 contractions of bf16 tiles, which it refuses;
    # a training run uses the default precision
    with jax.default_matmul_precision("default"):
        return program, aot.compile_program(program, target)


def test_topology_names_resolve_to_chip_counts():
    assert topo.resolve("v5p-512").chips == 256 and topo.resolve("v5p-512").jax_name == "v5:4x8x8"
    assert topo.resolve("v5p-64").chips == 32
    assert topo.resolve("v6e-256").jax_name == "v6e:16x16" and topo.resolve("v6e-256").chips == 256
    assert topo.resolve("v5e-4").chips == 4 and topo.resolve("v5litepod-16").jax_name == "v5e:4x4"
    assert topo.resolve("v5:2x2x1").chips == 4 and topo.resolve("v5:2x2x1").spec.product == "v5p"
    with pytest.raises(ValueError, match="not a v6e slice size"):
        topo.resolve("v6e-48")
    with pytest.raises(ValueError, match="unknown TPU generation"):
        topo.resolve("v9x-8")


def test_help_lists_product_names(capsys):
    with pytest.raises(SystemExit):
        cli.main(["aot", "--help"])
    out = capsys.readouterr().out
    assert "v5p-512 = 256 chips" in out and "v6e-256" in out and "v5e-4" in out


def test_tiny_train_step_compiles_with_rule_argument_bytes(train_report):
    program, report = train_report
    assert report.fits and report.chips == 4 and report.mesh["fsdp"] == 4
    assert report.argument_bytes == report.layout_argument_bytes
    # the rules' shard shapes themselves: the stacked q projection (layers, embed, heads, head_dim) splits embed
    # over fsdp=4, so one chip holds a quarter of it
    state = program.args[0]
    q = next(x for path, x in jax.tree_util.tree_flatten_with_path(state.params)[0]
             if "to_q" in jax.tree_util.keystr(path))
    assert q.sharding.shard_shape(q.shape) == (q.shape[0], q.shape[1] // 4) + tuple(q.shape[2:])
    leaves = [x for x in jax.tree.leaves(program.args) if hasattr(x, "sharding")]
    unpadded = sum(math.prod(x.sharding.shard_shape(x.shape)) * (8 if jax.dtypes.issubdtype(
        x.dtype, jax.dtypes.prng_key) else np.dtype(x.dtype).itemsize) for x in leaves)
    assert report.expected_argument_bytes == unpadded
    assert report.flops_per_chip > 0 and report.temp_bytes > 0


def test_tiny_sampler_compiles_with_rule_argument_bytes(v5p_4):
    target, devices = v5p_4
    config = load_config("configs/dit_tiny.py", ["--config.mesh.data=1", "--config.mesh.fsdp=-1"])
    program = aot.build(config, devices, "sample", resolution=128, steps=4, cfg_scale=4.0, prompt_tokens=16)
    report = aot.compile_program(program, target)
    assert report.fits and report.argument_bytes == report.layout_argument_bytes
    assert "4 steps" in report.description and "CFG on" in report.description


def test_tiny_lora_step_compiles_with_a_frozen_sharded_bf16_base(v5p_4):
    """train-lora: the base is an argument in bf16 sharded like the DiT trainer's params; the TrainState holds
    only the rank-4 factors (a's input axis split like the base kernel's) and their moments."""
    target, devices = v5p_4
    config = load_config("configs/lora_tiny.py", TINY_SPLASH + ["--config.base_dtype=bfloat16"])
    program = aot.build(config, devices, resolution=128)
    assert program.kind == "train-lora"
    with jax.default_matmul_precision("default"):
        report = aot.compile_program(program, target)
    assert report.fits and report.argument_bytes == report.layout_argument_bytes
    state, base = program.args[0], program.args[1]
    assert {x.dtype for x in jax.tree.leaves(base)} == {jnp.dtype("bfloat16")}
    q = base["blocks"]["attn"]["to_q"]["kernel"]
    assert q.sharding.shard_shape(q.shape)[1] == q.shape[1] // 4
    a = state.params["blocks"]["attn"]["to_q"]["a"]
    assert a.shape[-1] == 4 and a.sharding.shard_shape(a.shape)[1] == a.shape[1] // 4
    n_train = sum(x.size for x in jax.tree.leaves(state.params))
    assert sum(x.size for x in jax.tree.leaves(state.opt_state) if hasattr(x, "size")) <= 2 * n_train + 8
    assert "trainable" in report.description


def test_oversized_program_does_not_fit_with_a_clear_message(tmp_path):
    # through the pod launcher's dry run, which runs `aot` for the slice before touching any pod.
    # 2048² = 16384 image tokens with the einsum attention: (B, heads, S, S) fp32 logits per chip >> 15.75 GiB
    env = dict(os.environ, AOT_ARGS=f"--resolution 2048 --json {tmp_path / 'r.json'}")
    proc = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry-run", "--topology", "v5e-4", "run", "train-dit",
                           "--config", "configs/dit_train_tiny.py", "--workdir", "gs://b/x", "--config.batch_size=16"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout
    assert proc.returncode == 1, proc.stdout + proc.stderr[-2000:]
    assert "QIJ_DISTRIBUTED=auto" in out and "train-dit --config configs/dit_train_tiny.py" in out
    assert "does not fit: needs" in out and "GiB per chip, v5e has 15.75 GiB" in out
    needed = float(out.split("does not fit: needs ")[1].split(" GiB")[0])
    assert needed > 15.75
    assert "more fsdp" in out and "--config.remat" in out and "per-chip batch" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["fits"] is False and report["chips"] == 4 and report["overrides"] == ["--config.batch_size=16"]


def test_gpu_multinode_dry_run_prints_every_node():
    env = dict(os.environ, NUM_NODES="3", COORDINATOR="node0:12345")
    proc = subprocess.run(["bash", "launch/gpu_multinode.sh", "--dry-run", "train-dit", "--config",
                           "configs/dit_7b_train.py", "--workdir", "/shared/run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    nodes = [line for line in proc.stdout.splitlines() if line.startswith("node ")]
    assert len(nodes) == 3
    for i, line in enumerate(nodes):
        assert f"QIJ_PROCESS_ID={i} " in line and "QIJ_NUM_PROCESSES=3" in line
        assert "QIJ_COORDINATOR=node0:12345" in line and "XLA_PYTHON_CLIENT_MEM_FRACTION=0.92" in line
        assert line.endswith("train-dit --config configs/dit_7b_train.py --workdir /shared/run")


def test_jaxpr_flops_counts_matmuls_and_scans():
    x = jnp.zeros((4, 8))
    w = jnp.zeros((3, 8, 8))

    def f(x, w):
        return jax.lax.scan(lambda h, wi: (h @ wi, None), x, w)[0]

    assert aot.jaxpr_flops(f, x, w) == 3 * 2 * 4 * 8 * 8


def test_tiny_int8_sampler_and_qlora_step_compile_with_int8_kernel_arguments(v5p_4):
    """`--config.quantize=int8`: the sampler's DiT block kernels and the LoRA base's are int8 arguments (with
    their scales), sharded like the float kernels, and the per-chip argument bytes shrink accordingly."""
    from qwix._src.providers.ptq import WithAux

    target, devices = v5p_4
    reports = {}
    for mode in ("none", "int8"):
        config = load_config("configs/dit_tiny.py", ["--config.mesh.data=1", "--config.mesh.fsdp=-1",
                                                     f"--config.quantize={mode}"])
        program = aot.build(config, devices, "sample", resolution=128, steps=4, cfg_scale=4.0, prompt_tokens=16)
        reports[mode] = aot.compile_program(program, target)
        assert reports[mode].fits and reports[mode].argument_bytes == reports[mode].layout_argument_bytes
    kernel = program.args[0]["params"]["blocks"]["attn"]["to_q"]["kernel"]
    assert isinstance(kernel, WithAux) and kernel.array.qvalue.dtype == jnp.int8
    assert kernel.array.qvalue.sharding.shard_shape(kernel.shape)[1] == kernel.shape[1] // 4
    assert "int8 block kernels" in reports["int8"].description
    assert reports["int8"].argument_bytes < 0.8 * reports["none"].argument_bytes

    config = load_config("configs/lora_tiny.py", TINY_SPLASH + ["--config.base_dtype=bfloat16",
                                                                "--config.quantize=int8"])
    program = aot.build(config, devices, resolution=128)
    with jax.default_matmul_precision("default"):
        report = aot.compile_program(program, target)
    assert report.fits and "(QLoRA)" in report.description
    assert program.args[1]["blocks"]["mlp"]["proj"]["kernel"].array.qvalue.dtype == jnp.int8


def test_saved_executable_records_its_topology_and_is_refused_on_other_devices(v5p_4, tmp_path):
    """`aot --save FILE` writes the executable with the versions and devices it is for; loading it on this CPU host
    is one clear error naming both (it runs only on the topology it was compiled for)."""
    from qwenimage_jax.errors import InputValueError

    target, devices = v5p_4
    config = load_config("configs/dit_tiny.py", ["--config.mesh.data=1", "--config.mesh.fsdp=-1"])
    program = aot.build(config, devices, "sample", resolution=128, steps=2, prompt_tokens=16)
    path = str(tmp_path / "sampler.xla")
    report = aot.compile_program(program, target, save=path)
    assert report.saved.startswith(path) and "4 x TPU v5" in report.saved and "(v5:2x2x1)" in report.saved
    with pytest.raises(InputValueError, match=r"compiled for 4 x TPU v5.* \(v5:2x2x1\), this process has \d+ x cpu"):
        aot.load_executable(path)


def test_single_chip_slices_build_their_devices():
    """v6e-1 / v5e-1 are smaller than libtpu's default host block (2x2): their devices are built with the slice's
    own bounds instead of failing inside libtpu."""
    for name, kind in (("v6e-1", "TPU v6 lite"), ("v5e-1", "TPU v5 lite")):
        devices = topo.devices(topo.resolve(name))
        assert len(devices) == 1 and devices[0].device_kind == kind
