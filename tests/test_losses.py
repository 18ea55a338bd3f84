"""Losses: fixed points at the exact fields, descent directions, JVP tangents vs finite
differences, float64 transcriptions of the paper's branching code, slip switches, rescale refit."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers.models.embeddings import get_timestep_embedding
from test_parameterization import _xp, gaussian  # shared closed forms (tests/ is on sys.path)

from distill_jax import losses as L
from distill_jax.losses.scm import _trig
from distill_jax.parameterization import bcast

D = 3  # data dimension of the toy problems
BF16 = jnp.bfloat16
C_DIR = jnp.array([1.0, -0.5, 0.25])  # direction of the student's perturbation


def J(a):
    return jnp.asarray(a, jnp.float32)


def bf16_round(a):
    return np.array(J(a).astype(BF16).astype(jnp.float32))


# --- a tiny tanh MLP usable with NumPy float64 (references) and jax.numpy (losses) -------------


def mlp_init(seed: int, d_in: int, d_out: int = D, hidden: int = 16) -> dict:
    rng = np.random.default_rng(seed)
    return {
        "w1": rng.normal(0, 1 / np.sqrt(d_in), (d_in, hidden)),
        "b1": rng.normal(0, 0.3, hidden),
        "w2": rng.normal(0, 1 / np.sqrt(hidden), (hidden, d_out)),
        "b2": rng.normal(0, 0.1, d_out),
    }


def mlp(p: dict, *cols):
    xp = _xp(*cols)
    h = xp.concatenate([c if c.ndim == 2 else c[:, None] for c in cols], axis=-1)
    return xp.tanh(h @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def f32(p: dict) -> dict:
    return jax.tree.map(J, p)


# --- flow matching ----------------------------------------------------------------------------


def test_flow_matching_gradient_zero_at_exact_velocity_and_descends():
    G = gaussian(D)
    x0 = G.sample(jax.random.key(0), 40_000)

    def loss(theta):
        fn = lambda x, s, _: G.flow_velocity(x, s) + theta * C_DIR  # noqa: E731
        return L.flow_matching_loss(fn, x0, jax.random.key(1))[0]

    g0, g1 = jax.grad(loss)(0.0), jax.grad(loss)(0.5)
    # E[grad] = 2 theta |c|^2 / D; the exact field is optimal only in expectation (batch noise).
    expected = 2 * 0.5 * float(C_DIR @ C_DIR) / D
    assert abs(float(g1) - expected) < 0.05 * expected
    assert abs(float(g0)) < 0.02 * expected


# --- sCM --------------------------------------------------------------------------------------


def _scm_grads(student, theta, step, n=256):
    """d scm_loss / d theta and g_norm for the student ``F + theta c`` (F the exact consistency
    model "cm" or the exact teacher velocity "teacher") and the exact teacher."""
    G = gaussian(D, seed=5)
    x0 = G.sample(jax.random.key(2), n)
    F = G.consistency_velocity if student == "cm" else G.trig_velocity

    def loss(th):
        fn = lambda x, t, _: (F(x, t) + th * C_DIR, None)  # noqa: E731
        return L.scm_loss(
            fn, lambda x, t, _: G.trig_velocity(x, t), x0, jax.random.key(3), step=step
        )

    (_, metrics), grad = jax.value_and_grad(loss, has_aux=True)(theta)
    return float(grad), float(metrics["scm/g_norm"])


@pytest.mark.parametrize("student, step, other", [("cm", 10_000, "teacher"), ("teacher", 0, "cm")])
def test_scm_fixed_point_and_descent(student, step, other):
    """After warmup the fixed point is the exact consistency model; at step 0 (r = 0) the tangent
    is only -cos^2 t (F - F_T), whose fixed point is the teacher's own velocity."""
    (g0, n0), (g1, n1) = _scm_grads(student, 0.0, step), _scm_grads(student, 0.3, step)
    assert g1 > 0.0  # a step against the gradient moves theta towards 0
    assert abs(g0) < 1e-4 * g1  # measured 2.7e-8 (consistency model), 0 (teacher)
    assert n0 < 1e-4 * n1
    # ...and the other one is not a fixed point: its tangent has the scale of theta = 0.3
    assert _scm_grads(other, 0.0, step)[1] > 0.5 * n1


