"""The "hijax" attention (one op: a fused kernel's forward and backward, the blockwise tangent)
against XLA's attention, float32: values, JVP tangents, gradients, the gradient of a JVP's primal
(sCM's one-pass loss) and through its tangent, plain, under ``jax.checkpoint`` and inside
``jax.lax.scan``; then the trainer's sCM loss with one graphdef against its two-pass program.
Tolerance: max |error| / max |reference| < 1e-5; 1e-4 for the second derivatives through the
tangent (two stacked attentions in a scan: plain einsum attention differs from XLA's by 1e-5
there, the blockwise implementation by 1.5e-4). benchmarks/hijax_attention.py shows which of the
op's rules each transformation runs.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from distill_jax.config import base_config
from distill_jax.methods import make_loss_fn, model_configs
from distill_jax.models.attention import Blockwise, Hijax, PallasTangent, attention
from distill_jax.models.flux import Flux, FluxConfig
from distill_jax.train import _graphdef

B, T, H, K = 2, 37, 3, 16  # T is prime: the 16 x 8 tiles pad it
TOL, SECOND_ORDER_TOL = 1e-5, 1e-4
OPS = {"hijax": "hijax", "xla_q16_kv8": Hijax("xla", Blockwise(16, 8))}


def assert_close(out, ref, what="", tol=TOL):
    for i, (o, r) in enumerate(zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True)):
        o, r = np.asarray(o, np.float64), np.asarray(r, np.float64)
        assert o.shape == r.shape, (what, i, o.shape, r.shape)
        err = np.abs(o - r).max() / max(np.abs(r).max(), 1e-30)
        assert err < tol, f"{what}[{i}]: max error {err:.2e} of the reference scale"


def arrays(n, seed=0):
    rng = np.random.default_rng(seed)
    return [jnp.asarray(rng.standard_normal((B, T, H, K)) * 2.0, jnp.float32) for _ in range(n)]


def scanned(f):
    """``q -> f(q, k, v)`` twice, as the body of a scan (the scanned blocks)."""

    def g(q, k, v):
        return jax.lax.scan(lambda x, _: (f(x, k, v), None), q, None, length=2)[0]

    return g


WRAPPERS = {
    "plain": lambda f: f,
    "checkpoint": lambda f: jax.checkpoint(f, policy=jax.checkpoint_policies.nothing_saveable),
    "scan": scanned,
}


def every_pass(impl, wrap, xs, dxs, do):
    """Value, JVP, VJP, gradient of a loss of the JVP's primal (tangent stop-gradiented) and
    gradient of a loss of the tangent, of attention with ``impl`` wrapped by ``wrap``."""
    f = WRAPPERS[wrap](lambda q, k, v: attention(q, k, v, impl=impl))

    def jvp(*x):
        return jax.jvp(f, x, dxs)

    def primal_loss(*x):
        out, tangent = jvp(*x)
        return jnp.sum(out * do) + jnp.sum(jnp.sin(out) * jax.lax.stop_gradient(tangent))

    def tangent_loss(*x):
        return jnp.sum(jnp.sin(jvp(*x)[1]) * do)

    @jax.jit
    def run(xs):
        return (
            f(*xs),
            jvp(*xs),
            jax.vjp(f, *xs)[1](do),
            jax.grad(primal_loss, (0, 1, 2))(*xs),
            jax.grad(tangent_loss, (0, 1, 2))(*xs),
        )

    return run(xs)


@pytest.mark.parametrize("wrap", sorted(WRAPPERS))
@pytest.mark.parametrize("op", sorted(OPS))
def test_every_pass_matches_xla(op, wrap):
    q, k, v, dq, dk, dv, do = arrays(7)
    got = every_pass(OPS[op], wrap, (q, k, v), (dq, dk, dv), do)
    want = every_pass("xla", wrap, (q, k, v), (dq, dk, dv), do)
    names = ("value", "jvp", "vjp", "grad of the jvp's primal", "grad through the tangent")
    tols = (TOL,) * 4 + (SECOND_ORDER_TOL,)
    for g, w, name, tol in zip(got, want, names, tols, strict=True):
        assert_close(g, w, name, tol)


def test_a_fused_kernel_without_jvp_serves_every_pass():
    """Splash (Pallas interpreter off TPU) defines only a backward: ``jax.jvp`` through it fails,
    through the op it runs the blockwise tangent, and reverse mode runs splash's backward, also
    over the JVP's primal and through ``jax.checkpoint``."""
    q, k, v, dq, dk, dv, do = arrays(7)
    with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
        jax.jvp(lambda *x: attention(*x, impl="splash"), (q, k, v), (dq, dk, dv))
    for wrap in ("plain", "checkpoint"):
        got = every_pass(Hijax("splash", Blockwise(16, 8)), wrap, (q, k, v), (dq, dk, dv), do)
        want = every_pass("xla", wrap, (q, k, v), (dq, dk, dv), do)
        assert_close(got[:4], want[:4], wrap)


