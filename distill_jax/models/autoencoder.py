"""The FLUX autoencoder: diffusers' ``AutoencoderKL`` in Flax NNX, matching it numerically.

Dimension letters, used in shape comments throughout:
  B batch, H/W image height/width, h/w latent height/width (H / 2**(len(block_out_channels) - 1)),
  C channels (3 for images, ``latent_channels`` for latents), T = H*W tokens in the mid-block
  attention.

Layout: every array this module takes or returns is channels-last, ``[B, H, W, C]`` (NHWC), the
layout XLA convolutions prefer. diffusers and the FLUX pipeline's noise use channels-first
``[B, C, H, W]``; convert at that boundary with :func:`to_nchw` / :func:`to_nhwc` (plain
transposes, so noise drawn in NCHW stays bit-identical).

Structure (and parameter names, which mirror diffusers' where that keeps the port table short):
  encoder: conv_in -> down_blocks[i] (ResnetBlock x layers_per_block, then a stride-2 conv except
  in the last block) -> mid_block (resnet, single-head attention, resnet) -> GroupNorm, SiLU ->
  conv_out to 2 * latent_channels (mean and log-variance); optional 1x1 ``quant_conv``.
  decoder: optional 1x1 ``post_quant_conv`` -> conv_in -> mid_block -> up_blocks over the
  reversed channels (ResnetBlock x (layers_per_block + 1), then nearest x2 and a conv except in the
  last block) -> GroupNorm, SiLU -> conv_out.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from distill_jax.sharding import axes

# diffusers hard-codes this epsilon for every GroupNorm of the VAE (resnets, attention, outputs).
NORM_EPS = 1e-6
# diffusers clamps the posterior's log-variance to this range before using it.
LOGVAR_RANGE = (-30.0, 20.0)

_DOWN_BLOCK = "DownEncoderBlock2D"
_UP_BLOCK = "UpDecoderBlock2D"
# diffusers config keys that do not change the network (tiling defaults, upcast hints).
_IGNORED_KEYS = frozenset({"sample_size", "force_upcast"})


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
    """Architecture and latent normalization of an ``AutoencoderKL``.

    ``scaling_factor`` and ``shift_factor`` define the diffusion-space latents
    ``(z - shift_factor) * scaling_factor`` (see :meth:`Autoencoder.scale_latents`).
    """

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.3611
    shift_factor: float = 0.1159
    use_quant_conv: bool = False
    use_post_quant_conv: bool = False
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"block_out_channels {self.block_out_channels} must be divisible by "
                    f"norm_num_groups={self.norm_num_groups}"
                )

    @classmethod
    def flux(cls) -> AutoencoderConfig:
        """FLUX.1 [dev]/[schnell] ``vae/config.json``."""
        return cls()

    @classmethod
    def tiny(cls) -> AutoencoderConfig:
        """A ~0.7M-parameter model with FLUX's latent width and normalization, for tests."""
        return cls(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8)

    @classmethod
    def from_diffusers(cls, config: Mapping[str, Any]) -> AutoencoderConfig:
        """Maps a diffusers ``AutoencoderKL`` ``config.json`` dict; unsupported fields raise.

        Raises ``ValueError`` naming each field whose value this port cannot reproduce (other
        block types, activations, per-channel latent statistics, unknown keys).
        """
        config = dict(config)
        n = len(config.get("block_out_channels", (64,)))
        problems = []
        if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
            problems.append(f"_class_name={config['_class_name']!r} (expected 'AutoencoderKL')")
        for key, want in (("down_block_types", _DOWN_BLOCK), ("up_block_types", _UP_BLOCK)):
            got = tuple(config.get(key, (want,)))
            if got != (want,) * n:
                problems.append(f"{key}={got} (only {want!r} x len(block_out_channels) = {n})")
        if config.get("act_fn", "silu") not in ("silu", "swish"):
            problems.append(f"act_fn={config['act_fn']!r} (only 'silu')")
        for key in ("latents_mean", "latents_std"):
            if config.get(key) is not None:
                problems.append(f"{key} (per-channel latent statistics are not supported)")
        fields = {f.name for f in dataclasses.fields(cls)}
        checked = {"down_block_types", "up_block_types", "act_fn", "latents_mean", "latents_std"}
        for key in sorted(set(config) - fields - checked - _IGNORED_KEYS):
            if not key.startswith("_"):
                problems.append(f"{key} (unknown AutoencoderKL config field)")
        if problems:
            raise ValueError("unsupported AutoencoderKL config: " + "; ".join(problems))
        # diffusers' own defaults apply to absent keys, not this class's FLUX defaults.
        defaults = dict(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            block_out_channels=(64,),
            layers_per_block=1,
            norm_num_groups=32,
            scaling_factor=0.18215,
            shift_factor=None,
            use_quant_conv=True,
            use_post_quant_conv=True,
            mid_block_add_attention=True,
        )
        kw = {k: config.get(k, v) for k, v in defaults.items()}
        kw["shift_factor"] = float(kw["shift_factor"] or 0.0)  # None means no shift
        kw["scaling_factor"] = float(kw["scaling_factor"])
        return cls(**kw)


