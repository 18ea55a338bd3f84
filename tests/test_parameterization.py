"""Flow <-> TrigFlow conversions and time samplers against closed forms for Gaussian data.

``Gaussian`` (imported by the loss and sampler tests) gives the exact fields of data
``x0 ~ N(m, diag(sd^2))`` with independent ``N(0, I)`` noise: every conditional expectation is
linear and the PF-ODE map preserves each coordinate's z-score.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from distill_jax import parameterization as P


def _xp(*a):
    """NumPy for float64 references, jax.numpy otherwise (so the fields work under jax.jvp)."""
    return np if all(isinstance(x, np.ndarray | float) for x in a) else jnp


@dataclasses.dataclass(frozen=True)
class Gaussian:
    m: jax.Array  # [D]
    sd: jax.Array  # [D]

    # flow time s: x_s = (1 - s) x0 + s z
    def var_s(self, s):
        return (1 - s) ** 2 * self.sd**2 + s**2

    def flow_velocity(self, x, s):
        """E[z - x0 | x_s = x], x [B, D], s [B]."""
        s = s[:, None]
        return (s - (1 - s) * self.sd**2) / self.var_s(s) * (x - (1 - s) * self.m) - self.m

    def flow_map(self, x, s, r):
        """PF-ODE from flow time s to r (z-score preserved)."""
        xp = _xp(self.m, x, s, r)
        s, r = s[:, None], r[:, None]
        return (1 - r) * self.m + xp.sqrt(self.var_s(r) / self.var_s(s)) * (x - (1 - s) * self.m)

    def average_velocity(self, z, t, delta):
        """Exact MeanFlow u(z, t, delta) = (z - flow_map(z, t, t - delta)) / delta, written
        without the division so that it is smooth (and equal to the velocity) at delta = 0."""
        xp = _xp(self.m, z, t, delta)
        r = (t - delta)[:, None]
        t = t[:, None]
        vt, vr = self.var_s(t), self.var_s(r)
        c = ((t + r) - (2 - t - r) * self.sd**2) / (vt * (1 + xp.sqrt(vr / vt)))
        return c * (z - (1 - t) * self.m) - self.m

    # TrigFlow time t, standard units: x_t = cos t x0 + sin t z
    def var_t(self, t):
        xp = _xp(self.m, t)
        return xp.cos(t) ** 2 * self.sd**2 + xp.sin(t) ** 2

    def trig_velocity(self, x, t):
        """E[cos t z - sin t x0 | x_t = x]."""
        xp = _xp(self.m, x, t)
        t = t[:, None]
        c, s = xp.cos(t), xp.sin(t)
        return c * s * (1 - self.sd**2) / self.var_t(t) * (x - c * self.m) - s * self.m

    def denoiser(self, x, t):
        xp = _xp(self.m, x, t)
        t = t[:, None]
        return self.m + xp.cos(t) * self.sd**2 / self.var_t(t) * (x - xp.cos(t) * self.m)

    def ode_endpoint(self, x, t):
        """PF-ODE solution at t = 0 from x at trig time t."""
        xp = _xp(self.m, x, t)
        t = t[:, None]
        return self.m + self.sd * (x - xp.cos(t) * self.m) / xp.sqrt(self.var_t(t))

    def consistency_velocity(self, x, t):
        """F of the exact consistency model: cos t x - sin t F = ode_endpoint, i.e.
        F = (cos t x - endpoint) / sin t, rewritten without cancellation near t = 0."""
        xp = _xp(self.m, x, t)
        t = t[:, None]
        c, s, sd = xp.cos(t), xp.sin(t), self.sd
        rv = xp.sqrt(self.var_t(t))
        a = s * (c**2 - sd**2 * (1 + c**2)) / (rv * (c * rv + sd))
        b = s / (rv * (rv + sd * c))
        return a * x - b * self.m

    def sample(self, key, n):
        return self.m + self.sd * jax.random.normal(key, (n, self.m.shape[0]))

    def f64(self) -> Gaussian:
        """The same distribution with NumPy float64 parameters (for float64 references)."""
        return Gaussian(np.asarray(self.m, np.float64), np.asarray(self.sd, np.float64))


def gaussian(d: int = 3, seed: int = 0) -> Gaussian:
    rng = np.random.default_rng(seed)
    return Gaussian(
        jnp.asarray(rng.normal(0, 0.7, d), jnp.float32),
        jnp.asarray(rng.uniform(0.3, 1.5, d), jnp.float32),
    )


def rk4(f, x, t0, t1, n):
    """Fixed-step RK4 of dx/dt = f(x [B, D], t [B]) in float64 NumPy from t0 to t1 (scalars or
    [B], per-sample start and end times)."""
    B = x.shape[0]
    t = np.broadcast_to(np.asarray(t0, np.float64), (B,)).copy()
    h = (np.broadcast_to(np.asarray(t1, np.float64), (B,)) - t) / n
    hb = h[:, None]
    for _ in range(n):
        k1 = f(x, t)
        k2 = f(x + hb / 2 * k1, t + h / 2)
        k3 = f(x + hb / 2 * k2, t + h / 2)
        k4 = f(x + hb * k3, t + h)
        x = x + hb / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        t = t + h
    return x


# --- time conversions -------------------------------------------------------------------------


def test_time_round_trips_and_norm():
    s = jnp.linspace(0.0, 1.0, 1001)
    t = P.flow_to_trig_time(s)
    assert t.dtype == jnp.float32
    np.testing.assert_allclose(P.trig_to_flow_time(t), s, atol=1e-6)
    np.testing.assert_allclose(np.asarray(t)[[0, -1]], [0.0, np.pi / 2], atol=1e-7)
    tt = jnp.linspace(0.0, np.pi / 2, 1001)
    np.testing.assert_allclose(P.flow_to_trig_time(P.trig_to_flow_time(tt)), tt, atol=2e-6)
    # n(s) = 1 / (cos t + sin t) and tan t = s / (1 - s)
    np.testing.assert_allclose(P.flow_norm(s), 1 / (jnp.cos(t) + jnp.sin(t)), rtol=1e-6)
    # (away from s = 1, where tan t is ill-conditioned in float32)
    inner = slice(1, -10)
    np.testing.assert_allclose(jnp.tan(t[inner]), s[inner] / (1 - s[inner]), rtol=2e-5)


def test_trig_state_is_flow_state_at_same_snr():
    k0, k1, k2 = jax.random.split(jax.random.key(0), 3)
    x0, z = jax.random.normal(k0, (64, 5)), jax.random.normal(k1, (64, 5))
    t = jax.random.uniform(k2, (64,), minval=0.0, maxval=np.pi / 2)
    x_hat = jnp.cos(t)[:, None] * x0 + jnp.sin(t)[:, None] * z
    x_s, s = P.trig_to_flow_input(x_hat, t)
    np.testing.assert_allclose(x_s, (1 - s)[:, None] * x0 + s[:, None] * z, atol=2e-6)


# --- velocity conversions on the exact Gaussian fields ----------------------------------------


def test_velocity_conversions_match_exact_trigflow_velocity():
    G = gaussian(4)
    k0, k1 = jax.random.split(jax.random.key(1))
    x_hat = 1.5 * jax.random.normal(k0, (256, 4))
    t = jax.random.uniform(k1, (256,), minval=0.01, maxval=np.pi / 2 - 0.01)
    F_exact = G.trig_velocity(x_hat, t)
    x_s, s = P.trig_to_flow_input(x_hat, t)
    v_exact = G.flow_velocity(x_s, s)
    np.testing.assert_allclose(P.flow_to_trig_velocity(x_s, v_exact, s), F_exact, atol=2e-5)
    np.testing.assert_allclose(P.trig_to_flow_velocity(x_hat, F_exact, t), v_exact, atol=2e-5)
    np.testing.assert_allclose(P.trigflow_velocity(G.flow_velocity, x_hat, t), F_exact, atol=2e-5)
    # has_aux passes the second output through untouched
    F, aux = P.trigflow_velocity(lambda x, s_: (G.flow_velocity(x, s_), s_), x_hat, t, has_aux=True)
    np.testing.assert_allclose(F, F_exact, atol=2e-5)
    np.testing.assert_allclose(aux, s)


def bf16(a) -> np.ndarray:
    """float32 values rounded to bfloat16 by ml_dtypes: the references' rounding (spec 7.6)."""
    return np.asarray(a, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.mark.parametrize("jit", [False, True])
def test_trigflow_wrapper_computes_s_and_the_input_scale_in_bfloat16(jit):
    """``time_dtype=bfloat16``: the paper's ``FluxTrigFlow`` on bf16 tensors (spec 1.3, 7.6),
    each operation rounded: ``s = sin t / (cos t + sin t)`` of the bf16 time, the input scale
    ``n(s) = sqrt(s^2 + (1 - s)^2)``; the model gets ``s`` and ``n x_hat``, its output is divided
    by the same ``n``. Jitted too, where XLA would keep bf16 arithmetic in float32 (excess
    precision) without ``quantize``'s ``lax.reduce_precision``."""
    rng = np.random.default_rng(0)
    t = np.linspace(0.05, 1.5, 29, dtype=np.float32)
    x_hat, v = rng.standard_normal((2, 29, 3)).astype(np.float32)
    tb = bf16(t)
    sin, cos = bf16(np.sin(tb)), bf16(np.cos(tb))
    s = bf16(sin / bf16(cos + sin))
    n = bf16(np.sqrt(bf16(bf16(s * s) + bf16(bf16(1 - s) ** 2))))[:, None]

    def wrapped(x, tt, dtype):  # the model's inputs come back as aux
        flow = lambda xs, ss: (jnp.asarray(v), (xs, ss))  # noqa: E731
        return P.trigflow_velocity(flow, x, tt, has_aux=True, time_dtype=dtype)

    fn = jax.jit(wrapped, static_argnums=2) if jit else wrapped
    F, (x_s, s_in) = fn(x_hat, t, jnp.bfloat16)
    np.testing.assert_array_equal(s_in, s)
    np.testing.assert_allclose(x_s, n * x_hat, rtol=1e-7)
    sb = s[:, None]
    F_ref = ((1 - 2 * sb) * (n * x_hat) + (1 - 2 * sb + 2 * sb * sb) * v) / n
    np.testing.assert_allclose(F, F_ref, rtol=1e-6, atol=1e-6)
    # float32 (the default) is exact, and the roundings above are not nothing
    _, (x32, s32) = fn(x_hat, t, jnp.float32)
    t64 = t.astype(np.float64)
    np.testing.assert_allclose(s32, np.sin(t64) / (np.sin(t64) + np.cos(t64)), rtol=1e-6)
    assert np.mean(s32 != s) > 0.5 and np.mean(x32 != x_s) > 0.5


def test_consistency_function_denoiser_and_ode_endpoint():
    G = gaussian(3, seed=2)
    k0, k1 = jax.random.split(jax.random.key(2))
    x_hat = jax.random.normal(k0, (16, 3))
    t = jax.random.uniform(k1, (16,), minval=0.05, maxval=1.55)
    # With the teacher's instantaneous velocity: the denoiser E[x0 | x_t].
    f = P.consistency_fn(x_hat, t, G.trig_velocity(x_hat, t), sigma_d=1.0)
    np.testing.assert_allclose(f, G.denoiser(x_hat, t), atol=2e-6)
    # With the exact consistency model: the PF-ODE end point, checked by integrating the ODE.
    Gd = G.f64()
    x_end = rk4(
        Gd.trig_velocity, np.asarray(x_hat, np.float64), np.asarray(t, np.float64), 0.0, 400
    )
    np.testing.assert_allclose(G.ode_endpoint(x_hat, t), x_end, atol=1e-5)
    # Code units (x_t = sigma_d x_hat): f is sigma_d times the standard-units endpoint.
    F_cm = G.consistency_velocity(x_hat, t)
    f_code = P.consistency_fn(0.5 * x_hat, t, F_cm, sigma_d=0.5)
    np.testing.assert_allclose(f_code / 0.5, x_end, atol=1e-5)
    # The cancellation-free closed form equals the naive (cos t x - endpoint) / sin t.
    naive = (jnp.cos(t)[:, None] * x_hat - G.ode_endpoint(x_hat, t)) / jnp.sin(t)[:, None]
    np.testing.assert_allclose(F_cm, naive, atol=1e-4)


def test_flow_map_and_average_velocity_closed_forms():
    G = gaussian(3, seed=3)
    Gd = G.f64()
    z = np.asarray(jax.random.normal(jax.random.key(3), (8, 3)), np.float64)
    t = np.full(8, 0.9)
    r = np.full(8, 0.2)
    z_r = rk4(
        lambda x, s: np.asarray(Gd.flow_velocity(x, np.broadcast_to(s, (8,)))), z, 0.9, 0.2, 400
    )
    np.testing.assert_allclose(Gd.flow_map(z, t, r), z_r, atol=1e-6)
    u = Gd.average_velocity(z, t, t - r)
    np.testing.assert_allclose(u, (z - z_r) / 0.7, atol=1e-6)
    np.testing.assert_allclose(Gd.average_velocity(z, t, 0 * t), Gd.flow_velocity(z, t), atol=1e-12)


# --- time samplers ----------------------------------------------------------------------------


def test_scm_time_sampler_distribution():
    t = P.sample_scm_times(jax.random.key(0), (200_000,), p_mean=0.2, p_std=1.6, sigma_d=0.5)
    assert t.dtype == jnp.float32 and t.shape == (200_000,)
    assert float(t.min()) > 0 and float(t.max()) < np.pi / 2
    log_sigma = np.log(0.5 * np.tan(np.asarray(t, np.float64)))
    assert abs(log_sigma.mean() - 0.2) < 0.01
    assert abs(log_sigma.std() - 1.6) < 0.01
    # logit(s) = ln(sigma / sigma_d): flow time is logit-normal(0.2 + ln 2, 1.6), median 0.709.
    s = np.asarray(P.trig_to_flow_time(t), np.float64)
    assert abs(np.median(s) - 1 / (1 + np.exp(-(0.2 + np.log(2))))) < 0.005
    np.testing.assert_array_equal(t, P.sample_scm_times(jax.random.key(0), (200_000,)))


def test_meanflow_time_sampler_distribution():
    n, mu, sigma = 200_000, -0.4, 1.0
    r, t = P.sample_meanflow_times(jax.random.key(1), (n,), mu, sigma, ratio_r_neq_t=0.75)
    assert r.dtype == t.dtype == jnp.float32
    r, t = np.asarray(r, np.float64), np.asarray(t, np.float64)
    assert np.all(r <= t) and np.all(r > 0) and np.all(t < 1)
    neq = r < t
    assert abs(neq.mean() - 0.75) < 0.005
    logit = lambda a: np.log(a / (1 - a))  # noqa: E731
    # E[max(n1, n2)] = mu + sigma / sqrt(pi), E[min] = mu - sigma / sqrt(pi)
    assert abs(logit(t).mean() - (mu + sigma / np.sqrt(np.pi))) < 0.01
    assert abs(logit(r[neq]).mean() - (mu - sigma / np.sqrt(np.pi))) < 0.01
    # bf16 rounding keeps the order and makes every value bf16-representable
    rb, tb = P.sample_meanflow_times(jax.random.key(1), (1000,), dtype=jnp.bfloat16)
    assert bool(jnp.all(rb <= tb))
    np.testing.assert_array_equal(tb, tb.astype(jnp.bfloat16).astype(jnp.float32))
    assert not np.array_equal(tb, P.sample_meanflow_times(jax.random.key(1), (1000,))[1])
