"""Rotary position embeddings and the one attention function every model calls.

Dimension letters: B batch, T tokens, H heads, K head dim, A id axes (3 for FLUX); inside the
blockwise kernel Q and S are the tokens of one query block and of one key block, N a block count.

Implementations behind :func:`attention` (``impl``), by the passes they serve:

=================  ========  ====  ==================================================
impl               jax.jvp   grad  what it is; most of the T x T scores held at once
=================  ========  ====  ==================================================
"xla" (default)    yes       yes   XLA's attention; [B, H, T, T]
"plain"            yes       yes   the reference, in einsums; [B, H, T, T]
"blockwise"        yes       yes   online softmax with its own JVP; [B, H, Q, S] tiles
                                   (grad: one [B, H, Q, T] row block of probabilities)
"cudnn"            no        yes   cuDNN's fused kernel (GPU, half precision); none
"splash"           no        yes   Pallas splash kernel (TPU); none
"auto"             CPU       yes   cudnn on GPU, splash on TPU, blockwise on CPU
"hijax"            yes       yes   one op: forward and backward by "auto", the tangent
                                   by "blockwise"; as "auto", tangent: [B, H, Q, S] tiles
=================  ========  ====  ==================================================

sCM and MeanFlow need ``jax.jvp`` through the student. Fused kernels define only a backward rule,
so that pass runs ``"blockwise"`` (or a :class:`Blockwise` with chosen tile sizes): online-softmax
attention whose forward *and* tangent are computed tile by tile in one sweep over the keys. The
gradient pass is then a separate forward and may use ``"auto"``.

``"hijax"`` (or a :class:`Hijax`) serves both passes with one op, built on jax 0.10's
``jax.experimental.hijax.VJPHiPrimitive``: ``jax.jvp`` runs the blockwise tangent, reverse mode
the fused kernel's backward, also for a reverse pass over a JVP's primal (sCM's one-pass loss)
and through ``jax.checkpoint`` and ``jax.lax.scan``; benchmarks/hijax_attention.py shows which
rule each transformation runs. With ``model.attn_impl = model.jvp_attn_impl = "hijax"`` the
losses take the student's forward from the JVP's primal: one graphdef, one student forward.
Its tangent is the ``lax.scan`` sweep, or with ``Hijax(tangent=PallasTangent(...))`` one Pallas
kernel that computes the output and its tangent tile by tile
(:mod:`distill_jax.models.attention_pallas`; the Pallas interpreter off GPU and TPU).
The API is experimental in jax; the op has no ``jax.vmap`` rule.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import hijax

from distill_jax.models.attention_pallas import pallas_forward_and_tangent
from distill_jax.sharding import activation_spec

IMPLEMENTATIONS = ("xla", "plain", "blockwise", "cudnn", "splash", "auto", "hijax")
DEFAULT_BLOCK = 512
SPLASH_ALIGN = 128  # splash tiles are multiples of 128 tokens


def rope_frequencies(
    ids: jax.Array, axes_dim: Sequence[int], theta: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
    """Cosines and sines of the FLUX multi-axis RoPE.

    ``ids`` is ``[..., T, A]`` (positions per axis, e.g. (0, row, col) for image tokens);
    returns ``(cos, sin)`` of shape ``[..., T, K/2]`` with K = sum(axes_dim), in float32.
    Axis ``a`` of width ``d`` uses frequencies ``theta^(-2k/d)`` for ``k < d/2``.
    """
    if ids.shape[-1] != len(axes_dim):
        raise ValueError(
            f"ids have {ids.shape[-1]} axes, axes_dim {tuple(axes_dim)} has {len(axes_dim)}"
        )
    angles = []
    for a, d in enumerate(axes_dim):
        # Frequencies are constants: computed in float64 on the host, as diffusers does.
        omega = jnp.asarray(1.0 / theta ** (np.arange(0, d, 2, dtype=np.float64) / d), jnp.float32)
        angles.append(ids[..., a, None].astype(jnp.float32) * omega)  # [..., T, d/2]
    angle = jnp.concatenate(angles, axis=-1)  # [..., T, K/2]
    return jnp.cos(angle), jnp.sin(angle)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates adjacent pairs (x_2k, x_2k+1) of ``x [B, T, H, K]`` by the angles of ``cos/sin``.

    ``cos``/``sin`` are ``[B or 1, T, K/2]``. Computed in float32, returned in ``x.dtype``.
    """
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # [B, T, H, K/2, 2]
    re, im = xf[..., 0], xf[..., 1]
    c, s = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, K/2]
    out = jnp.stack([re * c - im * s, im * c + re * s], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


@dataclasses.dataclass(frozen=True)
class Blockwise:
    """Tile sizes of the blockwise implementation; pass an instance as ``impl`` (or a model's
    ``attn_impl``) to choose them. ``"blockwise"`` means ``Blockwise()``.

    Each step holds a few ``[B, H, block_q, block_kv]`` float32 tiles; ``block_q >= T`` processes
    every query at once (fewer, larger steps, which suit GPUs better; memory ``O(T block_kv)``).
    The sizes are upper bounds: T is cut into as many blocks as the size asks for, of equal size
    rounded up to a multiple of 8 (T = 1152 at 512 runs three blocks of 384, not 1536 padded
    tokens), and the last block's padded keys are masked.
    """

    block_q: int = DEFAULT_BLOCK
    block_kv: int = DEFAULT_BLOCK

    def __post_init__(self):
        for name in ("block_q", "block_kv"):
            size = getattr(self, name)
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"Blockwise.{name} must be a positive int, got {size!r}")


def attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str | Blockwise | Hijax = "xla"
) -> jax.Array:
    """Full (unmasked) multi-head attention. ``q, k, v``: ``[B, T, H, K]`` -> ``[B, T, H, K]``.

    ``impl`` is one of :data:`IMPLEMENTATIONS`, a :class:`Blockwise` or a :class:`Hijax` (see the
    module table).
    """
    if q.ndim != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(
            f"attention takes q, k, v of one shape [B, T, H, K]; got {q.shape}, {k.shape}, "
            f"{v.shape}"
        )
    with jax.named_scope("attention"):  # names the op in HLO metadata and in profiles
        return _dispatch(q, k, v, impl)


def _dispatch(q, k, v, impl):
    if isinstance(impl, Blockwise):
        return blockwise_attention(q, k, v, block_q=impl.block_q, block_kv=impl.block_kv)
    if isinstance(impl, Hijax):
        return hijax_attention(q, k, v, impl)
    if impl == "hijax":
        return hijax_attention(q, k, v)
    impl = resolve_impl(impl, q.dtype, q.shape[-1])
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v, implementation="xla")
    if impl == "plain":
        return _plain(q, k, v)
    if impl == "blockwise":
        return blockwise_attention(q, k, v)
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    if impl == "splash":
        return splash_attention(q, k, v)
    raise ValueError(
        f"unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}, a Blockwise(...) "
        "or a Hijax(...)"
    )


def auto_impl(backend: str, dtype: jnp.dtype, head_dim: int | None = None) -> str:
    """The fastest implementation for the forward and gradient passes on ``backend``.

    cuDNN's fused attention on GPU (half precision, head dim a multiple of 8 up to 128), splash
    on TPU, blockwise on CPU, XLA otherwise. None of the fused kernels has a JVP: the tangent
    pass uses blockwise. On CPU the blockwise sweep beats XLA's attention by about 2.4x forward
    and backward (benchmarks/jvp_attention_memory.py's timing), and with blockwise in both
    passes the trainer runs the student forward once per sCM / MeanFlow step. ``head_dim`` is
    needed on GPU only.
    """
    if backend in ("gpu", "cuda"):
        if head_dim is None:
            raise ValueError("auto_impl on GPU needs head_dim (cuDNN's kernel takes at most 128)")
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if half and head_dim % 8 == 0 and head_dim <= 128 else "xla"
    if backend == "tpu":
        return "splash"
    return "blockwise" if backend == "cpu" else "xla"


def resolve_impl(impl, dtype: jnp.dtype, head_dim: int | None = None):
    """``impl``, with ``"auto"`` as :func:`auto_impl` picks it for the default backend."""
    return auto_impl(jax.default_backend(), dtype, head_dim) if impl == "auto" else impl