def _scm_reference(ps, pt, x0, z, t, lv, step, sigma_d=0.5, warmup=4000, c=0.1, h=1e-5):
    """Float64 transcription of the paper's sCMLoss (spec 3.2) in its code units, with a central
    finite difference for the JVP. Student F = mlp(ps; x_hat, t); ``lv`` [B] its logvar.
    Returns (loss, mean ||g||, mean w, normalised g [B, D], w [B])."""
    F_s = lambda xh, tt: mlp(ps, xh, tt)  # noqa: E731
    ct, st = np.cos(t)[:, None], np.sin(t)[:, None]
    x_t = ct * sigma_d * x0 + st * sigma_d * z
    dxdt = sigma_d * mlp(pt, x_t / sigma_d, t)
    vx, vt = ct * st * dxdt / sigma_d, (ct * st)[:, 0]
    dF = F_s(x_t / sigma_d + h * vx, t + h * vt) - F_s(x_t / sigma_d - h * vx, t - h * vt)
    dF = dF / (2 * h)
    r = min(1.0, step / warmup)
    g = -(ct**2) * (sigma_d * F_s(x_t / sigma_d, t) - dxdt) - r * (ct * st * x_t + sigma_d * dF)
    g_norm = np.linalg.norm(g, axis=1, keepdims=True)
    g = g / (g_norm + c)
    w = 1 / (sigma_d * np.tan(t))
    loss = np.mean((w / np.exp(lv))[:, None] * g**2 + lv[:, None])
    return loss, g_norm.mean(), w.mean(), g, w


def _scm_problem(seed, n):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, D)), rng.normal(size=(n, D)), rng.uniform(0.05, 1.5, n)


@pytest.mark.parametrize("step", [0, 1000, 8000])
def test_scm_matches_float64_transcription(step):
    ps, pt, p_lv = mlp_init(10, D + 1), mlp_init(12, D + 1), mlp_init(11, 1, 1, hidden=4)
    x0, z, t = _scm_problem(0, 32)
    ps32, pt32, p_lv32 = f32(ps), f32(pt), f32(p_lv)
    student = lambda x, tt, _: (mlp(ps32, x, tt), mlp(p_lv32, tt))  # noqa: E731
    teacher_fn = lambda x, tt, _: mlp(pt32, x, tt)  # noqa: E731
    kw = dict(step=step, t=J(t), noise=J(z))
    loss, m = L.scm_loss(student, teacher_fn, J(x0), jax.random.key(0), **kw)
    ref, g_norm, w, _, _ = _scm_reference(ps, pt, x0, z, t, mlp(p_lv, t)[:, 0], step)
    np.testing.assert_allclose(float(loss), ref, rtol=1e-6)  # measured 1.2e-7
    np.testing.assert_allclose(float(m["scm/g_norm"]), g_norm, rtol=2e-5)
    np.testing.assert_allclose(float(m["scm/mean_weight"]), w, rtol=2e-5)
    np.testing.assert_allclose(float(m["scm/warmup"]), min(1.0, step / 4000))


def test_scm_logvar_gradient_vanishes_at_its_optimum():
    """Adaptive weighting: per sample, e^{logvar} = w mean(g_normalised^2) minimises the loss."""
    ps, pt = mlp_init(20, D + 1), mlp_init(21, D + 1)
    x0, z, t = _scm_problem(1, 16)
    ps32, pt32 = f32(ps), f32(pt)

    def loss(lv):
        fn = lambda x, tt, _: (mlp(ps32, x, tt), lv)  # noqa: E731
        kw = dict(step=10**6, t=J(t), noise=J(z))
        return L.scm_loss(fn, lambda x, tt, _: mlp(pt32, x, tt), J(x0), jax.random.key(0), **kw)[0]

    _, _, _, g, w = _scm_reference(ps, pt, x0, z, t, np.zeros(16), step=10**6)
    lv_opt = np.log(w * np.mean(g**2, axis=1))
    grad_opt, grad_off = jax.grad(loss)(J(lv_opt)), jax.grad(loss)(J(lv_opt + 0.5))
    assert float(jnp.max(jnp.abs(grad_opt))) < 1e-4 * float(jnp.max(jnp.abs(grad_off)))
    assert bool(jnp.all(grad_off > 0))


