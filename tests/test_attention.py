"""Attention implementations against closed forms in float64 NumPy: values, JVP tangents, VJPs.

The reference is softmax(QK^T/sqrt(K)) V with its closed-form tangent (dP = P (dS - rowsum(P dS)))
and cotangent, all in float64. Tolerances are max |error| / max |reference|: 5e-6 for float32
inputs (observed <= 8e-7); 2e-2 for bfloat16 inputs, with the reference run on the same rounded
inputs (observed <= 6e-3, about 1.5 bfloat16 ulps of 2^-8).
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax.models.attention import (
    Blockwise,
    _tile,
    apply_rope,
    attention,
    auto_impl,
    rope_frequencies,
)
from distill_jax.models.flux import Flux, FluxConfig
from distill_jax.sharding import make_mesh

B, T, H, K = 2, 37, 3, 16  # T is prime: no block size divides it
TOL = {"float32": 5e-6, "bfloat16": 2e-2}
JVP_IMPLS = {
    "xla": "xla",
    "plain": "plain",
    "blockwise": "blockwise",  # one 512-block: T < block
    "blockwise_q16_kv8": Blockwise(16, 8),
    "blockwise_q8_kv16": Blockwise(8, 16),
}


# ---- float64 references ---------------------------------------------------------------------


def _probs(q, k):
    s = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(q.shape[-1])
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)  # [B, H, T, T]


def ref_attention(q, k, v):
    return np.einsum("bhqs,bshk->bqhk", _probs(q, k), v)


def ref_tangent(q, k, v, dq, dk, dv):
    p, scale = _probs(q, k), 1 / np.sqrt(q.shape[-1])
    ds = (np.einsum("bqhk,bshk->bhqs", dq, k) + np.einsum("bqhk,bshk->bhqs", q, dk)) * scale
    dp = p * (ds - (p * ds).sum(-1, keepdims=True))
    return np.einsum("bhqs,bshk->bqhk", dp, v) + np.einsum("bhqs,bshk->bqhk", p, dv)


def ref_cotangent(q, k, v, do):
    p, scale = _probs(q, k), 1 / np.sqrt(q.shape[-1])
    dp = np.einsum("bqhk,bshk->bhqs", do, v)
    ds = p * (dp - (p * dp).sum(-1, keepdims=True))
    return (
        np.einsum("bhqs,bshk->bqhk", ds, k) * scale,
        np.einsum("bhqs,bqhk->bshk", ds, q) * scale,
        np.einsum("bhqs,bqhk->bshk", p, do),
    )


def assert_close(out, ref, rel, what=""):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    err = np.abs(out - ref).max() / np.abs(ref).max()
    assert err < rel, f"{what}: max error {err:.2e} of the reference scale (tolerance {rel:.0e})"


def arrays(dtype, n=6, shape=(B, T, H, K), seed=0):
    """``n`` random arrays in ``dtype`` (q and k scaled up so the softmax is far from uniform)."""
    rng = np.random.default_rng(seed)
    out = [rng.standard_normal(shape) * (2.0 if i in (0, 1) else 1.0) for i in range(n)]
    return [jnp.asarray(x, dtype) for x in out]


def rope(x, positions=(4, 9)):
    """FLUX's RoPE on a (4 x 9)-grid of image ids plus one text token: T = 37 tokens."""
    h, w = positions
    ids = np.zeros((T, 3), np.float32)
    ids[1:, 1], ids[1:, 2] = np.repeat(np.arange(h), w), np.tile(np.arange(w), h)
    cos, sin = rope_frequencies(jnp.asarray(ids)[None], (4, 6, 6))
    return apply_rope(x, cos, sin)


