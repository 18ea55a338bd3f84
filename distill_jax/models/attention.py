"""Rotary position embeddings and the one attention function every model calls.

Dimension letters: B batch, T tokens, H heads, K head dim, A id axes (3 for FLUX).

Implementations behind :func:`attention` (``impl``):

- ``"xla"`` (default): ``jax.nn.dot_product_attention``; differentiable in both modes, so
  ``jax.jvp`` (sCM and MeanFlow tangents) and ``jax.grad`` go through it.
- ``"plain"``: softmax(QK^T/sqrt(K)) V written out in einsums; the reference the others are
  tested against.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("xla", "plain")


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


def _plain(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhk,bshk->bhqs", q, k, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # [B, H, T, T]
    return jnp.einsum("bhqs,bshk->bqhk", probs, v)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "xla") -> jax.Array:
    """Full (unmasked) multi-head attention. ``q, k, v``: ``[B, T, H, K]`` -> ``[B, T, H, K]``."""
    if impl == "xla":
        return jax.nn.dot_product_attention(q, k, v)
    if impl == "plain":
        return _plain(q, k, v)
    raise ValueError(f"unknown attention impl {impl!r}; choose one of {IMPLEMENTATIONS}")