def test_scm_tangent_matches_finite_differences():
    ps, pt = f32(mlp_init(30, D + 1)), f32(mlp_init(31, D + 1))
    k0, k1 = jax.random.split(jax.random.key(4))
    x, t = jax.random.normal(k0, (8, D)), jax.random.uniform(k1, (8,), minval=0.1, maxval=1.4)
    F_fn = lambda xx, tt: mlp(ps, xx, tt)  # noqa: E731
    F_T = mlp(pt, x, t)
    dF = L.scm_tangent(F_fn, x, t, F_T)
    cs, h = jnp.cos(t) * jnp.sin(t), 1e-2
    fd = F_fn(x + h * cs[:, None] * F_T, t + h * cs) - F_fn(x - h * cs[:, None] * F_T, t - h * cs)
    np.testing.assert_allclose(dF, fd / (2 * h), rtol=2e-3, atol=2e-4)


# --- MeanFlow ---------------------------------------------------------------------------------


def _mf_exact_grad(theta, tangent_velocity, n=256):
    G = gaussian(D, seed=6)
    x0 = G.sample(jax.random.key(5), n)

    def loss(th):
        fn = lambda z, t, d, _: G.average_velocity(z, t, d) + th * C_DIR  # noqa: E731
        teacher_fn = lambda z, t, _: G.flow_velocity(z, t)  # noqa: E731
        kw = dict(tangent_velocity=tangent_velocity)
        return L.meanflow_loss(fn, teacher_fn, x0, jax.random.key(6), **kw)[0]

    return float(jax.grad(loss)(theta))


def test_meanflow_fixed_point_and_descent():
    g0, g1 = _mf_exact_grad(0.0, "teacher"), _mf_exact_grad(0.3, "teacher")
    assert g1 > 0.0
    assert abs(g0) < 1e-4 * g1  # measured 2.3e-6
    # Paper slip 7.2: the ground-truth tangent eps - x0 moves the fixed point off the exact
    # average velocity (measured 0.20 of the gradient at theta = 0.3).
    assert abs(_mf_exact_grad(0.0, "ground_truth")) > 0.05 * g1


def test_meanflow_dudt_matches_finite_differences():
    p = f32(mlp_init(40, D + 2))
    ks = jax.random.split(jax.random.key(7), 3)
    z, v = jax.random.normal(ks[0], (8, D)), jax.random.normal(ks[1], (8, D))
    t = jax.random.uniform(ks[2], (8,), minval=0.3, maxval=0.9)
    r, h = 0.5 * t, 1e-2
    u_fn = lambda zz, tt, dd: mlp(p, zz, tt, dd)  # noqa: E731
    dudt = L.meanflow_dudt(u_fn, z, r, t, v)
    fd = (u_fn(z + h * v, t + h, t + h - r) - u_fn(z - h * v, t - h, t - h - r)) / (2 * h)
    np.testing.assert_allclose(dudt, fd, rtol=2e-3, atol=2e-4)


MF_CFG = dict(omega=0.9, kappa=0.5, cfg_t_min=0.2, cfg_t_max=0.8, adaptive_p=0.5, adaptive_c=1.0)


def _mf_reference(ps, pt, pb, ground_truth_tangent, cfg_own_delta, h=1e-5):
    """Float64 transcription of the paper's MeanFlowLoss branching (spec 4.3): separate CFG and
    non-CFG subsets, finite-difference JVPs. Student u = mlp(ps; z, t, delta, cond). ``pb`` is
    the problem: x0, eps, r, t, drop, cond, uncond (float64 NumPy)."""
    x0, eps, r, t, drop = pb["x0"], pb["eps"], pb["r"], pb["t"], pb["drop"]
    cond, uncond = pb["cond"], np.broadcast_to(pb["uncond"], pb["cond"].shape)
    stu = lambda z, tt, d, cc: mlp(ps, z, tt, d, cc)  # noqa: E731
    c_in = np.where(drop[:, None], uncond, cond)
    z = (1 - t[:, None]) * x0 + t[:, None] * eps
    v_gt, delta = eps - x0, t - r
    u, vT = stu(z, t, delta, c_in), mlp(pt, z, t, c_in)

    def dudt(i, v):  # d/dh u(z + h v, t + h, (t + h) - r)
        fwd = stu(z[i] + h * v, t[i] + h, delta[i] + h, c_in[i])
        return (fwd - stu(z[i] - h * v, t[i] - h, delta[i] - h, c_in[i])) / (2 * h)

    tgt = np.zeros_like(u)
    i = (t >= MF_CFG["cfg_t_min"]) & (t <= MF_CFG["cfg_t_max"]) & ~drop
    dc = delta[i] if cfg_own_delta else 0 * delta[i]
    u_c, u_0 = stu(z[i], t[i], dc, cond[i]), stu(z[i], t[i], dc, uncond[i])
    omega, kappa = MF_CFG["omega"], MF_CFG["kappa"]
    v_mix = omega * vT[i] + kappa * u_c + (1 - omega - kappa) * u_0
    tgt[i] = v_mix - delta[i][:, None] * dudt(i, v_mix)
    i = ~i
    tgt[i] = vT[i] - delta[i][:, None] * dudt(i, v_gt[i] if ground_truth_tangent else vT[i])
    e = np.sum((u - tgt) ** 2, axis=1)
    return np.mean(e / (e + MF_CFG["adaptive_c"]) ** MF_CFG["adaptive_p"])


