"""Samplers with exact models land on the exact ODE solution; schedules equal diffusers'."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, SCMScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from test_parameterization import gaussian  # shared closed forms (tests/ is on sys.path)

from distill_jax.pipeline.samplers import (
    euler_sample,
    flux_shift_mu,
    flux_sigmas,
    meanflow_sample,
    meanflow_sigmas,
    scm_sample,
    scm_timesteps,
)

# FLUX.1-dev / FLUX.1-lite scheduler_config.json
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)


@pytest.mark.parametrize("seq_len, steps", [(1024, 4), (1024, 28), (4096, 2), (4096, 28)])
def test_flux_sigmas_match_diffusers(seq_len, steps):
    sched = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    mu = calculate_shift(seq_len, 256, 4096, 0.5, 1.15)
    assert flux_shift_mu(seq_len) == pytest.approx(mu, abs=1e-12)
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    ours = flux_sigmas(steps, seq_len)
    assert ours.dtype == np.float32 and ours.shape == (steps + 1,)
    np.testing.assert_array_equal(ours, sched.sigmas.numpy())  # bitwise: same float32 arithmetic


def test_meanflow_sigmas_spec_values():
    """Spec 5.4: L_img = 1024 gives mu = 0.63 and these shifted sigmas."""
    mu = flux_shift_mu(1024)
    assert mu == pytest.approx(0.63, abs=1e-9)
    np.testing.assert_allclose(meanflow_sigmas(2, mu), [1.0, 0.6525, 0.0], atol=1e-4)
    np.testing.assert_allclose(
        meanflow_sigmas(4, mu), [1.0, 0.8492, 0.6525, 0.3849, 0.0], atol=1e-4
    )


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_scm_timesteps_match_diffusers(steps):
    sched = SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)
    sched.set_timesteps(steps, intermediate_timesteps=1.3 if steps == 2 else None)
    ours = scm_timesteps(steps)
    assert ours.dtype == np.float32
    np.testing.assert_array_equal(ours, sched.timesteps.numpy())
    np.testing.assert_allclose(scm_timesteps(2, intermediate=None), np.linspace(1.5708, 0, 3))


def test_scm_sampler_matches_diffusers_step_loop():
    """Same model through diffusers' SCMScheduler.step (its pred_x0), re-noised with our draws."""
    G = gaussian(4, seed=7)
    trig = lambda x, t: G.trig_velocity(x, t) + 0.1 * x  # noqa: E731 - any smooth field
    noise = jax.random.normal(jax.random.key(0), (8, 4))
    key = jax.random.key(1)
    ours = scm_sample(trig, noise, key, scm_timesteps(4))
    # replay: the sampler draws step i's noise from jax.random.split(key, N)[i]
    zs = [torch.tensor(np.asarray(jax.random.normal(k, (8, 4)))) for k in jax.random.split(key, 4)]
    sched = SCMScheduler(num_train_timesteps=1000, prediction_type="trigflow", sigma_data=0.5)
    sched.set_timesteps(4, intermediate_timesteps=None)
    x = torch.tensor(np.asarray(0.5 * noise))
    for i, t in enumerate(sched.timesteps[:-1]):
        F = trig(jnp.asarray(x.numpy() / 0.5), jnp.full((8,), float(t)))
        _, x0 = sched.step(torch.tensor(np.asarray(0.5 * F)), t, x, return_dict=False)
        t_next = sched.timesteps[i + 1]
        x = torch.cos(t_next) * x0 + torch.sin(t_next) * 0.5 * zs[i]
    np.testing.assert_allclose(ours, x0.numpy() / 0.5, atol=2e-5)


def test_scm_one_step_with_exact_consistency_model_is_the_ode_solution():
    G = gaussian(4, seed=8)
    noise = jax.random.normal(jax.random.key(2), (512, 4))
    x = scm_sample(G.consistency_velocity, noise, jax.random.key(3), scm_timesteps(1))
    # PF-ODE from pure noise at t = pi/2: x0 = m + sd * noise (z-score preserved)
    np.testing.assert_allclose(x, G.m + G.sd * noise, atol=5e-5)
    # Multistep: every step lands on an exact sample, so the marginal is the data's.
    xs = scm_sample(G.consistency_velocity, noise, jax.random.key(4), scm_timesteps(4))
    np.testing.assert_allclose(xs.mean(0), G.m, atol=4 * float(G.sd.max()) / np.sqrt(512))
    np.testing.assert_allclose(xs.std(0), G.sd, rtol=0.15)


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_meanflow_sampler_with_exact_average_velocity_is_the_ode_solution(steps):
    G = gaussian(4, seed=9)
    noise = jax.random.normal(jax.random.key(5), (256, 4))
    z = meanflow_sample(G.average_velocity, noise, meanflow_sigmas(steps, flux_shift_mu(1024)))
    np.testing.assert_allclose(z, G.m + G.sd * noise, atol=5e-5)


def test_euler_sampler_converges_to_the_ode_solution():
    G = gaussian(4, seed=10)
    noise = jax.random.normal(jax.random.key(6), (256, 4))
    exact = G.m + G.sd * noise
    err = [
        float(jnp.abs(euler_sample(G.flow_velocity, noise, flux_sigmas(n, 1024)) - exact).max())
        for n in (8, 64, 512)
    ]
    # first order: the error falls ~8x per 8x steps (measured 0.55, 0.074, 0.0093)
    assert err[1] < err[0] / 5 and err[2] < err[1] / 5 and err[2] < 0.015
