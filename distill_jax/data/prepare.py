"""``distill-jax prepare``: images + captions -> VAE latents + T5/CLIP embeddings, once.

Training then never runs the encoders. Each record of the output (a TFDS dataset, see
:func:`distill_jax.data.builders.latent_features`) holds

- ``latents [h, w, C]``: the VAE posterior sample ``mean + exp(logvar / 2) * eps`` (spec 2.4:
  ``latent_dist.sample()``), **unscaled**, in the autoencoder's channels-last layout. The
  diffusion latent is ``(latents - shift_factor) * scaling_factor``; both factors are in the
  dataset's metadata, so a later change of normalisation (sCM's extra ``sigma_d``) needs no
  re-encoding. ``eps`` is drawn from ``fold_in(key(seed), index)``, ``index`` being the record's
  position in the source, so a record's latent does not depend on batch size, host count or
  resumption.
- ``t5 [S, D_t5]`` and ``pooled [D_clip]`` from
  :func:`distill_jax.pipeline.text.encode_prompts` (``S = max_sequence_length``). FLUX's text ids
  are zeros and are not stored.

Storage dtype: bfloat16 by default, as the paper's code runs every encoder in bfloat16 (spec 3.1)
and the trainer computes in it; it halves the dominant cost, T5's ``S x 4096`` values (2 MiB per
record at S=256). ``float32`` keeps the encoders' output exactly; ``float16`` has 3 more mantissa
bits than bfloat16 but overflows above 65504 (checked: a non-finite value raises).

Sharding and resuming come from :func:`distill_jax.data.builders.write_dataset`: shard ``j``
(``shard_size`` records) is encoded by process ``j % process_count``, and shards already on disk
are never redone. Each process runs the encoders on its own devices: the pipeline's networks
must be addressable from every process (replicated, or sharded over the process's local
devices), since processes encode different records at different times.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.data import builders, input_pipeline, sources
from distill_jax.data.builders import Skipped, WriteReport
from distill_jax.models.autoencoder import Autoencoder
from distill_jax.pipeline.generate import check_request
from distill_jax.pipeline.latents import latent_size
from distill_jax.pipeline.pipeline import Pipeline
from distill_jax.pipeline.text import encode_prompts

log = logging.getLogger(__name__)

DTYPES = ("bfloat16", "float16", "float32")


@functools.partial(jax.jit, static_argnums=(0, 5))
def _encode_images(
    graphdef: nnx.GraphDef,
    state: nnx.State,
    images: jax.Array,
    indices: jax.Array,
    key: jax.Array,
    sample: bool,
) -> jax.Array:
    """Images ``[B, R, R, 3]`` in [-1, 1] -> latents ``[B, h, w, C]``: a posterior sample keyed
    by ``fold_in(key, index)`` per record, or the posterior mean."""
    mean, logvar = nnx.merge(graphdef, state).encode(images)
    if not sample:
        return mean
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, indices)  # [B] keys
    return jax.vmap(Autoencoder.sample_posterior)(mean, logvar, keys)


class _Item(NamedTuple):
    index: int  # position in the source: keys the posterior sample
    key: str
    caption: str
    image: np.ndarray  # float32 [R, R, 3] in [-1, 1]


def _load(
    source: sources.RecordSource, resolution: int, limits: dict[str, float], index: int
) -> _Item | Skipped:
    """Record ``index``, decoded and resized, or why it is skipped. ``limits``: the
    ``max_pixels`` and ``max_aspect_ratio`` of :func:`~distill_jax.data.sources.decode_image`."""
    record = source[index]
    if record.image is None:
        return Skipped(record.key, sources.MISSING_IMAGE)
    if record.caption is None:
        return Skipped(record.key, sources.MISSING_CAPTION)
    try:
        image = input_pipeline.load_image(record.image, resolution, **limits)
    except sources.DECODE_ERRORS as e:
        return Skipped(record.key, sources.decode_failure(record.key, e))
    return _Item(index, record.key, record.caption, image)


class _ShardEncoder:
    """Reads a shard's records with grain threads and encodes them ``batch_size`` at a time.

    The last batch of a shard is padded to ``batch_size`` (one compiled shape) and the padding
    dropped. One batch stays in flight: batch ``k + 1`` is dispatched before batch ``k`` is
    fetched, so host decoding overlaps device work.
    """

    def __init__(
        self,
        source: sources.RecordSource,
        pipeline: Pipeline,
        *,
        resolution: int,
        max_sequence_length: int,
        batch_size: int,
        sample_posterior: bool,
        seed: int,
        dtype: Any,
        num_threads: int,
        limits: dict[str, float],
    ):
        self.source, self.pipeline, self.limits = source, pipeline, limits
        self.resolution, self.max_sequence_length = resolution, max_sequence_length
        self.batch_size, self.sample_posterior, self.dtype = batch_size, sample_posterior, dtype
        self.key = jax.random.key(seed)
        self.vae = nnx.split(pipeline.vae)
        self.num_threads = num_threads

    def __call__(self, records: range) -> Iterator[dict | Skipped]:
        ds = grain.MapDataset.range(records.start, records.stop)
        ds = ds.map(functools.partial(_load, self.source, self.resolution, self.limits))
        items = ds.to_iter_dataset(
            grain.ReadOptions(num_threads=self.num_threads, prefetch_buffer_size=self.batch_size)
        )
        pending = None
        for batch in self._batches(items):
            if isinstance(batch, Skipped):
                yield batch
                continue
            encoded = self._dispatch(batch)
            if pending is not None:
                yield from self._fetch(*pending)
            pending = (batch, encoded)
        if pending is not None:
            yield from self._fetch(*pending)

    def _batches(self, items: Iterable[_Item | Skipped]) -> Iterator[list[_Item] | Skipped]:
        batch = []
        for item in items:
            if isinstance(item, Skipped):
                yield item
                continue
            batch.append(item)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch

    def _dispatch(self, batch: list[_Item]) -> tuple[jax.Array, jax.Array, jax.Array]:
        pad = self.batch_size - len(batch)
        indices = np.array([b.index for b in batch] + [0] * pad, np.int32)
        images = np.stack([b.image for b in batch] + [np.zeros_like(batch[0].image)] * pad)
        captions = [b.caption for b in batch] + [""] * pad
        latents = _encode_images(
            *self.vae, jnp.asarray(images), jnp.asarray(indices), self.key, self.sample_posterior
        )
        t5, pooled, _ = encode_prompts(
            self.pipeline, captions, max_sequence_length=self.max_sequence_length
        )
        # Cast on the device: bfloat16 halves the transfer as well as the file.
        return tuple(x.astype(self.dtype) for x in (latents, t5, pooled))

    def _fetch(self, batch: list[_Item], encoded: tuple) -> Iterator[dict]:
        latents, t5, pooled = (np.asarray(x)[: len(batch)] for x in jax.device_get(encoded))
        for name, x in (("latents", latents), ("t5", t5), ("pooled", pooled)):
            bad = ~np.isfinite(x.astype(np.float32)).reshape(len(x), -1).all(axis=1)
            if bad.any():
                keys = [batch[i].key for i in np.flatnonzero(bad)]
                hint = " (float16 overflows above 65504: use bfloat16)" * (x.dtype == np.float16)
                raise FloatingPointError(f"non-finite {name} for records {keys}{hint}")
        for i, item in enumerate(batch):
            yield {
                "latents": latents[i],
                "t5": t5[i],
                "pooled": pooled[i],
                "caption": item.caption,
                "key": item.key,
                "index": item.index,
            }


UNCOND_FILE = "uncond.npz"


def write_uncond(
    pipeline: Pipeline, out_dir: str | Path, *, max_sequence_length: int, dtype: str
) -> None:
    """Stores the embeddings of the unconditional prompt " " (MeanFlow's label dropout and CFG,
    spec 4.1) beside the dataset as ``uncond.npz`` with ``t5 [S, D]`` and ``pooled [D]``."""
    path = Path(out_dir) / UNCOND_FILE
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    t5, pooled, _ = encode_prompts(pipeline, [" "], max_sequence_length=max_sequence_length)
    tmp = path.with_suffix(f".tmp-{os.getpid()}.npz")  # hosts may write it at once
    np.savez(tmp, t5=np.asarray(t5[0], np.float32), pooled=np.asarray(pooled[0], np.float32))
    tmp.rename(path)


def prepare(
    source: str | Path | sources.RecordSource,
    out_dir: str | Path,
    *,
    pipeline: Pipeline,
    resolution: int = 512,
    max_sequence_length: int = 256,
    batch_size: int = 16,
    sample_posterior: bool = True,
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_size: int = 256,
    image_column: str = "image",
    caption_column: str = "caption",
    num_threads: int = 16,
    max_pixels: float = sources.MAX_PIXELS,
    max_aspect_ratio: float = sources.MAX_ASPECT_RATIO,
    process_index: int | None = None,
    process_count: int | None = None,
) -> WriteReport:
    """Encodes an image-caption source into a latents-and-embeddings dataset at ``out_dir``.

    Args:
      source: a folder of images (``metadata.jsonl`` or side-car ``.txt`` captions), parquet
        file(s), a dataset from :func:`~distill_jax.data.builders.build_image_dataset`, or any
        :class:`~distill_jax.data.sources.RecordSource`.
      out_dir: the output dataset folder; an interrupted run resumes into it.
      pipeline: supplies ``vae``, ``clip``, ``t5`` and the two tokenizers.
      resolution: images are resized (shorter side) and centre-cropped to ``R x R``; a multiple
        of 16 for FLUX (VAE 8x, then 2x2 latent patches).
      max_sequence_length: T5 tokens ``S`` (FLUX.1-dev: 512, schnell and the paper: 256).
      batch_size: records per encoder call (per process).
      sample_posterior: store a posterior sample (the paper) instead of the posterior mean.
      seed: root of the per-record posterior keys.
      dtype: storage dtype of latents and embeddings, one of :data:`DTYPES`.
      shard_size: records per output shard, the unit of resumption and of host assignment.
      image_column, caption_column: parquet columns (``caption_column`` also names the caption
        field of ``metadata.jsonl``); ``caption_column="llava"`` for midjourney-v6-llava.
      num_threads: threads reading and decoding images.
      max_pixels, max_aspect_ratio: larger or more elongated images are skipped unread (see
        :data:`~distill_jax.data.sources.MAX_PIXELS` for the defaults' reasons).
      process_index, process_count: this host's part; default from JAX.

    Returns the :class:`~distill_jax.data.builders.WriteReport` (records written and skipped by
    reason, whether the dataset is complete). Skipped records (missing, undecodable or oversized
    images, missing captions) are counted in the dataset's ``metadata.json``; a source whose
    every record is skipped raises ``ValueError`` with the counts.
    """
    sources.check_image_limits(max_pixels, max_aspect_ratio)
    check_request(
        [],
        height=resolution,
        width=resolution,
        seed=seed,
        max_sequence_length=max_sequence_length,
    )
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    h, w = latent_size(resolution, resolution, vae_scale_factor=pipeline.vae_scale_factor)
    vae = pipeline.vae.cfg
    if isinstance(source, str | Path):
        source = sources.open_source(
            source, image_column=image_column, caption_column=caption_column
        )
    settings = {
        "source": source.description,
        "resolution": resolution,
        "max_sequence_length": max_sequence_length,
        "sample_posterior": sample_posterior,
        "seed": seed,
        "dtype": dtype,
        "max_pixels": max_pixels,
        "max_aspect_ratio": max_aspect_ratio,
        "scaling_factor": vae.scaling_factor,
        "shift_factor": vae.shift_factor,
    }
    features = builders.latent_features(
        (h, w, vae.latent_channels),
        (max_sequence_length, pipeline.t5.cfg.d_model),
        pipeline.clip.cfg.hidden_size,
        jnp.dtype(dtype),
    )
    encoder = _ShardEncoder(
        source,
        pipeline,
        resolution=resolution,
        max_sequence_length=max_sequence_length,
        batch_size=batch_size,
        sample_posterior=sample_posterior,
        seed=seed,
        dtype=jnp.dtype(dtype),
        num_threads=num_threads,
        limits={"max_pixels": max_pixels, "max_aspect_ratio": max_aspect_ratio},
    )
    write_uncond(pipeline, out_dir, max_sequence_length=max_sequence_length, dtype=dtype)
    return builders.write_dataset(
        out_dir,
        name=builders.LATENT_DATASET,
        features=features,
        num_records=len(source),
        read_shard=encoder,
        shard_size=shard_size,
        metadata=settings
        | {
            "latent_layout": "[h, w, C], unscaled",
            "diffusion_latents": "(latents - shift_factor) * scaling_factor",
        },
        plan=settings,
        description="FLUX VAE latents with T5 and CLIP prompt embeddings (distill-jax prepare).",
        process_index=process_index,
        process_count=process_count,
    )


__all__ = ["DTYPES", "prepare"]
