"""The T5 v1.1 encoder (FLUX's second text encoder, T5-XXL), matching transformers' T5EncoderModel.

Pre-norm blocks of bias-free self-attention and a gated-GELU feed-forward, with T5's RMS layer
norm and a learned relative position bias. The bias table lives once on the encoder: T5 stores it
in the first layer and shares the computed bias with every layer, which is the same computation,
and keeping it out of the layers leaves them identical in structure (scan- and remat-friendly).

Dimension letters: B batch, S tokens (T the attended-to tokens), D model width, H heads,
K head dim, F feed-forward hidden, V vocabulary, R relative position buckets.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.sharding import axes


@dataclasses.dataclass(frozen=True)
class T5Config:
    vocab_size: int
    d_model: int
    d_kv: int
    d_ff: int
    num_layers: int
    num_heads: int
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> T5Config:
        """From a transformers ``T5Config.to_dict()`` (or ``config.json``); gated-GELU only."""
        proj = config.get("feed_forward_proj")
        if proj != "gated-gelu":
            raise ValueError(
                f"feed_forward_proj must be 'gated-gelu' (T5 v1.1), got {proj!r}; "
                "the ReLU feed-forward of the original T5 is not implemented"
            )
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in config]
        if missing:
            raise ValueError(f"T5 config lacks field(s) {missing}")
        return cls(**{n: config[n] for n in names})


def t5_v1_1_xxl() -> T5Config:
    """google/t5-v1_1-xxl, FLUX's ``text_encoder_2``."""
    return T5Config(
        vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64
    )


def tiny() -> T5Config:
    return T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4)


