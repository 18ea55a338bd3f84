"""The CLIP text transformer (FLUX's first text encoder, CLIP-L), matching ``CLIPTextModel``.

Token plus learned position embeddings, pre-LayerNorm causal self-attention blocks with a
two-layer MLP, a final LayerNorm, and the pooled vector read at the end-of-text token the way
transformers picks it.

Dimension letters: B batch, S tokens (T the attended-to tokens), D width, H heads, K head dim,
F MLP hidden, V vocabulary, P positions.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from distill_jax.sharding import axes

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": partial(jax.nn.gelu, approximate=False),  # transformers' "gelu" is the erf form
}


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    # 2 selects transformers' legacy pooling (argmax of the ids); any other id pools at its
    # first occurrence.
    eos_token_id: int = 2

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"hidden_act must be one of {sorted(ACTIVATIONS)}, got {self.hidden_act!r}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def from_transformers(cls, config: Mapping[str, Any]) -> CLIPTextConfig:
        """From a transformers ``CLIPTextConfig.to_dict()`` (or a whole ``CLIPConfig``'s)."""
        config = config.get("text_config") or config
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [n for n in names if n not in config]
        if missing:
            raise ValueError(f"CLIP text config lacks field(s) {missing}")
        return cls(**{n: config[n] for n in names})


def clip_l() -> CLIPTextConfig:
    """openai/clip-vit-large-patch14's text tower, FLUX's ``text_encoder`` (legacy eos id 2)."""
    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=768,
        intermediate_size=3072,
        num_hidden_layers=12,
        num_attention_heads=12,
    )


def tiny() -> CLIPTextConfig:
    return CLIPTextConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
    )


class CLIPAttention(nnx.Module):
    """Causal multi-head self-attention with biased q, k, v and output projections."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        self.num_heads = cfg.num_attention_heads
        self.head_dim = cfg.hidden_size // cfg.num_attention_heads
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        into = dict(kernel_metadata=axes("embed", "heads"), bias_metadata=axes("heads"))
        self.q = nnx.Linear(d, d, **into, **kw)
        self.k = nnx.Linear(d, d, **into, **kw)
        self.v = nnx.Linear(d, d, **into, **kw)
        self.o = nnx.Linear(
            d, d, kernel_metadata=axes("heads", "embed"), bias_metadata=axes("embed"), **kw
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, S, D] -> [B, S, D]``; token s attends to tokens t <= s."""
        b, s, _ = x.shape
        split = (b, s, self.num_heads, self.head_dim)
        q = self.q(x).reshape(split)  # [B, S, H, K]
        k = self.k(x).reshape(split)
        v = self.v(x).reshape(split)
        logits = jnp.einsum("bshk,bthk->bhst", q, k, preferred_element_type=jnp.float32)
        logits = logits * self.head_dim**-0.5  # [B, H, S, T]
        causal = jnp.tril(jnp.ones((s, s), bool))  # [S, T]
        logits = jnp.where(causal, logits, jnp.finfo(jnp.float32).min)
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)  # float32 softmax, as torch
        out = jnp.einsum("bhst,bthk->bshk", weights, v)  # [B, S, H, K]
        return self.o(out.reshape(b, s, self.num_heads * self.head_dim))


class CLIPMLP(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.act = cfg.hidden_act
        self.fc1 = nnx.Linear(
            d, f, kernel_metadata=axes("embed", "mlp"), bias_metadata=axes("mlp"), **kw
        )
        self.fc2 = nnx.Linear(
            f, d, kernel_metadata=axes("mlp", "embed"), bias_metadata=axes("embed"), **kw
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, S, D] -> [B, S, D]`` through ``[B, S, F]``."""
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


def _layer_norm(cfg: CLIPTextConfig, dtype: Any, param_dtype: Any, rngs: nnx.Rngs) -> nnx.LayerNorm:
    # Two-pass variance, like torch, rather than E[x^2] - E[x]^2.
    return nnx.LayerNorm(
        cfg.hidden_size,
        epsilon=cfg.layer_norm_eps,
        use_fast_variance=False,
        dtype=dtype,
        param_dtype=param_dtype,
        scale_metadata=axes("embed"),
        bias_metadata=axes("embed"),
        rngs=rngs,
    )


class CLIPEncoderLayer(nnx.Module):
    """Pre-norm residual attention, then pre-norm residual MLP."""

    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any, param_dtype: Any):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = _layer_norm(cfg, dtype, param_dtype, rngs)
        self.attn = CLIPAttention(cfg, rngs=rngs, **kw)
        self.norm2 = _layer_norm(cfg, dtype, param_dtype, rngs)
        self.mlp = CLIPMLP(cfg, rngs=rngs, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, S, D] -> [B, S, D]``."""
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPTextEncoder(nnx.Module):
    """Token ids ``[B, S]`` -> ``(last_hidden_state [B, S, D], pooled [B, D])``."""

    def __init__(
        self,
        cfg: CLIPTextConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        init = nnx.initializers.normal(0.02)
        self.token_embed = nnx.Embed(
            cfg.vocab_size,
            cfg.hidden_size,
            embedding_init=init,
            embedding_metadata=axes("vocab", "embed"),
            rngs=rngs,
            **kw,
        )
        self.pos_embed = nnx.Embed(
            cfg.max_position_embeddings,
            cfg.hidden_size,
            embedding_init=init,
            embedding_metadata=axes(None, "embed"),  # [P, D]: 77 rows, not worth sharding
            rngs=rngs,
            **kw,
        )
        self.layers = nnx.List(
            [CLIPEncoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_hidden_layers)]
        )
        self.final_norm = _layer_norm(cfg, dtype, param_dtype, rngs)

    def pool_index(self, input_ids: jax.Array) -> jax.Array:
        """Position of the end-of-text token in each row: int ``[B]``.

        With the legacy ``eos_token_id == 2`` configs (CLIP-L as shipped with FLUX) transformers
        takes the largest id in the row, which is the end-of-text token of CLIP's vocabulary;
        otherwise it takes the first occurrence of ``eos_token_id`` (row start if absent).
        """
        if self.cfg.eos_token_id == 2:
            return jnp.argmax(input_ids, axis=-1)
        return jnp.argmax((input_ids == self.cfg.eos_token_id).astype(jnp.int32), axis=-1)

    def __call__(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        """``input_ids [B, S]`` int with ``S <= max_position_embeddings``.

        Returns the final-normed hidden states ``[B, S, D]`` and the pooled ``[B, D]``.
        """
        b, s = input_ids.shape
        if s > self.cfg.max_position_embeddings:
            raise ValueError(
                f"{s} tokens exceed max_position_embeddings {self.cfg.max_position_embeddings}"
            )
        x = self.token_embed(input_ids) + self.pos_embed(jnp.arange(s))[None]  # [B, S, D]
        for layer in self.layers:
            x = layer(x)
        x = self.final_norm(x)
        pooled = x[jnp.arange(b), self.pool_index(input_ids)]  # [B, D]
        return x, pooled
