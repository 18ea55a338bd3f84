"""What the benchmarks share: the mid-size FLUX inputs and a median timer.

Run a benchmark with the project's environment (``.venv/bin/python benchmarks/NAME.py``): the
package is installed there, and this folder is on the path as the script's own.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
from tqdm import tqdm

from distill_jax.models.flux import FluxConfig


def flux_inputs(
    cfg: FluxConfig, batch: int, grid: tuple[int, int], text: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Keyword arguments of a FLUX forward (diffusers' names), float32: standard normal packed
    latents ``[B, h*w, C]`` and text, image ids of an ``h x w`` token grid, t = 0.5, g = 3.5."""
    h, w = grid
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None]
    return dict(
        hidden_states=rng.standard_normal((batch, h * w, cfg.in_channels), np.float32),
        encoder_hidden_states=rng.standard_normal((batch, text, cfg.context_dim), np.float32),
        pooled_projections=rng.standard_normal((batch, cfg.pooled_dim), np.float32),
        timestep=np.full((batch,), 0.5, np.float32),
        img_ids=ids.reshape(-1, 3),
        txt_ids=np.zeros((text, 3), np.float32),
        guidance=np.full((batch,), 3.5, np.float32),
    )


def median_seconds(fn: Callable[[], object], repeats: int, desc: str | None = None) -> float:
    """Median wall time of ``fn``, which blocks until its result is ready (a progress bar with
    ``desc``). No warm-up call: JAX functions are compiled ahead of time by the callers."""
    times = []
    for _ in tqdm(range(repeats), desc=desc, leave=False, disable=desc is None):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
