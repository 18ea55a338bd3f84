"""Test-wide environment: 8 fake CPU devices for sharding tests, no hub access, float32 matmuls.

These must be set before JAX (or transformers) is imported anywhere.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
