"""Writing generated images: numbered PNGs (prompt in the PNG text chunk) and a contact grid."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin


def _check_images(images: np.ndarray) -> np.ndarray:
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"images must be uint8 [N, H, W, 3], got {images.dtype} {list(images.shape)}"
        )
    return images


def image_grid(images: np.ndarray, cols: int | None = None) -> np.ndarray:
    """Tiles uint8 ``[N, H, W, 3]`` row-major into ``[rows * H, cols * W, 3]``, black where empty.

    ``cols`` defaults to ``ceil(sqrt(N))``.
    """
    images = _check_images(images)
    n, h, w, _ = images.shape
    cols = cols or math.ceil(math.sqrt(n))
    if cols < 1:
        raise ValueError(f"cols={cols} must be >= 1")
    rows = math.ceil(n / cols)
    grid = np.zeros((rows * cols, h, w, 3), np.uint8)
    grid[:n] = images
    return grid.reshape(rows, cols, h, w, 3).transpose(0, 2, 1, 3, 4).reshape(rows * h, cols * w, 3)


def save_images(
    images: np.ndarray,
    out_dir: str | Path,
    prompts: Sequence[str] | None = None,
    *,
    grid: bool = True,
    indices: Sequence[int] | None = None,
) -> list[Path]:
    """Writes ``out_dir/00000.png``, ``00001.png``, ... and, for more than one image, ``grid.png``.

    ``prompts`` (one per image) are stored in each PNG's ``prompt`` text chunk. ``indices`` name
    the files instead of ``0..N-1`` (a host's share of a longer list). Returns the paths written,
    the grid last.
    """
    images = _check_images(images)
    if prompts is not None and len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    indices = range(len(images)) if indices is None else list(indices)
    if len(indices) != len(images):
        raise ValueError(f"{len(indices)} indices for {len(images)} images")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        info = PngImagePlugin.PngInfo()
        if prompts is not None:
            info.add_itxt("prompt", prompts[i])
        path = out / f"{indices[i]:05d}.png"
        Image.fromarray(image).save(path, pnginfo=info)
        paths.append(path)
    if grid and len(images) > 1:
        path = out / "grid.png"
        Image.fromarray(image_grid(images)).save(path)
        paths.append(path)
    return paths


__all__ = ["image_grid", "save_images"]
