"""The sCM / MeanFlow tangents' time derivative by central difference (``time_derivative=
"finite_difference"``) against closed forms and against the exact JVP on the tiny FLUX model; the
whole losses and their gradients by both routes; the float32 time embedding of ``time_scale =
1000`` students against float64; the config switches that select them."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill_jax import config, losses
from distill_jax.losses.finite_difference import TIME_DERIVATIVES
from distill_jax.methods import loss_switches, make_loss_fn, model_configs
from distill_jax.models.flux import Flux, FluxConfig, timestep_embedding
from distill_jax.parameterization import trigflow_velocity
from distill_jax.pipeline.latents import image_ids

F32, BF16 = jnp.float32, jnp.bfloat16
FD = "finite_difference"
B = 2


def rel(a, b) -> float:
    """Relative error ``||a - b|| / ||b||`` over all elements."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# --- (a) closed forms ---------------------------------------------------------------------------

W = 20.0  # angular frequency of the closed forms: third derivative large against round-off
C = np.array([0.5, -1.0, 2.0])


def _closed_form(method: str, time_derivative: str, dt: float):
    """``(tangent, exact, central)``: the loss's tangent of a student made of ``cos(W t)`` and
    ``sin(W t)``, its exact value, and the exact value of a central difference of step ``dt``
    (the time part times ``sinc(W dt) = sin(W dt) / (W dt)``), float64 references.

    sCM: ``F(x, t) = cos(W t) x + sin(W t) c``, tangent ``cs (cos(W t) F_T + d_t F)``.
    MeanFlow: ``u(z, t, Δ) = cos(W t) z + sin(W Δ) c``, ``du/dt = cos(W t) v + d_t u + d_Δ u``.
    """
    ks = jax.random.split(jax.random.key(0), 3)
    x, v = (np.asarray(jax.random.normal(k, (8, 3)), np.float64) for k in ks[:2])
    t = np.asarray(jax.random.uniform(ks[2], (8,), minval=0.2, maxval=0.95), np.float64)
    r = 0.5 * t
    xj, vj, tj, rj = (jnp.asarray(a, F32) for a in (x, v, t, r))
    kw = dict(time_derivative=time_derivative, fd_dt=dt)
    t32 = np.asarray(tj, np.float64)  # the float32 times the loss sees
    c, s = np.cos(W * t32)[:, None], np.sin(W * t32)[:, None]
    if method == "scm":
        got = losses.scm_tangent(
            lambda xx, tt: jnp.cos(W * tt)[:, None] * xx + jnp.sin(W * tt)[:, None] * C,
            xj,
            tj,
            vj,
            **kw,
        )
        cs = (np.cos(t32) * np.sin(t32))[:, None]
        image, time = cs * c * v, cs * W * (-s * x + c * C)
    else:
        d32 = np.asarray(tj - rj, np.float64)

        def u(zz, tt, dd):
            return jnp.cos(W * tt)[:, None] * zz + jnp.sin(W * dd)[:, None] * C

        got = losses.meanflow_dudt(u, xj, rj, tj, vj, **kw)
        image, time = c * v, W * (-s * x + np.cos(W * d32)[:, None] * C)
    sinc = math.sin(W * dt) / (W * dt)
    return np.asarray(got, np.float64), image + time, image + sinc * time


@pytest.mark.parametrize("method", ["scm", "meanflow"])
@pytest.mark.parametrize("dt", [1e-2, 1e-3])
def test_central_difference_of_closed_forms(method, dt):
    """The finite-difference route gives the central difference's closed form to float32
    round-off (``~eps |F| / dt``), which is the exact tangent to ``(W dt)^2 / 6`` of the time
    part: O(dt^2), its constant that of a central (not a one-sided, O(dt)) difference. The JVP
    route gives the exact tangent."""
    got, exact, central = _closed_form(method, FD, dt)
    scale = np.abs(exact).max()
    np.testing.assert_allclose(got, central, rtol=0, atol=30 * 6e-8 / dt * scale)
    err, predicted = np.abs(got - exact).max(), np.abs(central - exact).max()
    # predicted = (1 - sinc(W dt)) |d_t F| ~ (W dt)^2 / 6 |d_t F|, a one-sided difference's error
    # would be ~ W dt / 2 |d_t F|: measured err / predicted = 1.00 at 1e-2, 0.9-1.1 at 1e-3
    assert 0.7 * predicted < err < 1.3 * predicted, (err, predicted)
    jvp, exact, _ = _closed_form(method, "jvp", dt)
    np.testing.assert_allclose(jvp, exact, rtol=1e-5, atol=1e-5 * scale)


