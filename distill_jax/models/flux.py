"""The FLUX.1 MMDiT in flax.nnx.

Dimension letters: B batch, L image tokens, S text tokens, T = S + L, D width (= H*K), H heads,
K head dim, M feed-forward width, C channels, E sinusoid width (256).

Parameter names follow the BFL layout (fused ``qkv`` projections, the single block's fused
``linear1``), so that each block runs few, large matmuls; ``distill_jax.port.flux`` maps them to
and from diffusers' and BFL's state dicts. The call mirrors diffusers' ``FluxTransformer2DModel``:
``model(hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
guidance)``, with ``timestep`` and ``guidance`` multiplied by ``cfg.time_scale`` before the
sinusoidal embedding (1000 in stock FLUX; 1 for the rescaled teachers and students of sCM and
MeanFlow, spec section 1.2); with ``time_dtype=bfloat16`` they are first rounded to bfloat16, as
the paper's bf16 models cast them (spec 1.2 item 1).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from distill_jax.models.attention import apply_rope, attention, resolve_impl, rope_frequencies
from distill_jax.parameterization import quantize
from distill_jax.sharding import axes, constrain

log = logging.getLogger(__name__)

REMAT_POLICIES = {
    "none": None,  # no rematerialization
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmuls
}
DELTA_INITS = ("copy", "zero")
# FluxConfig(scan_layers=None) stacks the blocks of models at least this deep: an unrolled
# FLUX.1-lite-8B step (8 + 38 blocks, three passes) is too large to compile quickly, while the
# small models (tiny, mid, toy) keep the per-block layout their checkpoints were written in.
SCAN_FROM_BLOCKS = 16


def check_time_scale(value: Any) -> float:
    """``value`` as a float when it is a finite, positive number (not a bool or a string)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(
            f"time_scale={value!r}: expected a finite number > 0 (1000 for stock FLUX, 1 for "
            "rescaled teachers and students)"
        )
    return float(value)


