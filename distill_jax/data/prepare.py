"""``distill-jax prepare``: a training dataset of latents and prompt embeddings, made once.

Two sources, one output format:

- :func:`prepare`: images + captions -> VAE latents + T5/CLIP embeddings.
- :func:`prepare_prompts`: prompts alone -> the teacher's own samples (the data-free path).
  The teacher's sampler (FLUX's Euler ODE, :func:`~distill_jax.pipeline.generate.denoise`) at
  its full step count turns each record's noise into a clean latent, stored as an encoded image's
  would be. For when no image dataset fits: the paper's training data is private.

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

With :func:`prepare_prompts`, ``latents`` is the teacher's sample instead, unscaled the same way
(``z / scaling_factor + shift_factor``; the toy's autoencoder latents are its diffusion latents,
so its factors are 1 and 0); record ``i`` is sample ``i % K`` of prompt ``i // K`` (``K``
samples per prompt), its initial noise ``normal(fold_in(key(seed), i), [C, h, w])``, so again
nothing depends on batch size, host count or resumption.

Sharding and resuming come from :func:`distill_jax.data.builders.write_dataset`: shard ``j``
(``shard_size`` records) is encoded by process ``j % process_count``, and shards already on disk
are never redone. Each process runs the encoders on its own devices: the pipeline's networks
must be addressable from every process (replicated, or sharded over the process's local
devices), since processes encode different records at different times.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from distill_jax.data import builders, input_pipeline, shapes, sources
from distill_jax.data.builders import Skipped, WriteReport
from distill_jax.models.autoencoder import Autoencoder
from distill_jax.pipeline import latents as lat
from distill_jax.pipeline import toy
from distill_jax.pipeline.generate import (
    AnyPipeline,
    _check_model,
    check_request,
    default_schedule,
    denoise,
)
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
                yield from _examples(*pending)
            pending = (batch, encoded)
        if pending is not None:
            yield from _examples(*pending)

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


class _Record(NamedTuple):
    """What a record is besides its arrays."""

    index: int
    key: str
    caption: str


def _examples(batch: list[_Item | _Record], encoded: tuple) -> Iterator[dict]:
    """The examples of a dispatched batch: its ``(latents, t5, pooled)`` fetched, the padding
    dropped, every value checked finite (a non-finite one raises naming the records)."""
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
    pipeline: AnyPipeline, out_dir: str | Path, *, max_sequence_length: int, dtype: str
) -> None:
    """Stores the embeddings of the unconditional prompt " " (MeanFlow's label dropout and CFG,
    spec 4.1) beside the dataset as ``uncond.npz`` with ``t5 [S, D]`` and ``pooled [D]``."""
    path = Path(out_dir) / UNCOND_FILE
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    t5, pooled, _ = pipeline.encode([" "], max_sequence_length)
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


# --- prompts only: the teacher's own samples ------------------------------------------------

PROMPT_FIELDS = ("prompt", "text", "caption")  # a .jsonl line's prompt: the first one present
FLUX_TEACHER_STEPS = 28  # FLUX.1-dev's default number of sampling steps (diffusers, BFL)
FLUX_GUIDANCE = 3.5  # FLUX.1-dev's default embedded guidance


def _prompt_lines(path: Path) -> list[tuple[str, str]]:
    """``(where, prompt)`` for each prompt of the file at ``path``, ``where`` being
    ``"path:line"``."""
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist (or is not a file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path} is not UTF-8 text ({err})") from None
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        where, line = f"{path}:{n}", line.strip()
        if not line:
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: not JSON ({err})") from None
            field = next((f for f in PROMPT_FIELDS if isinstance(row, dict) and f in row), None)
            if field is None or not isinstance(row[field], str):
                fields = " or ".join(map(repr, PROMPT_FIELDS))
                raise ValueError(f"{where}: a .jsonl line needs a string {fields} field")
            line = row[field].strip()
            if not line:
                raise ValueError(f"{where}: the {field!r} field is empty")
        out.append((where, line))
    if not out:
        raise ValueError(f"prompts file {path} holds no prompts (one a line; blank lines skipped)")
    return out


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a file: one a line (surrounding whitespace stripped, blank lines skipped),
    or, for a ``.jsonl`` file, one JSON object a line whose ``"prompt"``, ``"text"`` or
    ``"caption"`` field (the first present) is the prompt, as GenEval's
    ``evaluation_metadata.jsonl``. A missing or empty file, or a bad line, raises naming it."""
    return [prompt for _, prompt in _prompt_lines(Path(path))]


def _check_prompts(pipeline: AnyPipeline, lines: Sequence[tuple[str, str]]) -> None:
    """Refuses, naming its line, a prompt the teacher cannot read (before any sampling): text
    that is not UTF-8, or for the toy a word outside its world's vocabulary or a caption longer
    than its text length."""
    for where, prompt in lines:
        try:
            check_request([prompt])
            if isinstance(pipeline, toy.ToyPipeline):
                toy.tokenize([prompt], pipeline.vocab, pipeline.text_len)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None


