"""Test-wide environment: 8 fake CPU devices for sharding tests, no hub access, float32 matmuls.

These must be set before JAX (or transformers) is imported anywhere.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

import tempfile  # noqa: E402

import jax  # noqa: E402

# Identical programs (the trainer's step across resume tests, say) compile once per session.
jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="jax-cache-"))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

# The longest files first (seconds in one process, 2 cores): `make test`'s two workers take whole
# files in this order, so none is left to start alone at the end (longest-first scheduling).
LONGEST_FIRST = (
    "test_train.py",  # ~380 s
    "test_multihost.py",  # ~250 s
    "test_scan_layers.py",  # ~135 s
    "test_flux.py",  # ~105 s
    "test_demo.py",  # ~65 s
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))  # stable
