"""MeanFlow distillation loss with teacher-velocity guidance and CFG-MeanFlow, spec section 4.3.

Callables (parameters closed over by the caller, who differentiates the loss):

- ``student_fn(z, t, delta, cond) -> u``: average velocity [B, ...] over ``[r, t]`` at the flow
  state ``z`` [B, ...], flow time ``t`` [B] and interval ``delta = t - r`` [B] (the dual-time
  student of spec 1.2 item 2: ``timestep = t``, ``timestep2 = t - r``, both unscaled).
- ``teacher_fn(z, t, cond) -> v``: instantaneous flow velocity ``eps - x0`` [B, ...].

``cond`` and ``uncond`` are pytrees of the same structure whose leaves all carry the batch axis
first (``uncond`` leaves may have a leading 1 or none; they broadcast). Label dropout swaps a
sample's leaves to ``uncond``; keep the per-sample guidance value identical in both (the paper
drops only the text). Leaves shared by the whole batch (image ids) belong in the closure.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from distill_jax.losses.finite_difference import central_difference, check_time_derivative
from distill_jax.parameterization import F32, bcast, quantize, sample_meanflow_times

Array = jax.Array
sg = jax.lax.stop_gradient
TANGENT_VELOCITIES = ("teacher", "ground_truth")


def meanflow_dudt(
    u_fn: Callable[[Array, Array, Array], Array],
    z: Array,
    r: Array,
    t: Array,
    v: Array,
    *,
    time_dtype: Any = F32,
    time_derivative: str = "jvp",
    fd_dt: float = 1e-4,
) -> Array:
    """Total derivative ``du/dt = d_z u . v + d_t u`` with ``r`` held fixed (spec 4.3 step 7).

    ``time_derivative="jvp"``: ``jax.jvp`` of ``(z, r, t) -> u_fn(z, t, t - r)`` at
    ``(z [B, ...], r [B], t [B])`` with tangents ``(v, 0, 1)``: the unit tangent on ``t`` reaches
    both time inputs, since ``d(t - r)/dt = 1``. ``"finite_difference"``: ``d_z u . v`` by a JVP in
    ``z`` alone, plus the central difference of ``t -> u_fn(z, t, t - r)`` (both time inputs
    shifted, as the JVP's tangent) of step ``fd_dt`` in float32 times
    (:mod:`distill_jax.losses.finite_difference`; agrees with the JVP to ``O(fd_dt^2)``).
    ``time_dtype`` rounds ``t - r`` (bf16: the paper's subtraction of bf16 times, spec 7.6; the
    finite difference needs float32). Returns float32 [B, ...].
    """
    check_time_derivative(time_derivative, fd_dt, time_dtype)
    return _u_and_dudt(u_fn, z, r, t, v, time_dtype, time_derivative, fd_dt)[1]


def _u_and_dudt(
    u_fn,
    z: Array,
    r: Array,
    t: Array,
    v: Array,
    time_dtype: Any,
    time_derivative: str = "jvp",
    dt: float = 1e-4,
) -> tuple[Array, Array]:
    """``(u(z, t, t - r), du/dt)``: the primal (which the caller may differentiate) and the float32
    tangent (not yet stopped) of :func:`meanflow_dudt`."""

    def fn(z_, r_, t_):
        return u_fn(z_, t_, quantize(t_ - r_, time_dtype))

    v = v.astype(z.dtype)
    if time_derivative == "jvp":
        u, dudt = jax.jvp(fn, (z, r, t), (v, jnp.zeros_like(r), jnp.ones_like(t)))
        return u, dudt.astype(F32)
    u, du_z = jax.jvp(lambda z_: fn(z_, r, t), (z,), (v,))
    du_t = central_difference(lambda t_: fn(z, r, t_), t, dt)  # d_t u + d_delta u, [B, ...]
    return u, du_z.astype(F32) + du_t


def meanflow_loss(
    student_fn: Callable[[Array, Array, Array, Any], Array],
    teacher_fn: Callable[[Array, Array, Any], Array],
    x0: Array,
    key: Array,
    *,
    cond: Any = None,
    uncond: Any = None,
    cfg_prob: float = 0.1,
    use_cfg: bool = True,
    omega: float = 1.0,
    kappa: float = 0.5,
    cfg_t_min: float = 0.0,
    cfg_t_max: float = 1.0,
    adaptive_p: float = 1.0,
    adaptive_c: float = 1e-3,
    mu: float = -0.4,
    sigma: float = 1.0,
    ratio_r_neq_t: float = 0.75,
    tangent_velocity: str = "teacher",
    cfg_at_r_equals_t: bool = True,
    time_dtype: Any = F32,
    time_derivative: str = "jvp",
    fd_dt: float = 1e-4,
    r: Array | None = None,
    t: Array | None = None,
    noise: Array | None = None,
    drop: Array | None = None,
    tangent_fn: Callable[[Array, Array, Array, Any], Array] | None = None,
) -> tuple[Array, dict[str, Array]]:
    """MeanFlow loss ``mean_b w_b e_b``, ``e_b = ||u - sg(u_tgt)||^2``, spec 4.3.

    1. Label dropout: with probability ``cfg_prob`` a sample's ``cond`` becomes ``uncond``.
    2. ``(r, t)`` sorted logit-normal pairs (spec 4.2), ``z_t = (1 - t) x0 + t eps``.
    3. ``v_T = teacher(z_t, t)``. CFG samples (conditional, ``cfg_t_min <= t <= cfg_t_max``) mix
       ``v~ = omega v_T + kappa u_c + (1 - omega - kappa) u_0`` from the (stop-gradient) student
       with the sample's own text and with ``uncond``.
    4. ``du/dt`` by JVP along ``(v_tan, 0, 1)`` through ``(z, r, t)`` (or its time part by a
       finite difference: ``time_derivative``); ``v_tan = v~`` for CFG samples, ``v_T``
       otherwise. Target ``u_tgt = v_tgt - (t - r) du/dt`` with ``v_tgt = v~`` or ``v_T``.
    5. Adaptive weight ``w = 1 / sg(e + c)^p`` (p=1: ~ e / (e + c)).

    Switches (defaults fix spec 7; :func:`distill_jax.losses.paper_slips` gives the paper's):
      tangent_velocity: ``"teacher"`` uses ``v_T`` in the non-CFG tangent, consistent with the
        target; ``"ground_truth"`` uses ``eps - x0`` there, as the paper's code (spec 7.2).
      cfg_at_r_equals_t: evaluate ``u_c, u_0`` at ``delta = 0`` (instantaneous velocities, as the
        upstream MeanFlow CFG) if True; at the sample's own ``t - r`` if False (paper, spec 7.3).
      time_dtype: rounds ``r, t``, ``delta = t - r`` (before the student's Δ embedder and in the
        target) and the interpolation coefficients; bfloat16 = paper (spec 7.6). Give the models
        the same (``Flux(time_dtype=)``), as the trainer does.
      time_derivative: how step 4 takes the time part ``d_t u`` of ``du/dt``: ``"jvp"`` (the
        default, exact) or ``"finite_difference"``: an exact JVP in ``z`` alone plus the central
        difference of ``t -> u(z, t, t - r)`` of step ``fd_dt`` in float32 times (NVIDIA rCM's
        route for students that embed ``1000 t``; :mod:`distill_jax.losses.finite_difference`).
        Both agree to ``O(fd_dt^2)`` plus round-off ``~eps |u| / fd_dt``; the difference costs
        two more student forwards (no backward) and needs float32 ``time_dtype``.
      fd_dt: the finite difference's time step (flow time), 1e-4 by default as rCM's.

    Args:
      student_fn, teacher_fn, cond, uncond: see the module docstring. With ``cond`` or
        ``uncond`` None there is no dropout and no CFG (an unconditional model).
      x0: clean latents in standard units, [B, ...]. key: PRNG key (dropout, times, noise).
      use_cfg: the paper's ``--use_cfg_meanflow`` (static; False skips the two CFG passes).
      r, t, noise, drop: optional fixed times [B], noise [B, ...], dropout mask [B] bool.
      tangent_fn: the same function as ``student_fn`` for the JVP pass (under stop-gradient),
        e.g. the student with a memory-frugal attention that defines a JVP. By default (None)
        one ``jax.jvp`` of ``student_fn`` gives both ``u`` (differentiated by the caller) and
        ``du/dt``, so the student's forward runs once; with ``tangent_fn`` it runs twice.
    Returns:
      ``(loss, metrics)``, float32 scalars ``meanflow/loss``, ``meanflow/mse`` (mean square error
      element-wise), ``meanflow/cfg_fraction``, ``meanflow/drop_fraction``,
      ``meanflow/r_neq_t_fraction``, ``meanflow/dudt_norm`` (mean per-sample norm).
    """
    if tangent_velocity not in TANGENT_VELOCITIES:
        raise ValueError(f"tangent_velocity must be one of {TANGENT_VELOCITIES}")
    check_time_derivative(time_derivative, fd_dt, time_dtype)
    k_drop, k_time, k_z = jax.random.split(key, 3)
    x0 = x0.astype(F32)
    B = x0.shape[0]
    conditional = cond is not None and uncond is not None
    use_cfg = use_cfg and conditional

    if conditional:
        if drop is None:
            drop = jax.random.uniform(k_drop, (B,)) < cfg_prob
        cond_in = jax.tree.map(lambda c, u: jnp.where(bcast(drop, c), u, c), cond, uncond)
        uncond_b = jax.tree.map(lambda c, u: jnp.broadcast_to(u, c.shape), cond, uncond)
    else:
        drop = jnp.zeros((B,), bool)
        cond_in = cond

    if r is None or t is None:
        r, t = sample_meanflow_times(k_time, (B,), mu, sigma, ratio_r_neq_t)
    r, t = quantize(r, time_dtype), quantize(t, time_dtype)
    delta = quantize(t - r, time_dtype)  # the paper subtracts bf16 times in bf16
    eps = jax.random.normal(k_z, x0.shape, F32) if noise is None else noise.astype(F32)
    tb = bcast(t, x0)
    z_t = quantize(1.0 - tb, time_dtype) * x0 + tb * eps
    v_gt = eps - x0

    v_T = sg(teacher_fn(z_t, t, cond_in)).astype(F32)

    cfg_mask = (t >= cfg_t_min) & (t <= cfg_t_max) & ~drop & use_cfg
    if use_cfg:
        delta_cfg = jnp.zeros_like(delta) if cfg_at_r_equals_t else delta
        u_c = sg(student_fn(z_t, t, delta_cfg, cond_in)).astype(F32)
        u_0 = sg(student_fn(z_t, t, delta_cfg, uncond_b)).astype(F32)
        v_mix = omega * v_T + kappa * u_c + (1.0 - omega - kappa) * u_0
    else:
        v_mix = v_T
    m = bcast(cfg_mask, x0)
    v_plain_tan = v_T if tangent_velocity == "teacher" else v_gt
    v_tan = jnp.where(m, v_mix, v_plain_tan)
    v_tgt = jnp.where(m, v_mix, v_T)

    if tangent_fn is None:
        # One pass: the JVP's primal u(z_t, t, t - r) is the student's forward that the caller
        # differentiates (only the tangent is stopped), so the student runs forward once.
        u, dudt = _u_and_dudt(
            lambda z, tt, d: student_fn(z, tt, d, cond_in),
            z_t,
            r,
            t,
            v_tan,
            time_dtype,
            time_derivative,
            fd_dt,
        )
    else:
        u = student_fn(z_t, t, delta, cond_in)
        dudt = meanflow_dudt(
            lambda z, tt, d: tangent_fn(z, tt, d, cond_in),
            z_t,
            r,
            t,
            v_tan,
            time_dtype=time_dtype,
            time_derivative=time_derivative,
            fd_dt=fd_dt,
        )
    u, dudt = u.astype(F32), sg(dudt).astype(F32)
    u_tgt = sg(v_tgt - bcast(delta, x0) * dudt)

    axes = tuple(range(1, x0.ndim))
    err = u - u_tgt
    e = jnp.sum(err * err, axis=axes)  # [B]; summed, not averaged, over each sample (spec 4.3.9)
    w = 1.0 / sg(e + adaptive_c) ** adaptive_p
    loss = jnp.mean(w * e)
    metrics = {
        "meanflow/loss": loss,
        "meanflow/mse": jnp.mean(err * err),
        "meanflow/cfg_fraction": jnp.mean(cfg_mask.astype(F32)),
        "meanflow/drop_fraction": jnp.mean(drop.astype(F32)),
        "meanflow/r_neq_t_fraction": jnp.mean((r < t).astype(F32)),
        "meanflow/dudt_norm": jnp.mean(jnp.sqrt(jnp.sum(dudt * dudt, axis=axes))),
    }
    return loss, metrics