# ---- values, tangents and gradients ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(JVP_IMPLS))
@pytest.mark.parametrize(
    "dtype,with_rope", [("float32", False), ("float32", True), ("bfloat16", True)]
)
def test_value_tangent_and_gradient_match_closed_form(name, dtype, with_rope):
    impl = JVP_IMPLS[name]
    q, k, v, dq, dk, dv = arrays(dtype)
    if with_rope:  # RoPE is linear: rotate the tangents too, then compare on rotated inputs
        q, k, dq, dk = rope(q), rope(k), rope(dq), rope(dk)
    do = arrays(dtype, n=1, seed=1)[0]

    @jax.jit
    def run(q, k, v, dq, dk, dv, do):
        f = lambda *x: attention(*x, impl=impl)  # noqa: E731
        out, tangent = jax.jvp(f, (q, k, v), (dq, dk, dv))
        return out, tangent, jax.vjp(f, q, k, v)[1](do)

    out, tangent, grads = run(q, k, v, dq, dk, dv, do)
    assert out.dtype == tangent.dtype == jnp.dtype(dtype)
    f64 = [np.asarray(x, np.float64) for x in (q, k, v, dq, dk, dv, do)]
    tol = TOL[dtype]
    assert_close(out, ref_attention(*f64[:3]), tol, "value")
    assert_close(tangent, ref_tangent(*f64[:6]), tol, "tangent")
    for g, r, what in zip(grads, ref_cotangent(*f64[:3], f64[6]), "qkv", strict=True):
        assert_close(g, r, tol, f"d{what}")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_splash_value_and_gradient_match_closed_form(dtype):
    """Splash (Pallas interpreter off TPU); T = 37 is padded to 128 with the padded keys masked."""
    q, k, v, do = arrays(dtype, n=4)
    q, k = rope(q), rope(k)
    out, vjp = jax.vjp(jax.jit(lambda *x: attention(*x, impl="splash")), q, k, v)
    f64 = [np.asarray(x, np.float64) for x in (q, k, v, do)]
    tol = TOL[dtype]
    assert_close(out, ref_attention(*f64[:3]), tol, "value")
    for g, r, what in zip(vjp(do), ref_cotangent(*f64), "qkv", strict=True):
        assert_close(g, r, tol, f"d{what}")


def test_splash_under_a_mesh_runs_sharded():
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    q, k, v = arrays("float32", n=3, shape=(4, 130, 2, K))
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, "tensor", None))
    with jax.set_mesh(mesh):
        q, k, v = (jax.device_put(x, sharding) for x in (q, k, v))
        f = jax.jit(lambda *x: attention(*x, impl="splash"))
        assert "manual_computation" in f.lower(q, k, v).as_text()  # the kernel is shard_mapped
        out = f(q, k, v)
    assert out.sharding.spec == sharding.spec
    f64 = [np.asarray(x, np.float64) for x in (q, k, v)]
    assert_close(out, ref_attention(*f64), TOL["float32"], "value")


def test_gradient_through_a_stopped_jvp():
    """The sCM pattern, jax.grad of a loss whose target is a stop-gradient JVP of the same net,
    plus a term through the tangent itself (reverse mode through the JVP rule)."""
    x, w, dx = arrays("float32", n=3, shape=(B, T, H, K))
    x = rope(x)

    def loss(w, impl):
        def net(x):
            return attention(x * w, x, x + w, impl=impl)

        out, tangent = jax.jvp(net, (x,), (dx,))
        return jnp.sum(out * jax.lax.stop_gradient(tangent)) + jnp.sum(tangent)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    assert_close(grad(w, Blockwise(16, 8)), grad(w, "plain"), TOL["float32"], "grad")


def test_auto_picks_the_backends_fused_kernel():
    bf16 = jnp.bfloat16
    assert auto_impl("gpu", bf16, 128) == "cudnn"
    assert auto_impl("gpu", jnp.float32, 128) == "xla"  # cuDNN attention is half precision only
    assert auto_impl("gpu", bf16, 256) == "xla"
    assert auto_impl("tpu", jnp.float32, 128) == "splash"
    assert auto_impl("cpu", bf16, 128) == "blockwise"
    q, k, v = arrays("float32", n=3)
    np.testing.assert_array_equal(
        attention(q, k, v, impl="auto"), attention(q, k, v, impl="blockwise")
    )


# ---- memory: the JVP never holds the score matrix -------------------------------------------


def largest_buffer(hlo: str) -> tuple[int, str]:
    """Elements and text of the largest array shape in an HLO module."""
    shapes = re.findall(r"\b[a-z]+\d*\[([\d,]+)\]", hlo)
    return max((int(np.prod([int(d) for d in s.split(",")])), s) for s in shapes)


