"""The grain input pipeline over this package's datasets: shard, shuffle, decode, batch.

One function, :func:`make_dataset`, for both dataset kinds (told apart by their features):

- image-caption datasets give ``{"image": float32 [B, R, R, 3] in [-1, 1], "caption": str [B],
  "key": str [B]}``, each image resized and centre-cropped as the paper's training script does
  (spec section 6: ``Resize(R)`` of the shorter side, bilinear with antialiasing as torchvision
  does on PIL images, ``CenterCrop(R)``, ``Normalize(0.5, 0.5)``);
- latent datasets (``prepare``'s output) give ``{"latents": [B, h, w, C], "t5": [B, S, D_t5],
  "pooled": [B, D_clip]}`` in the stored dtype (bfloat16 by default; the trainer casts), plus
  ``caption``, ``key`` and ``index``. Latents are the raw VAE posterior samples: the diffusion
  latent is ``(latents - shift_factor) * scaling_factor`` (both in the dataset's metadata).

Order is a pure function of ``(seed, shard)``: each host takes a contiguous, equal-sized slice of
the records (``grain.sharding.ShardByJaxProcess`` by default), grain shuffles it globally with a
different permutation every epoch, and the iterator's state (``it.get_state()``, a small
JSON-able dict; ``it.set_state(state)``) resumes the stream exactly where it was. A record whose
image fails to decode is dropped and logged with its key (the build already counted and removed
the ones it saw; this guards against files damaged since).
"""

from __future__ import annotations

import logging
from pathlib import Path

import grain
import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from distill_jax.data import sources

log = logging.getLogger(__name__)