@dataclasses.dataclass(frozen=True)
class FluxConfig:
    """Structure of a FLUX MMDiT. Sizes only: no dtypes, RNGs or meshes.

    ``delta_embed`` adds MeanFlow's second time embedder on Δ = t − r (input ``timestep2``);
    ``delta_init`` is ``"copy"`` (a copy of the time embedder, as the paper's code) or ``"zero"``
    (zero output layer, so that the student equals the teacher at r = t). ``logvar_head`` adds
    sCM's Linear(D→1) on the conditioning vector (spec section 1.3).

    ``scan_layers`` is the parameter layout of the blocks: per block (``double_blocks.{i}.…``,
    run as a Python loop) or stacked on a leading ``layers`` axis (``double_blocks.…`` of shape
    ``[num_double, …]``, each kind of block run as one ``jax.lax.scan``), so that the compiled
    program does not grow with depth. None (the default) resolves by depth: stacked from
    :data:`SCAN_FROM_BLOCKS` blocks on (the full-size presets), per block below (tiny, mid, toy).

    ``time_embed_float32`` computes the time, guidance and Δ embeddings (sinusoid and MLP, and so
    their JVP tangents) in float32 whatever the compute dtype, cast to it once summed into the
    conditioning vector (NVIDIA rCM's JVP route to distil stock, ``time_scale = 1000``, teachers;
    :func:`distill_jax.losses.scm_loss`'s ``time_derivative`` is the other). It changes what a
    bfloat16 model computes, not its parameters, so it is stored with the structure: a student
    trained with it samples with it.
    """

    num_double: int = 19
    num_single: int = 38
    num_heads: int = 24
    head_dim: int = 128
    in_channels: int = 64
    out_channels: int | None = None
    context_dim: int = 4096
    pooled_dim: int = 768
    axes_dim: tuple[int, ...] = (16, 56, 56)
    rope_theta: float = 10000.0
    mlp_ratio: float = 4.0
    guidance_embed: bool = True
    time_scale: float = 1000.0
    time_embed_dim: int = 256
    delta_embed: bool = False
    delta_init: str = "copy"
    logvar_head: bool = False
    scan_layers: bool | None = None
    time_embed_float32: bool = False

    def __post_init__(self):
        if self.scan_layers is None:
            deep = self.num_double + self.num_single >= SCAN_FROM_BLOCKS
            object.__setattr__(self, "scan_layers", deep)
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"FluxConfig: sum(axes_dim)={sum(self.axes_dim)} must equal "
                f"head_dim={self.head_dim}"
            )
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"FluxConfig: every RoPE axis dim must be even, got {self.axes_dim}")
        if self.delta_init not in DELTA_INITS:
            raise ValueError(f"FluxConfig: delta_init={self.delta_init!r}, expected {DELTA_INITS}")
        check_time_scale(self.time_scale)
        if self.time_embed_dim % 2:
            raise ValueError(f"FluxConfig: time_embed_dim={self.time_embed_dim} must be even")

    @property
    def hidden(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden * self.mlp_ratio)

    @property
    def out(self) -> int:
        return self.out_channels or self.in_channels

    def replace(self, **changes: Any) -> FluxConfig:
        return dataclasses.replace(self, **changes)

    # Presets. Depth is data: confirm it from the checkpoint's own config.json when converting.
    @classmethod
    def flux1_dev(cls) -> FluxConfig:
        return cls()

    @classmethod
    def flux1_schnell(cls) -> FluxConfig:
        return cls(guidance_embed=False)

    @classmethod
    def flux1_lite_8b(cls) -> FluxConfig:
        return cls(num_double=8, num_single=38)

    @classmethod
    def tiny(cls) -> FluxConfig:
        return cls(
            num_double=1,
            num_single=1,
            num_heads=2,
            head_dim=16,
            in_channels=16,
            context_dim=32,
            pooled_dim=16,
            axes_dim=(4, 6, 6),
        )

    @classmethod
    def mid(cls) -> FluxConfig:
        """The benchmarks' model: FLUX's layout (64 input channels, 128-wide heads split 8/28/28
        by the rotary axes at half size) at a width of 512 and 2 + 4 blocks, which a CPU runs
        in seconds."""
        return cls(
            num_double=2,
            num_single=4,
            num_heads=8,
            head_dim=64,
            in_channels=64,
            context_dim=512,
            pooled_dim=256,
            axes_dim=(8, 28, 28),
        )

    @classmethod
    def toy(cls) -> FluxConfig:
        """The toy teacher of the shapes world (:mod:`distill_jax.pipeline.toy`): 1 double + 2
        single blocks of width 384 (6 heads of 64) over the toy autoencoder's latents (16
        channels, 64 packed: one token per cell of the world) and a 64-wide text encoder. The
        width is well above a token's 64 channels: the velocity carries the noise through the
        residual stream. ``time_scale=1`` as the paper's rescaled teacher (spec 2.2), no guidance
        embedding, so that sCM and MeanFlow distil it directly."""
        return cls(
            num_double=1,
            num_single=2,
            num_heads=6,
            head_dim=64,
            in_channels=64,
            context_dim=64,
            pooled_dim=64,
            axes_dim=(8, 28, 28),
            mlp_ratio=2.0,
            guidance_embed=False,
            time_scale=1.0,
        )

    PRESETS = ("flux1_dev", "flux1_schnell", "flux1_lite_8b", "mid", "tiny", "toy")
    # Fields a converted folder's config.json may lack, with the value its writer meant: folders
    # written before scan_layers existed hold per-block parameters (distill_jax.folders), those
    # before time_embed_float32 embed times in the compute dtype.
    ADDED_FIELDS = {"scan_layers": False, "time_embed_float32": False}

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> FluxConfig:
        """A preset by name (one of :data:`PRESETS`), with ``overrides`` applied."""
        if name not in cls.PRESETS:
            raise ValueError(f"FluxConfig preset {name!r}; choose one of {cls.PRESETS}")
        return getattr(cls, name)().replace(**overrides)

    _DIFFUSERS_KEYS = {
        "num_layers": "num_double",
        "num_single_layers": "num_single",
        "num_attention_heads": "num_heads",
        "attention_head_dim": "head_dim",
        "in_channels": "in_channels",
        "out_channels": "out_channels",
        "joint_attention_dim": "context_dim",
        "pooled_projection_dim": "pooled_dim",
        "axes_dims_rope": "axes_dim",
        "guidance_embeds": "guidance_embed",
    }

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any], **overrides: Any) -> FluxConfig:
        """Maps a diffusers ``transformer/config.json`` dict; ``overrides`` set other fields."""
        if config.get("patch_size", 1) != 1:
            raise ValueError(
                f"FLUX config: patch_size={config['patch_size']} is not supported "
                "(FLUX packs 2x2 patches outside the transformer; expected 1)"
            )
        unknown = sorted(
            k
            for k in config
            if not k.startswith("_") and k != "patch_size" and k not in cls._DIFFUSERS_KEYS
        )
        if unknown:
            log.warning("FLUX config: ignoring unknown keys %s", unknown)
        fields = {
            ours: config[theirs] for theirs, ours in cls._DIFFUSERS_KEYS.items() if theirs in config
        }
        if "axes_dim" in fields:
            fields["axes_dim"] = tuple(fields["axes_dim"])
        return cls(**{**fields, **overrides})

    def to_diffusers(self) -> dict[str, Any]:
        """The diffusers ``config.json`` of this structure (extra heads are not diffusers')."""
        out = {theirs: getattr(self, ours) for theirs, ours in self._DIFFUSERS_KEYS.items()}
        out["axes_dims_rope"] = list(self.axes_dim)
        return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, **out}


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """FLUX's sinusoid ``[cos(t f_i), sin(t f_i)]``, f_i = max_period^(-i/(dim/2)). [B] -> [B, E].

    Always float32: at t = 1000 the arguments reach 1000 and bf16 would destroy them.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def embed_float32(embedder: MLPEmbedder, x: jax.Array) -> jax.Array:
    """``embedder(x)`` (Linear, SiLU, Linear) in float32 whatever its compute dtype: parameters
    upcast, matmuls at full float32 precision (not TF32 or one bf16 pass). [B, E] -> [B, D]."""

    def dense(layer: nnx.Linear, h: jax.Array) -> jax.Array:
        kernel = layer.kernel.get_value().astype(jnp.float32)
        h = jnp.dot(h, kernel, precision=jax.lax.Precision.HIGHEST)
        return h + layer.bias.get_value().astype(jnp.float32)

    return dense(embedder.out_layer, jax.nn.silu(dense(embedder.in_layer, x.astype(jnp.float32))))


def _linear(
    din: int, dout: int, names: tuple[str, str], rngs: nnx.Rngs, dtype, param_dtype, **kw: Any
) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        kernel_metadata=axes(*names),
        bias_metadata=axes(names[1]),
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
        **kw,
    )


def _layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters, statistics in float32."""
    with jax.named_scope("norm"):
        xf = x.astype(jnp.float32)
        mean = xf.mean(-1, keepdims=True)
        var = jnp.square(xf - mean).mean(-1, keepdims=True)
        return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return _layer_norm(x) * (1 + scale) + shift