def relative_position_buckets(seq_len: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """Bidirectional bucket of every relative position ``-(S-1) .. S-1``: int32 ``[2S-1]``.

    Computed on the host in float32 in the same operation order as transformers, so the truncation
    at bucket boundaries (e.g. distance 16 of 32 buckets / 128) lands on the same side.
    """
    rel = np.arange(-(seq_len - 1), seq_len)  # key position minus query position
    half = num_buckets // 2
    bucket = (rel > 0).astype(np.int64) * half  # keys after the query use the upper half
    dist = np.abs(rel)
    exact = half // 2  # distances below this get a bucket each; the rest are log-spaced
    ratio = np.maximum(dist, 1).astype(np.float32) / np.float32(exact)  # max() keeps log finite
    log_part = np.log(ratio) / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
    far = np.minimum(exact + log_part.astype(np.int64), half - 1)
    return (bucket + np.where(dist < exact, dist, far)).astype(np.int32)


class T5LayerNorm(nnx.Module):
    """RMS norm without mean subtraction or bias; the variance is always taken in float32."""

    def __init__(self, dim: int, eps: float, *, dtype: Any, param_dtype: Any):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), **axes("embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[..., D] -> [..., D]``."""
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class T5Attention(nnx.Module):
    """Bias-free multi-head self-attention; no 1/sqrt(K) scaling (T5 folds it into the init)."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.d_kv
        inner = cfg.num_heads * cfg.d_kv
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q = nnx.Linear(cfg.d_model, inner, kernel_metadata=axes("embed", "heads"), **kw)
        self.k = nnx.Linear(cfg.d_model, inner, kernel_metadata=axes("embed", "heads"), **kw)
        self.v = nnx.Linear(cfg.d_model, inner, kernel_metadata=axes("embed", "heads"), **kw)
        self.o = nnx.Linear(inner, cfg.d_model, kernel_metadata=axes("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        """``x [B, S, D]``, ``position_bias [H, S, S]`` (float32), ``mask [B, S]`` or None."""
        b, s, _ = x.shape
        split = (b, s, self.num_heads, self.head_dim)
        q = self.q(x).reshape(split)  # [B, S, H, K]
        k = self.k(x).reshape(split)
        v = self.v(x).reshape(split)
        # Scores in float32: unscaled T5 logits get large and the bias is added at full precision.
        logits = jnp.einsum("bshk,bthk->bhst", q, k, preferred_element_type=jnp.float32)
        logits = logits + position_bias[None]  # [B, H, S, T]
        if mask is not None:
            keep = mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]: padding keys are dropped
            logits = jnp.where(keep, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhst,bthk->bshk", weights, v)  # [B, S, H, K]
        return self.o(out.reshape(b, s, self.num_heads * self.head_dim))


class T5GatedFeedForward(nnx.Module):
    """``wo(gelu_tanh(wi_0 x) * wi_1 x)``: T5 v1.1's gated-GELU, no biases."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.wi_0 = nnx.Linear(cfg.d_model, cfg.d_ff, kernel_metadata=axes("embed", "mlp"), **kw)
        self.wi_1 = nnx.Linear(cfg.d_model, cfg.d_ff, kernel_metadata=axes("embed", "mlp"), **kw)
        self.wo = nnx.Linear(cfg.d_ff, cfg.d_model, kernel_metadata=axes("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, S, D] -> [B, S, D]`` through ``[B, S, F]``."""
        # transformers' gelu_new is the tanh approximation.
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5Block(nnx.Module):
    """Pre-norm residual attention, then pre-norm residual feed-forward."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.attn = T5Attention(cfg, rngs=rngs, **kw)
        self.mlp_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)
        self.mlp = T5GatedFeedForward(cfg, rngs=rngs, **kw)

    def __call__(self, x: jax.Array, position_bias: jax.Array, mask: jax.Array | None) -> jax.Array:
        """``[B, S, D] -> [B, S, D]``."""
        x = x + self.attn(self.attn_norm(x), position_bias, mask)
        return x + self.mlp(self.mlp_norm(x))


class T5Encoder(nnx.Module):
    """Token ids ``[B, S]`` -> final-normed hidden states ``[B, S, D]``."""

    def __init__(
        self,
        cfg: T5Config,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.d_model,
            embedding_init=nnx.initializers.normal(1.0),
            embedding_metadata=axes("vocab", "embed"),
            rngs=rngs,
            **kw,
        )
        # [R, H]: one learned scalar per bucket and head, shared by all layers.
        self.relative_bias = nnx.Embed(
            cfg.relative_attention_num_buckets,
            cfg.num_heads,
            embedding_init=nnx.initializers.normal(cfg.d_model**-0.5),
            embedding_metadata=axes(None, "heads"),
            rngs=rngs,
            dtype=jnp.float32,
            param_dtype=param_dtype,
        )
        self.layers = nnx.List([T5Block(cfg, rngs=rngs, **kw) for _ in range(cfg.num_layers)])
        self.final_norm = T5LayerNorm(cfg.d_model, cfg.layer_norm_epsilon, **kw)

    def position_bias(self, seq_len: int) -> jax.Array:
        """Relative position bias for ``seq_len`` tokens: float32 ``[H, S, T]``."""
        buckets = relative_position_buckets(
            seq_len,
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        )
        by_offset = self.relative_bias(jnp.asarray(buckets))  # [2S-1, H], offset t - s + S - 1
        pos = jnp.arange(seq_len)
        offset = pos[None, :] - pos[:, None] + seq_len - 1  # [S, T]
        return jnp.transpose(by_offset[offset], (2, 0, 1))  # [H, S, T]

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """``input_ids [B, S]`` int, ``attention_mask [B, S]`` (1 = attend, 0 = padding) or None.

        Returns ``[B, S, D]`` in ``dtype``. FLUX passes no mask; padded positions then attend to
        the padding like any other token, as in the reference pipeline.
        """
        x = self.embed(input_ids)  # [B, S, D]
        bias = self.position_bias(input_ids.shape[1])
        for layer in self.layers:
            x = layer(x, bias, attention_mask)
        return self.final_norm(x)
