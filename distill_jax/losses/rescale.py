"""Time-scale rescaling of a stock FLUX teacher (time_scale 1000 -> 1), spec 2.2.

Stock FLUX feeds ``1000 s`` and ``1000 g`` to its sinusoidal embeddings; the distillation recipe
feeds ``s`` and ``g``. No exact re-parameterisation exists (only the 32 lowest of the 128 x1000
frequencies are x1 frequencies), so the rescaled teacher is made in two steps (spec 2.2
"recipe"): (a) a least-squares refit of the first Linear of the timestep and guidance embedders
(host-side NumPy, float64, once), then (b) a short regression of the rescaled model onto the stock
one with :func:`rescale_regression_loss`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from distill_jax.parameterization import F32, bcast

Array = jax.Array


def timestep_sinusoid(
    tau: np.ndarray, dim: int = 256, max_period: float = 10000.0, scale: float = 1.0
) -> np.ndarray:
    """FLUX's ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)`` in float64 NumPy.

    ``phi(tau) = [cos(scale tau f_i)]_i || [sin(scale tau f_i)]_i``, ``f_i = exp(-ln(max_period)
    i / (dim/2))``, ``i < dim/2`` (spec 1.1, cosines first). ``tau`` [N] -> [N, dim].
    """
    half = dim // 2
    freqs = np.exp(-np.log(max_period) * np.arange(half, dtype=np.float64) / half)
    arg = scale * np.asarray(tau, np.float64)[:, None] * freqs[None, :]
    return np.concatenate([np.cos(arg), np.sin(arg)], axis=1)


def refit_time_embedding(
    linear1_kernel: np.ndarray,
    linear1_bias: np.ndarray,
    *,
    old_scale: float = 1000.0,
    new_scale: float = 1.0,
    grid: np.ndarray | None = None,
    dim: int = 256,
    ridge: float = 1e-3,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Least-squares refit of an embedder's first Linear for a new input scale (spec 2.2 (a)).

    Finds ``(K', b')`` minimising ``sum_tau ||phi(new tau) K' + b' - (phi(old tau) K + b)||^2
    + lambda ||K'||^2`` over ``tau`` in ``grid``, ``lambda = ridge * mean diag`` of the normal
    matrix. The ridge matters: the x1 features are nearly collinear on [0, 1] (``cos(1e-4 tau) ~
    1``), and the unregularised fit of a dense kernel reaches entries ~1e4 that cancel (useless
    in bf16). Measured on a dense random N(0, 1/256) kernel: ridge 1e-8 -> residual 0.68, kernel
    norm x720; 1e-3 (default) -> 0.71, x1.9. An exactly refittable kernel (only the 32 shared
    frequencies) is reproduced to 1.2e-3 at the default and to 3e-8 at ridge 1e-12.

    Args:
      linear1_kernel: [dim, D] in the ``x @ K`` layout (flax), any float dtype.
      linear1_bias: [D].
      grid: the inputs ``tau`` in *unscaled* units: flow times for the timestep embedder (default
        ``linspace(0, 1, 8193)``, dense enough for the x1000 sinusoid's top frequency of 1000
        rad), guidance values for the guidance embedder (e.g. ``linspace(1, 10, 8193)``). A
        spacing above ``pi / old_scale`` aliases the old sinusoid and warns.
    Returns:
      ``(kernel [dim, D], bias [D], relative_residual)``: arrays in the input kernel's dtype and
      ``||fit - target||_F / ||target||_F`` over the grid (from Gram matrices: resolves residuals
      down to ~1e-7).
    """
    if grid is None:
        grid = np.linspace(0.0, 1.0, 8193)
    # The old sinusoid's top frequency is old_scale rad per unit of tau; a coarser grid aliases it
    # into low frequencies that the fit would then reproduce between the grid points.
    spacing = float(np.max(np.diff(np.sort(np.asarray(grid, np.float64)))))
    if spacing > np.pi / old_scale:
        warnings.warn(
            f"refit grid spacing {spacing:.3g} exceeds pi/old_scale = {np.pi / old_scale:.3g}: "
            "the old embedding is aliased; use a denser grid",
            stacklevel=2,
        )
    K = np.asarray(linear1_kernel, np.float64)
    b = np.asarray(linear1_bias, np.float64)
    ones = np.ones((len(grid), 1))
    A = np.concatenate([timestep_sinusoid(grid, dim, scale=new_scale), ones], axis=1)  # [N, dim+1]
    Bm = np.concatenate([timestep_sinusoid(grid, dim, scale=old_scale), ones], axis=1)
    M = np.concatenate([K, b[None, :]], axis=0)  # [dim+1, D]; target Y = Bm @ M
    # Normal equations through Gram matrices: the [N, D] target (N x 3072) is never materialised.
    AtA, AtB, BtB = A.T @ A, A.T @ Bm, Bm.T @ Bm
    reg = ridge * np.trace(AtA) / AtA.shape[0] * np.eye(AtA.shape[0])
    reg[-1, -1] = 0.0  # the bias is not penalised
    W = np.linalg.solve(AtA + reg, AtB @ M)  # [dim+1, D]
    # ||A W - Bm M||^2 = tr(W'AtA W) - 2 tr(W'AtB M) + tr(M'BtB M)
    target_sq = np.sum(M * (BtB @ M))
    res_sq = np.sum(W * (AtA @ W)) - 2.0 * np.sum(W * (AtB @ M)) + target_sq
    rel = float(np.sqrt(max(res_sq, 0.0) / target_sq))
    out_dtype = np.asarray(linear1_kernel).dtype
    return W[:-1].astype(out_dtype), W[-1].astype(out_dtype), rel