def down_block_channels(cfg: AutoencoderConfig) -> list[tuple[int, int]]:
    """``(in, out)`` channels of each encoder down block (its first resnet changes width)."""
    c = cfg.block_out_channels
    return [(c[max(i - 1, 0)], c[i]) for i in range(len(c))]


def up_block_channels(cfg: AutoencoderConfig) -> list[tuple[int, int]]:
    """``(in, out)`` channels of each decoder up block, widest first."""
    c = cfg.block_out_channels[::-1]
    return [(c[max(i - 1, 0)], c[i]) for i in range(len(c))]


def to_nchw(x: jax.Array) -> jax.Array:
    """``[B, H, W, C]`` -> ``[B, C, H, W]``."""
    return jnp.transpose(x, (0, 3, 1, 2))


def to_nhwc(x: jax.Array) -> jax.Array:
    """``[B, C, H, W]`` -> ``[B, H, W, C]``."""
    return jnp.transpose(x, (0, 2, 3, 1))


@dataclasses.dataclass(frozen=True)
class _Dtypes:
    dtype: Any
    param_dtype: Any

    def conv(self, cin: int, cout: int, k: int, *, rngs: nnx.Rngs, **kw) -> nnx.Conv:
        # torch pads 3x3 convs by 1 on every side: "SAME" for stride 1.
        return nnx.Conv(
            cin,
            cout,
            (k, k),
            rngs=rngs,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_metadata=axes(None, None, "conv_in", "conv_out"),
            bias_metadata=axes("conv_out"),
            **kw,
        )

    def norm(self, c: int, groups: int, *, rngs: nnx.Rngs) -> nnx.GroupNorm:
        # The two-pass variance matches torch; the fast E[x^2]-E[x]^2 form loses digits.
        return nnx.GroupNorm(
            c,
            groups,
            epsilon=NORM_EPS,
            use_fast_variance=False,
            rngs=rngs,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            scale_metadata=axes("norm"),
            bias_metadata=axes("norm"),
        )

    def linear(self, cin: int, cout: int, names: tuple[str, str], *, rngs: nnx.Rngs) -> nnx.Linear:
        return nnx.Linear(
            cin,
            cout,
            rngs=rngs,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_metadata=axes(*names),
            bias_metadata=axes(names[1]),
        )