def resize_and_crop(img: Image.Image, resolution: int) -> np.ndarray:
    """RGB PIL image -> uint8 ``[R, R, 3]``: shorter side to ``R`` (bilinear, antialiased), then the
    centre ``R x R``.

    Sizes and offsets follow torchvision's ``Resize(R)`` and ``CenterCrop(R)`` on PIL images: the
    longer side is ``int(R * long / short)`` (truncated) and the crop starts at
    ``int(round((side - R) / 2))`` (Python's round-half-to-even).
    """
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_long = int(resolution * long / short)
    new_w, new_h = (resolution, new_long) if w <= h else (new_long, resolution)
    img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    top = int(round((new_h - resolution) / 2.0))
    left = int(round((new_w - resolution) / 2.0))
    return np.asarray(img.crop((left, top, left + resolution, top + resolution)))


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` -> float32 in [-1, 1] (``ToTensor`` then ``Normalize(0.5, 0.5)``)."""
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def load_image(
    data: bytes,
    resolution: int,
    *,
    max_pixels: float = sources.MAX_PIXELS,
    max_aspect_ratio: float = sources.MAX_ASPECT_RATIO,
) -> np.ndarray:
    """Encoded image bytes -> float32 ``[R, R, 3]`` in [-1, 1]; raises as
    :func:`~distill_jax.data.sources.decode_image` (oversized or undecodable)."""
    img = sources.decode_image(data, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
    return to_model_range(resize_and_crop(img, resolution))


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class _ImageRecord(grain.transforms.Map):
    """A stored image-caption record -> model inputs, or ``None`` (dropped) if undecodable."""

    def __init__(self, resolution: int):
        self.resolution = resolution

    def map(self, row: dict) -> dict | None:
        key = _text(row["key"])
        try:
            image = load_image(bytes(row["image"]), self.resolution)
        except sources.DECODE_ERRORS as e:
            log.warning("skipping record %s: undecodable image (%s)", key, e)
            return None
        return {"image": image, "caption": _text(row["caption"]), "key": key}


def _latent_record(row: dict) -> dict:
    out = {k: row[k] for k in ("latents", "t5", "pooled", "index")}
    return out | {"caption": _text(row["caption"]), "key": _text(row["key"])}


def host_slice(num_records: int, shard: grain.sharding.ShardOptions) -> slice:
    """The contiguous records of ``shard``. With ``drop_remainder`` every host gets
    ``num_records // shard_count`` of them (hosts must take the same number of steps);
    otherwise the last ``num_records % shard_count`` records go one each to the first hosts."""
    i, n = shard.shard_index, shard.shard_count
    if not 0 <= i < n:
        raise ValueError(f"shard_index={i} not in [0, shard_count={n})")
    if shard.drop_remainder:
        size = num_records // n
        return slice(i * size, (i + 1) * size)
    size, extra = divmod(num_records, n)
    start = i * size + min(i, extra)
    return slice(start, start + size + (i < extra))


def make_dataset(
    path: str | Path,
    *,
    batch_size: int,
    seed: int = 0,
    shuffle: bool = True,
    num_epochs: int | None = None,
    resolution: int = 512,
    shard: grain.sharding.ShardOptions | None = None,
    drop_remainder: bool = True,
    num_threads: int = 16,
) -> grain.IterDataset:
    """Batches of a dataset folder written by this package (see the module docstring).

    Args:
      path: a dataset folder (``build_image_dataset`` or ``prepare`` output).
      batch_size: examples per batch on this host (the global batch over ``shard_count``).
      seed: the shuffle seed, in ``[0, 2**32)``; the same seed gives the same order.
      shuffle: shuffle records (per epoch); ``False`` keeps the stored order.
      num_epochs: passes over the data; ``None`` repeats forever.
      resolution: output size ``R`` of image datasets (ignored for latent datasets).
      shard: this host's part; default ``grain.sharding.ShardByJaxProcess(drop_remainder=True)``.
      drop_remainder: drop a last, smaller batch.
      num_threads: threads reading and decoding records.

    Returns a ``grain.IterDataset``; ``iter()`` of it has ``get_state()`` / ``set_state()``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    builder = tfds.builder_from_directory(str(path))
    features = set(builder.info.features.keys())
    source = builder.as_data_source("train")
    shard = shard or grain.sharding.ShardByJaxProcess(drop_remainder=True)
    ds = grain.MapDataset.source(source)[host_slice(len(source), shard)]
    if len(ds) == 0:
        raise ValueError(
            f"{path}: shard {shard.shard_index} of {shard.shard_count} holds no records "
            f"({len(source)} in the dataset)"
        )
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs)  # a new permutation each epoch (grain reseeds per epoch)
    if {"image", "caption"} <= features:
        ds = ds.map(_ImageRecord(resolution))
    elif {"latents", "t5", "pooled"} <= features:
        ds = ds.map(_latent_record)
    else:
        raise ValueError(f"{path}: unknown dataset layout with features {sorted(features)}")
    # to_iter_dataset drops the None of undecodable records, so batches stay full.
    return ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=max(batch_size, 16))
    ).batch(batch_size, drop_remainder=drop_remainder)


def _collate(records: list[dict]) -> dict:
    return {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}


class _HostRows(grain.transforms.Map):
    """Global batch indices -> this host's records of them, collated."""

    def __init__(self, source, rows: np.ndarray, record_fn=None):
        self.source, self.rows, self.record_fn = source, rows, record_fn

    def map(self, indices: np.ndarray) -> dict:
        records = [self.source[int(i)] for i in indices[self.rows]]
        if self.record_fn is not None:
            records = [self.record_fn(r) for r in records]
        return _collate(records)


def global_batches(
    source,
    *,
    global_batch: int,
    rows: np.ndarray | None = None,
    seed: int = 0,
    shuffle: bool = True,
    record_fn=None,
    num_threads: int = 4,
) -> grain.IterDataset:
    """Each host's share of a sequence of global batches that does not depend on the host count.

    Global batch ``k`` is records ``order[k*B : (k+1)*B]`` of ``order``, the records shuffled
    with ``seed`` (a new permutation each epoch; a batch may straddle two epochs). A host reads
    only ``rows`` of each global batch (default: all of them): the rows its devices hold, from
    :func:`distill_jax.data.training.host_rows`. So 1 process x 4 devices and 2 processes x 2
    devices see the same global batches, every record is read by exactly one host, and the
    iterator's state (``{"next_index": k}``) is the same on every host and restores on any
    topology. ``record_fn`` maps each stored record before batching.
    """
    if global_batch < 1 or global_batch > len(source):
        raise ValueError(f"global_batch={global_batch} must be in [1, {len(source)} records]")
    rows = np.arange(global_batch) if rows is None else np.asarray(rows)
    order = grain.MapDataset.range(len(source))
    if shuffle:
        order = order.shuffle(seed=seed)
    ds = order.repeat().batch(global_batch, drop_remainder=True)
    ds = ds.map(_HostRows(source, rows, record_fn))
    return ds.to_iter_dataset(
        grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=num_threads)
    )


def latent_batches(
    path: str | Path, *, global_batch: int, rows: np.ndarray | None = None, seed: int = 0
) -> grain.IterDataset:
    """:func:`global_batches` of a ``prepare`` (latents) dataset folder."""
    builder = tfds.builder_from_directory(str(path))
    features = set(builder.info.features.keys())
    if not {"latents", "t5", "pooled"} <= features:
        raise ValueError(f"{path}: not a latents dataset (features {sorted(features)})")
    return global_batches(
        builder.as_data_source("train"),
        global_batch=global_batch,
        rows=rows,
        seed=seed,
        record_fn=_latent_record,
    )


__all__ = [
    "global_batches",
    "host_slice",
    "latent_batches",
    "load_image",
    "make_dataset",
    "resize_and_crop",
    "to_model_range",
]