class RMSNorm(nnx.Module):
    """Per-head RMSNorm with a learned scale (FLUX's q/k norm), statistics in float32."""

    def __init__(self, dim: int, *, param_dtype=jnp.float32, eps: float = 1e-6):
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), logical_axes=("norm",))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        with jax.named_scope("norm"):
            xf = x.astype(jnp.float32)
            xf = xf * jax.lax.rsqrt(jnp.square(xf).mean(-1, keepdims=True) + self.eps)
            return (xf * self.scale.get_value().astype(jnp.float32)).astype(x.dtype)


class MLPEmbedder(nnx.Module):
    """Linear, SiLU, Linear: the time, guidance and pooled-text embedders."""

    def __init__(self, din: int, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.in_layer = _linear(din, dim, ("io", "embed"), rngs, dtype, param_dtype)
        self.out_layer = _linear(dim, dim, ("mlp", "embed"), rngs, dtype, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out_layer(jax.nn.silu(self.in_layer(x)))


class Modulation(nnx.Module):
    """SiLU then Linear(D → n·D): the AdaLN shift/scale/gate vectors, each ``[B, 1, D]``."""

    def __init__(self, dim: int, n: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.lin = _linear(dim, n * dim, ("embed", "mod"), rngs, dtype, param_dtype)
        self.n = n

    def __call__(self, vec: jax.Array) -> list[jax.Array]:
        out = self.lin(jax.nn.silu(vec))[:, None, :]  # [B, 1, n*D]
        return jnp.split(out, self.n, axis=-1)


class QKV(nnx.Module):
    """Fused q/k/v projection with per-head RMSNorm on q and k."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.hidden
        self.qkv = _linear(d, 3 * d, ("embed", "heads"), rngs, dtype, param_dtype)
        self.query_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype)
        self.key_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype)
        self.proj = _linear(d, d, ("heads", "embed"), rngs, dtype, param_dtype)
        self.heads = cfg.num_heads

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        qkv = self.qkv(x).reshape(*x.shape[:2], 3, self.heads, -1)  # [B, N, 3, H, K]
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        return self.query_norm(q), self.key_norm(k), v


class MLP(nnx.Module):
    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.fc1 = _linear(cfg.hidden, cfg.mlp_hidden, ("embed", "mlp"), rngs, dtype, param_dtype)
        self.fc2 = _linear(cfg.mlp_hidden, cfg.hidden, ("mlp", "embed"), rngs, dtype, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class DoubleBlock(nnx.Module):
    """Two streams (image, text) with their own weights and one joint attention over [txt; img]."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attn_impl: str):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.img_mod = Modulation(cfg.hidden, 6, **kw)
        self.img_attn = QKV(cfg, **kw)
        self.img_mlp = MLP(cfg, **kw)
        self.txt_mod = Modulation(cfg.hidden, 6, **kw)
        self.txt_attn = QKV(cfg, **kw)
        self.txt_mlp = MLP(cfg, **kw)
        self.attn_impl = attn_impl

    def __call__(self, img, txt, vec, cos, sin):
        """img ``[B, L, D]``, txt ``[B, S, D]``, vec ``[B, D]`` -> (img, txt)."""
        i_shift, i_scale, i_gate, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift, t_scale, t_gate, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn(_modulate(img, i_shift, i_scale))
        tq, tk, tv = self.txt_attn(_modulate(txt, t_shift, t_scale))
        q = apply_rope(jnp.concatenate([tq, iq], axis=1), cos, sin)  # [B, T, H, K]
        k = apply_rope(jnp.concatenate([tk, ik], axis=1), cos, sin)
        v = jnp.concatenate([tv, iv], axis=1)
        out = attention(q, k, v, impl=self.attn_impl).reshape(*q.shape[:2], -1)  # [B, T, D]
        s = txt.shape[1]
        img = img + i_gate * self.img_attn.proj(out[:, s:])
        img = img + i_gate2 * self.img_mlp(_modulate(img, i_shift2, i_scale2))
        txt = txt + t_gate * self.txt_attn.proj(out[:, :s])
        txt = txt + t_gate2 * self.txt_mlp(_modulate(txt, t_shift2, t_scale2))
        return img, txt


class SingleBlock(nnx.Module):
    """One stream over [txt; img]: fused qkv+MLP input projection, parallel attention and MLP."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype, param_dtype, attn_impl: str):
        d, m = cfg.hidden, cfg.mlp_hidden
        self.modulation = Modulation(d, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear1 = _linear(d, 3 * d + m, ("embed", "mlp"), rngs, dtype, param_dtype)
        self.query_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype)
        self.key_norm = RMSNorm(cfg.head_dim, param_dtype=param_dtype)
        self.linear2 = _linear(d + m, d, ("mlp", "embed"), rngs, dtype, param_dtype)
        self.heads, self.hidden, self.attn_impl = cfg.num_heads, d, attn_impl

    def __call__(self, x, vec, cos, sin):
        """x ``[B, T, D]`` -> ``[B, T, D]``."""
        shift, scale, gate = self.modulation(vec)
        h = self.linear1(_modulate(x, shift, scale))  # [B, T, 3D + M]
        qkv, mlp = h[..., : 3 * self.hidden], h[..., 3 * self.hidden :]
        qkv = qkv.reshape(*x.shape[:2], 3, self.heads, -1)  # [B, T, 3, H, K]
        q = apply_rope(self.query_norm(qkv[:, :, 0]), cos, sin)
        k = apply_rope(self.key_norm(qkv[:, :, 1]), cos, sin)
        out = attention(q, k, qkv[:, :, 2], impl=self.attn_impl).reshape(x.shape)
        mixed = jnp.concatenate([out, jax.nn.gelu(mlp, approximate=True)], axis=-1)
        return x + gate * self.linear2(mixed)


class FinalLayer(nnx.Module):
    """AdaLN (shift, scale: the BFL order) then Linear(D → C_out)."""

    def __init__(self, cfg: FluxConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        d = cfg.hidden
        self.adaLN = _linear(d, 2 * d, ("embed", "mod"), rngs, dtype, param_dtype)
        self.linear = _linear(d, cfg.out, ("embed", "io"), rngs, dtype, param_dtype)

    def __call__(self, x: jax.Array, vec: jax.Array) -> jax.Array:
        shift, scale = jnp.split(self.adaLN(jax.nn.silu(vec))[:, None, :], 2, axis=-1)
        return self.linear(_modulate(x, shift, scale))


class Flux(nnx.Module):
    """The FLUX MMDiT.

    ``dtype`` is the compute dtype (bfloat16 for training), ``param_dtype`` the storage dtype
    (float32 master weights). ``remat`` names a per-block rematerialization policy
    (:data:`REMAT_POLICIES`); ``attn_impl`` an implementation of
    :func:`distill_jax.models.attention.attention` (``"auto"`` is resolved for the default
    backend when the model is built). ``time_dtype`` is the precision of the time
    inputs (timestep, guidance, Δ) before the sinusoid: float32 keeps them exact, bfloat16 rounds
    them as the paper's models do (``timestep.to(hidden_states.dtype)``, spec 1.2 item 1, 7.6).

    With ``cfg.scan_layers``, ``double_blocks`` and ``single_blocks`` are each one block whose
    parameters hold every layer on a leading ``layers`` axis, run as one ``jax.lax.scan`` with
    the remat policy applied to each step; otherwise they are ``nnx.List`` s of blocks.
    :func:`relayout` moves parameters between the two layouts.
    """

    def __init__(
        self,
        cfg: FluxConfig,
        *,
        rngs: nnx.Rngs,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        attn_impl: str = "xla",
        time_dtype=jnp.float32,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat={remat!r}; choose one of {sorted(REMAT_POLICIES)}")
        # "auto" resolved now, so that equal structures have equal graphdefs
        attn_impl = resolve_impl(attn_impl, dtype, cfg.head_dim)
        self.cfg, self.dtype, self.remat, self.time_dtype = cfg, dtype, remat, time_dtype
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        d = cfg.hidden
        self.img_in = _linear(cfg.in_channels, d, ("io", "embed"), **kw)
        self.txt_in = _linear(cfg.context_dim, d, ("io", "embed"), **kw)
        self.time_in = MLPEmbedder(cfg.time_embed_dim, d, **kw)
        self.vector_in = MLPEmbedder(cfg.pooled_dim, d, **kw)
        self.guidance_in = MLPEmbedder(cfg.time_embed_dim, d, **kw) if cfg.guidance_embed else None
        self.delta_in = MLPEmbedder(cfg.time_embed_dim, d, **kw) if cfg.delta_embed else None
        # Built one by one in either layout, so that a seed gives the same weights in both.
        layers = _stacked if cfg.scan_layers else nnx.List
        self.double_blocks = layers(
            [DoubleBlock(cfg, attn_impl=attn_impl, **kw) for _ in range(cfg.num_double)]
        )
        self.single_blocks = layers(
            [SingleBlock(cfg, attn_impl=attn_impl, **kw) for _ in range(cfg.num_single)]
        )
        self.final_layer = FinalLayer(cfg, **kw)
        self.logvar = (
            _linear(d, 1, ("embed", "io"), **kw, kernel_init=nnx.initializers.xavier_uniform())
            if cfg.logvar_head
            else None
        )
        if self.delta_in is not None:
            reset_delta_embedder(self, cfg.delta_init)

    def conditioning(
        self,
        timestep: jax.Array,
        pooled_projections: jax.Array,
        guidance: jax.Array | None = None,
        timestep2: jax.Array | None = None,
    ) -> jax.Array:
        """The conditioning vector ``vec [B, D]`` from timestep ``[B]``, pooled text ``[B, P]``,
        guidance ``[B]`` and (MeanFlow) Δ = t − r ``[B]``; times are rounded to ``time_dtype``,
        then scaled by ``time_scale``. The sinusoids are float32; with
        ``cfg.time_embed_float32`` so are their embedders, until ``vec`` is cast to ``dtype``."""
        cfg, e = self.cfg, self.cfg.time_embed_dim

        def embedded(embedder, x):
            x = jnp.broadcast_to(quantize(x, self.time_dtype), pooled_projections.shape[:1])
            x = timestep_embedding(x * cfg.time_scale, e)  # [B, E] float32
            if cfg.time_embed_float32:
                return embed_float32(embedder, x)
            return embedder(x.astype(self.dtype))

        vec = embedded(self.time_in, timestep)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError(
                    "this FLUX model embeds guidance (guidance_embed=True); "
                    "pass guidance=[B] (e.g. 3.5)"
                )
            vec = vec + embedded(self.guidance_in, guidance)
        elif guidance is not None:
            raise ValueError(
                "this FLUX model has no guidance embedder (guidance_embed=False, "
                "e.g. schnell); pass guidance=None"
            )
        if self.delta_in is not None:
            if timestep2 is None:
                raise ValueError(
                    "this FLUX model has a Δ-time embedder (delta_embed=True); "
                    "pass timestep2 = t - r"
                )
            vec = vec + embedded(self.delta_in, timestep2)
        elif timestep2 is not None:
            raise ValueError(
                "timestep2 given but the model has no Δ-time embedder (delta_embed=False)"
            )
        vec = vec + self.vector_in(pooled_projections.astype(self.dtype))
        return vec.astype(self.dtype)

    def _block(self, block: nnx.Module, *args):
        if self.remat == "none":
            return block(*args)
        # jax.checkpoint over a pure function of the block's state: NNX's own remat would try to
        # write the parameters back, which fails when they come from an enclosing trace (the
        # teacher's parameters inside the jitted train step).
        graphdef, state = nnx.split(block)

        def run(state, *args):
            return nnx.merge(graphdef, state)(*args)

        # Inside a scan, the loop already keeps XLA from merging the recomputation away.
        policy, cse = REMAT_POLICIES[self.remat], not self.cfg.scan_layers
        return jax.checkpoint(run, policy=policy, prevent_cse=cse)(state, *args)

    def _blocks(self, blocks: nnx.Module, x: tuple[jax.Array, ...], *args) -> tuple:
        """Runs ``blocks`` (an ``nnx.List``, or one block of stacked parameters: one scan step
        per layer) in order on the stream(s) ``x``, each output constrained to its sharding."""

        def step(x, block):
            out = self._block(block, *x, *args)
            out = out if isinstance(out, tuple) else (out,)
            return tuple(constrain(o, "batch", "seq", "act_embed") for o in out)

        if isinstance(blocks, nnx.List):
            for block in blocks:
                x = step(x, block)
            return x
        graphdef, stacked = nnx.split(blocks)

        def body(x, layer):  # layer: one block's slice of the stacked state
            return step(x, nnx.merge(graphdef, layer)), None

        return jax.lax.scan(body, x, stacked)[0]

    def __call__(
        self,
        hidden_states: jax.Array,
        encoder_hidden_states: jax.Array,
        pooled_projections: jax.Array,
        timestep: jax.Array,
        img_ids: jax.Array,
        txt_ids: jax.Array,
        guidance: jax.Array | None = None,
        timestep2: jax.Array | None = None,
        *,
        return_logvar: bool = False,
    ):
        """Velocity (or average velocity) of packed latents.

        hidden_states ``[B, L, C_in]``, encoder_hidden_states ``[B, S, D_txt]``,
        pooled_projections ``[B, P]``, timestep ``[B]`` (flow time in [0, 1]),
        img_ids ``[L, 3]`` or ``[B, L, 3]``, txt_ids ``[S, 3]`` or ``[B, S, 3]``,
        guidance ``[B]``, timestep2 ``[B]``. Returns ``[B, L, C_out]`` in the compute dtype, and
        with ``return_logvar`` also the sCM log-variance ``[B]`` in float32.
        """
        cfg = self.cfg
        _, n_img, c = hidden_states.shape
        if c != cfg.in_channels:
            raise ValueError(f"hidden_states has {c} channels, the model takes {cfg.in_channels}")
        if encoder_hidden_states.shape[-1] != cfg.context_dim:
            raise ValueError(
                f"encoder_hidden_states width {encoder_hidden_states.shape[-1]} != "
                f"context_dim {cfg.context_dim}"
            )
        vec = self.conditioning(timestep, pooled_projections, guidance, timestep2)  # [B, D]
        img = self.img_in(hidden_states.astype(self.dtype))  # [B, L, D]
        txt = self.txt_in(encoder_hidden_states.astype(self.dtype))  # [B, S, D]
        s = txt.shape[1]
        ids = jnp.concatenate(
            [
                jnp.broadcast_to(txt_ids, (txt_ids.shape[0] if txt_ids.ndim == 3 else 1, s, 3)),
                jnp.broadcast_to(img_ids, (img_ids.shape[0] if img_ids.ndim == 3 else 1, n_img, 3)),
            ],
            axis=1,
        )  # [B or 1, T, 3]
        cos, sin = rope_frequencies(ids, cfg.axes_dim, cfg.rope_theta)  # [B or 1, T, K/2]

        img, txt = self._blocks(self.double_blocks, (img, txt), vec, cos, sin)
        x = jnp.concatenate([txt, img], axis=1)  # [B, T, D]
        (x,) = self._blocks(self.single_blocks, (x,), vec, cos, sin)
        out = self.final_layer(x[:, s:], vec)  # [B, L, C_out]
        if not return_logvar:
            return out
        if self.logvar is None:
            raise ValueError("return_logvar=True needs a model built with logvar_head=True")
        return out, self.logvar(vec)[:, 0].astype(jnp.float32)

    def logvar_at(
        self, timestep: jax.Array, pooled_projections: jax.Array, guidance: jax.Array | None = None
    ) -> jax.Array:
        """The log-variance head on the conditioning of another time (the paper's code feeds the
        TrigFlow time here, spec section 7.9). Returns ``[B]`` float32."""
        if self.logvar is None:
            raise ValueError("logvar_at needs a model built with logvar_head=True")
        vec = self.conditioning(
            timestep,
            pooled_projections,
            guidance,
            None if self.delta_in is None else jnp.zeros_like(timestep),
        )
        return self.logvar(vec)[:, 0].astype(jnp.float32)


LAYERS = "layers"  # the logical axis of stacked blocks (never sharded: see sharding.py)
_BLOCK_LISTS = ("double_blocks", "single_blocks")


def _stack(variables: list[nnx.Variable]) -> nnx.Variable:
    """One variable holding ``variables``' values stacked on a leading ``layers`` axis."""
    first = variables[0]
    out = first.replace(jnp.stack([v.get_value() for v in variables]))
    names = first.get_metadata("logical_axes", None)
    if names is not None:
        out.set_metadata("logical_axes", (LAYERS, *names))
    return out


def _unstack(variable: nnx.Variable) -> list[nnx.Variable]:
    """The per-layer variables of a stacked one (the inverse of :func:`_stack`)."""
    value, names = variable.get_value(), variable.get_metadata("logical_axes", None)
    out = []
    for i in range(value.shape[0]):
        v = variable.replace(value[i])
        if names is not None:
            v.set_metadata("logical_axes", tuple(names[1:]))
        out.append(v)
    return out


def _stacked(blocks: list[nnx.Module]) -> nnx.Module:
    """One module of ``blocks``' structure whose every variable holds all the blocks' values on a
    leading ``layers`` axis, for :meth:`Flux._blocks`' scan."""
    if not blocks:
        return nnx.List([])
    split = [nnx.split(b) for b in blocks]
    flat = [dict(nnx.to_flat_state(state)) for _, state in split]
    stacked = [(p, _stack([f[p] for f in flat])) for p in flat[0]]
    return nnx.merge(split[0][0], nnx.from_flat_state(stacked))


def relayout(params: nnx.State, scan_layers: bool) -> nnx.State:
    """A :class:`Flux` state (parameters, or any state of the same paths) in the block layout
    ``scan_layers``: per-block variables (``double_blocks.{i}.…``) stacked into one per name
    (``double_blocks.…``, ``[N, …]``), or stacked ones split back. Values are moved, never
    changed (bit for bit); works under ``jax.jit``. A state already in that layout is returned
    as it is."""
    out, groups = [], {}
    for path, var in nnx.to_flat_state(params):
        per_block = path[0] in _BLOCK_LISTS and isinstance(path[1], int)
        stacked = path[0] in _BLOCK_LISTS and not per_block
        if scan_layers and per_block:
            groups.setdefault((path[0], *path[2:]), {})[path[1]] = var
        elif not scan_layers and stacked:
            out += [((path[0], i, *path[1:]), v) for i, v in enumerate(_unstack(var))]
        else:
            out.append((path, var))
    for path, layers in groups.items():
        if sorted(layers) != list(range(len(layers))):
            raise ValueError(f"{'.'.join(map(str, path))}: blocks {sorted(layers)} are not 0..N-1")
        out.append((path, _stack([layers[i] for i in range(len(layers))])))
    return nnx.from_flat_state(out)


def reset_delta_embedder(model: Flux, mode: str) -> None:
    """(Re)initialises MeanFlow's Δ-time embedder from the model's time embedder.

    ``"copy"``: a copy of ``time_in`` (the paper's code; the student then differs from the teacher
    at r = t by E(φ(0))); ``"zero"``: ``time_in``'s first layer and a zero output layer, so that
    the student is exactly the teacher at r = t. Call after loading teacher weights.
    """
    if model.delta_in is None:
        raise ValueError("the model has no Δ-time embedder (delta_embed=False)")
    if mode not in DELTA_INITS:
        raise ValueError(f"delta init {mode!r}; choose one of {DELTA_INITS}")
    src, dst = model.time_in, model.delta_in
    for name in ("in_layer", "out_layer"):
        for p in ("kernel", "bias"):
            value = getattr(getattr(src, name), p).get_value()
            if mode == "zero" and name == "out_layer":
                value = jnp.zeros_like(value)
            getattr(getattr(dst, name), p).set_value(jnp.array(value))