@pytest.mark.parametrize("ground_truth_tangent", [False, True])
@pytest.mark.parametrize("cfg_own_delta", [False, True])
def test_meanflow_matches_float64_transcription(ground_truth_tangent, cfg_own_delta):
    ps, pt = mlp_init(50, D + 4), mlp_init(51, D + 3)
    rng = np.random.default_rng(2)
    n = 48
    a = np.sort(rng.uniform(0.02, 0.98, (2, n)), axis=0)
    r, t = bf16_round(a[0]).astype(np.float64), bf16_round(a[1]).astype(np.float64)
    r[::4] = t[::4]  # some r = t
    pb = dict(x0=rng.normal(size=(n, D)), eps=rng.normal(size=(n, D)), r=r, t=t)
    pb |= dict(
        drop=rng.uniform(size=n) < 0.3, cond=rng.normal(size=(n, 2)), uncond=np.zeros((1, 2))
    )
    ref = _mf_reference(ps, pt, pb, ground_truth_tangent, cfg_own_delta)
    ps32, pt32 = f32(ps), f32(pt)
    kw = MF_CFG | dict(cond=J(pb["cond"]), uncond=J(pb["uncond"]), r=J(r), t=J(t))
    kw |= dict(noise=J(pb["eps"]), drop=jnp.asarray(pb["drop"]))
    kw |= dict(cfg_at_r_equals_t=not cfg_own_delta)
    kw |= dict(tangent_velocity="ground_truth" if ground_truth_tangent else "teacher")
    stu, tea = lambda z, tt, d, c: mlp(ps32, z, tt, d, c), lambda z, tt, c: mlp(pt32, z, tt, c)
    loss_fn = jax.jit(lambda x0, key: L.meanflow_loss(stu, tea, x0, key, **kw))
    loss, m = loss_fn(J(pb["x0"]), jax.random.key(0))
    np.testing.assert_allclose(float(loss), ref, rtol=1e-5)
    cfg = (t >= 0.2) & (t <= 0.8) & ~pb["drop"]
    np.testing.assert_allclose(float(m["meanflow/cfg_fraction"]), cfg.mean())
    np.testing.assert_allclose(float(m["meanflow/r_neq_t_fraction"]), (r < t).mean())
    # The other setting of the two switches gives a different loss (each slip matters here).
    other = _mf_reference(ps, pt, pb, not ground_truth_tangent, not cfg_own_delta)
    assert abs(other - ref) > 0.01 * ref


def test_meanflow_cfg_terms_at_r_equals_t_coincide_when_all_r_equal_t():
    p, pt = f32(mlp_init(60, D + 4)), f32(mlp_init(61, D + 3))
    x0 = jax.random.normal(jax.random.key(8), (32, D))
    cond = jax.random.normal(jax.random.key(9), (32, 2))

    def loss(cfg_at_r_equals_t, ratio):
        stu, tea = lambda z, t, d, c: mlp(p, z, t, d, c), lambda z, t, c: mlp(pt, z, t, c)
        kw = dict(cond=cond, uncond=jnp.zeros((1, 2)), ratio_r_neq_t=ratio)
        kw["cfg_at_r_equals_t"] = cfg_at_r_equals_t
        return float(L.meanflow_loss(stu, tea, x0, jax.random.key(10), **kw)[0])

    assert loss(True, 0.0) == loss(False, 0.0)
    assert loss(True, 0.75) != loss(False, 0.75)


# --- precision slip and presets ---------------------------------------------------------------