def test_a_pallas_tangent_serves_every_pass():
    """With :class:`PallasTangent` the op's tangent is the Pallas kernel's (interpreted on CPU);
    the other rules are unchanged: every pass matches XLA's, plain and under checkpoint (the
    tangent's own derivative, second order, runs the sweep)."""
    q, k, v, dq, dk, dv, do = arrays(7)
    for tangent, kernel in ((PallasTangent(16, 8), True), (Blockwise(16, 8), False)):
        op = Hijax("xla", tangent)
        jvp = jax.jit(lambda *x, op=op: jax.jvp(lambda *y: attention(*y, impl=op), x[:3], x[3:]))
        text = jvp.lower(q, k, v, dq, dk, dv).as_text(debug_info=True)
        assert ("attention_forward_and_tangent" in text) == kernel  # the kernel's name
    for wrap in ("plain", "checkpoint"):
        got = every_pass(Hijax("xla", PallasTangent(16, 8)), wrap, (q, k, v), (dq, dk, dv), do)
        want = every_pass("xla", wrap, (q, k, v), (dq, dk, dv), do)
        assert_close(got[:4], want[:4], wrap)


def test_scm_loss_with_one_graphdef_matches_two_passes():
    """With ``attn_impl = jvp_attn_impl = "hijax"`` the trainer's sCM loss takes the student's
    forward from the JVP's primal (one graphdef, full remat); its loss and gradient equal the
    two-pass program's (XLA forward and backward, blockwise tangent, no remat)."""

    def loss_and_grad(attn_impl, jvp_attn_impl, remat):
        c = base_config()
        c.method, c.model.overrides = "scm", {"time_scale": 1.0}
        c.model.dtype, c.model.remat = "float32", remat
        c.model.attn_impl, c.model.jvp_attn_impl = attn_impl, jvp_attn_impl
        teacher_cfg, student_cfg = model_configs(c, FluxConfig.tiny().replace(time_scale=1.0))
        structures = ((student_cfg, attn_impl), (student_cfg, jvp_attn_impl))
        structures += ((teacher_cfg, attn_impl),)
        gds = [_graphdef(cfg, c, impl) for cfg, impl in structures]
        teacher = nnx.state(Flux(teacher_cfg, rngs=nnx.Rngs(0)), nnx.Param)
        student = nnx.state(Flux(student_cfg, rngs=nnx.Rngs(1)), nnx.Param)
        rng = np.random.default_rng(0)
        batch = {
            "latents": rng.standard_normal((2, 4, 8, 6), np.float32),
            "t5": rng.standard_normal((2, 5, student_cfg.context_dim), np.float32),
            "pooled": rng.standard_normal((2, student_cfg.pooled_dim), np.float32),
        }
        aux = {"uncond_t5": batch["t5"][0], "uncond_pooled": batch["pooled"][0]}
        loss_fn = make_loss_fn(c, *gds)
        grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
        (loss, _), grads = grad_fn(student, teacher, batch, aux, jax.random.key(0), 1000)
        return loss, grads

    one_pass = loss_and_grad("hijax", "hijax", "full")
    two_passes = loss_and_grad("xla", "blockwise", "none")
    assert_close(one_pass[0], two_passes[0], "loss")
    assert_close(one_pass[1], two_passes[1], "gradient")


def test_bad_ops_have_clear_errors():
    with pytest.raises(ValueError, match=r"Hijax.fused='flash'"):
        Hijax("flash")
    with pytest.raises(ValueError, match="Hijax.tangent must be a Blockwise"):
        Hijax("xla", "blockwise")
