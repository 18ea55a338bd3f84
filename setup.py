"""distill-jax: FLUX.1 in JAX/Flax NNX, distilled into 1-4-step students (sCM, MeanFlow)."""

from setuptools import find_packages, setup

# Pinned together and tested on CPython 3.11 (CPU). Bump them as a set.
RUNTIME = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
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

# The PyTorch reference stack the parity tests compare against. torch is pinned to the CPU build
# the Makefile installs first; an unpinned torch would pull several GB of CUDA wheels.
TEST = [
    "torch==2.13.0",
    "diffusers==0.42.1",
    "pytest",
    "ruff",
]

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
    extras_require={"test": TEST},
    entry_points={"console_scripts": ["distill-jax = distill_jax.cli:main"]},
)
