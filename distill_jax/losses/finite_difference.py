"""The time derivative of the sCM and MeanFlow tangents: exact JVP or a central difference.

Both losses need the total derivative of the student along the teacher's ODE,
``dF/dt = d_x F . v + d_t F``. ``time_derivative="jvp"`` takes all of it by one forward-mode
``jax.jvp``; ``"finite_difference"`` takes the image part ``d_x F . v`` by an exact JVP in the image
input alone (time tangent zero) and the time part ``d_t F`` by :func:`central_difference` in
float32 times, as NVIDIA's rCM offers for students that embed ``1000 t`` (stock FLUX's
``time_scale``): no forward-mode tangent passes through the time embedding, and no rescaled
teacher (spec 2.2) is needed.

The difference is central, ``(F(t + dt) - F(t - dt)) / (2 dt)``: its error is
``dt^2 / 6 |d^3 F / dt^3|``, against ``dt / 2 |d^2 F / dt^2|`` for the forward difference that
would save one of its two extra forwards. With ``time_scale = 1000`` the sinusoid's fastest
feature is ``sin(1000 t)``: at ``dt = 1e-4`` its derivative is off by
``(1000 dt)^2 / 6 = 1.7e-3`` relative by the central difference and by ``1000 dt / 2 = 5e-2`` by
the forward one. Round-off adds ``~eps |F| / dt``: ``6e-4 |F|`` at ``dt = 1e-4`` for a student
computing in float32, ``~2^-8 |F| / dt`` in bfloat16 (its two forwards round differently), so
the difference wants a float32 student. Measured on ``FluxConfig.tiny`` (random, time_scale 1000,
sCM tangent, relative to the float32 JVP; tests/test_time_derivative.py): float32 forwards
3.6e-2, 3.2e-3, 4.7e-4 at dt = 1e-3, 3e-4, 1e-4; bfloat16 forwards 6.6e-2, 0.19, 0.43 (the
bfloat16 JVP: 1.1e-2).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.parameterization import F32, bcast

Array = jax.Array
TIME_DERIVATIVES = ("jvp", "finite_difference")


def check_time_derivative(
    time_derivative: str, fd_dt: float | Array, time_dtype: Any = F32
) -> None:
    """Refuses an unknown ``time_derivative``, a ``fd_dt`` that is not a finite number > 0 (a
    JAX scalar, traced or not, passes unchecked: a sweep over steps compiles once), and the finite
    difference with ``time_dtype`` other than float32 (a time step of 1e-4 does not survive
    bfloat16 times, whose spacing near 1 is 2^-8 = 4e-3)."""
    if time_derivative not in TIME_DERIVATIVES:
        raise ValueError(f"time_derivative={time_derivative!r}; choose one of {TIME_DERIVATIVES}")
    if time_derivative != "finite_difference":
        return
    number = isinstance(fd_dt, numbers.Real) and not isinstance(fd_dt, bool)
    if not isinstance(fd_dt, jax.Array) and not (number and 0 < fd_dt < math.inf):
        raise ValueError(f"fd_dt={fd_dt!r}: the finite difference's time step, a number > 0")
    if jnp.dtype(time_dtype) != jnp.dtype(F32):
        raise ValueError(
            f"time_derivative='finite_difference' needs float32 times, got "
            f"time_dtype={jnp.dtype(time_dtype).name} (its rounding exceeds fd_dt={fd_dt})"
        )


def central_difference(fn: Callable[[Array], Array], t: Array, dt: float | Array) -> Array:
    """``d fn / dt`` at ``t`` [B] by ``(fn(t + dt) - fn(t - dt)) / (t_+ - t_-)``, float32 [B, ...].

    The shifted times ``t_+- = t +- dt`` are float32 whatever the caller's compute dtype, and the
    divisor is their float32 difference (exact for ``t >= 3 dt``), not ``2 dt``, so the rounding of
    ``t +- dt`` only moves the midpoint (by < ulp(t)). ``fn(t) -> [B, ...]`` is evaluated
    twice; the caller stops the gradient of the result.
    """
    t = jnp.asarray(t, F32)
    t_plus, t_minus = t + dt, t - dt
    diff = fn(t_plus).astype(F32) - fn(t_minus).astype(F32)
    return diff / bcast(t_plus - t_minus, diff)
