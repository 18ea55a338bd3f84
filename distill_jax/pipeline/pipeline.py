"""The text-to-image pipeline: the four FLUX networks and the two tokenizers, nothing else.

A container with the two ends of sampling (``encode`` prompts, ``decode`` latents), as
diffusers' ``FluxPipeline`` minus the scheduler (the schedules are functions in
:mod:`distill_jax.pipeline.samplers`). Build one from converted weights (``load_pipeline``) or,
in tests, from diffusers/transformers modules through :mod:`distill_jax.port`. Torch never enters
the library: conversion happens before a Pipeline exists.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.models.autoencoder import Autoencoder, to_nhwc
from distill_jax.models.clip import CLIPTextEncoder
from distill_jax.models.flux import Flux
from distill_jax.models.t5 import T5Encoder
from distill_jax.pipeline import latents as lat
from distill_jax.pipeline.text import encode_prompts


@functools.partial(jax.jit, static_argnums=(0, 3, 4))
def _decode(graphdef: nnx.GraphDef, state: nnx.State, packed: jax.Array, h: int, w: int):
    vae = nnx.merge(graphdef, state)
    z = to_nhwc(lat.unpack(packed.astype(jnp.float32), h, w))  # [B, h, w, C]
    x = vae.decode(vae.unscale_latents(z)).astype(jnp.float32)  # [B, H, W, 3] in ~[-1, 1]
    # diffusers' VaeImageProcessor: (x / 2 + 0.5).clamp(0, 1), then * 255 rounded to even.
    return jnp.round(jnp.clip(x / 2 + 0.5, 0.0, 1.0) * 255.0).astype(jnp.uint8)


@dataclasses.dataclass
class Pipeline:
    """FLUX's networks plus tokenizers.

    ``clip_tokenizer`` is a transformers ``CLIPTokenizer``; ``t5_tokenizer`` a ``T5TokenizerFast``
    (see :func:`distill_jax.pipeline.text.load_tokenizers`).
    """

    transformer: Flux
    vae: Autoencoder
    clip: CLIPTextEncoder
    t5: T5Encoder
    clip_tokenizer: Any
    t5_tokenizer: Any

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell: ``2 ** (len(block_out_channels) - 1)`` (8 for FLUX)."""
        return 2 ** (len(self.vae.cfg.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        """Channels ``C`` of the unpacked latent (16 for FLUX); the transformer sees ``4C``."""
        return self.transformer.cfg.in_channels // 4

    def encode(
        self, prompts: str | Sequence[str], max_sequence_length: int = 256
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(t5 [B, S, D_t5], pooled [B, D_clip], txt_ids [S, 3])`` of ``B`` prompts, with
        ``S = max_sequence_length`` (:func:`~distill_jax.pipeline.text.encode_prompts`)."""
        return encode_prompts(self, prompts, max_sequence_length=max_sequence_length)

    def decode(self, packed: jax.Array, height: int, width: int) -> np.ndarray:
        """Packed diffusion latents ``[B, L, 4C]`` -> uint8 images ``[B, H, W, 3]`` through the
        VAE (one ``jax.jit`` per shape)."""
        h, w = lat.latent_size(height, width, vae_scale_factor=self.vae_scale_factor)
        return np.asarray(_decode(*nnx.split(self.vae), packed, h, w))

    def check(self) -> None:
        """Raises ``ValueError`` when the parts do not fit together (widths, channels)."""
        problems = []
        flux, vae = self.transformer.cfg, self.vae.cfg
        if flux.in_channels % 4 or flux.in_channels // 4 != vae.latent_channels:
            problems.append(
                f"transformer in_channels={flux.in_channels} != 4 x VAE latent_channels="
                f"{vae.latent_channels}"
            )
        if flux.out != flux.in_channels:
            problems.append(
                f"transformer out_channels={flux.out} != in_channels={flux.in_channels}"
            )
        if flux.context_dim != self.t5.cfg.d_model:
            problems.append(
                f"transformer context_dim={flux.context_dim} != T5 d_model={self.t5.cfg.d_model}"
            )
        if flux.pooled_dim != self.clip.cfg.hidden_size:
            problems.append(
                f"transformer pooled_dim={flux.pooled_dim} != CLIP hidden_size="
                f"{self.clip.cfg.hidden_size}"
            )
        if problems:
            raise ValueError("pipeline parts do not fit: " + "; ".join(problems))


__all__ = ["Pipeline"]
