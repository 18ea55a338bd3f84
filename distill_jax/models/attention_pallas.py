"""Attention's output and its JVP tangent in one Pallas kernel, tile by tile.

For ``q, k, v`` and tangents ``dq, dk, dv`` (all ``[B, T, H, K]``) the kernel returns
``O = softmax(q k^T / sqrt(K)) v`` and ``dO``, the JVP of ``O`` along ``(dq, dk, dv)``, in one
sweep over key tiles: the flash-attention recurrence of :mod:`distill_jax.models.attention`'s
blockwise sweep (see its comment "Blockwise attention with its own JVP" for the algebra), as a
kernel. Dimension letters: B batch, T tokens, H heads, K head dim; Q and S the tokens of one
query tile and of one key tile.

Layout: inputs and outputs are ``[B, T, H, K]``; outside the kernel they are transposed to
heads-major ``[B, H, T, K]`` and T is zero-padded up to a multiple of each tile (padded keys get
-inf scores, padded query rows are cut off). The grid is (batch, heads, query tiles); each program
loops over the key tiles of its head.

Memory: a program holds one ``[block_q, block_kv]`` float32 score tile at a time (with the
probabilities and score tangents of the same tile), never the ``T x T`` matrix, plus its running
sums: ``[block_q, K]`` twice and ``[block_q]`` three times, in float32. Its head's ``k, v, dk, dv``
are one block each (``[T, K]``), which on TPU must fit in VMEM.

Tile sizes are used as given: on TPU they must be multiples of 128 (and K a multiple of 128), on
GPU powers of two (and K too); neither is checked here. On CPU the kernel runs in the Pallas
interpreter: correct but slow, for tests.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def pallas_forward_and_tangent(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    dq: jax.Array,
    dk: jax.Array,
    dv: jax.Array,
    *,
    block_q: int,
    block_kv: int,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(O, dO)``: attention of ``q, k, v`` and its JVP along ``dq, dk, dv``.

    All six are ``[B, T, H, K]``; both results are ``[B, T, H, K]`` in ``q.dtype``. Scores and
    running sums are float32; low-precision operands meet in matmuls with float32 accumulation.
    ``interpret=None`` runs the Pallas interpreter unless the default backend is GPU or TPU.
    """
    for name, size in (("block_q", block_q), ("block_kv", block_kv)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    args = (q, k, v, dq, dk, dv)
    if q.ndim != 4 or any(x.shape != q.shape for x in args):
        shapes = ", ".join(str(x.shape) for x in args)
        raise ValueError(f"q, k, v, dq, dk, dv must share one shape [B, T, H, K]; got {shapes}")
    if interpret is None:
        interpret = jax.default_backend() not in ("gpu", "tpu")

    b, t, h, kd = q.shape
    n_q, n_kv = -(-t // block_q), -(-t // block_kv)

    def heads_major(x, size):  # [B, T, H, K] -> [B, H, N * size, K], zero-padded
        pad = -(-t // size) * size - t
        return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).swapaxes(1, 2)

    # None squeezes batch and heads out of the kernel's refs: [Q, K] and [T_kv, K].
    query_tile = pl.BlockSpec((None, None, block_q, kd), lambda b, h, i: (b, h, i, 0))
    whole_head = pl.BlockSpec((None, None, n_kv * block_kv, kd), lambda b, h, i: (b, h, 0, 0))
    out_shape = jax.ShapeDtypeStruct((b, h, n_q * block_q, kd), q.dtype)  # [B, H, T_q, K]
    kernel = functools.partial(_kernel, t=t, block_kv=block_kv, scale=1.0 / math.sqrt(kd))
    out, d_out = pl.pallas_call(
        kernel,
        out_shape=(out_shape, out_shape),
        grid=(b, h, n_q),
        in_specs=[query_tile, whole_head, whole_head, query_tile, whole_head, whole_head],
        out_specs=(query_tile, query_tile),
        interpret=interpret,
        name="attention_forward_and_tangent",
    )(
        heads_major(q, block_q),
        heads_major(k, block_kv),
        heads_major(v, block_kv),
        heads_major(dq, block_q),
        heads_major(dk, block_kv),
        heads_major(dv, block_kv),
    )
    return out.swapaxes(1, 2)[:, :t], d_out.swapaxes(1, 2)[:, :t]


def _kernel(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref, o_ref, do_ref, *, t, block_kv, scale):
    """One query tile of one head: ``q_ref, dq_ref, o_ref, do_ref`` are ``[Q, K]``, the key refs
    ``[T_kv, K]`` with T_kv a multiple of ``block_kv``; keys at ``t`` and beyond are padding."""
    qi, dqi = q_ref[...], dq_ref[...]  # [Q, K]
    n_kv = k_ref.shape[0] // block_kv

    def mm(spec, a, b):  # low-precision operands, float32 accumulation
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32)

    def step(j, carry):
        m, z, acc, ds_sum, g = carry
        start = pl.multiple_of(j * block_kv, block_kv)
        keys = pl.ds(start, block_kv)
        kj, vj, dkj, dvj = (ref[keys, :] for ref in (k_ref, v_ref, dk_ref, dv_ref))  # [S, K]
        s = mm("qk,sk->qs", qi, kj) * scale  # [Q, S]
        if t % block_kv:  # only the last tile is padded; it always starts at a real key
            key = start + jax.lax.broadcasted_iota(jnp.int32, s.shape, 1)
            s = jnp.where(key < t, s, -jnp.inf)
        # Finite: every key tile holds at least one real key, so no exp(-inf - -inf).
        m_new = jnp.maximum(m, s.max(-1, keepdims=True))  # [Q, 1]
        alpha = jnp.exp(m - m_new)  # [Q, 1]; 0 on the first tile
        p = jnp.exp(s - m_new)  # [Q, S]
        ds = (mm("qk,sk->qs", dqi, kj) + mm("qk,sk->qs", qi, dkj)) * scale  # [Q, S]
        pds = p * ds
        z = alpha * z + p.sum(-1, keepdims=True)
        acc = alpha * acc + mm("qs,sk->qk", p.astype(vj.dtype), vj)  # [Q, K]
        ds_sum = alpha * ds_sum + pds.sum(-1, keepdims=True)
        g = alpha * g + mm("qs,sk->qk", pds.astype(vj.dtype), vj)
        g = g + mm("qs,sk->qk", p.astype(dvj.dtype), dvj)
        return m_new, z, acc, ds_sum, g

    stats = jnp.zeros((qi.shape[0], 1), jnp.float32)  # [Q, 1]
    rows = jnp.zeros(qi.shape, jnp.float32)  # [Q, K]
    _, z, acc, ds_sum, g = jax.lax.fori_loop(
        0, n_kv, step, (stats - jnp.inf, stats, rows, stats, rows)
    )
    out = acc / z  # [Q, K]
    o_ref[...] = out.astype(o_ref.dtype)
    do_ref[...] = ((g - ds_sum * out) / z).astype(do_ref.dtype)
