"""sCM (continuous-time consistency, TrigFlow) distillation loss, spec section 3.2.

The student and teacher are reached only through callables, so the same loss drives a FLUX MMDiT
(wrapped by :func:`distill_jax.parameterization.trigflow_velocity`) or a toy MLP:

- ``student_fn(x_hat, t, cond) -> (F, logvar)``: TrigFlow velocity ``F`` [B, ...] at the standard
  units state ``x_hat = x_t / sigma_d`` and trig time ``t`` [B]; ``logvar`` is the adaptive-weight
  head, any shape with B elements ([B], [B, 1], ...), or None for no head (logvar = 0).
- ``teacher_fn(x_hat, t, cond) -> F``.

``cond`` is an arbitrary pytree (text embeddings, pooled embedding, guidance ``g`` [B], ...) passed
unchanged to both; it is a constant for the JVP. Things shared by the whole batch (image ids) can
simply be closed over. Parameters are closed over by the caller, who differentiates the loss:
``jax.grad(lambda p: scm_loss(partial(student, p), ...)[0])``. The target network is
``sg(theta)`` (no EMA, spec 3.1): the JVP pass uses the same parameters under a stop-gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.losses.finite_difference import central_difference, check_time_derivative
from distill_jax.parameterization import F32, bcast, quantize, sample_scm_times

Array = jax.Array
sg = jax.lax.stop_gradient


def _trig(t: Array, dtype: Any) -> tuple[Array, Array]:
    """``(cos t, sin t)`` computed in ``dtype`` (bf16 reproduces spec 7.6), returned in float32."""
    td = quantize(t, dtype)
    return quantize(jnp.cos(td), dtype), quantize(jnp.sin(td), dtype)


def scm_tangent(
    F_fn: Callable[[Array, Array], Array],
    x_hat: Array,
    t: Array,
    F_teacher: Array,
    *,
    time_dtype: Any = F32,
    time_derivative: str = "jvp",
    fd_dt: float = 1e-4,
) -> Array:
    """``cos t sin t * dF/dt`` of the student along the teacher PF-ODE (spec 3.2 step 6).

    ``time_derivative="jvp"``: ``jax.jvp`` of ``(x_hat, t) -> F_fn(x_hat, t)`` at
    ``(x_hat [B, ...], t [B])`` with tangents ``(cos t sin t F_teacher, cos t sin t)``, i.e.
    ``cs (d_x F . F_T + d_t F)``. ``"finite_difference"``: the same ``cs d_x F . F_T`` by a JVP in
    ``x_hat`` alone, plus ``cs d_t F`` by a central difference of step ``fd_dt`` in float32 times
    (:mod:`distill_jax.losses.finite_difference`; agrees with the JVP to ``O(fd_dt^2)``). Returns
    float32 [B, ...]; the caller stops its gradient.
    """
    check_time_derivative(time_derivative, fd_dt, time_dtype)
    fn = lambda xh, tt: (F_fn(xh, tt), None)  # noqa: E731
    return _primal_and_tangent(fn, x_hat, t, F_teacher, time_dtype, time_derivative, fd_dt)[1]


def _tangents(x_hat: Array, t: Array, F_teacher: Array, time_dtype: Any) -> tuple[Array, Array]:
    """``(cos t sin t F_teacher, cos t sin t)``: the direction of :func:`scm_tangent`'s JVP."""
    c, s = _trig(t, time_dtype)
    cs = c * s
    return (bcast(cs, x_hat) * F_teacher.astype(F32)).astype(x_hat.dtype), cs.astype(t.dtype)


def _primal_and_tangent(
    fn, x_hat: Array, t: Array, F_teacher: Array, time_dtype: Any, time_derivative: str, dt: float
) -> tuple[Any, Array]:
    """``(fn(x_hat, t), cs dF/dt)`` for ``fn(x_hat, t) -> (F, aux)``: the primal (which the caller
    may differentiate) and the float32 tangent of :func:`scm_tangent` (not yet stopped)."""
    v_x, v_t = _tangents(x_hat, t, F_teacher, time_dtype)
    if time_derivative == "jvp":
        primal, (dF, _) = jax.jvp(fn, (x_hat, t), (v_x, v_t))
        return primal, dF.astype(F32)
    primal, (dF_x, _) = jax.jvp(lambda xh: fn(xh, t), (x_hat,), (v_x,))
    dF_t = central_difference(lambda tt: fn(x_hat, tt)[0], t, dt)  # d_t F, [B, ...]
    return primal, dF_x.astype(F32) + bcast(v_t.astype(F32), dF_t) * dF_t