def test_time_dtype_rounds_times():
    """time_dtype=bfloat16 (spec 7.6) rounds the times: bf16-rounded and raw float32 times give the
    same loss under bf16 and different losses under float32."""
    G = gaussian(D)
    x0 = G.sample(jax.random.key(11), 64)
    stu = lambda x, tt, _: (G.consistency_velocity(x, tt) + 0.1, None)  # noqa: E731
    # a MeanFlow error that depends on t (a constant offset would give a t-independent loss)
    u = lambda z, tt, d, _: G.average_velocity(z, tt, d) + 0.3 * tt[:, None] * z  # noqa: E731

    @functools.partial(jax.jit, static_argnums=(0, 2))
    def loss(method, tt, dtype):
        if method == "scm":
            tea = lambda x, t_, _: G.trig_velocity(x, t_)  # noqa: E731
            return L.scm_loss(stu, tea, x0, jax.random.key(13), step=100, t=tt, time_dtype=dtype)[0]
        kw = dict(r=0.5 * tt, t=tt, time_dtype=dtype, adaptive_p=0.0)  # 0.5 t rounds like t
        tea = lambda z, t_, _: G.flow_velocity(z, t_)  # noqa: E731
        return L.meanflow_loss(u, tea, x0, jax.random.key(15), **kw)[0]

    for method, lo, hi in (("scm", 0.1, 1.5), ("meanflow", 0.2, 0.95)):
        t = jax.random.uniform(jax.random.key(12), (64,), minval=lo, maxval=hi)
        tq = J(bf16_round(t))
        assert float(loss(method, t, BF16)) == float(loss(method, tq, BF16))
        assert float(loss(method, t, jnp.float32)) != float(loss(method, tq, jnp.float32))
    # In the paper's code t = pi/2 - 1e-4 becomes 1.5703125; the trig coefficients follow suit.
    c32, c16 = _trig(jnp.array([1.5707]), jnp.float32)[0], _trig(jnp.array([1.5707]), BF16)[0]
    assert float(c16[0]) > 5 * float(c32[0])
    # bf16 coefficients of the bf16 time, jitted as in the trainer (where XLA could keep bf16
    # arithmetic in float32): cos and sin rounded as ml_dtypes rounds them
    tt = np.linspace(0.05, 1.5, 29, dtype=np.float32)
    c, s = jax.jit(_trig, static_argnums=1)(tt, BF16)
    np.testing.assert_array_equal(c, bf16_round(np.cos(bf16_round(tt))))
    np.testing.assert_array_equal(s, bf16_round(np.sin(bf16_round(tt))))


@pytest.mark.parametrize("separate_tangent", [False, True])
def test_meanflow_rounds_delta_before_the_embedder_and_in_the_target(separate_tangent):
    """``time_dtype=bfloat16`` rounds Δ = t − r to bf16, as the paper subtracts its bf16 times
    in bf16 (spec 7.6): the student's Δ input (in the JVP pass and, with ``tangent_fn``, the
    gradient pass) is ``bf16(t - r)`` by ml_dtypes, and so is the target's. With ``u = Δ`` and
    ``v_T = 0``, ``du/dt = 1``: the error is Δ_student + Δ_target. float32 keeps Δ exact."""
    t, r = np.float32([0.99609375, 0.5, 0.75]), np.float32([2**-13, 0.001, 0.25])
    x0 = jnp.zeros((3, 2))

    def run(dtype):
        seen = []

        def u(z, tt, d, _):
            jax.debug.callback(lambda d_: seen.append(np.asarray(d_)), d)
            return jnp.broadcast_to(d[:, None], z.shape)

        kw = dict(r=r, t=t, time_dtype=dtype, adaptive_p=0.0)
        if separate_tangent:
            kw["tangent_fn"] = u
        _, m = L.meanflow_loss(u, lambda z, tt, _: jnp.zeros_like(z), x0, jax.random.key(0), **kw)
        return seen, float(m["meanflow/mse"])

    seen, mse = run(BF16)
    delta = bf16_round(bf16_round(t) - bf16_round(r))  # [0.99609375, 0.49804688, 0.5]
    assert len(seen) == 1 + separate_tangent
    for d in seen:
        np.testing.assert_array_equal(d, delta)
    np.testing.assert_allclose(mse, np.mean((2 * delta) ** 2), rtol=1e-6)
    seen, mse = run(jnp.float32)
    exact = t - r
    assert not np.array_equal(exact, delta)
    for d in seen:
        np.testing.assert_array_equal(d, exact)
    np.testing.assert_allclose(mse, np.mean((2 * exact) ** 2), rtol=1e-6)


