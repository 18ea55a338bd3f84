"""FLUX latent geometry: latent sizes, 2x2 patch packing and the image position ids.

The same arithmetic as diffusers' ``FluxPipeline`` (``prepare_latents``, ``_pack_latents``,
``_unpack_latents``, ``_prepare_latent_image_ids``), except that a size the 2x2-patched latent
grid cannot tile is refused rather than silently rounded down.

Dimension letters: B batch, C latent channels (16 for FLUX), h/w latent height/width (pixels /
vae_scale_factor, both even), L = (h/2)(w/2) image tokens. The VAE-side layout is channels-first
``[B, C, h, w]``, as diffusers draws its noise; a token holds its 2x2 patch in ``(c, dy, dx)``
order with ``c`` slowest: features ``[c0dy0dx0, c0dy0dx1, c0dy1dx0, c0dy1dx1, c1dy0dx0, ...]``.
"""

from __future__ import annotations

import einops
import jax
import numpy as np

# FLUX's AutoencoderKL halves the resolution three times (2 ** (len(block_out_channels) - 1)).
VAE_SCALE_FACTOR = 8


def latent_size(
    height: int, width: int, *, vae_scale_factor: int = VAE_SCALE_FACTOR
) -> tuple[int, int]:
    """Latent ``(h, w)`` of an image of ``height x width`` pixels: ``2 * (pixels // (2 * vsf))``.

    Raises ``ValueError`` naming the value when a side is not a positive multiple of
    ``2 * vae_scale_factor`` (16 for FLUX): diffusers would round it down and return a smaller
    image than asked for.
    """
    patch = 2 * vae_scale_factor
    for name, value in (("height", height), ("width", width)):
        if int(value) != value or value <= 0 or value % patch:
            raise ValueError(
                f"{name}={value} must be a positive multiple of {patch} pixels (the VAE's "
                f"{vae_scale_factor}x downsampling times FLUX's 2x2 latent patches); "
                f"try {max(patch, int(value) // patch * patch)}"
            )
    return 2 * (int(height) // patch), 2 * (int(width) // patch)


def pack(latents: jax.Array | np.ndarray) -> jax.Array:
    """``[B, C, h, w] -> [B, (h/2)(w/2), 4C]``: each token a 2x2 patch, features ``(c, dy, dx)``.

    Works on NumPy and JAX arrays alike (the type of the input is kept).
    """
    if latents.ndim != 4 or latents.shape[2] % 2 or latents.shape[3] % 2:
        raise ValueError(f"pack expects latents [B, C, h, w] with even h, w; got {latents.shape}")
    return einops.rearrange(latents, "b c (h dy) (w dx) -> b (h w) (c dy dx)", dy=2, dx=2)


def unpack(packed: jax.Array | np.ndarray, h: int, w: int) -> jax.Array:
    """Inverse of :func:`pack`: ``[B, (h/2)(w/2), 4C] -> [B, C, h, w]`` for an ``h x w`` latent."""
    if packed.ndim != 3 or packed.shape[1] != (h // 2) * (w // 2) or packed.shape[2] % 4:
        raise ValueError(
            f"unpack expects [B, {(h // 2) * (w // 2)}, 4C] for a {h}x{w} latent, "
            f"got {packed.shape}"
        )
    return einops.rearrange(
        packed, "b (h w) (c dy dx) -> b c (h dy) (w dx)", h=h // 2, w=w // 2, dy=2, dx=2
    )


def image_ids(h: int, w: int) -> np.ndarray:
    """Position ids of the ``(h/2)(w/2)`` image tokens of an ``h x w`` latent: float32 ``[L, 3]``.

    Row ``i * (w/2) + j`` is ``(0, i, j)``: the token's row and column on the 2x2-patch grid (the
    first axis is unused for text-to-image; the text ids are all zeros).
    """
    rows, cols = np.meshgrid(np.arange(h // 2), np.arange(w // 2), indexing="ij")
    ids = np.stack([np.zeros_like(rows), rows, cols], axis=-1)  # [h/2, w/2, 3]
    return ids.reshape(-1, 3).astype(np.float32)


def noise_shape(
    batch: int, channels: int, height: int, width: int, *, vae_scale_factor: int = VAE_SCALE_FACTOR
) -> tuple[int, int, int, int]:
    """Shape ``[B, C, h, w]`` of the initial noise for ``height x width`` pixels (validated)."""
    h, w = latent_size(height, width, vae_scale_factor=vae_scale_factor)
    return batch, channels, h, w


__all__ = ["VAE_SCALE_FACTOR", "image_ids", "latent_size", "noise_shape", "pack", "unpack"]
