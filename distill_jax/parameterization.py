"""Flow-matching <-> TrigFlow conversions and the distillation time samplers.

Spec references are to ``spec/t2i-distill.md``. Units: ``x0`` is the clean latent in *standard*
units (FLUX's ``(VAE - shift) * scale``), ``eps``/``z`` is standard Gaussian noise.

- Flow time ``s in [0, 1]``: ``x_s = (1 - s) x0 + s z``, flow velocity ``v = z - x0``.
- TrigFlow time ``t in [0, pi/2]``: ``x_hat_t = cos t x0 + sin t z`` (the paper's code stores
  ``x_t = sigma_d * x_hat_t``), TrigFlow velocity ``F = dx_hat_t/dt = cos t z - sin t x0``.

Both describe the same noisy state at the same SNR when ``tan t = s / (1 - s)``; then
``x_s = n(s) x_hat_t`` with ``n(s) = sqrt(s^2 + (1-s)^2) = 1 / (cos t + sin t)`` (spec 2.3).

Times, trigonometric coefficients and the conversions are computed in float32 whatever the dtype of
the data (spec 7.6), unless a ``dtype`` argument asks for the paper's bfloat16 arithmetic: then
every operation's result is rounded to it, as the paper's bf16 tensors are (:func:`quantize`).
Time arrays have shape ``[B]`` and broadcast against ``[B, ...]`` data.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
F32 = jnp.float32


def bcast(t: Array, x: Array) -> Array:
    """Reshapes a per-sample ``t`` [B] to ``[B, 1, ..., 1]`` so it broadcasts against ``x``."""
    t = jnp.asarray(t)
    return t.reshape(t.shape + (1,) * (x.ndim - t.ndim))


def quantize(t: Array, dtype: Any = F32) -> Array:
    """Rounds float32 values to the precision of ``dtype`` (bf16: the paper's times, spec 7.6);
    float32 in, float32 out, the identity for ``dtype=float32``.

    ``lax.reduce_precision``, not a cast there and back: under ``jit`` XLA may keep bfloat16
    arithmetic in float32 without rounding (seen on CPU for bf16 ``cos`` and division), and its
    ``simplify-fp-conversions`` pass may fold a float32 -> bfloat16 -> float32 pair of casts (XLA
    allows excess precision), silently undoing the rounding. Tangents are rounded alike.
    """
    t = jnp.asarray(t, F32)
    if jnp.dtype(dtype) == jnp.dtype(F32):
        return t
    info = jnp.finfo(dtype)
    return jax.lax.reduce_precision(t, exponent_bits=info.nexp, mantissa_bits=info.nmant)


# --- times (spec 1.3, 2.3) --------------------------------------------------------------------


def trig_to_flow_time(t: Array, dtype: Any = F32) -> Array:
    """Flow time ``s = sin t / (sin t + cos t)`` of TrigFlow time ``t`` (same shape, float32).

    ``dtype=bfloat16`` rounds ``t`` and each operation's result, as the paper's ``FluxTrigFlow``
    computes ``s`` from its bf16 time (spec 1.3, 7.6).
    """
    t = quantize(t, dtype)
    sin, cos = quantize(jnp.sin(t), dtype), quantize(jnp.cos(t), dtype)
    return quantize(sin / quantize(sin + cos, dtype), dtype)


def flow_to_trig_time(s: Array) -> Array:
    """TrigFlow time ``t = arctan(s / (1 - s))`` of flow time ``s`` (same shape, float32).

    Written as ``arctan2(s, 1 - s)`` so that ``s = 1`` gives ``pi/2`` without a division by zero.
    """
    s = jnp.asarray(s, F32)
    return jnp.arctan2(s, 1.0 - s)


def flow_norm(s: Array, dtype: Any = F32) -> Array:
    """``n(s) = sqrt(s^2 + (1 - s)^2)``, the factor with ``x_s = n(s) x_hat_t`` (spec 1.3).

    ``dtype=bfloat16`` rounds ``s`` and each operation's result (the paper's input scale).
    """
    q = lambda a: quantize(a, dtype)  # noqa: E731
    s = q(s)
    return q(jnp.sqrt(q(q(s * s) + q(q(1.0 - s) ** 2))))


# --- velocities (spec 1.3, 2.3) ---------------------------------------------------------------


def trig_to_flow_input(x_hat: Array, t: Array, dtype: Any = F32) -> tuple[Array, Array]:
    """TrigFlow state ``x_hat_t`` [B, ...] at trig time ``t`` [B] -> (flow state ``x_s``, ``s``).

    ``x_s = n(s) x_hat_t`` (spec 1.3 "flow input"); ``x_s`` is float32. ``dtype`` is the precision
    of ``s`` and ``n(s)`` (:func:`trig_to_flow_time`, :func:`flow_norm`).
    """
    s = trig_to_flow_time(t, dtype)
    return bcast(flow_norm(s, dtype), x_hat) * x_hat.astype(F32), s


def flow_to_trig_velocity(x_s: Array, v: Array, s: Array, dtype: Any = F32) -> Array:
    """Flow velocity ``v`` at flow state ``x_s`` [B, ...], time ``s`` [B] -> TrigFlow velocity.

    ``F = [(1 - 2s) x_s + (1 - 2s + 2s^2) v] / n(s)`` (spec 1.3 "TrigFlow output", derived in 2.3).
    Returns float32, shape of ``x_s``. ``dtype`` is the precision of ``n(s)`` (the input scale
    that the output is divided by); the rest is float32.
    """
    s = bcast(jnp.asarray(s, F32), x_s)
    n = flow_norm(s, dtype)
    return ((1.0 - 2.0 * s) * x_s.astype(F32) + (1.0 - 2.0 * s + 2.0 * s * s) * v.astype(F32)) / n


def trig_to_flow_velocity(x_hat: Array, F: Array, t: Array) -> Array:
    """Inverse of :func:`flow_to_trig_velocity`: TrigFlow ``F`` at ``x_hat_t``, ``t`` -> flow ``v``.

    From ``z = cos t F + sin t x_hat`` and ``x0 = cos t x_hat - sin t F`` (spec 2.3):
    ``v = z - x0 = (cos t + sin t) F + (sin t - cos t) x_hat``. Returns float32.
    """
    t = bcast(jnp.asarray(t, F32), x_hat)
    c, s = jnp.cos(t), jnp.sin(t)
    return (c + s) * F.astype(F32) + (s - c) * x_hat.astype(F32)


def consistency_fn(x_t: Array, t: Array, F: Array, sigma_d: float = 0.5) -> Array:
    """sCM consistency function ``f(x_t, t) = cos t x_t - sin t sigma_d F`` (spec 2.3).

    ``x_t`` is in the paper's code units (``sigma_d * x_hat_t``) and so is the result; with
    ``sigma_d = 1`` and ``x_t = x_hat_t`` it is in standard units. ``F`` is the TrigFlow velocity at
    ``x_t / sigma_d``. With the teacher's instantaneous ``F`` this is the denoiser ``E[x0 | x_t]``;
    with a perfect consistency student it is the PF-ODE end point.
    """
    t = bcast(jnp.asarray(t, F32), x_t)
    return jnp.cos(t) * x_t.astype(F32) - jnp.sin(t) * sigma_d * F.astype(F32)


def trigflow_velocity(
    flow_fn: Callable[..., Any],
    x_hat: Array,
    t: Array,
    *args: Any,
    has_aux: bool = False,
    time_dtype: Any = F32,
    **kwargs: Any,
) -> Any:
    """Wraps a flow-velocity model into a TrigFlow one (the paper's ``FluxTrigFlow``, spec 1.3).

    Args:
      flow_fn: ``flow_fn(x_s, s, *args, **kwargs) -> v`` (or ``(v, aux)`` with ``has_aux``), with
        ``x_s`` [B, ...] a flow state, ``s`` [B] flow time in [0, 1] (time_scale 1) and ``v`` the
        flow velocity ``z - x0``.
      x_hat: TrigFlow state in standard units ``x_t / sigma_d``, [B, ...].
      t: TrigFlow time, [B].
      time_dtype: precision of the flow time ``s`` and the input scale ``n(s)``; bfloat16
        computes both as the paper's wrapper does (spec 7.6), float32 (default) exactly.
    Returns:
      ``F`` [B, ...] float32 (and ``aux`` unchanged with ``has_aux``). Differentiable in ``x_hat``
      and ``t``, so ``jax.jvp`` through it gives the sCM tangent.
    """
    x_s, s = trig_to_flow_input(x_hat, t, time_dtype)
    out = flow_fn(x_s.astype(x_hat.dtype), s, *args, **kwargs)
    v, aux = out if has_aux else (out, None)
    F = flow_to_trig_velocity(x_s, v, s, time_dtype)
    return (F, aux) if has_aux else F


# --- time samplers (spec 3.2 step 3, 4.2) -----------------------------------------------------


def sample_logit_normal(key: Array, shape: tuple[int, ...], mean: float, std: float) -> Array:
    """``sigmoid(mean + std * N(0, 1))`` of the given shape, float32 in (0, 1)."""
    return jax.nn.sigmoid(mean + std * jax.random.normal(key, shape, F32))


def sample_scm_times(
    key: Array,
    shape: tuple[int, ...],
    p_mean: float = 0.2,
    p_std: float = 1.6,
    sigma_d: float = 0.5,
    dtype: Any = F32,
) -> Array:
    """sCM TrigFlow times ``t = arctan(exp(p_mean + p_std n) / sigma_d)``, ``n ~ N(0, 1)``.

    Spec 3.2 step 3 (the paper hard-codes 0.5 for ``sigma_d``, spec 7.12). ``tan t`` is log-normal;
    in flow time ``s = sigmoid(p_mean + ln(1/sigma_d) + p_std n)``. ``dtype`` rounds the times
    (``bfloat16`` reproduces spec 7.6); the result is float32, in (0, pi/2).
    """
    sigma = jnp.exp(p_mean + p_std * jax.random.normal(key, shape, F32))
    return quantize(jnp.arctan(sigma / sigma_d), dtype)


def sample_meanflow_times(
    key: Array,
    shape: tuple[int, ...],
    mu: float = -0.4,
    sigma: float = 1.0,
    ratio_r_neq_t: float = 0.75,
    dtype: Any = F32,
) -> tuple[Array, Array]:
    """MeanFlow flow times ``(r, t)``, each of ``shape``, float32, ``0 < r <= t < 1`` (spec 4.2).

    Two i.i.d. logit-normal(mu, sigma) values are sorted into ``r = min``, ``t = max``; then with
    probability ``1 - ratio_r_neq_t`` the pair collapses to ``r = t`` (the paper: 75% have r < t).
    ``dtype`` rounds both (the paper samples in bf16, spec 7.6); rounding is monotone, so the order
    survives it.
    """
    k_pair, k_eq = jax.random.split(key)
    a = sample_logit_normal(k_pair, (2, *shape), mu, sigma)
    r, t = jnp.min(a, axis=0), jnp.max(a, axis=0)
    keep = jax.random.uniform(k_eq, shape) < ratio_r_neq_t
    r = jnp.where(keep, r, t)
    return quantize(r, dtype), quantize(t, dtype)
