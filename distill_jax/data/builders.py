"""TFDS datasets in array_record, written shard by shard: resumable, split across hosts, no TF.

The output folder is an ordinary TFDS dataset (``dataset_info.json``, ``features.json``,
``metadata.json`` and ``{name}-train.array_record-{i:05d}-of-{n:05d}`` shards): read it with
``tfds.builder_from_directory(out_dir).as_data_source("train")`` or through
:mod:`distill_jax.data.input_pipeline`. TensorFlow is never imported.

Why not ``tfds.core.GeneratorBasedBuilder.download_and_prepare``: it writes a whole split in one
process and in one go, so it can neither resume after an interruption nor let each host encode
its slice, which ``prepare`` needs. It also fails here for any builder class defined in a package
(as opposed to ``__main__``): locating the class's checksums file imports
``importlib_resources``, which TFDS 4.9.10 does not install; ``store_as_tfds_dataset`` fails the
same way. (From ``__main__``, where that lookup is skipped, it does write array_record without
TensorFlow.) So this module writes shards the way TFDS's own ``SequentialWriter`` does, from
TFDS's parts: ``FeaturesDict.serialize_example``, ``ArrayRecordWriter(path, "group_size:1")``
(one record per chunk, for random access), and a ``DatasetInfo`` with its ``SplitInfo`` written
by ``DatasetInfo.write_to_directory`` once every shard exists.

Shard ``j`` holds source records ``[j * shard_size, (j + 1) * shard_size)`` (fewer when records
are skipped) and is written by process ``j % process_count``. A shard is finished once its file
has its final name: it is written under a temporary name and renamed after its statistics
(``_progress/shard-{j:05d}.json``) are on disk, so an interrupted run redoes only unfinished
shards. ``_progress/plan.json`` pins what the shards were made with (record count, shard size,
source, settings); resuming with a different plan raises instead of mixing two datasets.

Floating-point arrays are stored raw (``Encoding.BYTES``): TFDS's default proto float lists
cannot hold bfloat16 without TensorFlow. Records are zstd-compressed by array_record's default
writer options, as TFDS writes them.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import grain
import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordWriter
from tqdm import tqdm

from distill_jax.data import sources

log = logging.getLogger(__name__)

SPLIT = "train"
VERSION = "1.0.0"
PROGRESS_DIR = "_progress"
# Skipped keys kept in metadata.json; every one is in the shard's _progress file.
MAX_SKIPPED_KEYS = 100

Example = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record left out of the dataset, and why (one of :data:`sources.SKIP_REASONS`)."""

    key: str
    reason: str