class ResnetBlock(nnx.Module):
    """GroupNorm, SiLU, conv3x3, twice, plus a skip (1x1 ``conv_shortcut`` when width changes)."""

    def __init__(self, cin: int, cout: int, groups: int, d: _Dtypes, *, rngs: nnx.Rngs):
        self.norm1 = d.norm(cin, groups, rngs=rngs)
        self.conv1 = d.conv(cin, cout, 3, rngs=rngs)
        self.norm2 = d.norm(cout, groups, rngs=rngs)
        self.conv2 = d.conv(cout, cout, 3, rngs=rngs)
        self.conv_shortcut = d.conv(cin, cout, 1, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, cin]`` -> ``[B, H, W, cout]``."""
        h = self.conv1(nnx.silu(self.norm1(x)))
        h = self.conv2(nnx.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over all pixels, C wide, with a residual connection."""

    def __init__(self, c: int, groups: int, d: _Dtypes, *, rngs: nnx.Rngs):
        self.group_norm = d.norm(c, groups, rngs=rngs)
        self.to_q = d.linear(c, c, ("embed", "heads"), rngs=rngs)
        self.to_k = d.linear(c, c, ("embed", "heads"), rngs=rngs)
        self.to_v = d.linear(c, c, ("embed", "heads"), rngs=rngs)
        self.to_out = d.linear(c, c, ("heads", "embed"), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        """``[B, H, W, C]`` -> ``[B, H, W, C]``."""
        b, hh, ww, c = x.shape
        t = self.group_norm(x).reshape(b, hh * ww, 1, c)  # [B, T, 1 head, C]
        # jax's attention scales by 1/sqrt(C) and takes the softmax in float32, as diffusers.
        o = jax.nn.dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t))
        return x + self.to_out(o).reshape(b, hh, ww, c)


def _resnets(
    cin: int, cout: int, layers: int, groups: int, d: _Dtypes, *, rngs: nnx.Rngs
) -> nnx.List:
    """``layers`` resnets; the first maps ``cin`` -> ``cout`` channels."""
    return nnx.List(
        [ResnetBlock(cin if i == 0 else cout, cout, groups, d, rngs=rngs) for i in range(layers)]
    )


class MidBlock(nnx.Module):
    """Resnet, attention (unless disabled), resnet; all at the widest channel count."""

    def __init__(self, c: int, groups: int, attention: bool, d: _Dtypes, *, rngs: nnx.Rngs):
        self.resnets = _resnets(c, c, 2, groups, d, rngs=rngs)
        self.attention = AttentionBlock(c, groups, d, rngs=rngs) if attention else None

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.resnets[0](x)
        if self.attention is not None:
            x = self.attention(x)
        return self.resnets[1](x)


