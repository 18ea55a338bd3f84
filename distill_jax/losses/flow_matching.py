"""Rectified-flow (flow-matching) loss: the teacher's training objective (spec 2.2, 2.3)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.parameterization import F32, bcast, sample_logit_normal

Array = jax.Array


def flow_matching_loss(
    velocity_fn: Callable[[Array, Array, Any], Array],
    x0: Array,
    key: Array,
    *,
    cond: Any = None,
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    s: Array | None = None,
    noise: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """Flow matching: ``mean || v(x_s, s) - (eps - x0) ||^2`` with ``x_s = (1 - s) x0 + s eps``.

    Args:
      velocity_fn: ``velocity_fn(x_s [B, ...], s [B], cond) -> v [B, ...]``, flow time unscaled.
      x0: clean latents in standard units, [B, ...].
      key: PRNG key for the times and the noise.
      cond: conditioning pytree handed to ``velocity_fn`` unchanged.
      logit_mean, logit_std: flow times ``s ~ sigmoid(N(logit_mean, logit_std^2))``;
        logit-normal(0, 1) by default, the usual rectified-flow choice (SD3, FLUX fine-tuning).
      s, noise: optional fixed flow times [B] and noise [B, ...] (override the sampling).
    Returns:
      ``(loss, {"fm/loss", "fm/mean_time"})``, float32 scalars; the mean is over all elements.
    """
    k_s, k_z = jax.random.split(key)
    x0 = x0.astype(F32)
    if s is None:
        s = sample_logit_normal(k_s, x0.shape[:1], mean=logit_mean, std=logit_std)
    s = jnp.asarray(s, F32)
    eps = jax.random.normal(k_z, x0.shape, F32) if noise is None else noise.astype(F32)
    sb = bcast(s, x0)
    x_s = (1.0 - sb) * x0 + sb * eps
    v = velocity_fn(x_s, s, cond).astype(F32)
    loss = jnp.mean((v - (eps - x0)) ** 2)
    return loss, {"fm/loss": loss, "fm/mean_time": jnp.mean(s)}