def test_paper_slips_are_accepted_keywords():
    mf = {"tangent_velocity": "ground_truth", "cfg_at_r_equals_t": False, "time_dtype": BF16}
    assert L.paper_slips("meanflow") == {"loss": mf, "model": {"delta_init": "copy"}}
    assert L.paper_slips("scm") == {"loss": {"time_dtype": BF16}, "model": {"logvar_time": "trig"}}
    x0, key = gaussian(D).sample(jax.random.key(16), 8), jax.random.key(0)
    mf_kw, scm_kw = L.paper_slips("meanflow")["loss"], L.paper_slips("scm")["loss"]
    L.meanflow_loss(lambda z, t, d, _: z, lambda z, t, _: z, x0, key, **mf_kw)
    L.scm_loss(lambda x, t, _: (x, t), lambda x, t, _: x, x0, key, step=0, **scm_kw)
    with pytest.raises(ValueError):
        L.paper_slips("imm")
    with pytest.raises(ValueError):
        L.meanflow_loss(lambda *a: a[0], lambda *a: a[0], x0, key, tangent_velocity="gt")


def test_losses_are_jittable_with_traced_step():
    G = gaussian(D)
    x0 = G.sample(jax.random.key(18), 16)

    @jax.jit
    def f(step, key):
        stu = lambda x, t, _: (G.trig_velocity(x, t), jnp.zeros(x.shape[0]))  # noqa: E731
        return L.scm_loss(stu, lambda x, t, _: G.trig_velocity(x, t), x0, key, step=step)[1]

    m = f(jnp.asarray(2000), jax.random.key(0))
    np.testing.assert_allclose(float(m["scm/warmup"]), 0.5)
    assert all(v.shape == () for v in m.values())
    assert bcast(jnp.ones(4), jnp.ones((4, 2, 3))).shape == (4, 1, 1)


# --- rescale ----------------------------------------------------------------------------------


def test_timestep_sinusoid_matches_diffusers():
    tau = np.linspace(0, 1000, 17)
    kw = dict(flip_sin_to_cos=True, downscale_freq_shift=0)
    ref = get_timestep_embedding(torch.tensor(tau), 256, **kw).numpy()
    np.testing.assert_allclose(L.timestep_sinusoid(tau / 1000, scale=1000.0), ref, atol=2e-4)


def _embed(kernel, bias, tau, scale):
    return L.timestep_sinusoid(tau, scale=scale) @ kernel + bias


def test_refit_exact_when_only_shared_frequencies_are_used():
    """1000 f_i = f_{i-96}: a kernel on the 32 lowest x1000 frequencies is exactly refittable."""
    rng = np.random.default_rng(0)
    K = np.zeros((256, 64))
    for lo in (96, 224):
        K[lo : lo + 32] = rng.normal(0, 1 / 16, (32, 64))
    b = rng.normal(0, 0.1, 64)
    K2, b2, rel = L.refit_time_embedding(K, b, old_scale=1000.0, new_scale=1.0, ridge=1e-12)
    tau = np.linspace(0, 1, 3001)
    target = _embed(K, b, tau, 1000.0)
    assert rel < 1e-7  # measured 3.3e-8
    assert np.linalg.norm(_embed(K2, b2, tau, 1.0) - target) / np.linalg.norm(target) < 1e-7
    # The default ridge (1e-3) trades a little accuracy for a bounded kernel (measured 1.2e-3).
    assert L.refit_time_embedding(K, b)[2] < 3e-3
    with pytest.warns(UserWarning, match="aliased"):  # 0.005 > pi / 1000
        L.refit_time_embedding(K, b, grid=np.linspace(0.0, 10.0, 2001))