def _plain(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, H, T, T]
    return jnp.einsum("bhqs,bshk->bqhk", probs, v)


# ------------------------------------------------------------------------------------------------
# Blockwise attention with its own JVP.
#
# For query i and keys j, with s_ij = q_i.k_j / sqrt(K), P = softmax_j(s), O_i = sum_j P_ij v_j:
#   ds_ij = (dq_i.k_j + q_i.dk_j) / sqrt(K)
#   dO_i  = sum_j P_ij (ds_ij - mu_i) v_j + sum_j P_ij dv_j,    mu_i = sum_j P_ij ds_ij
#         = (G_i - M_i O_i) / z_i
# where, with p_ij = exp(s_ij - m_i) for the row maximum m_i,
#   z_i = sum_j p_ij,   A_i = sum_j p_ij v_j,   M_i = sum_j p_ij ds_ij,
#   G_i = sum_j p_ij (ds_ij v_j + dv_j),   O_i = A_i / z_i,   mu_i = M_i / z_i.
# All four sums share the softmax's running maximum, so one sweep over key blocks accumulates them,
# rescaling by exp(m_old - m_new) whenever the maximum grows (the flash-attention recurrence).
# ------------------------------------------------------------------------------------------------


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    block_q: int = DEFAULT_BLOCK,
    block_kv: int = DEFAULT_BLOCK,
) -> jax.Array:
    """Attention that never holds more than ``[B, H, block_q, block_kv]`` scores at a time, in
    the forward pass and in its JVP. ``q, k, v``: ``[B, T, H, K]`` -> ``[B, T, H, K]``.

    Reverse mode transposes the JVP one query block at a time (each block's forward is
    recomputed), so ``jax.grad`` holds one ``[B, H, block_q, T]`` row of probabilities at a time.
    Scores and accumulators are float32; probabilities meet ``v`` in ``v.dtype``.
    """
    Blockwise(block_q, block_kv)  # validates the sizes
    t = q.shape[1]
    return _blockwise(q, k, v, _tile(t, block_q), _tile(t, block_kv))