# --- (b) the tiny FLUX model: finite difference vs JVP -------------------------------------------


def _tiny(time_scale: float):
    """The float32 tiny FLUX model (guidance, Δ embedder copied from the time embedder) on fixed
    inputs: ``call(x, s, delta=None) -> v [B, L, 16]``, a 4x4 latent grid and 8 text tokens."""
    cfg = FluxConfig.tiny().replace(time_scale=time_scale, delta_embed=True)
    model = Flux(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    t5 = jnp.asarray(rng.standard_normal((B, 8, cfg.context_dim)), F32)
    pooled = jnp.asarray(rng.standard_normal((B, cfg.pooled_dim)), F32)
    g, img, txt = jnp.array([4.0, 4.5]), image_ids(4, 4), np.zeros((8, 3), np.float32)

    def call(x, s, delta=None):
        delta = jnp.zeros_like(s) if delta is None else delta
        return model(x, t5, pooled, s, img, txt, g, timestep2=delta).astype(F32)

    return call


def _tangents(method: str, time_scale: float, dts: tuple[float, ...]):
    """The tiny model's sCM tangent (TrigFlow wrapper) or MeanFlow ``du/dt`` by JVP, and by finite
    difference at each of ``dts`` (one compile: the step is traced)."""
    call = _tiny(time_scale)
    rng = np.random.default_rng(1)
    x, v = (jnp.asarray(rng.standard_normal((B, 4, 16)), F32) for _ in range(2))
    if method == "scm":
        t = jnp.array([0.4, 1.1], F32)

        def tangent(time_derivative, dt=1e-4):
            F = lambda xh, tt: trigflow_velocity(call, xh, tt)  # noqa: E731
            kw = dict(time_derivative=time_derivative, fd_dt=dt)
            return losses.scm_tangent(F, x, t, v, **kw)

    else:
        t, r = jnp.array([0.45, 0.9], F32), jnp.array([0.2, 0.9], F32)  # r < t and r = t

        def tangent(time_derivative, dt=1e-4):
            kw = dict(time_derivative=time_derivative, fd_dt=dt)
            return losses.meanflow_dudt(call, x, r, t, v, **kw)

    exact = jax.jit(lambda: tangent("jvp"))()
    fd = jax.jit(lambda dt: tangent(FD, dt))
    return {dt: rel(fd(jnp.float32(dt)), exact) for dt in dts}


# Steps in the truncation regime, then where float32 round-off (~1e-7 / dt) takes over. At
# time_scale 1000 the embedding's fastest sinusoid turns 1000 dt radians per step.
SWEEPS = {1.0: (1e-1, 3e-2, 1e-2, 1e-3, 1e-4), 1000.0: (3e-3, 1e-3, 3e-4, 1e-4)}


@pytest.mark.parametrize("method", ["scm", "meanflow"])
@pytest.mark.parametrize("time_scale", [1.0, 1000.0])
def test_finite_difference_agrees_with_jvp_on_tiny_flux(method, time_scale):
    """float32: the error falls as dt^2 (x ~11 per step of 10/3, x ~9 per 3) until round-off,
    then rises as 1/dt. Measured (relative): time_scale 1 at dt = 0.1, 0.03, 0.01, 1e-3, 1e-4:
    sCM 4.6e-3, 4.1e-4, 4.4e-5, 1.1e-4, 9.5e-4; MeanFlow 2.2e-4, 2.0e-5, 1.1e-5, 1.0e-4,
    1.2e-3. time_scale 1000 at dt = 3e-3, 1e-3, 3e-4, 1e-4: sCM 0.28, 3.6e-2, 3.2e-3, 4.7e-4;
    MeanFlow (t and Δ both shifted) 0.63, 0.12, 1.2e-2, 1.3e-3."""
    err = _tangents(method, time_scale, SWEEPS[time_scale])
    print(method, time_scale, {k: f"{v:.2e}" for k, v in err.items()})
    if time_scale == 1.0:
        assert 7 < err[1e-1] / err[3e-2] < 16, err  # (10/3)^2 = 11.1
        assert err[1e-2] < 2e-4 and err[1e-4] < 3e-3, err  # round-off: ~1e-7 / dt
        assert err[1e-4] > 3 * err[1e-2], err
    else:
        assert 6 < err[1e-3] / err[3e-4] < 16, err
        assert err[3e-3] > err[1e-3] > err[3e-4] > err[1e-4], err
        # rCM's step: (1000 dt)^2 / 6 = 1.7e-3 at the worst, per time input
        assert err[1e-4] < 2.5e-3, err


# --- (c) the whole losses, as the trainer calls them ---------------------------------------------


def _step_loss(method: str, jvp_attn_impl: str, time_derivative: str, fd_dt: float = 1e-4):
    """``jit(value_and_grad(loss_fn))`` of the trainer's step (:func:`make_loss_fn`) for a stock
    (time_scale 1000) tiny teacher, float32 compute, with its arguments: ``(fn, args)``.
    ``jvp_attn_impl="xla"`` takes the student's forward from the JVP's primal (one pass);
    ``"blockwise"`` runs a separate tangent pass (``tangent_fn``)."""
    from distill_jax.train import _graphdef

    c = config.base_config()
    c.method, c.model.dtype, c.model.jvp_attn_impl = method, "float32", jvp_attn_impl
    c.model.delta_init = "copy"  # the Δ embedder non-zero: the difference shifts both times
    c.data.batch_size, c.data.latent_grid = B, (4, 4)
    c.loss.scm.tangent_warmup_steps = 10  # the tangent at full weight at step 100
    c.loss.time_derivative, c.loss.fd_dt = time_derivative, fd_dt
    c.model.time_embed_float32 = True  # lets the JVP route take the stock teacher too
    teacher_cfg, student_cfg = model_configs(c)
    assert teacher_cfg.time_scale == 1000.0 and student_cfg.time_embed_float32
    gds = [_graphdef(student_cfg, c, a) for a in ("xla", jvp_attn_impl)]
    gds.append(_graphdef(teacher_cfg, c, "xla"))
    params = nnx.state(Flux(student_cfg, rngs=nnx.Rngs(1)), nnx.Param)
    teacher = nnx.state(Flux(teacher_cfg, rngs=nnx.Rngs(2)), nnx.Param)
    ks = jax.random.split(jax.random.key(3), 3)
    batch = {
        "latents": jax.random.normal(ks[0], (B, 4, 4, 4)),
        "t5": jax.random.normal(ks[1], (B, 8, student_cfg.context_dim)),
        "pooled": jax.random.normal(ks[2], (B, student_cfg.pooled_dim)),
    }
    aux = {"uncond_t5": jnp.zeros((1, 8, 32)), "uncond_pooled": jnp.zeros((1, 16))}
    fn = jax.jit(jax.value_and_grad(make_loss_fn(c, *gds), has_aux=True))
    return fn(params, teacher, batch, aux, jax.random.key(4), 100)


@pytest.mark.parametrize(("method", "jvp_attn_impl"), [("scm", "blockwise"), ("meanflow", "xla")])
def test_losses_and_gradients_agree_between_routes(method, jvp_attn_impl):
    """The trainer's loss and parameter gradients with ``config.loss.time_derivative=
    "finite_difference"`` (dt = 1e-4) equal the JVP route's to the tangent's own error (~1e-3 at
    time_scale 1000, above); both routes stop the tangent's gradient (a
    gradient through the two extra forwards would not be the JVP route's)."""
    (loss_j, m_j), g_j = _step_loss(method, jvp_attn_impl, "jvp")
    (loss_f, m_f), g_f = _step_loss(method, jvp_attn_impl, FD)
    tangent = "scm/tangent_norm" if method == "scm" else "meanflow/dudt_norm"
    flat_j, flat_f = (np.concatenate([np.ravel(x) for x in jax.tree.leaves(g)]) for g in (g_j, g_f))
    errs = {
        "loss": abs(float(loss_f) - float(loss_j)) / abs(float(loss_j)),
        "tangent_norm": rel(m_f[tangent], m_j[tangent]),
        "grad": rel(flat_f, flat_j),
    }
    print(method, jvp_attn_impl, {k: f"{v:.1e}" for k, v in errs.items()})
    assert errs["tangent_norm"] < 3e-3 and errs["loss"] < 3e-3 and errs["grad"] < 3e-3, errs
    assert np.linalg.norm(flat_j) > 0


# --- (d) bad settings ---------------------------------------------------------------------------


def _call(name: str, **kw):
    """One of the four entry points on a trivial problem, with the keyword arguments ``kw``."""
    x, t, key = jnp.ones((2, 3)), jnp.array([0.3, 0.6]), jax.random.key(0)
    if name == "scm_loss":
        return losses.scm_loss(lambda a, b, _: (a, None), lambda a, b, _: a, x, key, step=0, **kw)
    if name == "meanflow_loss":
        return losses.meanflow_loss(lambda a, b, d, _: a, lambda a, b, _: a, x, key, **kw)
    if name == "scm_tangent":
        return losses.scm_tangent(lambda a, b: a, x, t, x, **kw)
    return losses.meanflow_dudt(lambda a, b, d: a, x, 0.5 * t, t, x, **kw)


ENTRY_POINTS = ["scm_loss", "meanflow_loss", "scm_tangent", "meanflow_dudt"]


@pytest.mark.parametrize("name", ENTRY_POINTS)
def test_bad_settings_are_refused(name):
    """An unknown route names itself and the choices; the finite difference refuses a step that
    is not a number > 0 and bfloat16 times (their spacing, 4e-3 near 1, exceeds the step)."""
    for bad in ("fd", "JVP", None):
        with pytest.raises(ValueError, match=rf"time_derivative={bad!r}; choose one of"):
            _call(name, time_derivative=bad)
    assert TIME_DERIVATIVES == ("jvp", "finite_difference")
    for dt in (0.0, -1e-4, math.nan, math.inf, True, "1e-4"):
        with pytest.raises(ValueError, match="fd_dt="):
            _call(name, time_derivative=FD, fd_dt=dt)
    with pytest.raises(ValueError, match="needs float32 times, got time_dtype=bfloat16"):
        _call(name, time_derivative=FD, time_dtype=BF16)
    for route in TIME_DERIVATIVES:  # accepted (the JVP route ignores fd_dt; bf16 is its slip)
        _call(name, time_derivative=route, fd_dt=1e-4)
    _call(name, time_derivative="jvp", time_dtype=BF16)


def test_config_selects_the_route_and_refuses_what_cannot_work():
    """``--config.loss.time_derivative=finite_difference`` reaches the loss; a stock teacher
    (time_scale 1000) needs the finite difference or the float32 time embedding (then set on the
    student) and float32 times; an unknown route fails when the run is set up."""
    c = config.load_config("configs/scm.py:runlocal", [f"--config.loss.time_derivative={FD}"])
    assert (loss_switches(c)["time_derivative"], loss_switches(c)["fd_dt"]) == (FD, 1e-4)
    base = config.load_config("configs/scm.py:runlocal")
    assert loss_switches(base)["time_derivative"] == "jvp"
    assert not base.model.time_embed_float32
    stock = FluxConfig.tiny()
    assert stock.time_scale == 1000.0
    for method in ("scm", "meanflow"):
        c = config.load_config(f"configs/{method}.py:runlocal")
        with pytest.raises(ValueError, match="time_scale=1 .*finite_difference"):
            model_configs(c, stock)
        c.loss.time_derivative = FD
        _, student = model_configs(c, stock)
        assert student.time_scale == 1000.0 and not student.time_embed_float32
        c.loss.time_derivative, c.model.time_embed_float32 = "jvp", True
        _, student = model_configs(c, stock)
        assert student.time_embed_float32
        c.loss.paper_slips = True  # bfloat16 times
        with pytest.raises(ValueError, match="needs config.loss.time_dtype='float32'"):
            model_configs(c, stock)
        c.loss.time_derivative = FD
        with pytest.raises(ValueError, match="needs float32 times"):
            model_configs(c, stock)
    c = config.load_config("configs/scm.py:runlocal", ["--config.loss.time_derivative=fd"])
    with pytest.raises(ValueError, match="time_derivative='fd'"):
        model_configs(c)


# --- (e) the float32 time embedding -------------------------------------------------------------


def _reference(embedder, tau: np.ndarray, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``embedder(sinusoid(tau))`` [B, D] and its derivative in ``tau``."""
    half = dim // 2
    f = np.exp(-math.log(10000.0) * np.arange(half) / half)
    a = tau[:, None] * f[None]
    e = np.concatenate([np.cos(a), np.sin(a)], -1)
    de = np.concatenate([-np.sin(a) * f, np.cos(a) * f], -1)
    w1, b1, w2, b2 = (
        np.asarray(p.get_value(), np.float64)
        for layer in (embedder.in_layer, embedder.out_layer)
        for p in (layer.kernel, layer.bias)
    )
    h = e @ w1 + b1
    sig = 1 / (1 + np.exp(-h))
    return (h * sig) @ w2 + b2, ((de @ w1) * sig * (1 + h * (1 - sig))) @ w2


def test_sinusoid_at_time_scale_1000_is_float32_accurate():
    """``timestep_embedding(1000 t)`` in float32 against float64: the phase of ``1000 t`` is
    float32-exact to ~6e-5 (measured max error 6.7e-5); computed from a bfloat16 ``1000 t`` (what
    a bf16 model would do) it is off by order 1 (measured 1.66)."""
    t = np.linspace(0.01, 0.99, 64).astype(np.float32)
    half = 128
    f = np.exp(-math.log(10000.0) * np.arange(half) / half)
    a = 1000.0 * t.astype(np.float64)[:, None] * f
    ref = np.concatenate([np.cos(a), np.sin(a)], -1)
    got = np.asarray(timestep_embedding(jnp.asarray(t) * 1000.0, 2 * half))
    assert np.abs(got - ref).max() < 2e-4
    bf16 = np.asarray(timestep_embedding((jnp.asarray(t) * 1000.0).astype(BF16), 2 * half))
    assert np.abs(bf16 - ref).max() > 0.5


def test_float32_time_embedding_of_a_bfloat16_model():
    """``FluxConfig.time_embed_float32``: a bfloat16 model's conditioning vector and its JVP
    tangent in t (what the sCM / MeanFlow tangent sees) are the float64 reference of
    ``time_in(sinusoid(1000 t)) + delta_in(sinusoid(1000 Δ))`` rounded once to bfloat16: within
    2^-8 relative plus the float32 sinusoid's own error; without the switch, bfloat16
    embedders miss by far more (measured 0.43% vs 0.16% of the norm, worst elements thousands
    of bf16 ulps). In a float32 model the switch changes nothing. ``vector_in`` is zeroed so that
    the vector is the time embeddings alone."""
    t = np.linspace(0.01, 0.99, 64).astype(np.float32)
    delta = np.linspace(0.0, 0.5, 64).astype(np.float32)

    def conditioning(dtype, flag):
        cfg = FluxConfig.tiny().replace(
            time_embed_float32=flag, delta_embed=True, guidance_embed=False
        )
        model = Flux(cfg, rngs=nnx.Rngs(0), dtype=dtype)
        for layer in (model.vector_in.in_layer, model.vector_in.out_layer):
            for p in (layer.kernel, layer.bias):
                p.set_value(jnp.zeros_like(p.get_value()))
        pooled = jnp.zeros((len(t), cfg.pooled_dim))

        def vec(tt):
            return model.conditioning(tt, pooled, None, jnp.asarray(delta))

        out = jax.jvp(vec, (jnp.asarray(t),), (jnp.ones_like(t),))
        assert out[0].dtype == dtype and out[1].dtype == dtype
        return model, [np.asarray(o.astype(F32), np.float64) for o in out]

    model, f32 = conditioning(F32, False)
    ref_t, d_ref_t = _reference(model.time_in, 1000.0 * t.astype(np.float64), 256)
    ref_d, _ = _reference(model.delta_in, 1000.0 * delta.astype(np.float64), 256)
    refs = [ref_t + ref_d, 1000.0 * d_ref_t]  # d/dt of time_in(sinusoid(1000 t))
    for got, ref in zip(f32, refs, strict=True):
        assert rel(got, ref) < 1e-4  # measured 4e-6 and 2e-5: float32 phases
    _, f32_flag = conditioning(F32, True)
    for got, ref in zip(f32_flag, f32, strict=True):
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    _, bf16 = conditioning(BF16, False)
    _, bf16_flag = conditioning(BF16, True)
    for flag, plain, ref in zip(bf16_flag, bf16, refs, strict=True):
        f32_err = 1e-4 * np.abs(ref).max()  # the float32 sinusoid's, measured 3.6e-5
        assert np.all(np.abs(flag - ref) <= 2.0**-8 * np.abs(ref) + f32_err)
        assert not np.all(np.abs(plain - ref) <= 2.0**-8 * np.abs(ref) + f32_err)
        assert rel(flag, ref) < 2.0**-9 < rel(plain, ref)