@functools.partial(jax.jit, static_argnums=2)
def _record_noise(key: jax.Array, indices: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Standard normal noise ``[B, C, h, w]``: record ``i``'s drawn from ``fold_in(key, i)``."""
    keys = jax.vmap(jax.random.fold_in, (None, 0))(key, indices)  # [B] keys
    return jax.vmap(lambda k: jax.random.normal(k, shape, jnp.float32))(keys)


@functools.partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _unscaled(packed: jax.Array, h: int, w: int, scale: float, shift: float) -> jax.Array:
    """Packed diffusion latents ``[B, L, 4C]`` -> the stored layout: unscaled ``[B, h, w, C]``
    (``z / scaling_factor + shift_factor``, as the VAE decodes them)."""
    z = lat.unpack(packed, h, w).transpose(0, 2, 3, 1)  # [B, h, w, C]
    return z / scale + shift


class _ShardSampler:
    """Samples a shard's records with the teacher, ``batch_size`` at a time.

    Record ``i`` is sample ``i % K`` of prompt ``i // K``, from the noise
    ``normal(fold_in(key(seed), i), [C, h, w])``. The last batch of a shard is padded to
    ``batch_size`` (one compiled shape) and the padding dropped; batch ``k + 1`` is dispatched
    before batch ``k`` is fetched, so writing overlaps sampling.
    """

    def __init__(
        self,
        pipeline: AnyPipeline,
        prompts: Sequence[str],
        *,
        samples_per_prompt: int,
        resolution: int,
        steps: int,
        guidance: float | None,
        max_sequence_length: int,
        batch_size: int,
        seed: int,
        dtype: Any,
        normalisation: tuple[float, float],
    ):
        self.pipeline, self.prompts, self.samples_per_prompt = pipeline, prompts, samples_per_prompt
        self.guidance, self.max_sequence_length = guidance, max_sequence_length
        self.batch_size, self.dtype, self.normalisation = batch_size, dtype, normalisation
        self.h, self.w = latent_size(
            resolution, resolution, vae_scale_factor=pipeline.vae_scale_factor
        )
        self.img_ids = lat.image_ids(self.h, self.w)  # [L, 3]
        self.schedule = default_schedule("teacher", steps, len(self.img_ids))
        self.key = jax.random.key(seed)

    def __call__(self, records: range) -> Iterator[dict]:
        pending = None
        for start in range(records.start, records.stop, self.batch_size):
            batch = [
                self._record(i) for i in range(start, min(start + self.batch_size, records.stop))
            ]
            sampled = self._dispatch(batch)
            if pending is not None:
                yield from _examples(*pending)
            pending = (batch, sampled)
        if pending is not None:
            yield from _examples(*pending)

    def _record(self, index: int) -> _Record:
        prompt, sample = divmod(index, self.samples_per_prompt)
        return _Record(index, f"{prompt:06d}-{sample}", self.prompts[prompt])

    def _dispatch(self, batch: list[_Record]) -> tuple[jax.Array, jax.Array, jax.Array]:
        pad = [batch[-1]] * (self.batch_size - len(batch))
        indices = jnp.asarray([r.index for r in batch + pad], jnp.int32)
        t5, pooled, txt_ids = self.pipeline.encode(
            [r.caption for r in batch + pad], self.max_sequence_length
        )
        shape = (self.pipeline.latent_channels, self.h, self.w)
        noise = _record_noise(self.key, indices, shape)  # [B, C, h, w]
        packed = denoise(
            self.pipeline,
            lat.pack(noise),
            t5,
            pooled,
            txt_ids,
            self.img_ids,
            schedule=self.schedule,
            guidance=self.guidance,
        )
        latents = _unscaled(packed, self.h, self.w, *self.normalisation)
        # Cast on the device: bfloat16 halves the transfer as well as the file.
        return tuple(x.astype(self.dtype) for x in (latents, t5, pooled))


def prepare_prompts(
    prompts: str | Path | Sequence[str],
    out_dir: str | Path,
    *,
    pipeline: AnyPipeline,
    steps: int | None = None,
    guidance: float | None = None,
    resolution: int | None = None,
    samples_per_prompt: int = 1,
    max_sequence_length: int = 256,
    batch_size: int = 16,
    seed: int = 0,
    dtype: str = "bfloat16",
    shard_size: int = 256,
    process_index: int | None = None,
    process_count: int | None = None,
) -> WriteReport:
    """The teacher's samples for ``prompts``, written at ``out_dir`` as :func:`prepare` writes
    encoded images: distillation data without a dataset of images (see the module docstring).

    Args:
      prompts: a prompts file (see :func:`read_prompts`), or the prompts themselves.
      out_dir: the output dataset folder; an interrupted run resumes into it.
      pipeline: the teacher: a :class:`~distill_jax.pipeline.pipeline.Pipeline` (its transformer
        samples, its T5 and CLIP embed the prompts, its VAE's factors unscale the latents) or a
        :class:`~distill_jax.pipeline.toy.ToyPipeline`.
      steps: Euler steps of the teacher's sampler (FLUX's, on its resolution-shifted schedule);
        default its full count: :data:`FLUX_TEACHER_STEPS` (28), the toy's
        :data:`~distill_jax.pipeline.toy.TEACHER_STEPS`.
      guidance: the embedded guidance of a teacher that embeds it (default
        :data:`FLUX_GUIDANCE`, 3.5); a teacher without a guidance embedder (FLUX.1-schnell, the
        toy) takes none.
      resolution: pixels per side, a multiple of 16 (default 512; the toy's world is 32).
      samples_per_prompt: records per prompt ``K``, each from its own noise.
      max_sequence_length: T5 tokens ``S`` (the toy's text length is its world's).
      batch_size: records per sampler call (per process).
      seed: root of the per-record noise keys.
      dtype, shard_size, process_index, process_count: as for :func:`prepare`.

    Returns the :class:`~distill_jax.data.builders.WriteReport`. The dataset's metadata holds the
    settings (sampler, steps, guidance, seed, ...), which a resume must repeat, as it must the
    prompts (a SHA-256 of them is checked). A prompt the teacher cannot read (the toy's unknown
    words) raises naming its line before anything is sampled.
    """
    if isinstance(prompts, str | Path):
        lines = _prompt_lines(Path(prompts))
        source = f"prompts:{Path(prompts).resolve()}"
    else:
        lines = [(f"prompt {i}", p) for i, p in enumerate(prompts)]
        source = f"prompts:{len(lines)} given"
        if not lines:
            raise ValueError("prepare_prompts: no prompts given")
    texts = [p for _, p in lines]
    is_toy = isinstance(pipeline, toy.ToyPipeline)
    if steps is None:
        steps = toy.TEACHER_STEPS if is_toy else FLUX_TEACHER_STEPS
    if resolution is None:
        resolution = shapes.SIZE if is_toy else 512
    if guidance is None and pipeline.transformer.guidance_in is not None:
        guidance = FLUX_GUIDANCE
    check_request(
        [],
        height=resolution,
        width=resolution,
        steps=steps,
        guidance=guidance,
        seed=seed,
        max_sequence_length=max_sequence_length,
    )
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}; expected one of {DTYPES}")
    for name, value in (("batch_size", batch_size), ("samples_per_prompt", samples_per_prompt)):
        if value < 1:
            raise ValueError(f"{name}={value} must be >= 1")
    pipeline.check()
    _check_model(pipeline, "teacher", guidance)
    _check_prompts(pipeline, lines)
    num_records = len(texts) * samples_per_prompt
    h, w = latent_size(resolution, resolution, vae_scale_factor=pipeline.vae_scale_factor)
    # The toy's autoencoder latents are already its diffusion latents.
    vae = None if is_toy else pipeline.vae.cfg
    scale, shift = (1.0, 0.0) if is_toy else (vae.scaling_factor, vae.shift_factor)
    t5, pooled, _ = jax.eval_shape(lambda: pipeline.encode([" "], max_sequence_length))
    settings = {
        "source": source,
        "prompts_sha256": hashlib.sha256("\n".join(texts).encode()).hexdigest(),
        "samples_per_prompt": samples_per_prompt,
        "sampler": "teacher",
        "steps": steps,
        "guidance": guidance,
        "resolution": resolution,
        "max_sequence_length": t5.shape[1],
        "seed": seed,
        "dtype": dtype,
        "scaling_factor": scale,
        "shift_factor": shift,
    }
    features = builders.latent_features(
        (h, w, pipeline.latent_channels), t5.shape[1:], pooled.shape[-1], jnp.dtype(dtype)
    )
    sampler = _ShardSampler(
        pipeline,
        texts,
        samples_per_prompt=samples_per_prompt,
        resolution=resolution,
        steps=steps,
        guidance=guidance,
        max_sequence_length=max_sequence_length,
        batch_size=min(batch_size, shard_size, num_records),
        seed=seed,
        dtype=jnp.dtype(dtype),
        normalisation=(scale, shift),
    )
    log.info(
        "prepare: %d prompt(s) x %d sample(s), the teacher's sampler at %d step(s), guidance %s, "
        "%dx%d px (latents [%d, %d, %d]), %s",
        len(texts),
        samples_per_prompt,
        steps,
        guidance,
        resolution,
        resolution,
        h,
        w,
        pipeline.latent_channels,
        dtype,
    )
    write_uncond(pipeline, out_dir, max_sequence_length=max_sequence_length, dtype=dtype)
    return builders.write_dataset(
        out_dir,
        name=builders.LATENT_DATASET,
        features=features,
        num_records=num_records,
        read_shard=sampler,
        shard_size=shard_size,
        metadata=settings
        | {
            "latent_layout": "[h, w, C], unscaled",
            "diffusion_latents": "(latents - shift_factor) * scaling_factor",
            "records": "index i: sample i % samples_per_prompt of prompt i // samples_per_prompt",
        },
        plan=settings,
        description="Latents sampled by the teacher from prompts, with their T5 and CLIP "
        "embeddings (distill-jax prepare --prompts).",
        process_index=process_index,
        process_count=process_count,
    )


__all__ = ["DTYPES", "prepare", "prepare_prompts", "read_prompts"]