def _tile(t: int, size: int) -> int:
    """The tile :class:`Blockwise` runs for ``size`` at ``t`` tokens: ``ceil(t / size)`` equal
    blocks, rounded up to a multiple of 8 (never above ``size``), so padding stays under 8 tokens
    per block instead of up to a whole block."""
    n = -(-t // size)
    even = -(-t // n)
    return min(size, -(-even // 8) * 8) if even > 8 else even


@functools.partial(jax.custom_jvp, nondiff_argnums=(3, 4))
def _blockwise(q, k, v, block_q, block_kv):
    return _sweep(q, k, v, None, block_q, block_kv)[0]


@_blockwise.defjvp
def _blockwise_jvp(block_q, block_kv, primals, tangents):
    return _sweep(*primals, tangents, block_q, block_kv)


def _blocks(x: jax.Array, size: int) -> jax.Array:
    """``[B, T, H, K]`` -> ``[N, B, size, H, K]``, zero-padding T up to N * size."""
    b, t, h, kd = x.shape
    n = -(-t // size)
    x = jnp.pad(x, ((0, 0), (0, n * size - t), (0, 0), (0, 0)))
    return x.reshape(b, n, size, h, kd).swapaxes(0, 1)


def _sweep(q, k, v, tangents, block_q, block_kv):
    """``(O, dO)`` (``dO`` None without tangents), one query block at a time."""
    b, t, h, kd = q.shape
    scale = 1.0 / math.sqrt(kd)
    with_tangent = tangents is not None
    n_kv = -(-t // block_kv)
    valid = (jnp.arange(n_kv * block_kv) < t).reshape(n_kv, block_kv)  # padded keys are False
    keys = (_blocks(k, block_kv), _blocks(v, block_kv), valid)  # [N, B, S, H, K] ...
    if with_tangent:
        dq, dk, dv = tangents
        keys += (_blocks(dk, block_kv), _blocks(dv, block_kv))

    def mm(a, b_, spec):  # low-precision operands, float32 accumulation
        return jnp.einsum(spec, a, b_, preferred_element_type=jnp.float32)

    def row(qi, dqi):
        """One query block ``[B, Q, H, K]`` (and its tangent) against every key block."""

        def step(carry, key_block):
            kj, vj, ok = key_block[:3]
            m, z, acc = carry[:3]
            s = mm(qi, kj, "bqhk,bshk->bhqs") * scale  # [B, H, Q, S]
            s = jnp.where(ok, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))  # finite: every key block holds a real key
            alpha = jnp.exp(m - m_new)  # [B, H, Q]
            p = jnp.exp(s - m_new[..., None])  # [B, H, Q, S]
            z = alpha * z + p.sum(-1)
            acc = alpha[..., None] * acc + mm(p.astype(vj.dtype), vj, "bhqs,bshk->bhqk")
            if not with_tangent:
                return (m_new, z, acc), None
            dkj, dvj = key_block[3:]
            ds_sum, g = carry[3:]
            ds = (mm(dqi, kj, "bqhk,bshk->bhqs") + mm(qi, dkj, "bqhk,bshk->bhqs")) * scale
            pds = p * ds  # [B, H, Q, S]
            ds_sum = alpha * ds_sum + pds.sum(-1)
            g = alpha[..., None] * g
            g = g + mm(pds.astype(vj.dtype), vj, "bhqs,bshk->bhqk")
            g = g + mm(p.astype(dvj.dtype), dvj, "bhqs,bshk->bhqk")
            return (m_new, z, acc, ds_sum, g), None

        stats = jnp.zeros((b, h, qi.shape[1]), jnp.float32)  # [B, H, Q]
        rows = jnp.zeros((b, h, qi.shape[1], kd), jnp.float32)  # [B, H, Q, K]
        carry = (stats - jnp.inf, stats, rows) + ((stats, rows) if with_tangent else ())
        (_, z, acc, *tangent_sums), _ = jax.lax.scan(step, carry, keys)
        out = acc / z[..., None]  # [B, H, Q, K]
        if not with_tangent:
            return _bqhk(out, q.dtype)
        ds_sum, g = tangent_sums
        d_out = (g - ds_sum[..., None] * out) / z[..., None]
        return _bqhk(out, q.dtype), _bqhk(d_out, q.dtype)

    # Under jax.grad the JVP is linearized and transposed; recomputing each query block's sweep
    # bounds its saved probabilities to one [B, H, Q, T] row instead of the whole matrix.
    row = jax.checkpoint(row, prevent_cse=False)

    def unblock(x):  # [N, B, Q, H, K] -> [B, T, H, K]
        return x.swapaxes(0, 1).reshape(b, -1, h, kd)[:, :t]

    if not with_tangent:
        return unblock(jax.lax.map(lambda qi: row(qi, None), _blocks(q, block_q))), None
    out, d_out = jax.lax.map(lambda x: row(*x), (_blocks(q, block_q), _blocks(dq, block_q)))
    return unblock(out), unblock(d_out)


def _bqhk(x: jax.Array, dtype) -> jax.Array:
    return jnp.einsum("bhqk->bqhk", x).astype(dtype)


# ------------------------------------------------------------------------------------------------
# One op for every pass (jax.experimental.hijax): the forward and backward of a fused kernel, the
# tangent of the blockwise sweep. Autodiff never looks inside either op; it calls their rules:
#   _Attention        jax.jvp -> its jvp: (_Attention(q, k, v), _AttentionTangent(q, k, v, dq..))
#                     reverse -> its vjp_fwd / vjp_bwd: the fused kernel's own VJP
#   _AttentionTangent evaluated by the blockwise sweep; transposed (the tangent is linear in dq,
#                     dk, dv) by the fused kernel's VJP, since the transpose of a JVP is the VJP.
# The second op is what makes reverse mode through jax.checkpoint use the fused backward too:
# checkpoint linearizes by JVP and partial evaluation, then transposes the linear part.
# ------------------------------------------------------------------------------------------------

FUSED = ("xla", "plain", "cudnn", "splash", "auto")


@dataclasses.dataclass(frozen=True)
class PallasTangent(Blockwise):
    """The tangent of a :class:`Hijax` op by one Pallas kernel (output and tangent together,
    :func:`distill_jax.models.attention_pallas.pallas_forward_and_tangent`) with these tiles,
    instead of the ``lax.scan`` sweep; in the Pallas interpreter off GPU and TPU (tests)."""


@dataclasses.dataclass(frozen=True)
class Hijax:
    """One attention op for the forward, backward *and* tangent passes; pass an instance as
    ``impl`` (or a model's ``attn_impl``). ``"hijax"`` means ``Hijax()``.

    ``fused`` (one of :data:`FUSED`; ``"auto"``: :func:`auto_impl`) computes the forward and
    backward, ``tangent`` the JVP's tangent, which never holds ``T x T``: a :class:`Blockwise`
    (the ``lax.scan`` sweep) or a :class:`PallasTangent` (one Pallas kernel).
    Under ``jax.jvp`` the forward runs twice, by ``fused`` and inside the tangent's sweep, so
    that a reverse pass over the JVP's primal (sCM's one-pass loss) runs ``fused``'s backward.
    """

    fused: str = "auto"
    tangent: Blockwise = Blockwise()

    def __post_init__(self):
        if self.fused not in FUSED:
            raise ValueError(f"Hijax.fused={self.fused!r}; choose one of {FUSED}")
        if not isinstance(self.tangent, Blockwise):
            raise ValueError(
                f"Hijax.tangent must be a Blockwise or a PallasTangent, got {self.tangent!r}"
            )


def hijax_attention(q: jax.Array, k: jax.Array, v: jax.Array, op: Hijax = Hijax()) -> jax.Array:
    """Attention as one ``jax.experimental.hijax`` op (:class:`Hijax`). ``q, k, v``:
    ``[B, T, H, K]`` -> ``[B, T, H, K]``. No ``jax.vmap`` rule."""
    fused = resolve_impl(op.fused, q.dtype, q.shape[-1])
    t = q.shape[1]
    tiles = (_tile(t, op.tangent.block_q), _tile(t, op.tangent.block_kv))
    pallas = isinstance(op.tangent, PallasTangent)
    return _Attention((q, k, v), fused, tiles, pallas)(q, k, v)


def _accumulates(x) -> bool:
    """Whether a transpose rule's argument is a cotangent accumulator (a linear input)."""
    return callable(getattr(x, "accum", None))


def _sweep_tangent(q, k, v, dq, dk, dv, tiles):
    return _sweep(q, k, v, (dq, dk, dv), *tiles)[1]


class _Op(hijax.VJPHiPrimitive):
    """An attention primitive of ``args`` whose output has the type of the first (``q``)."""

    def __init__(self, args, fused: str, tiles: tuple[int, int], pallas: bool = False):
        self.in_avals = tuple(map(jax.typeof, args))
        self.out_aval = self.in_avals[0]
        self.params = {"fused": fused, "tiles": tiles, "pallas": pallas}
        super().__init__()


class _Attention(_Op):
    def expand(self, q, k, v):
        return attention(q, k, v, impl=self.fused)

    def vjp_fwd(self, nzs_in, q, k, v):
        # The pullback is a pytree of the kernel's residuals.
        return jax.vjp(functools.partial(attention, impl=self.fused), q, k, v)

    def vjp_bwd_retval(self, pullback, d_out):
        return pullback(hijax.instantiate_zeros(d_out))

    def jvp(self, primals, tangents):
        tangents = tuple(map(hijax.instantiate_zeros, tangents))
        args = primals + tangents
        d_out = _AttentionTangent(args, self.fused, self.tiles, self.pallas)(*args)
        return self(*primals), d_out


class _AttentionTangent(_Op):
    """``(q, k, v, dq, dk, dv) -> dO``, linear in the last three."""

    def expand(self, *args):
        if self.pallas:
            block_q, block_kv = self.tiles
            return pallas_forward_and_tangent(*args, block_q=block_q, block_kv=block_kv)[1]
        return _sweep_tangent(*args, self.tiles)

    def transpose(self, d_out, q, k, v, *accums):
        if any(map(_accumulates, (q, k, v))):
            raise NotImplementedError("attention's tangent is linear in dq, dk, dv only")
        if isinstance(d_out, hijax.Zero):
            return
        _, pullback = jax.vjp(functools.partial(attention, impl=self.fused), q, k, v)
        for acc, ct in zip(accums, pullback(d_out), strict=True):
            if _accumulates(acc):
                acc.accum(ct)

    # Differentiating the tangent itself (second order) goes through the sweep.
    def vjp_fwd(self, nzs_in, *args):
        return jax.vjp(functools.partial(_sweep_tangent, tiles=self.tiles), *args)

    def vjp_bwd_retval(self, pullback, d_out):
        return pullback(hijax.instantiate_zeros(d_out))

    def jvp(self, primals, tangents):
        tangents = tuple(map(hijax.instantiate_zeros, tangents))
        return jax.jvp(functools.partial(_sweep_tangent, tiles=self.tiles), primals, tangents)


# ------------------------------------------------------------------------------------------------
# Splash attention (Pallas, TPU). Elsewhere it runs in the Pallas interpreter, which is how the
# tests check it on CPU.
# ------------------------------------------------------------------------------------------------


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """TPU splash attention (forward and backward fused; no JVP). ``[B, T, H, K]`` -> same.

    T is padded to a multiple of 128 with the padded keys masked. Under an active mesh the kernel
    runs inside ``shard_map`` with batch and heads sharded by the ``batch`` and ``heads`` rules
    (Pallas kernels are not partitioned automatically).
    """
    b, t, h, kd = q.shape
    padded = -(-t // SPLASH_ALIGN) * SPLASH_ALIGN
    kernel = _splash_kernel(t, padded, jax.default_backend() != "tpu")
    scale = 1.0 / math.sqrt(kd)

    def run(q, k, v):  # [b, T, h, K] per shard
        def heads_major(x):  # [b, T, h, K] -> [b, h, T', K]
            return jnp.pad(x, ((0, 0), (0, padded - t), (0, 0), (0, 0))).swapaxes(1, 2)

        out = jax.vmap(kernel)(heads_major(q * scale), heads_major(k), heads_major(v))
        return out.swapaxes(1, 2)[:, :t]

    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return run(q, k, v)
    # The spec constrain() would give [B, T, H, K] under the active rules: batch and heads split,
    # tokens whole (each shard attends over every key).
    spec = activation_spec(q.shape, "batch", "seq", "heads", None, mesh=mesh)
    return jax.shard_map(run, in_specs=(spec,) * 3, out_specs=spec, check_vma=False)(q, k, v)


@functools.lru_cache(maxsize=32)
def _splash_kernel(t: int, padded: int, interpret: bool):
    """A single-head splash kernel over ``padded`` tokens of which the first ``t`` are keys."""
    # Imported on first use: Pallas's TPU modules take about as long to import as jax itself.
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_kernel as splash,
    )
    from jax.experimental.pallas.ops.tpu.splash_attention import (
        splash_attention_mask as splash_mask,
    )

    if padded == t:
        mask = splash_mask.FullMask((padded, padded))
    else:
        keep = np.zeros((padded, padded), bool)
        keep[:, :t] = True
        mask = splash_mask.NumpyMask(keep)
    block = next(b for b in (512, 256, 128) if padded % b == 0)
    sizes = splash.BlockSizes(
        block_q=block,
        block_kv=block,
        block_q_dkv=block,
        block_kv_dkv=block,
        block_q_dq=block,
        block_kv_dq=block,
    )
    # Concrete mask tables even when first called under a trace: the kernel outlives it (cached).
    with jax.ensure_compile_time_eval():
        mha = splash.make_splash_mha(
            splash_mask.MultiHeadMask([mask]),
            block_sizes=sizes,
            head_shards=1,
            q_seq_shards=1,
            interpret=interpret,
        )
    # One head's kernel, mapped over heads: the mask is shared, so it is stored once.
    return jax.vmap(lambda q, k, v: mha(q[None], k[None], v[None])[0])