@pytest.mark.parametrize("kind", ["time", "guidance"])
def test_refit_is_least_squares_optimum(kind):
    """For a dense random kernel no exact refit exists (spec 2.2); the refit is the ridge
    least-squares optimum and its reported residual is the true one."""
    rng = np.random.default_rng(1)
    K, b = rng.normal(0, 1 / 16, (256, 8)), rng.normal(0, 0.1, 8)
    grid = np.linspace(0, 1, 8193) if kind == "time" else np.linspace(1, 10, 8193)
    K2, b2, rel = L.refit_time_embedding(K, b, grid=grid)  # default ridge 1e-3
    Y = _embed(K, b, grid, 1000.0)
    true_rel = np.linalg.norm(_embed(K2, b2, grid, 1.0) - Y) / np.linalg.norm(Y)
    np.testing.assert_allclose(rel, true_rel, rtol=1e-6)
    # Optimality for the ridge objective J = ||fit - Y||^2 + lam ||K'||^2: J is stationary (no
    # random perturbation, either sign, lowers it).
    A = np.concatenate([L.timestep_sinusoid(grid), np.ones((len(grid), 1))], axis=1)
    lam = 1e-3 * np.sum(A * A) / A.shape[1]

    def obj(K_, b_):
        return np.sum((_embed(K_, b_, grid, 1.0) - Y) ** 2) + lam * np.sum(K_**2)

    for _ in range(4):
        dK, db = rng.normal(0, 1e-3, K2.shape), rng.normal(0, 1e-3, b2.shape)
        assert min(obj(K2 + dK, b2 + db), obj(K2 - dK, b2 - db)) >= obj(K2, b2) * (1 - 1e-12)
    # ...it beats the best constant (the target's mean), and the default ridge keeps the kernel
    # at the original's scale (an unregularised fit has entries ~1e4 that cancel).
    assert rel < np.linalg.norm(Y - Y.mean(0)) / np.linalg.norm(Y)  # measured 0.73 / 0.80
    assert np.linalg.norm(K2) < 3 * np.linalg.norm(K)  # measured 2.7x / 2.3x


def test_rescale_regression_loss():
    key = jax.random.key(17)
    x0 = jax.random.normal(key, (64, D))
    seen = {}

    def stock(x, s, g, _):  # applies its own x1000 to the unscaled s and g
        seen["s"], seen["g"] = s, g
        return x * jnp.cos(1000 * s)[:, None] + 1e-3 * (1000 * g)[:, None]

    def loss(theta, sampler="uniform"):
        fn = lambda x, s, g, _: x * jnp.cos(1000 * s)[:, None] + g[:, None] + theta  # noqa: E731
        return L.rescale_regression_loss(fn, stock, x0, key, time_sampler=sampler)

    l0, m0 = loss(0.0)
    assert float(l0) < 1e-10 and float(m0["rescale/rel_err"]) < 1e-10
    assert float(jnp.min(seen["s"])) >= 0 and float(jnp.max(seen["s"])) <= 1
    assert 2.0 <= float(jnp.min(seen["g"])) and float(jnp.max(seen["g"])) <= 5.0
    grad = jax.grad(lambda th: loss(th, "logit_normal")[0])(0.2)
    np.testing.assert_allclose(float(grad), 2 * 0.2, rtol=1e-5)


@pytest.mark.parametrize("beta", [1.0, 0.05])
def test_rescale_smooth_l1_is_torch_smooth_l1(beta):
    """loss="smooth_l1" is torch.nn.functional.smooth_l1_loss of the same velocities (float32),
    and rel_err stays the squared error's."""
    key = jax.random.key(3)
    x0 = jax.random.normal(key, (32, D))
    stock = lambda x, s, g, _: x * jnp.cos(1000 * s)[:, None]  # noqa: E731
    student = lambda x, s, g, _: 1.1 * x * jnp.cos(1000 * s)[:, None] + 0.2  # noqa: E731
    got, m = L.rescale_regression_loss(
        student, stock, x0, key, guidance_range=None, loss="smooth_l1", smooth_l1_beta=beta
    )
    _, want_m = L.rescale_regression_loss(student, stock, x0, key, guidance_range=None)
    seen = {}

    def spy(x, s, g, c):
        seen["x"], seen["s"] = x, s
        return stock(x, s, g, c)

    L.rescale_regression_loss(student, spy, x0, key, guidance_range=None)
    v, v_ref = (np.asarray(f(seen["x"], seen["s"], None, None)) for f in (student, stock))
    want = torch.nn.functional.smooth_l1_loss(torch.tensor(v), torch.tensor(v_ref), beta=beta)
    np.testing.assert_allclose(float(got), float(want), rtol=1e-5)
    np.testing.assert_allclose(float(m["rescale/rel_err"]), float(want_m["rescale/rel_err"]))
    with pytest.raises(ValueError, match="rescale loss='l1'"):
        L.rescale_regression_loss(student, stock, x0, key, guidance_range=None, loss="l1")