@dataclasses.dataclass(frozen=True)
class WriteReport:
    """What one :func:`write_dataset` call did.

    ``complete`` is true once every shard exists and the dataset metadata has been written
    (by this call or an earlier one); ``skipped`` counts this call's skipped records by reason.
    """

    out_dir: Path
    num_shards: int
    shards_written: int
    shards_found_done: int
    examples: int
    skipped: dict[str, int]
    complete: bool


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """``(index, count)``; defaults to JAX's multi-host process index and count."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} not in [0, process_count={process_count})")
    return process_index, process_count


def _write_json(path: Path, obj: Any) -> None:
    """Atomically (write, then rename), so a reader never sees half a file."""
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _check_plan(path: Path, plan: Mapping[str, Any]) -> None:
    """Records ``plan`` on the first run; on a resume, raises naming every field that changed."""
    plan = json.loads(json.dumps(plan))  # tuples -> lists, as they will read back
    if path.is_file():
        old = json.loads(path.read_text())
        changed = sorted(k for k in set(old) | set(plan) if old.get(k) != plan.get(k))
        if changed:
            diffs = "; ".join(f"{k}: {old.get(k)!r} -> {plan.get(k)!r}" for k in changed)
            raise ValueError(
                f"{path.parent.parent} holds shards made with different settings ({diffs}); "
                "use another output folder or delete this one"
            )
    else:
        _write_json(path, plan)


def write_dataset(
    out_dir: str | Path,
    *,
    name: str,
    features: tfds.features.FeaturesDict,
    num_records: int,
    read_shard: Callable[[range], Iterable[Example | Skipped]],
    shard_size: int,
    metadata: Mapping[str, Any] | None = None,
    plan: Mapping[str, Any] | None = None,
    description: str = "",
    process_index: int | None = None,
    process_count: int | None = None,
) -> WriteReport:
    """Writes the TFDS dataset ``name`` to ``out_dir``: the generic "examples -> dataset" path.

    Args:
      out_dir: the dataset folder (shared between hosts when several write it).
      name: the TFDS dataset name (snake_case).
      features: the record layout; every example is ``features.serialize_example``-ed.
      num_records: how many source records there are (examples plus skips).
      read_shard: ``range`` of record indices -> their examples (dicts matching ``features``) or
        :class:`Skipped` markers, in order. Must give the same answer on every call: a shard
        can be redone after an interruption. A procedural dataset is
        ``lambda r: (make_example(i) for i in r)``.
      shard_size: source records per shard.
      metadata: JSON-serialisable facts stored in ``metadata.json`` (read back as
        ``builder.info.metadata``), next to the skip counts added here.
      plan: settings that must not change between a run and its resume (``num_records``,
        ``shard_size`` and the features are always included).
      process_index, process_count: this host's part; default ``jax.process_index()`` and
        ``jax.process_count()``. Process ``p`` writes shards ``p, p + count, ...``.

    Whoever finishes the last shard writes the dataset metadata; a host that finishes earlier
    returns ``complete=False``. Running again when every shard exists only writes the metadata.
    When every shard exists but holds no example (every record skipped), every host that sees
    it raises ``ValueError`` naming ``metadata["source"]`` and the skip counts of all hosts, and
    the dataset is not marked complete.
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size} must be >= 1")
    if num_records < 1:
        raise ValueError(f"{name}: the source has no records")
    out_dir = Path(out_dir)
    p, count = _process(process_index, process_count)
    num_shards = -(-num_records // shard_size)
    (out_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    _check_plan(
        out_dir / PROGRESS_DIR / "plan.json",
        {
            **(plan or {}),
            "name": name,
            "num_records": num_records,
            "shard_size": shard_size,
            "features": features.to_json(),
        },
    )
    template = _template(out_dir, name)
    mine = range(p, num_shards, count)
    todo = [j for j in mine if not _shard_done(out_dir, template, j, num_shards)]
    if len(todo) < len(mine):
        log.info(
            "%s: %d of this host's %d shards already done",
            out_dir,
            len(mine) - len(todo),
            len(mine),
        )
    examples, skipped = 0, collections.Counter()
    bar = tqdm(todo, desc=f"{name} shards", unit="shard", disable=not todo or p != 0)
    for j in bar:
        records = range(j * shard_size, min(num_records, (j + 1) * shard_size))
        stats = _write_shard(out_dir, template, j, num_shards, features, records, read_shard)
        examples += stats["examples"]
        skipped.update(stats["skipped"])
        bar.set_postfix(examples=examples, skipped=sum(skipped.values()))
    if skipped:
        log.warning("%s: skipped %s records (%s)", out_dir, sum(skipped.values()), dict(skipped))
    # The hosts of one job finish together: all shards written, then process 0 alone writes the
    # dataset's metadata, then every host returns.
    joint = process_index is None and count > 1
    if joint:
        from distill_jax import distributed

        distributed.sync(f"write-dataset-{name}-shards")
    # Every host decides from the same progress files (all hosts' counts), so all refuse alike.
    stats = _shard_stats(out_dir, template, num_shards)
    if stats is not None and not any(s["examples"] for s in stats):
        raise ValueError(
            f"{(metadata or {}).get('source', name)}: all {num_records} records were skipped "
            f"({_skip_counts(stats)}); {out_dir} would hold no examples"
        )
    complete = stats is not None
    if complete and (p == 0 or not joint):
        _finalize(
            out_dir,
            stats,
            name=name,
            features=features,
            metadata=metadata,
            description=description,
        )
    if joint:
        distributed.sync(f"write-dataset-{name}-final")
    return WriteReport(
        out_dir=out_dir,
        num_shards=num_shards,
        shards_written=len(todo),
        shards_found_done=len(mine) - len(todo),
        examples=examples,
        skipped=dict(skipped),
        complete=complete,
    )


def _template(out_dir: Path, name: str) -> tfds.core.ShardedFileTemplate:
    return tfds.core.ShardedFileTemplate(
        data_dir=out_dir, dataset_name=name, split=SPLIT, filetype_suffix="array_record"
    )


def _progress_path(out_dir: Path, j: int) -> Path:
    return out_dir / PROGRESS_DIR / f"shard-{j:05d}.json"


def _shard_done(out_dir: Path, template: tfds.core.ShardedFileTemplate, j: int, n: int) -> bool:
    return (
        Path(template.sharded_filepath(shard_index=j, num_shards=n)).is_file()
        and _progress_path(out_dir, j).is_file()
    )


def _shard_stats(
    out_dir: Path, template: tfds.core.ShardedFileTemplate, num_shards: int
) -> list[dict[str, Any]] | None:
    """The statistics of every shard (what :func:`_write_shard` returns), or ``None`` while one
    is unfinished."""
    if not all(_shard_done(out_dir, template, j, num_shards) for j in range(num_shards)):
        return None
    return [json.loads(_progress_path(out_dir, j).read_text()) for j in range(num_shards)]


def _skip_counts(stats: list[dict[str, Any]]) -> dict[str, int]:
    """Skipped records of all shards, by reason (every one of :data:`sources.SKIP_REASONS`)."""
    total = collections.Counter()
    for s in stats:
        total.update(s["skipped"])
    return {r: total.get(r, 0) for r in sources.SKIP_REASONS}


def _write_shard(
    out_dir: Path,
    template: tfds.core.ShardedFileTemplate,
    j: int,
    num_shards: int,
    features: tfds.features.FeaturesDict,
    records: range,
    read_shard: Callable[[range], Iterable[Example | Skipped]],
) -> dict[str, Any]:
    """Writes shard ``j`` under a temporary name, then its statistics, then renames it."""
    final = Path(template.sharded_filepath(shard_index=j, num_shards=num_shards))
    for stale in final.parent.glob(f"{final.name}.tmp*"):  # left by an interrupted run
        stale.unlink()
    tmp = final.with_name(f"{final.name}.tmp{os.getpid()}")
    writer = ArrayRecordWriter(str(tmp), "group_size:1")
    examples = num_bytes = 0
    skipped: collections.Counter[str] = collections.Counter()
    skipped_keys: list[str] = []
    try:
        for item in read_shard(records):
            if isinstance(item, Skipped):
                skipped[item.reason] += 1
                skipped_keys.append(item.key)
                continue
            data = features.serialize_example(item)
            writer.write(data)
            examples += 1
            num_bytes += len(data)
    finally:
        writer.close()
    stats = {
        "shard": j,
        "records": [records.start, records.stop],
        "examples": examples,
        "num_bytes": num_bytes,
        "skipped": dict(skipped),
        "skipped_keys": skipped_keys,
    }
    _write_json(_progress_path(out_dir, j), stats)
    os.replace(tmp, final)
    return stats


def _finalize(
    out_dir: Path,
    stats: list[dict[str, Any]],
    *,
    name: str,
    features: tfds.features.FeaturesDict,
    metadata: Mapping[str, Any] | None = None,
    description: str = "",
) -> None:
    """Writes ``dataset_info.json`` & co. from the ``stats`` of every shard. Idempotent: every
    host that gets here writes the same files."""
    template = _template(out_dir, name)
    keys: list[str] = []
    for s in stats:
        keys += s["skipped_keys"][: MAX_SKIPPED_KEYS - len(keys)]
    info = tfds.core.DatasetInfo(
        builder=tfds.core.DatasetIdentity(
            name=name,
            version=tfds.core.Version(VERSION),
            data_dir=str(out_dir),
            module_name=__name__,
        ),
        description=description,
        features=features,
        metadata=tfds.core.MetadataDict(
            **(metadata or {}),
            num_source_records=stats[-1]["records"][1],
            skipped=_skip_counts(stats),
            skipped_keys_sample=keys,
        ),
    )
    info.set_file_format("array_record")
    split = tfds.core.SplitInfo(
        name=SPLIT,
        shard_lengths=[s["examples"] for s in stats],
        num_bytes=sum(s["num_bytes"] for s in stats),
        filename_template=template,
    )
    info.set_splits(tfds.core.SplitDict([split]))
    info.write_to_directory(out_dir)


def load_info(path: str | Path) -> tfds.core.DatasetInfo:
    """The ``DatasetInfo`` of a dataset folder (features, splits, ``metadata``)."""
    path = Path(path)
    if not (path / "dataset_info.json").is_file():
        raise FileNotFoundError(
            f"{path} holds no dataset_info.json: not a finished dataset (an interrupted build "
            "or prepare resumes when run again)"
        )
    return tfds.builder_from_directory(str(path)).info


# --- the two dataset layouts ----------------------------------------------------------------

IMAGE_DATASET = "image_captions"
LATENT_DATASET = "flux_latents"


def image_features() -> tfds.features.FeaturesDict:
    """An image-caption record: the encoded image file as it came, its caption, its source key.

    The bytes are kept as they are (no re-encoding, no resizing): the resolution is chosen when
    reading. ``tfds.features.Image`` is not used because it needs TensorFlow to encode.
    """
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Tensor(shape=(), dtype=np.object_),
            "caption": tfds.features.Text(),
            "key": tfds.features.Text(),
        }
    )