def scm_loss(
    student_fn: Callable[[Array, Array, Any], tuple[Array, Array]],
    teacher_fn: Callable[[Array, Array, Any], Array],
    x0: Array,
    key: Array,
    *,
    step: Array | int,
    cond: Any = None,
    sigma_d: float = 0.5,
    p_mean: float = 0.2,
    p_std: float = 1.6,
    tangent_warmup_steps: int = 4000,
    tangent_norm_c: float = 0.1,
    time_dtype: Any = F32,
    time_derivative: str = "jvp",
    fd_dt: float = 1e-4,
    t: Array | None = None,
    noise: Array | None = None,
    tangent_fn: Callable[[Array, Array, Any], tuple[Array, Array]] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """sCM loss with tangent warmup, tangent normalisation and adaptive log-variance weighting.

    Spec 3.2 (the paper's ``sCMLoss.__call__``), in standard units (``x_t = sigma_d x_hat_t``):

    1. ``t = arctan(exp(p_mean + p_std n) / sigma_d)``, ``z ~ N(0, I)``,
       ``x_hat = cos t x0 + sin t z``.
    2. ``F_T = teacher(x_hat, t)``; ``dF = jvp(student, (x_hat, t), (cs F_T, cs))``,
       ``cs = cos t sin t`` (or its time part by a finite difference: ``time_derivative``).
    3. ``r = min(1, step / tangent_warmup_steps)``;
       ``g = -cos^2 t sigma_d (sg(F) - F_T) - r (cs sigma_d x_hat + sigma_d dF)``. ``dF`` already
       holds the factor cs (step 9 of spec 3.2; the pseudo-form at the end of 3.2 multiplies by
       cs twice, which would not vanish at the exact consistency model).
    4. ``g <- g / (||g|| + c)``, the norm per sample over all non-batch axes.
    5. ``w = 1 / (sigma_d tan t)``;
       ``L = mean[w e^{-logvar} (F - sg(F) - sg(g))^2 + logvar]`` over all elements.

    The value of ``F - sg(F)`` is zero; the parameter gradient is ``-2 w e^{-logvar} g / N``, which
    vanishes exactly when the student is the consistency model of the teacher (and, while
    ``r = 0``, when it equals the teacher).

    Args:
      student_fn, teacher_fn, cond: see the module docstring.
      x0: clean latents in standard units, [B, ...] (the paper's code stores ``sigma_d * x0``).
      key: PRNG key for the times and the noise.
      step: optimizer step for the tangent warmup (int or traced scalar).
      time_dtype: dtype of times and trigonometric coefficients; float32 by default, bfloat16
        reproduces the paper (spec 7.6). The loss itself is always float32. The callables do
        their own time arithmetic: give the TrigFlow wrapper the same dtype
        (``trigflow_velocity(time_dtype=)``, its ``s`` and ``n(s)``) and the models too
        (``Flux(time_dtype=)``, their embeddings' input), as the trainer does.
      time_derivative: how step 2 takes ``d_t F``: ``"jvp"`` (the default, exact, forward mode
        through the student's time embedding) or ``"finite_difference"``: an exact JVP in
        ``x_hat`` alone plus the central difference ``(F(t + fd_dt) - F(t - fd_dt)) / (2 fd_dt)``
        in float32 times (NVIDIA rCM's route for students that embed ``1000 t``, without a
        rescaled teacher; :mod:`distill_jax.losses.finite_difference`). Both multiply by the
        same ``cs`` and agree to ``O(fd_dt^2)`` plus round-off ``~eps |F| / fd_dt``; the
        difference costs two more student forwards (no backward) and needs float32
        ``time_dtype``.
      fd_dt: the finite difference's time step (TrigFlow time), 1e-4 by default as rCM's.
      t, noise: optional fixed TrigFlow times [B] and noise [B, ...] (override the sampling; for
        parity tests against a transcription of the paper's code).
      tangent_fn: the same function as ``student_fn`` for the JVP pass (under stop-gradient),
        e.g. the student with a memory-frugal attention that defines a JVP. By default (None)
        one ``jax.jvp`` of ``student_fn`` gives both ``F`` (differentiated by the caller) and
        ``dF``, so the student's forward runs once; with ``tangent_fn`` it runs twice, once in
        each function.
    Returns:
      ``(loss, metrics)``: float32 scalars ``scm/loss``, ``scm/l2`` (mean square of the normalised
      g), ``scm/g_norm`` (mean per-sample ``||g||`` before normalisation), ``scm/mean_weight``,
      ``scm/logvar``, ``scm/tangent_norm`` (mean per-sample ``||dF||``), ``scm/warmup``.
    """
    check_time_derivative(time_derivative, fd_dt, time_dtype)
    k_t, k_z = jax.random.split(key)
    x0 = x0.astype(F32)
    if t is None:
        t = sample_scm_times(k_t, x0.shape[:1], p_mean, p_std, sigma_d)
    t = quantize(t, time_dtype)
    z = jax.random.normal(k_z, x0.shape, F32) if noise is None else noise.astype(F32)
    c, s = _trig(t, time_dtype)
    cb, sb = bcast(c, x0), bcast(s, x0)
    x_hat = cb * x0 + sb * z

    F_T = sg(teacher_fn(x_hat, t, cond)).astype(F32)
    if tangent_fn is None:
        # One pass: the JVP's primal is the student's forward that the caller differentiates
        # (only the tangent is stopped), so the student runs forward once, not twice.
        (F, logvar), dF = _primal_and_tangent(
            lambda xh, tt: student_fn(xh, tt, cond),
            x_hat,
            t,
            F_T,
            time_dtype,
            time_derivative,
            fd_dt,
        )
        dF = sg(dF)
    else:
        dF = sg(
            scm_tangent(
                lambda xh, tt: tangent_fn(xh, tt, cond)[0],
                x_hat,
                t,
                F_T,
                time_dtype=time_dtype,
                time_derivative=time_derivative,
                fd_dt=fd_dt,
            )
        )
        F, logvar = student_fn(x_hat, t, cond)
    F = F.astype(F32)
    if logvar is None:  # no adaptive-weight head: plain weighting w
        logvar = jnp.zeros(x0.shape[:1], F32)
    logvar = bcast(logvar.astype(F32).reshape(x0.shape[0]), x0)
    F_minus = sg(F)

    if tangent_warmup_steps > 0:
        r = jnp.clip(jnp.asarray(step, F32) / tangent_warmup_steps, 0.0, 1.0)
    else:
        r = jnp.asarray(1.0, F32)
    g = -(cb * cb) * sigma_d * (F_minus - F_T) - r * (cb * sb * sigma_d * x_hat + sigma_d * dF)
    axes = tuple(range(1, x0.ndim))
    g_norm = jnp.sqrt(jnp.sum(g * g, axis=axes, keepdims=True))
    g = sg(g / (g_norm + tangent_norm_c))

    w = bcast(quantize(c / (sigma_d * s), time_dtype), x0)  # 1 / (sigma_d tan t)
    per_elem = w * jnp.exp(-logvar) * (F - F_minus - g) ** 2 + logvar
    loss = jnp.mean(per_elem)
    metrics = {
        "scm/loss": loss,
        "scm/l2": jnp.mean(g * g),
        "scm/g_norm": jnp.mean(g_norm),
        "scm/mean_weight": jnp.mean(w),
        "scm/logvar": jnp.mean(logvar),
        "scm/tangent_norm": jnp.mean(jnp.sqrt(jnp.sum(dF * dF, axis=axes))),
        "scm/warmup": r,
    }
    return loss, metrics
