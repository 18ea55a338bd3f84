"""A synthetic latents-and-embeddings source: random, deterministic, infinitely long.

Stands in for a ``distill-jax prepare`` dataset where shapes matter and content does not: the
trainer's tests, benchmarks and ``--dry-run``. Record ``i`` depends only on ``(seed, i)``.
"""

from __future__ import annotations

import numpy as np


class SyntheticLatents:
    """Random-access source of ``{"latents": [C, h, w], "t5": [S, Dt], "pooled": [P]}``."""

    def __init__(
        self,
        *,
        channels: int,
        grid: tuple[int, int],
        text_len: int,
        context_dim: int,
        pooled_dim: int,
        seed: int = 0,
        size: int = 1 << 20,
    ):
        self.shapes = {
            "latents": (channels, *grid),
            "t5": (text_len, context_dim),
            "pooled": (pooled_dim,),
        }
        self.seed, self.size = seed, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng([self.seed, int(index)])
        return {k: rng.standard_normal(s, dtype=np.float32) for k, s in self.shapes.items()}
