"""The toy text-to-image pipeline of the shapes world: a tiny FLUX MMDiT and a frozen text encoder.

The pieces mirror FLUX's, shrunk until a laptop CPU trains and distils them in minutes:

- **Latents** come from an autoencoder fitted to training renders, at FLUX's VAE shape: 16
  channels per 8x8-pixel patch of a 32x32 image, ``[16, 4, 4]``, which FLUX's 2x2 packing makes
  4 tokens of 64 channels, one per cell of the shapes world. The shipped teacher's is
  :class:`MaskColourAutoencoder`: each patch as its object's coverage (13 principal components
  of the masks) beside its colour (3 channels), so that what a word asks for is added to the
  latent, not multiplied into it; :class:`Autoencoder` is the linear one (principal components
  of the RGB patches; :meth:`Autoencoder.pixels` the pixels themselves). Either decodes clean
  renders to what the evaluator reads as the renders. (A world whose ``toy.json`` names only a
  ``patch`` reads the pixels themselves, folded ``patch x patch``.)
- **Text** is the word-level vocabulary of the captions (:func:`tokenize`) through a T5
  encoder with fixed random weights plus absolute sinusoidal positions (FLUX's text position ids
  are all zero, so the encoder must carry word order: "a red circle left of a blue square"
  differs from its mirror only in order). The shipped teacher's has no layers: each token is its
  word's embedding, its neighbours' (``text_context=2``: the word before binds a colour to its
  shape, the word after tells the first shape where it goes) and its position (random layers
  mixed the words, and the teacher then drew held-out colour-shape pairs with the shapes their
  colours were trained with). The pooled vector (CLIP's role) is the mean over the caption's
  tokens.
- **The transformer** is :class:`~distill_jax.models.flux.Flux` of the ``toy`` preset,
  ``time_scale=1`` and no guidance embedding, trained by the project's own trainer with flow
  matching (``distill-jax train --config configs/toy_teacher.py``); sCM and MeanFlow distil it
  unchanged.

:class:`ToyPipeline` has the surface of :class:`~distill_jax.pipeline.pipeline.Pipeline` that
:func:`~distill_jax.pipeline.generate.generate` uses (``encode``, ``decode``, ``check``,
``latent_channels``, ``vae_scale_factor``), so the real samplers serve both. A trained teacher
ships in ``distill_jax/assets/toy_teacher`` (:data:`TEACHER_PATH`); ``folders.load_pipeline``
reads any toy folder (one with a ``toy.json``) as a :class:`ToyPipeline`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from pathlib import Path

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.data import shapes
from distill_jax.models.flux import Flux
from distill_jax.models.t5 import T5Config, T5Encoder
from distill_jax.pipeline import latents as lat

TEACHER_PATH = Path(__file__).parent.parent / "assets" / "toy_teacher"
META_FILE = "toy.json"  # what makes a converted folder a toy pipeline: its world
COMPONENTS = ("transformer", "text_encoder_2")
PATCH = 4  # pixels per side folded into channels by space-to-depth
TEACHER_STEPS = 16  # the teacher's full number of Euler steps


def text_config(vocab_size: int, num_layers: int = 2) -> T5Config:
    """The frozen toy text encoder: ``num_layers`` T5 layers of width 64 over a caption
    vocabulary (0: word embeddings and positions alone)."""
    return T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=num_layers, num_heads=4
    )


def new_text_encoder(vocab_size: int, seed: int = 0, num_layers: int = 2) -> T5Encoder:
    """A text encoder with fixed random weights, for a teacher trained from scratch."""
    return T5Encoder(text_config(vocab_size, num_layers), rngs=nnx.Rngs(seed))


# --- text -------------------------------------------------------------------------------------


def tokenize(prompts: Sequence[str], vocab: Sequence[str], length: int) -> np.ndarray:
    """Word ids ``[B, length]`` int32 in ``vocab`` (id 0 pads); an unknown word is an error
    naming it."""
    index = {w: i for i, w in enumerate(vocab)}
    out = np.zeros((len(prompts), length), np.int32)
    for b, prompt in enumerate(prompts):
        words = prompt.lower().split()
        if len(words) > length:
            raise ValueError(f"prompt {prompt!r} has {len(words)} words; the toy takes {length}")
        unknown = [w for w in words if w not in index]
        if unknown:
            raise ValueError(
                f"prompt {prompt!r}: unknown word(s) {unknown}; the shapes world knows "
                f"{list(vocab[1:])}"
            )
        out[b, : len(words)] = [index[w] for w in words]
    return out


def _sinusoid(length: int, dim: int) -> np.ndarray:
    """Transformer absolute positions ``[S, D]``: sin on even, cos on odd features."""
    pos = np.arange(length)[:, None]
    freq = np.exp(-math.log(10000.0) * np.arange(0, dim, 2) / dim)[None]
    out = np.zeros((length, dim), np.float32)
    out[:, 0::2], out[:, 1::2] = np.sin(pos * freq), np.cos(pos * freq)
    return out


def encode_text(
    t5: T5Encoder,
    prompts: Sequence[str],
    vocab: Sequence[str],
    length: int,
    *,
    context: int = 0,
) -> tuple[jax.Array, jax.Array]:
    """``(hidden [B, S, D], pooled [B, D])`` of ``B`` prompts through the toy text encoder
    ``t5``, words of ``vocab``, ``S = length``; ``context=1`` folds each word's predecessor
    into its token, ``context=2`` also its successor (:func:`_encode`)."""
    if context not in (0, 1, 2):
        raise ValueError(
            f"text context={context!r}: 0 (words alone), 1 (with the word before) or 2 (with the "
            "words on both sides)"
        )
    return _encode(*nnx.split(t5), jnp.asarray(tokenize(prompts, vocab, length)), context)


@functools.partial(jax.jit, static_argnums=3)
def _encode(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array, context: int):
    """Word ids ``[B, S]`` -> ``(hidden [B, S, D], pooled [B, D])``: the T5 encoder with absolute
    positions added to its token embeddings; pooled is the mean over non-padding tokens (zeros
    for the empty caption).

    ``context >= 1`` adds to each word's embedding its predecessor's, features rotated by a third
    of the width (a fixed permutation, so "red" before a word reads apart from "red" itself): the
    token of "square" in "a red square" then holds which square, and an image token that reads
    one noun has its object's colour with it (bound by the caption, not by co-occurrence in
    training). ``context=2`` also adds the successor's, rotated by two thirds: the first noun of
    "a red circle left of a blue square" then holds where it goes. Padding gets neither."""
    t5 = nnx.merge(graphdef, state)
    e = t5.embed(ids)  # [B, S, D]
    words = (ids > 0)[..., None]
    x, third = e, e.shape[-1] // 3
    if context >= 1:
        before = jnp.pad(e[:, :-1], ((0, 0), (1, 0), (0, 0)))  # zeros before the first word
        x = x + jnp.roll(before, third, axis=-1) * words
    if context >= 2:
        after = jnp.pad((e * words)[:, 1:], ((0, 0), (0, 1), (0, 0)))  # zeros after the last
        x = x + jnp.roll(after, 2 * third, axis=-1) * words
    x = x + _sinusoid(ids.shape[1], t5.cfg.d_model)
    bias = t5.position_bias(ids.shape[1])
    for layer in t5.layers:
        x = layer(x, bias, None)
    x = t5.final_norm(x)
    mask = (ids > 0).astype(x.dtype)[..., None]  # [B, S, 1]
    pooled = (x * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
    return x, pooled


# --- latents ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class Autoencoder:
    """The toy's VAE: a linear map of each ``patch x patch`` RGB patch to ``C`` latent channels.

    ``encode``: pixels in [-1, 1] folded ``patch x patch`` into ``3 p^2`` values (channels
    ``(c, dy, dx)``), minus ``mean``, onto the orthonormal rows of ``basis [C, 3 p^2]``, times
    ``scale``; ``decode`` is its transpose (then clipped and rounded to uint8). With ``C = 3 p^2``
    and the identity basis (:meth:`pixels`) it is lossless space-to-depth; :meth:`fit` takes the
    principal components of training renders, which for the shapes world lose nothing the
    evaluator sees at 16 channels of 8x8 patches (as FLUX's VAE: 16 channels at 1/8 the side).
    """

    mean: np.ndarray  # [3 p^2] float32
    basis: np.ndarray  # [C, 3 p^2] float32, orthonormal rows
    scale: float
    patch: int

    @property
    def channels(self) -> int:
        return int(self.basis.shape[0])

    @classmethod
    def pixels(cls, patch: int = PATCH) -> Autoencoder:
        """Space-to-depth: the pixels themselves, ``3 p^2`` channels."""
        d = 3 * patch * patch
        return cls(np.zeros(d, np.float32), np.eye(d, dtype=np.float32), 1.0, patch)

    @classmethod
    def fit(cls, images: np.ndarray, channels: int, patch: int) -> Autoencoder:
        """The first ``channels`` principal components of the ``patch x patch`` patches of
        uint8 ``images [N, H, W, 3]``, scaled so the latents have unit variance overall."""
        x = _fold(_to_unit(images), patch)  # [N, h, w, D]
        x = x.reshape(-1, x.shape[-1])
        if not 0 < channels <= x.shape[-1]:
            raise ValueError(f"channels={channels} must be in [1, {x.shape[-1]}]")
        return cls(*_principal_components(x, channels), patch)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` -> latents ``[B, C, H/p, W/p]`` float32."""
        z = (_fold(_to_unit(images), self.patch) - self.mean) @ self.basis.T * self.scale
        return np.ascontiguousarray(z.transpose(0, 3, 1, 2), dtype=np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents ``[B, C, h, w]`` -> uint8 ``[B, p h, p w, 3]`` (clipped, rounded)."""
        z = np.asarray(latents, np.float32).transpose(0, 2, 3, 1) / np.float32(self.scale)
        x = einops.rearrange(
            z @ self.basis + self.mean,
            "b h w (c dy dx) -> b (h dy) (w dx) c",
            dy=self.patch,
            dx=self.patch,
        )
        return np.round(np.clip((x + 1.0) * 127.5, 0, 255)).astype(np.uint8)

    def to_json(self) -> dict:
        return {
            "kind": "linear",
            "patch": self.patch,
            "scale": self.scale,
            "mean": self.mean.tolist(),
            "basis": self.basis.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> Autoencoder:
        mean, basis = np.asarray(d["mean"], np.float32), np.asarray(d["basis"], np.float32)
        patch = int(d["patch"])
        if basis.ndim != 2 or basis.shape[1] != mean.shape[0] or mean.shape[0] != 3 * patch**2:
            raise ValueError(
                f"autoencoder: basis {list(basis.shape)} and mean {list(mean.shape)} do not fit "
                f"{patch}x{patch} RGB patches"
            )
        return cls(mean, basis, float(d["scale"]), patch)


@dataclasses.dataclass(frozen=True, eq=False)
class MaskColourAutoencoder:
    """A toy VAE that keeps what an object is apart from what colour it has.

    Each ``patch x patch`` RGB patch of a shapes render (at most one object's colour per patch:
    objects sit in separate cells) is ``background + m * c``: ``m [p^2]`` the fraction of each
    pixel the object covers, ``c [3]`` the object's colour minus the background (in [-1, 1]
    units; zero for an empty patch). ``encode`` writes ``m`` onto the first ``K`` principal
    components of training masks (``mask_basis [K, p^2]``, ``mask_mean``, times ``mask_scale``)
    and ``c`` times ``colour_scale``: ``K + 3`` channels. ``decode`` clips the mask to [0, 1] and
    blends, as the renderer does. The latent of a blue triangle is then the triangle's mask
    channels beside blue's colour channels: a sum of what each word asks for, where a linear
    autoencoder's latent of the same patch is their product. The shapes world's objects sit
    at the centres of its cells, so its masks take a dozen values and 13 components hold them
    exactly.
    """

    mask_mean: np.ndarray  # [p^2] float32
    mask_basis: np.ndarray  # [K, p^2] float32, orthonormal rows
    mask_scale: float
    colour_scale: float
    background: np.ndarray  # [3] float32, in [-1, 1] units
    patch: int

    kind = "mask_colour"

    @property
    def channels(self) -> int:
        return int(self.mask_basis.shape[0]) + 3

    @staticmethod
    def split(images: np.ndarray, patch: int, background: np.ndarray):
        """uint8 ``[B, H, W, 3]`` -> ``(m [B, h, w, p^2], c [B, h, w, 3])``: per patch the colour
        of its most saturated pixel (minus the background) and each pixel's share of it."""
        d = _fold_pixels(_to_unit(images) - background, patch)  # [B, h, w, p^2, 3]
        norm2 = (d * d).sum(-1)  # [B, h, w, p^2]
        idx = norm2.argmax(-1)[..., None, None]
        c = np.take_along_axis(d, idx, axis=-2)[..., 0, :]  # [B, h, w, 3]
        c2 = (c * c).sum(-1, keepdims=True)
        empty = c2 < (4 / 255) ** 2  # no pixel farther from the background than rounding
        c = np.where(empty, 0.0, c)
        m = np.where(empty, 0.0, (d * c[..., None, :]).sum(-1) / np.maximum(c2, 1e-12))
        return m.astype(np.float32), c.astype(np.float32)

    @classmethod
    def fit(cls, images: np.ndarray, channels: int, patch: int) -> MaskColourAutoencoder:
        """``channels - 3`` principal components of the masks of uint8 ``images [N, H, W, 3]``;
        each part scaled to unit variance."""
        background = np.asarray(shapes.BACKGROUND, np.float32) / 127.5 - 1.0
        m, c = cls.split(images, patch, background)
        m = m.reshape(-1, patch * patch)
        if not 0 < channels - 3 <= m.shape[-1]:
            raise ValueError(f"channels={channels} must be in [4, {m.shape[-1] + 3}]")
        mean, basis, mask_scale = _principal_components(m, channels - 3)
        colour_scale = 1.0 / float(np.sqrt(np.mean(c.astype(np.float64) ** 2)))
        return cls(mean, basis, mask_scale, colour_scale, background, patch)

    def encode(self, images: np.ndarray) -> np.ndarray:
        """uint8 ``[B, H, W, 3]`` -> latents ``[B, K + 3, H/p, W/p]`` float32."""
        m, c = self.split(images, self.patch, self.background)
        z = np.concatenate(
            [(m - self.mask_mean) @ self.mask_basis.T * self.mask_scale, c * self.colour_scale],
            axis=-1,
        )
        return np.ascontiguousarray(z.transpose(0, 3, 1, 2), dtype=np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents ``[B, K + 3, h, w]`` -> uint8 ``[B, p h, p w, 3]`` (clipped, rounded)."""
        z = np.asarray(latents, np.float32).transpose(0, 2, 3, 1)
        k = self.mask_basis.shape[0]
        m = z[..., :k] / np.float32(self.mask_scale) @ self.mask_basis + self.mask_mean
        c = z[..., k:] / np.float32(self.colour_scale)
        x = self.background + np.clip(m, 0.0, 1.0)[..., None] * c[..., None, :]
        x = einops.rearrange(
            x, "b h w (dy dx) c -> b (h dy) (w dx) c", dy=self.patch, dx=self.patch
        )
        return np.round(np.clip((x + 1.0) * 127.5, 0, 255)).astype(np.uint8)

    def to_json(self) -> dict:
        return {
            "kind": self.kind,
            "patch": self.patch,
            "mask_scale": self.mask_scale,
            "colour_scale": self.colour_scale,
            "background": self.background.tolist(),
            "mask_mean": self.mask_mean.tolist(),
            "mask_basis": self.mask_basis.tolist(),
        }

    @classmethod
    def from_json(cls, d: dict) -> MaskColourAutoencoder:
        mean = np.asarray(d["mask_mean"], np.float32)
        basis = np.asarray(d["mask_basis"], np.float32)
        patch = int(d["patch"])
        if basis.ndim != 2 or basis.shape[1] != mean.shape[0] or mean.shape[0] != patch**2:
            raise ValueError(
                f"autoencoder: mask_basis {list(basis.shape)} and mask_mean {list(mean.shape)} "
                f"do not fit {patch}x{patch} patches"
            )
        background = np.asarray(d["background"], np.float32)
        return cls(mean, basis, float(d["mask_scale"]), float(d["colour_scale"]), background, patch)


AUTOENCODERS = {"linear": Autoencoder, "mask_colour": MaskColourAutoencoder}


def autoencoder_from_json(d: dict) -> Autoencoder | MaskColourAutoencoder:
    """The autoencoder a ``toy.json`` world records (``kind``: linear when absent)."""
    kind = d.get("kind", "linear")
    if kind not in AUTOENCODERS:
        raise ValueError(f"autoencoder kind {kind!r}; the toy has {list(AUTOENCODERS)}")
    return AUTOENCODERS[kind].from_json(d)


def _fold_pixels(x: np.ndarray, patch: int) -> np.ndarray:
    """``[B, H, W, 3]`` -> ``[B, H/p, W/p, p^2, 3]`` (pixels ``(dy, dx)``)."""
    return einops.rearrange(x, "b (h dy) (w dx) c -> b h w (dy dx) c", dy=patch, dx=patch)


def _principal_components(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``(mean [D], basis [k, D], scale)`` of rows ``x [N, D]`` (float64 SVD): the first ``k``
    principal directions, each signed so its entries sum to >= 0, and the scale that gives the
    projections unit variance overall."""
    x = x.astype(np.float64)
    mean = x.mean(0)
    _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
    basis = vt[:k] * np.sign(vt[:k].sum(1, keepdims=True) + 1e-12)
    scale = 1.0 / float(np.sqrt((sv[:k] ** 2).sum() / (len(x) * k)))
    return mean.astype(np.float32), basis.astype(np.float32), scale


def _to_unit(images: np.ndarray) -> np.ndarray:
    return np.asarray(images).astype(np.float32) / 127.5 - 1.0


def _fold(x: np.ndarray, patch: int) -> np.ndarray:
    """``[B, H, W, 3]`` -> ``[B, H/p, W/p, 3 p^2]`` (channels ``(c, dy, dx)``)."""
    return einops.rearrange(x, "b (h dy) (w dx) c -> b h w (c dy dx)", dy=patch, dx=patch)


def to_latents(images: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """uint8 images ``[B, H, W, 3]`` -> latents ``[B, 3 p^2, H/p, W/p]`` float32: pixels in
    [-1, 1] folded ``p x p`` into channels (:meth:`Autoencoder.pixels`)."""
    return Autoencoder.pixels(patch).encode(images)


def from_latents(latents: np.ndarray, patch: int = PATCH) -> np.ndarray:
    """Latents ``[B, 3 p^2, h, w]`` -> uint8 images ``[B, p h, p w, 3]`` (clipped, rounded)."""
    return Autoencoder.pixels(patch).decode(latents)


# --- the pipeline -----------------------------------------------------------------------------


@dataclasses.dataclass
class ToyPipeline:
    """The toy's transformer and text encoder, and the world it reads: ``vocab`` (id 0 pads),
    captions of ``text_len`` words, the ``autoencoder`` of its latents (default: pixels folded
    4x4). ``transformer`` is any :class:`Flux` over the toy latents: the teacher, or an sCM or
    MeanFlow student."""

    transformer: Flux
    t5: T5Encoder
    vocab: tuple[str, ...]
    text_len: int
    autoencoder: Autoencoder | MaskColourAutoencoder = dataclasses.field(
        default_factory=Autoencoder.pixels
    )
    text_context: int = 0  # neighbours folded into each word's token (encode_text: 0, 1, 2)

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell (the autoencoder's patch)."""
        return self.autoencoder.patch

    @property
    def latent_channels(self) -> int:
        """Channels ``C`` of the unpacked latent (the autoencoder's)."""
        return self.autoencoder.channels

    def encode(
        self, prompts: str | Sequence[str], max_sequence_length: int | None = None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(t5 [B, S, D], pooled [B, D], txt_ids [S, 3])`` of the prompts ("" is the
        unconditional one). ``S`` is the world's ``text_len``, what the transformer was trained
        with; ``max_sequence_length`` (the real pipeline's T5 length) does not change it."""
        del max_sequence_length
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        t5, pooled = encode_text(
            self.t5, prompts, self.vocab, self.text_len, context=self.text_context
        )
        return t5, pooled, jnp.zeros((self.text_len, 3), jnp.float32)

    def decode(self, packed: jax.Array, height: int, width: int) -> np.ndarray:
        """Packed latents ``[B, L, 4C]`` -> uint8 images ``[B, height, width, 3]``."""
        h, w = lat.latent_size(height, width, vae_scale_factor=self.vae_scale_factor)
        return self.autoencoder.decode(lat.unpack(np.asarray(packed, np.float32), h, w))

    def check(self) -> None:
        """Raises ``ValueError`` when the parts do not fit together (widths, channels, words)."""
        flux, text = self.transformer.cfg, self.t5.cfg
        problems = []
        if flux.in_channels != 4 * self.latent_channels or flux.out != flux.in_channels:
            problems.append(
                f"transformer in/out channels {flux.in_channels}/{flux.out} != 4 x "
                f"{self.latent_channels} (the autoencoder's latent channels)"
            )
        if flux.context_dim != text.d_model or flux.pooled_dim != text.d_model:
            problems.append(
                f"transformer context/pooled dims {flux.context_dim}/{flux.pooled_dim} != text "
                f"encoder d_model={text.d_model}"
            )
        if text.vocab_size != len(self.vocab):
            problems.append(f"text vocab_size={text.vocab_size} != {len(self.vocab)} words")
        if problems:
            raise ValueError("toy pipeline parts do not fit: " + "; ".join(problems))

    def world(self) -> dict:
        """What ``toy.json`` records of the world the pipeline reads."""
        return {
            "text_len": self.text_len,
            "text_context": self.text_context,
            "vocab": list(self.vocab),
            "autoencoder": self.autoencoder.to_json(),
        }

    def with_transformer(self, transformer: Flux) -> ToyPipeline:
        return dataclasses.replace(self, transformer=transformer)


__all__ = [
    "AUTOENCODERS",
    "Autoencoder",
    "META_FILE",
    "MaskColourAutoencoder",
    "autoencoder_from_json",
    "PATCH",
    "TEACHER_PATH",
    "TEACHER_STEPS",
    "ToyPipeline",
    "encode_text",
    "from_latents",
    "new_text_encoder",
    "text_config",
    "to_latents",
    "tokenize",
]
