"""distill-jax: FLUX.1 in JAX/Flax NNX, distilled into 1-4-step students (sCM, MeanFlow)."""

from setuptools import find_packages, setup

# jax and jaxlib release in lockstep, and jax's accelerator extras (below) pin jaxlib to jax's own
# version, so one constant drives the jax, jaxlib and accelerator pins.
JAX_VERSION = "0.10.2"

# Pinned together and tested on CPython 3.11 (CPU). Bump them as a set.
RUNTIME = [
    f"jax=={JAX_VERSION}",
    f"jaxlib=={JAX_VERSION}",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml-collections==1.1.0",
    "einops==0.8.2",
    "numpy==2.4.6",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "sentencepiece==0.2.3",
    "tensorflow-datasets==4.9.10",
    "array-record==0.8.6",
    "grain==0.2.18",
    "pillow==13.0.0",
    "pyarrow==26.0.1",
    "protobuf==7.36.2",
    "safetensors==0.8.0",
    "huggingface-hub==2.4.0",
    "tqdm",
    "absl-py",
    "tensorboardX==2.6.5",
]

# Exported students in PyTorch (distill_jax.torch_students), and the PyTorch reference stack the
# parity tests compare against. torch is pinned to the CPU build the Makefile installs first; an
# unpinned torch would pull several GB of CUDA wheels.
TORCH = [
    "torch==2.13.0",
    "diffusers==0.42.1",
]
# pytest-xdist: `make test` runs the suite in two workers, one test file each.
TEST = [*TORCH, "pytest", "pytest-xdist==3.8.0", "ruff"]

# `pip install -e ".[tpu]"` / `".[cuda]"` on accelerator hosts: jax's own extras at the pinned jax.
# tpu pulls libtpu from PyPI (Cloud TPU VMs); cuda12 pulls jax-cuda12-plugin with the NVIDIA CUDA 12
# wheels, so the host needs only a driver. cpu is the default jaxlib and adds nothing.
ACCELERATORS = {
    "cpu": [],
    "tpu": [f"jax[tpu]=={JAX_VERSION}"],
    "cuda": [f"jax[cuda12]=={JAX_VERSION}"],
}

setup(
    name="distill-jax",
    version="0.1.0",
    description="FLUX.1 in JAX/Flax NNX and its few-step distillation (sCM, MeanFlow).",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["distill_jax", "distill_jax.*"]),
    package_data={"distill_jax": ["assets/**/*"]},  # the toy teacher of the demo
    install_requires=RUNTIME,
    extras_require={"torch": TORCH, "test": TEST, **ACCELERATORS},
    entry_points={"console_scripts": ["distill-jax = distill_jax.cli:main"]},
)