class DownBlock(nnx.Module):
    """Resnets, then (except in the last block) a stride-2 3x3 conv halving H and W."""

    def __init__(
        self,
        cin: int,
        cout: int,
        layers: int,
        groups: int,
        downsample: bool,
        d: _Dtypes,
        *,
        rngs: nnx.Rngs,
    ):
        self.resnets = _resnets(cin, cout, layers, groups, d, rngs=rngs)
        # diffusers pads only bottom/right by one, then convolves without padding.
        self.downsample = (
            d.conv(cout, cout, 3, rngs=rngs, strides=2, padding=((0, 1), (0, 1)))
            if downsample
            else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        return x if self.downsample is None else self.downsample(x)


class UpBlock(nnx.Module):
    """Resnets, then (except in the last block) nearest-neighbour x2 and a 3x3 conv."""

    def __init__(
        self,
        cin: int,
        cout: int,
        layers: int,
        groups: int,
        upsample: bool,
        d: _Dtypes,
        *,
        rngs: nnx.Rngs,
    ):
        self.resnets = _resnets(cin, cout, layers, groups, d, rngs=rngs)
        self.upsample = d.conv(cout, cout, 3, rngs=rngs) if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for r in self.resnets:
            x = r(x)
        if self.upsample is None:
            return x
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # [B, 2H, 2W, C]
        return self.upsample(x)


class Encoder(nnx.Module):
    """Images ``[B, H, W, in_channels]`` -> moments ``[B, h, w, 2 * latent_channels]``."""

    def __init__(self, cfg: AutoencoderConfig, d: _Dtypes, *, rngs: nnx.Rngs):
        c, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = d.conv(cfg.in_channels, c[0], 3, rngs=rngs)
        self.down_blocks = nnx.List(
            [
                DownBlock(i, o, cfg.layers_per_block, g, k < len(c) - 1, d, rngs=rngs)
                for k, (i, o) in enumerate(down_block_channels(cfg))
            ]
        )
        self.mid_block = MidBlock(c[-1], g, cfg.mid_block_add_attention, d, rngs=rngs)
        self.conv_norm_out = d.norm(c[-1], g, rngs=rngs)
        self.conv_out = d.conv(c[-1], 2 * cfg.latent_channels, 3, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Decoder(nnx.Module):
    """Latents ``[B, h, w, latent_channels]`` -> images ``[B, H, W, out_channels]``."""

    def __init__(self, cfg: AutoencoderConfig, d: _Dtypes, *, rngs: nnx.Rngs):
        c, g = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = d.conv(cfg.latent_channels, c[-1], 3, rngs=rngs)
        self.mid_block = MidBlock(c[-1], g, cfg.mid_block_add_attention, d, rngs=rngs)
        self.up_blocks = nnx.List(
            [
                UpBlock(i, o, cfg.layers_per_block + 1, g, k < len(c) - 1, d, rngs=rngs)
                for k, (i, o) in enumerate(up_block_channels(cfg))
            ]
        )
        self.conv_norm_out = d.norm(c[0], g, rngs=rngs)
        self.conv_out = d.conv(c[0], cfg.out_channels, 3, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(nnx.silu(self.conv_norm_out(x)))


class Autoencoder(nnx.Module):
    """The KL autoencoder. All arrays are NHWC; see the module docstring."""

    def __init__(
        self,
        cfg: AutoencoderConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
    ):
        self.cfg = cfg
        d = _Dtypes(dtype, param_dtype)
        zc = cfg.latent_channels
        self.encoder = Encoder(cfg, d, rngs=rngs)
        self.decoder = Decoder(cfg, d, rngs=rngs)
        self.quant_conv = d.conv(2 * zc, 2 * zc, 1, rngs=rngs) if cfg.use_quant_conv else None
        self.post_quant_conv = d.conv(zc, zc, 1, rngs=rngs) if cfg.use_post_quant_conv else None

    def encode(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Images ``[B, H, W, 3]`` in [-1, 1] -> ``(mean, logvar)``, both ``[B, h, w, C]``.

        ``mean`` is diffusers' ``latent_dist.mean`` (its ``mode()``), unscaled; ``logvar`` is
        clamped to :data:`LOGVAR_RANGE` as diffusers does.
        """
        moments = self.encoder(images)  # [B, h, w, 2C]
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    @staticmethod
    def sample_posterior(mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
        """A draw ``mean + exp(logvar / 2) * N(0, 1)``, ``[B, h, w, C]``."""
        eps = jax.random.normal(key, mean.shape, jnp.float32).astype(mean.dtype)
        return mean + jnp.exp(0.5 * logvar) * eps

    def decode(self, latents: jax.Array) -> jax.Array:
        """Unscaled latents ``[B, h, w, C]`` -> images ``[B, H, W, 3]`` (roughly in [-1, 1])."""
        if self.post_quant_conv is not None:
            latents = self.post_quant_conv(latents)
        return self.decoder(latents)

    def scale_latents(self, z: jax.Array) -> jax.Array:
        """Autoencoder latents -> diffusion-space latents: ``(z - shift) * scaling``."""
        return (z - self.cfg.shift_factor) * self.cfg.scaling_factor

    def unscale_latents(self, z: jax.Array) -> jax.Array:
        """Diffusion-space latents -> autoencoder latents: ``z / scaling + shift``."""
        return z / self.cfg.scaling_factor + self.cfg.shift_factor
