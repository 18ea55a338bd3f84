"""Sampling schedules: the times each sampler visits, host-side float32 NumPy (spec 5.2-5.4).

NumPy only, so that the JAX samplers (:mod:`distill_jax.pipeline.samplers`) and the PyTorch ones
(:mod:`distill_jax.torch_students`) walk the very same times.
"""

from __future__ import annotations

import math

import numpy as np

# diffusers' SCMScheduler default: 1.57080, slightly above pi/2 (cos = -3.7e-6). Kept for parity.
SCM_MAX_TIME = 1.57080


def scm_timesteps(
    steps: int, *, intermediate: float | None = 1.3, max_time: float = SCM_MAX_TIME
) -> np.ndarray:
    """TrigFlow times of the sCM sampler, ``[steps + 1]`` float32, ending at 0 (spec 5.3).

    ``steps == 2`` with ``intermediate`` (the paper's test script: 1.3) gives
    ``[max_time, intermediate, 0]``; otherwise ``linspace(max_time, 0, steps + 1)``, as
    ``diffusers.SCMScheduler.set_timesteps``. ``intermediate`` is ignored for ``steps != 2``.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    if steps == 2 and intermediate is not None:
        return np.array([max_time, intermediate, 0.0], np.float32)
    return np.linspace(max_time, 0.0, steps + 1).astype(np.float32)


def flux_shift_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's resolution-dependent shift ``mu`` (diffusers ``calculate_shift``), linear in L_img."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


def meanflow_sigmas(steps: int, mu: float) -> np.ndarray:
    """Shifted flow times ``[steps + 1]`` float32 from 1 down to 0 (spec 5.4).

    ``sigma = linspace(1, 1/steps, steps)``, ``sigma' = e^mu / (e^mu + 1/sigma - 1)``, then 0
    appended: the construction of FLUX's FlowMatchEulerDiscreteScheduler with dynamic shifting,
    in the same float32 arithmetic.
    """
    if steps < 1:
        raise ValueError("steps must be >= 1")
    sigmas = np.linspace(1.0, 1.0 / steps, steps).astype(np.float32)
    shifted = math.exp(mu) / (math.exp(mu) + (1.0 / sigmas - 1.0))
    return np.append(shifted.astype(np.float32), np.float32(0.0))


def flux_sigmas(
    steps: int,
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> np.ndarray:
    """FLUX's teacher schedule ``[steps + 1]`` (FluxPipeline + FlowMatchEulerDiscreteScheduler,
    ``use_dynamic_shifting=True``; defaults are the FLUX.1 scheduler config)."""
    mu = flux_shift_mu(image_seq_len, base_seq_len, max_seq_len, base_shift, max_shift)
    return meanflow_sigmas(steps, mu)


__all__ = ["SCM_MAX_TIME", "flux_shift_mu", "flux_sigmas", "meanflow_sigmas", "scm_timesteps"]
