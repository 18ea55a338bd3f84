"""distill-jax: FLUX.1 in JAX/Flax NNX, distilled into 1-4-step students (sCM, MeanFlow).

The loaders of converted folders are re-exported here; they (and jax) are imported on first use,
so that ``import distill_jax`` and ``distill-jax --help`` stay instant.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "load_flux": "distill_jax.folders",
    "load_pipeline": "distill_jax.folders",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'distill_jax' has no attribute {name!r}")
