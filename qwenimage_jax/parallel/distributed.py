"""Multi-host start-up driven by the environment, so one launch script serves TPU pods, SLURM and localhost.

    QIJ_COORDINATOR=host:port QIJ_NUM_PROCESSES=2 QIJ_PROCESS_ID=0 qwenimage-jax train-dit ...

On Cloud TPU pods `jax.distributed.initialize()` discovers everything itself (set QIJ_DISTRIBUTED=auto); on CPU
(tests) collectives go over gloo.
"""
from __future__ import annotations

import os

import jax

_initialized = False


def maybe_initialize() -> bool:
    """Calls `jax.distributed.initialize` once when the environment asks for it; returns True if it did."""
    global _initialized
    if _initialized:
        return True
    mode = os.environ.get("QIJ_DISTRIBUTED", "")
    coordinator = os.environ.get("QIJ_COORDINATOR")
    if mode == "auto":
        jax.distributed.initialize()
    elif coordinator:
        num = int(os.environ["QIJ_NUM_PROCESSES"])
        pid = int(os.environ["QIJ_PROCESS_ID"])
        if os.environ.get("JAX_PLATFORMS", "") == "cpu" or not os.environ.get("JAX_PLATFORMS"):
            try:
                jax.config.update("jax_cpu_collectives_implementation", "gloo")
            except Exception:  # noqa: BLE001 - older/newer jax spell it differently; harmless on accelerators
                pass
        local = os.environ.get("QIJ_LOCAL_DEVICE_IDS")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num, process_id=pid,
                                   local_device_ids=[int(i) for i in local.split(",")] if local else None)
    else:
        return False
    _initialized = True
    return True
