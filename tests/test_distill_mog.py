"""Distillation works: a 2-D mixture of Gaussians with an exact teacher, distilled into small MLP
students with sCM (1 step) and MeanFlow (2 and 4 steps).

The teacher's flow velocity is exact (posterior-weighted mixture of the per-component Gaussian
velocities), so only the students are learned. As in the paper, each student starts from the
teacher: a short regression onto the teacher's velocity, then the distillation loss. Samples are
compared with the energy distance (V-statistic between the two empirical measures, >= 0) to a
fixed data sample; every sampler starts from the same noise, so the comparison is paired.

Measured on CPU (these seeds, N = 4000): teacher Euler ED at 1/2/4/64 steps = 0.957 / 0.163 /
0.0363 / 0.00071. sCM (300 init + 800 steps): 1 step 0.00059 (0.83x the 64-step teacher), 2 steps
0.00068. MeanFlow (300 init + 1000 steps): 4 steps 0.00065 (0.91x), 2 steps 0.00080 (1.12x),
1 step 0.0060. With training seed 3 instead of 7: sCM 1 step 0.91x; MeanFlow 4 steps 0.94x,
2 steps 1.45x.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from distill_jax.losses import meanflow_loss, scm_loss
from distill_jax.parameterization import sample_scm_times, trigflow_velocity
from distill_jax.pipeline.samplers import euler_sample, meanflow_sample, scm_sample, scm_timesteps

MEANS = jnp.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
WEIGHTS = jnp.array([0.4, 0.2, 0.2, 0.2])
TAU = 0.45  # component std; data std ~1.1 (standard units)
N_EVAL = 4000
BATCH = 1024


def sample_data(key, n):
    k1, k2 = jax.random.split(key)
    comp = jax.random.choice(k1, len(WEIGHTS), (n,), p=WEIGHTS)
    return MEANS[comp] + TAU * jax.random.normal(k2, (n, 2))


def teacher_velocity(x, s):
    """Exact E[eps - x0 | x_s = x] for x_s = (1 - s) x0 + s eps: x [B, 2], s [B] -> [B, 2]."""
    s = s[:, None]
    var = (1 - s) ** 2 * TAU**2 + s**2  # per-component isotropic variance of x_s
    d = x[:, None, :] - (1 - s)[:, None] * MEANS[None]  # [B, K, 2]
    post = jax.nn.softmax(jnp.log(WEIGHTS) - jnp.sum(d * d, -1) / (2 * var), axis=-1)
    e_eps = (s / var)[:, None] * d
    e_x0 = MEANS[None] + ((1 - s) * TAU**2 / var)[:, None] * d
    return jnp.sum(post[..., None] * (e_eps - e_x0), axis=1)


def teacher_trig(x_hat, t):
    return trigflow_velocity(teacher_velocity, x_hat, t)


@jax.jit
def energy_distance(x, y):
    def mean_dist(a, b):
        return jnp.mean(jnp.sqrt(jnp.sum((a[:, None] - b[None]) ** 2, -1) + 1e-20))

    return 2 * mean_dist(x, y) - mean_dist(x, x) - mean_dist(y, y)


def ed(x, y) -> float:
    return float(energy_distance(x, y))


# --- small MLPs -------------------------------------------------------------------------------


def mlp_init(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (a, b)) / np.sqrt(a), jnp.zeros(b))
        for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
    ]


def mlp(params, h):
    for w, b in params[:-1]:
        h = jax.nn.silu(h @ w + b)
    w, b = params[-1]
    return h @ w + b


def train(loss_fn, params, steps, lr, seed, schedule=True):
    """Adam on ``loss_fn(params, x0, key, step) -> (loss, metrics)``; one jitted step."""
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps, alpha=0.05) if schedule else lr)

    @jax.jit
    def step(params, state, i):
        k_data, k_loss = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
        x0 = sample_data(k_data, BATCH)
        grads, metrics = jax.grad(loss_fn, has_aux=True)(params, x0, k_loss, i)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, metrics

    state = opt.init(params)
    for i in range(steps):
        params, state, metrics = step(params, state, i)
    return params, metrics


@pytest.fixture(scope="module")
def reference():
    data = sample_data(jax.random.key(100), N_EVAL)
    noise = jax.random.normal(jax.random.key(101), (N_EVAL, 2))
    teacher = {
        n: ed(euler_sample(teacher_velocity, noise, np.linspace(1, 0, n + 1)), data)
        for n in (1, 2, 4, 64)
    }
    return data, noise, teacher


# --- sCM: 1 step ------------------------------------------------------------------------------


def scm_student(params, x_hat, t, cond=None):
    """TrigFlow velocity and logvar. Time enters only as (sin t, cos t): low frequencies keep
    dF/dt, and so the tangent, small (the reason for the x1 time scale, spec 2.2)."""
    emb = jnp.stack([jnp.sin(t), jnp.cos(t)], -1)
    return mlp(params["F"], jnp.concatenate([x_hat, emb], -1)), mlp(params["logvar"], emb)[:, 0]


def test_scm_one_step_student_matches_teacher_ode(reference):
    data, noise, teacher = reference
    k1, k2 = jax.random.split(jax.random.key(1))
    params = {"F": mlp_init(k1, [4, 128, 128, 128, 2]), "logvar": mlp_init(k2, [2, 1])}

    def init_loss(p, x0, key, step):  # student <- teacher velocity (paper: init from teacher)
        kt, kz = jax.random.split(key)
        t = sample_scm_times(kt, x0.shape[:1])
        x_hat = jnp.cos(t)[:, None] * x0 + jnp.sin(t)[:, None] * jax.random.normal(kz, x0.shape)
        loss = jnp.mean((scm_student(p, x_hat, t)[0] - teacher_trig(x_hat, t)) ** 2)
        return loss, {"init/loss": loss}

    params, _ = train(init_loss, params, 300, 3e-3, seed=8, schedule=False)

    def loss(p, x0, key, step):
        teacher_fn = lambda x, t, c: teacher_trig(x, t)  # noqa: E731
        # no tangent warmup: the student already starts at the teacher
        student_fn = functools.partial(scm_student, p)
        return scm_loss(student_fn, teacher_fn, x0, key, step=step, tangent_warmup_steps=0)

    params, metrics = train(loss, params, 800, 2e-3, seed=7)
    assert np.isfinite(float(metrics["scm/loss"]))
    F = lambda x, t: scm_student(params, x, t)[0]  # noqa: E731
    ed_1 = ed(scm_sample(F, noise, jax.random.key(5), scm_timesteps(1)), data)
    ed_2 = ed(scm_sample(F, noise, jax.random.key(5), scm_timesteps(2)), data)
    print(f"sCM ED 1 step {ed_1:.5f}, 2 steps {ed_2:.5f}; teacher {teacher}")
    assert ed_1 <= 1.5 * teacher[64]
    assert ed_2 <= 1.5 * teacher[64]
    assert teacher[1] > 100 * ed_1  # the teacher itself at 1 step collapses to the mean


# --- MeanFlow: 2 and 4 steps ------------------------------------------------------------------


def meanflow_student(params, z, t, delta, cond=None):
    emb = jnp.stack([t, jnp.cos(jnp.pi * t), delta, jnp.cos(jnp.pi * delta)], -1)
    return mlp(params, jnp.concatenate([z, emb], -1))


def test_meanflow_few_step_student_matches_teacher_ode(reference):
    data, noise, teacher = reference
    params = mlp_init(jax.random.key(1), [6, 128, 128, 128, 2])

    def init_loss(p, x0, key, step):  # u(z, t, 0) <- teacher velocity
        kt, kz = jax.random.split(key)
        t = jax.random.uniform(kt, x0.shape[:1])
        z = (1 - t)[:, None] * x0 + t[:, None] * jax.random.normal(kz, x0.shape)
        loss = jnp.mean((meanflow_student(p, z, t, 0 * t) - teacher_velocity(z, t)) ** 2)
        return loss, {"init/loss": loss}

    params, _ = train(init_loss, params, 300, 3e-3, seed=9, schedule=False)

    def loss(p, x0, key, step):
        # unconditional (no cond/uncond: no CFG); a wider logit-normal (sigma 1.4 instead of the
        # paper's 1.0) puts more pairs near t = 1, where few-step sampling starts
        teacher_fn = lambda z, t, c: teacher_velocity(z, t)  # noqa: E731
        student_fn = functools.partial(meanflow_student, p)
        return meanflow_loss(student_fn, teacher_fn, x0, key, sigma=1.4)

    params, metrics = train(loss, params, 1000, 4e-3, seed=7)
    assert np.isfinite(float(metrics["meanflow/loss"]))
    u = lambda z, t, d: meanflow_student(params, z, t, d)  # noqa: E731
    eds = {n: ed(meanflow_sample(u, noise, np.linspace(1, 0, n + 1)), data) for n in (1, 2, 4)}
    print(f"MeanFlow ED {eds}; teacher {teacher}")
    assert eds[4] <= 1.5 * teacher[64]
    # 2 steps: 1.12x here, but 1.45-1.50x with other training seeds, so the bound is 2x.
    assert eds[2] <= 2.0 * teacher[64]
    assert teacher[4] > 20 * eds[4] and teacher[2] > 100 * eds[2]