def rescale_regression_loss(
    student_fn: Callable[[Array, Array, Array | None, Any], Array],
    stock_fn: Callable[[Array, Array, Array | None, Any], Array],
    x0: Array,
    key: Array,
    *,
    cond: Any = None,
    guidance_range: tuple[float, float] | None = (2.0, 5.0),
    time_sampler: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    loss: str = "mse",
    smooth_l1_beta: float = 1.0,
) -> tuple[Array, dict[str, Array]]:
    """Regression of the rescaled model onto the stock one (spec 2.2 (b) "recipe").

    ``mean ||v_x1(x_s; s, g) - sg(v_stock(x_s; 1000 s, 1000 g))||^2``, ``x_s = (1-s) x0 + s eps``
    (``loss="mse"``), or the mean smooth-L1 of the same difference (``loss="smooth_l1"``, the
    paper's: PyTorch's ``smooth_l1_loss`` with ``beta``, ``0.5 d^2 / beta`` below ``beta`` and
    ``|d| - 0.5 beta`` above, optax's Huber loss divided by ``beta``).

    Args:
      student_fn: ``(x_s [B, ...], s [B], g [B] | None, cond) -> v``, the rescaled model
        (time_scale 1).
      stock_fn: same signature and unscaled arguments; it applies its own x1000 (time_scale
        1000), like diffusers' FluxTransformer2DModel called with ``timestep = s``.
      x0: clean latents in standard units, [B, ...]. key: PRNG key.
      guidance_range: ``g ~ U[lo, hi]`` in raw units; None for a model without guidance.
      time_sampler: ``"uniform"`` (``s ~ U[0, 1]``) or ``"logit_normal"``.
      loss: ``"mse"`` or ``"smooth_l1"``; smooth_l1_beta: the latter's ``beta`` (> 0).
    Returns:
      ``(loss, {"rescale/loss", "rescale/rel_err"})``; ``rel_err`` = mean squared difference /
      mean square of the stock velocity, whichever loss is minimised.
    """
    if loss not in ("mse", "smooth_l1"):
        raise ValueError(f"rescale loss={loss!r}; 'mse' or 'smooth_l1'")
    if not smooth_l1_beta > 0:
        raise ValueError(f"smooth_l1_beta={smooth_l1_beta!r} must be > 0")
    k_s, k_g, k_z = jax.random.split(key, 3)
    x0 = x0.astype(F32)
    B = x0.shape[0]
    if time_sampler == "uniform":
        s = jax.random.uniform(k_s, (B,), F32)
    elif time_sampler == "logit_normal":
        s = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(k_s, (B,), F32))
    else:
        raise ValueError("time_sampler must be 'uniform' or 'logit_normal'")
    g = None
    if guidance_range is not None:
        g = jax.random.uniform(k_g, (B,), F32, *guidance_range)
    eps = jax.random.normal(k_z, x0.shape, F32)
    sb = bcast(s, x0)
    x_s = (1.0 - sb) * x0 + sb * eps
    v_ref = jax.lax.stop_gradient(stock_fn(x_s, s, g, cond)).astype(F32)
    v = student_fn(x_s, s, g, cond).astype(F32)
    mse = jnp.mean((v - v_ref) ** 2)
    if loss == "mse":
        value = mse
    else:
        value = jnp.mean(optax.huber_loss(v, v_ref, delta=smooth_l1_beta)) / smooth_l1_beta
    rel = mse / jnp.maximum(jnp.mean(v_ref * v_ref), 1e-12)
    return value, {"rescale/loss": value, "rescale/rel_err": rel}