@pytest.mark.parametrize("mode", ["jvp", "grad"])
@pytest.mark.parametrize("name", ["plain", "xla", "blockwise"])
def test_blockwise_never_holds_the_score_matrix(name, mode):
    """Compiled HLO at T = 512, blocks of 128: no buffer as large as one [B, H, T, T] matrix
    for blockwise (its largest: a [2, 128, 128] tile for the JVP; under grad, one query block's
    saved probabilities, [4, 1, 2, 128, 128]), while plain and xla hold [1, 2, 512, 512]."""
    impl = Blockwise(128, 128) if name == "blockwise" else name
    q, k, v = (jax.ShapeDtypeStruct((1, 512, 2, K), jnp.float32),) * 3
    f = lambda *x: attention(*x, impl=impl)  # noqa: E731
    if mode == "jvp":
        fn = lambda q, k, v: jax.jvp(f, (q, k, v), (q, k, v))  # noqa: E731
    else:
        fn = jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) ** 2), argnums=(0, 1, 2))
    size, shape = largest_buffer(jax.jit(fn).lower(q, k, v).compile().as_text())
    score_matrix = 1 * 2 * 512 * 512
    if name == "blockwise":
        assert size < score_matrix, f"blockwise {mode} holds a [{shape}] buffer"
    else:
        assert size >= score_matrix, f"{name} {mode}: largest buffer [{shape}]"


# ---- the FLUX model with blockwise attention -------------------------------------------------


@pytest.fixture(scope="module")
def tiny_flux():
    return Flux(FluxConfig.tiny().replace(time_scale=1.0), rngs=nnx.Rngs(0))


def flux_tangent(model: Flux, impl) -> tuple[jax.Array, jax.Array]:
    """Value and jvp (d/d latents, d/d time) of ``model`` with every block's attention set to
    ``impl``; 24 image + 5 text tokens, batch 2."""
    cfg = model.cfg
    for block in [*model.double_blocks, *model.single_blocks]:
        block.attn_impl = impl
    rng = np.random.default_rng(3)
    ids = np.zeros((4, 6, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(4)[:, None], np.arange(6)[None]
    x = dict(
        encoder_hidden_states=rng.standard_normal((2, 5, cfg.context_dim)).astype(np.float32),
        pooled_projections=rng.standard_normal((2, cfg.pooled_dim)).astype(np.float32),
        img_ids=ids.reshape(-1, 3),
        txt_ids=np.zeros((5, 3), np.float32),
        guidance=np.full((2,), 3.5, np.float32),
    )
    z, dz = rng.standard_normal((2, 2, 24, cfg.in_channels)).astype(np.float32)
    t, dt = np.array([0.3, 0.8], np.float32), np.ones(2, np.float32)
    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, z, t, dz, dt):
        f = lambda z, t: nnx.merge(graphdef, state)(hidden_states=z, timestep=t, **x)  # noqa: E731
        return jax.jvp(f, (z, t), (dz, dt))

    return run(state, z, t, dz, dt)


@pytest.fixture(scope="module")
def flux_xla(tiny_flux):
    return flux_tangent(tiny_flux, "xla")


@pytest.mark.parametrize("impl", ["blockwise", Blockwise(8, 8)], ids=["blockwise", "q8_kv8"])
def test_flux_blockwise_matches_xla_value_and_tangent(impl, tiny_flux, flux_xla):
    """Float32; T = 29 tokens is uneven for 8-blocks and below the default 512."""
    ref, d_ref = flux_xla
    out, d_out = flux_tangent(tiny_flux, impl)
    assert_close(out, ref, 1e-5, "value")
    assert_close(d_out, d_ref, 1e-5, "tangent")


def test_blockwise_tiles_are_even_and_pad_little():
    """The tile never exceeds the size asked for, keeps the block count ``ceil(T / size)``, and
    pads fewer than 8 tokens per block (1152 at 512 was 1536 tokens, now three blocks of 384)."""
    assert _tile(1152, 512) == 384 and _tile(4608, 512) == 512 and _tile(37, 16) == 16
    for t in range(1, 1300, 7):
        for size in (1, 3, 8, 16, 100, 384, 512, 1 << 30):
            tile, n = _tile(t, size), -(-t // size)
            assert tile <= size and -(-t // tile) == n, (t, size, tile)
            assert n * tile - t < 8 * n, (t, size, tile)


# ---- errors --------------------------------------------------------------------------------


def test_bad_inputs_have_clear_errors():
    q, k = arrays("float32", n=2)
    with pytest.raises(ValueError, match="unknown attention impl 'flash'"):
        attention(q, k, k, impl="flash")
    with pytest.raises(ValueError, match=r"one shape \[B, T, H, K\]"):
        attention(q, k[:, :5], k, impl="blockwise")
    with pytest.raises(ValueError, match="Blockwise.block_kv must be a positive int"):
        Blockwise(128, 0)
