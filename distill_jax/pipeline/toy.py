"""The toy text-to-image pipeline of the shapes world: a tiny FLUX MMDiT and a frozen text encoder.

The pieces mirror FLUX's, shrunk until a laptop CPU trains and distils them in minutes:

- **Latents** come from a linear autoencoder (:class:`Autoencoder`): each 8x8-pixel RGB patch of
  a 32x32 image in [-1, 1] onto the first 16 principal components of training renders, so an
  image is ``[16, 4, 4]`` (16 channels at 1/8 the side, as FLUX's VAE) and FLUX's 2x2 packing
  gives 4 tokens of 64 channels, one per cell of the shapes world. Decoding is the transpose;
  the evaluator reads decoded clean renders as it reads the renders. (A world whose ``toy.json``
  names only a ``patch`` reads the pixels themselves, folded ``patch x patch``.)
- **Text** is the word-level vocabulary of the captions (:func:`tokenize`) through a T5
  encoder with fixed random weights plus absolute sinusoidal positions (FLUX's text position ids
  are all zero, so the encoder must carry word order: "a red circle left of a blue square"
  differs from its mirror only in order). The shipped teacher's has no layers: each token is its
  word's embedding plus its position, so "square" reads the same beside any colour (random layers
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
import math
from collections.abc import Sequence
from pathlib import Path

import einops
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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
    t5: T5Encoder, prompts: Sequence[str], vocab: Sequence[str], length: int
) -> tuple[jax.Array, jax.Array]:
    """``(hidden [B, S, D], pooled [B, D])`` of ``B`` prompts through the toy text encoder
    ``t5``, words of ``vocab``, ``S = length``."""
    return _encode(*nnx.split(t5), jnp.asarray(tokenize(prompts, vocab, length)))


@jax.jit
def _encode(graphdef: nnx.GraphDef, state: nnx.State, ids: jax.Array):
    """Word ids ``[B, S]`` -> ``(hidden [B, S, D], pooled [B, D])``: the T5 encoder with absolute
    positions added to its token embeddings; pooled is the mean over non-padding tokens (zeros
    for the empty caption)."""
    t5 = nnx.merge(graphdef, state)
    x = t5.embed(ids) + _sinusoid(ids.shape[1], t5.cfg.d_model)  # [B, S, D]
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
        x = x.reshape(-1, x.shape[-1]).astype(np.float64)
        if not 0 < channels <= x.shape[-1]:
            raise ValueError(f"channels={channels} must be in [1, {x.shape[-1]}]")
        mean = x.mean(0)
        _, sv, vt = np.linalg.svd(x - mean, full_matrices=False)
        basis = vt[:channels] * np.sign(vt[:channels].sum(1, keepdims=True) + 1e-12)
        scale = 1.0 / float(np.sqrt((sv[:channels] ** 2).sum() / (len(x) * channels)))
        return cls(mean.astype(np.float32), basis.astype(np.float32), scale, patch)

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
    autoencoder: Autoencoder = dataclasses.field(default_factory=Autoencoder.pixels)

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
        t5, pooled = encode_text(self.t5, prompts, self.vocab, self.text_len)
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
            "vocab": list(self.vocab),
            "autoencoder": self.autoencoder.to_json(),
        }

    def with_transformer(self, transformer: Flux) -> ToyPipeline:
        return dataclasses.replace(self, transformer=transformer)


__all__ = [
    "Autoencoder",
    "META_FILE",
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
