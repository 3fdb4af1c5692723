"""Weight import/export: diffusers/transformers safetensors directories <-> Flax params, Orbax checkpoints."""
from qwenimage_jax.convert.safetensors_io import SafetensorsReader, load_json_config  # noqa: F401
from qwenimage_jax.convert.params import (  # noqa: F401
    WeightKeyError,
    WeightSpec,
    assemble_params,
    conv2d_kernel,
    linear_kernel,
    stack_layers,
    unchanged,
)
