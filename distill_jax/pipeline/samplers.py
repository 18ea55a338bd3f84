"""Few-step samplers over model callables: teacher Euler, sCM multistep, MeanFlow (spec 5.2-5.4).

Pure sampling math: the models come in as callables over arrays, so the samplers work with a FLUX
MMDiT (conditioning closed over by the caller) or a toy MLP. All state is in standard latent units
(FLUX's ``(VAE - shift) * scale``), noise ``N(0, I)``. Schedules are host-side float32 NumPy arrays
(static for ``jax.jit``) from :mod:`distill_jax.pipeline.schedules`, re-exported here; each
sampler is one ``lax.scan`` so a big model is compiled once.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.parameterization import F32
from distill_jax.pipeline.schedules import (
    SCM_MAX_TIME,
    flux_shift_mu,
    flux_sigmas,
    meanflow_sigmas,
    scm_timesteps,
)

Array = jax.Array


# --- samplers ---------------------------------------------------------------------------------


def euler_sample(v_fn: Callable[[Array, Array], Array], noise: Array, sigmas: np.ndarray) -> Array:
    """Flow-matching Euler ODE sampler of the teacher (spec 5.2).

    Args:
      v_fn: ``v_fn(z [B, ...], s [B]) -> v``, flow velocity at flow time ``s`` (unscaled).
      noise: ``z`` at ``sigmas[0]`` (usually 1), [B, ...].
      sigmas: decreasing flow times ``[N + 1]`` ending at 0, e.g. :func:`flux_sigmas`.
    Returns:
      ``z`` at ``sigmas[-1]``, float32 [B, ...]: ``z <- z + (sigma_next - sigma) v`` per step.
    """
    sig = jnp.asarray(sigmas, F32)
    B = noise.shape[0]

    def step(z, pair):
        s, s_next = pair
        v = v_fn(z, jnp.full((B,), s, F32)).astype(F32)
        return z + (s_next - s) * v, None

    z, _ = jax.lax.scan(step, noise.astype(F32), (sig[:-1], sig[1:]))
    return z


def meanflow_sample(
    u_fn: Callable[[Array, Array, Array], Array], noise: Array, sigmas: np.ndarray
) -> Array:
    """MeanFlow few-step sampler (spec 5.4): ``z_r = z_t - (t - r) u(z_t, t, t - r)``.

    Args:
      u_fn: ``u_fn(z [B, ...], t [B], delta [B]) -> u``, average velocity over ``[t - delta, t]``.
      noise: ``z`` at ``sigmas[0]``, [B, ...].
      sigmas: decreasing flow times ``[N + 1]`` ending at 0, e.g. :func:`meanflow_sigmas`.
    Returns:
      ``z`` at ``sigmas[-1]``, float32 [B, ...].
    """
    sig = jnp.asarray(sigmas, F32)
    B = noise.shape[0]

    def step(z, pair):
        t, r = pair
        u = u_fn(z, jnp.full((B,), t, F32), jnp.full((B,), t - r, F32)).astype(F32)
        return z - (t - r) * u, None

    z, _ = jax.lax.scan(step, noise.astype(F32), (sig[:-1], sig[1:]))
    return z


def scm_sample(
    trig_fn: Callable[[Array, Array], Array],
    noise: Array,
    key: Array,
    times: np.ndarray,
    sigma_d: float = 0.5,
) -> Array:
    """Multistep consistency sampler in TrigFlow time (spec 5.3, diffusers SCMScheduler).

    Per step ``t_i -> t_{i+1}``: ``x0 = cos t_i x - sin t_i sigma_d F(x / sigma_d, t_i)``, then
    ``x <- cos t_{i+1} x0 + sin t_{i+1} sigma_d z`` with fresh ``z ~ N(0, I)`` (``z`` from
    ``jax.random.split(key, N)[i]``). With ``t_N = 0`` the last step returns ``x0`` itself.

    Args:
      trig_fn: ``trig_fn(x_hat [B, ...], t [B]) -> F``, TrigFlow velocity in standard units, e.g.
        ``lambda x, t: trigflow_velocity(flow_model, x, t)`` for a flow-velocity model.
      noise: ``N(0, I)`` [B, ...]; the initial state is ``x = sigma_d noise``.
      key: PRNG key for the intermediate noise (unused for one step).
      times: decreasing TrigFlow times ``[N + 1]`` ending at 0, e.g. :func:`scm_timesteps`.
    Returns:
      ``x0 / sigma_d`` [B, ...] float32: the sample in standard latent units.
    """
    ts = jnp.asarray(times, F32)
    B = noise.shape[0]
    keys = jax.random.split(key, len(times) - 1)

    def step(x, inp):
        t, t_next, k = inp
        tb = jnp.full((B,), t, F32)
        F = trig_fn(x / sigma_d, tb).astype(F32)
        x0 = jnp.cos(t) * x - jnp.sin(t) * sigma_d * F
        z = jax.random.normal(k, x.shape, F32)
        return jnp.cos(t_next) * x0 + jnp.sin(t_next) * sigma_d * z, None

    x, _ = jax.lax.scan(step, sigma_d * noise.astype(F32), (ts[:-1], ts[1:], keys))
    return x / sigma_d


__all__ = [
    "SCM_MAX_TIME",
    "euler_sample",
    "flux_shift_mu",
    "flux_sigmas",
    "meanflow_sample",
    "meanflow_sigmas",
    "scm_sample",
    "scm_timesteps",
]