def latent_features(
    latent_shape: tuple[int, int, int],
    t5_shape: tuple[int, int],
    pooled_dim: int,
    dtype: Any,
) -> tfds.features.FeaturesDict:
    """A precomputed record: ``latents [h, w, C]`` (the VAE's channels-last layout, unscaled),
    ``t5 [S, D_t5]``, ``pooled [D_clip]``, all in ``dtype``; caption, source key and index."""

    def tensor(shape):
        return tfds.features.Tensor(shape=shape, dtype=dtype, encoding=tfds.features.Encoding.BYTES)

    return tfds.features.FeaturesDict(
        {
            "latents": tensor(tuple(latent_shape)),
            "t5": tensor(tuple(t5_shape)),
            "pooled": tensor((pooled_dim,)),
            "caption": tfds.features.Text(),
            "key": tfds.features.Text(),
            "index": tfds.features.Scalar(dtype=np.int64),
        }
    )


def build_image_dataset(
    source: str | Path | sources.RecordSource,
    out_dir: str | Path,
    *,
    image_column: str = "image",
    caption_column: str = "caption",
    shard_size: int = 1000,
    num_threads: int = 16,
    max_pixels: float = sources.MAX_PIXELS,
    max_aspect_ratio: float = sources.MAX_ASPECT_RATIO,
    process_index: int | None = None,
    process_count: int | None = None,
) -> WriteReport:
    """Image-caption source (folder, JSONL, side-car ``.txt``, parquet) -> TFDS dataset.

    Every image is decoded once here (``num_threads`` threads: PIL releases the GIL), so records
    with missing, undecodable or oversized (``max_pixels``, ``max_aspect_ratio``, checked from
    the header) images or missing captions are skipped, counted by reason in ``metadata.json``
    and logged; they never stop the build, unless every record is skipped. Resumable and
    multi-host as :func:`write_dataset`.
    """
    sources.check_image_limits(max_pixels, max_aspect_ratio)
    limits = {"max_pixels": max_pixels, "max_aspect_ratio": max_aspect_ratio}
    if not isinstance(source, str | Path):
        src = source
    else:
        src = sources.open_source(source, image_column=image_column, caption_column=caption_column)

    def check(record: sources.RawRecord) -> Example | Skipped:
        reason = sources.skip_reason(record, **limits)
        if reason is not None:
            return Skipped(record.key, reason)
        return {"image": record.image, "caption": record.caption, "key": record.key}

    def read_shard(records: range) -> Iterable[Example | Skipped]:
        ds = grain.MapDataset.source(src)[records.start : records.stop].map(check)
        return ds.to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads)
        )

    return write_dataset(
        out_dir,
        name=IMAGE_DATASET,
        features=image_features(),
        num_records=len(src),
        read_shard=read_shard,
        shard_size=shard_size,
        metadata={"source": src.description} | limits,
        plan={"source": src.description} | limits,
        description="Encoded images with captions (distill_jax.data.builders).",
        process_index=process_index,
        process_count=process_count,
    )


__all__ = [
    "IMAGE_DATASET",
    "LATENT_DATASET",
    "Skipped",
    "WriteReport",
    "build_image_dataset",
    "image_features",
    "latent_features",
    "load_info",
    "write_dataset",
]
