"""Image-caption sources as random-access sequences of raw records.

Three kinds, picked by :func:`open_source` from what the path holds:

- a **folder** of images (searched recursively, sorted by relative path) whose captions come from
  a ``metadata.jsonl`` at the folder root (Hugging Face ``imagefolder`` layout: one JSON object per
  line with ``file_name`` and the caption column) or from side-car ``.txt`` files next to each
  image (``cat.png`` -> ``cat.txt``); the JSONL wins when both give a caption;
- **parquet** shards (a file, or a folder of ``*.parquet``) such as
  ``brivangl/midjourney-v6-llava``, with a configurable image column (Hugging Face ``Image``
  structs ``{"bytes": ..., "path": ...}`` or raw bytes) and caption column (``llava`` there);
- an **image-caption dataset** written by :func:`distill_jax.data.builders.build_image_dataset`
  (a folder holding ``dataset_info.json``).

A record keeps the image as the file's encoded bytes; decoding happens later
(:func:`decode_image`), so a corrupt file costs one skipped record, not the run. Record ``i`` is
the same on every host and every run, which is what sharding and resuming rely on.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from PIL import Image

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_FILE = "metadata.jsonl"  # the Hugging Face imagefolder name
FILE_NAME_KEY = "file_name"

# Why a record is skipped; the keys of every skip count this package reports.
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_CAPTION = "missing_caption"
SKIP_REASONS = (MISSING_IMAGE, UNDECODABLE_IMAGE, MISSING_CAPTION)
# What PIL raises for bytes it cannot decode (truncated, not an image, absurdly large).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


@dataclasses.dataclass(frozen=True)
class RawRecord:
    """One source record. ``image`` is the encoded file (PNG, JPEG, ...); ``None`` = missing."""

    key: str  # where it came from: a relative path, or "shard.parquet:row"
    image: bytes | None
    caption: str | None


class RecordSource(Protocol):
    """Random access to ``len(source)`` records; ``description`` names the source in metadata."""

    description: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> RawRecord: ...


def _caption(value: object) -> str | None:
    """A usable caption or ``None`` (absent, not a string, or only whitespace)."""
    if not isinstance(value, str):
        return None
    value = value.strip()
    return value or None


def decode_image(data: bytes) -> Image.Image:
    """Encoded bytes -> a fully decoded RGB PIL image (alpha dropped, palettes expanded).

    Raises one of :data:`DECODE_ERRORS` for truncated or undecodable bytes, including truncated
    PNGs: PIL's ``LOAD_TRUNCATED_IMAGES`` stays off.
    """
    with Image.open(io.BytesIO(data)) as img:
        return img.convert("RGB")  # convert() forces the full decode


def skip_reason(record: RawRecord) -> str | None:
    """Why ``record`` cannot be used (one of :data:`SKIP_REASONS`), or ``None`` when it can.

    Decodes the image fully: a header that parses is not enough to catch a truncated file.
    """
    if record.image is None:
        return MISSING_IMAGE
    if record.caption is None:
        return MISSING_CAPTION
    try:
        decode_image(record.image)
    except DECODE_ERRORS:
        return UNDECODABLE_IMAGE
    return None


class FolderSource:
    """Images under ``root`` with captions from ``metadata.jsonl`` and/or side-car ``.txt`` files.

    Records are the union of the image files found and the ``file_name`` entries of the JSONL,
    sorted by relative path; an entry whose file is absent is a record with ``image=None``.
    """

    def __init__(self, root: str | Path, *, caption_column: str = "caption"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        self.description = f"folder:{self.root.resolve()}"
        files = {
            p.relative_to(self.root).as_posix()
            for p in self.root.rglob("*")
            if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        }
        self._jsonl = self._read_jsonl(self.root / METADATA_FILE, caption_column)
        self._names = sorted(files | set(self._jsonl))

    @staticmethod
    def _read_jsonl(path: Path, caption_column: str) -> dict[str, str | None]:
        """``file_name -> caption`` from ``path`` (empty when absent). A malformed line is a
        mistake in the listing rather than a corrupt record, so it raises, naming the line."""
        if not path.is_file():
            return {}
        out = {}
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                if not isinstance(row, dict) or not isinstance(row.get(FILE_NAME_KEY), str):
                    raise ValueError(f"{path}:{n}: expected an object with a {FILE_NAME_KEY!r}")
                name = Path(row[FILE_NAME_KEY])
                if name.is_absolute() or ".." in name.parts or not name.parts:
                    raise ValueError(
                        f"{path}:{n}: {FILE_NAME_KEY} {row[FILE_NAME_KEY]!r} is not a path "
                        f"inside {path.parent}"
                    )
                out[name.as_posix()] = _caption(row.get(caption_column))
        return out

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, index: int) -> RawRecord:
        name = self._names[index]
        path = self.root / name
        caption = self._jsonl.get(name)
        if caption is None:
            sidecar = path.with_suffix(".txt")
            if sidecar.is_file():
                caption = _caption(sidecar.read_text(encoding="utf-8", errors="replace"))
        image = None
        if path.is_file():  # a regular file: never a device or a FIFO, which could block
            try:
                image = path.read_bytes()
            except OSError:
                pass
        return RawRecord(key=name, image=image, caption=caption)


class ParquetSource:
    """Rows of parquet files, in file order then row order, read one row group at a time.

    ``image_column`` holds Hugging Face ``Image`` structs (the ``bytes`` field is used) or raw
    bytes; ``caption_column`` holds strings. Only these two columns are read.
    """

    def __init__(
        self,
        paths: str | Path | Sequence[str | Path],
        *,
        image_column: str = "image",
        caption_column: str = "caption",
    ):
        self.paths = _parquet_files(paths)
        self.columns = (image_column, caption_column)
        self.description = "parquet:" + ",".join(str(p.resolve()) for p in self.paths)
        # (file, row group) of every row group, and the global index of its first row.
        self._groups: list[tuple[int, int]] = []
        self._starts: list[int] = []
        self._file_starts: list[int] = []
        total = 0
        for f, path in enumerate(self.paths):
            meta = pq.ParquetFile(path)
            names = meta.schema_arrow.names
            for column in self.columns:
                if column not in names:
                    raise ValueError(f"{path}: no column {column!r} (columns: {names})")
            self._file_starts.append(total)
            for g in range(meta.metadata.num_row_groups):
                self._groups.append((f, g))
                self._starts.append(total)
                total += meta.metadata.row_group(g).num_rows
        self._len = total
        # Readers go through shards in order, several threads at once: keep the last row groups.
        self._cache: dict[int, tuple[list, list]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self._len

    def _row_group(self, g: int) -> tuple[list, list]:
        with self._lock:
            if g not in self._cache:
                f, group = self._groups[g]
                table = pq.ParquetFile(self.paths[f]).read_row_group(
                    group, columns=list(self.columns)
                )
                if len(self._cache) >= 4:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[g] = tuple(table.column(c).to_pylist() for c in self.columns)
            return self._cache[g]

    def __getitem__(self, index: int) -> RawRecord:
        if not 0 <= index < self._len:
            raise IndexError(f"record {index} out of range [0, {self._len})")
        g = bisect.bisect_right(self._starts, index) - 1
        images, captions = self._row_group(g)
        image = images[index - self._starts[g]]
        if isinstance(image, dict):  # Hugging Face Image struct
            image = image.get("bytes")
        f = self._groups[g][0]
        key = f"{self.paths[f].name}:{index - self._file_starts[f]}"
        image = bytes(image) if isinstance(image, bytes | bytearray) and image else None
        return RawRecord(key=key, image=image, caption=_caption(captions[index - self._starts[g]]))


def _parquet_files(paths: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(paths, str | Path):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(p.glob("*.parquet"))
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"parquet path {str(p)!r} does not exist")
    if not files:
        raise FileNotFoundError(f"no *.parquet files in {[str(p) for p in paths]}")
    return files


class DatasetSource:
    """The records of an image-caption dataset built by this package (its ``train`` split)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        builder = tfds.builder_from_directory(str(self.path))
        missing = {"image", "caption", "key"} - set(builder.info.features.keys())
        if missing:
            raise ValueError(
                f"{self.path}: not an image-caption dataset (features lack {sorted(missing)})"
            )
        self._data = builder.as_data_source("train")
        self.description = f"dataset:{self.path.resolve()}"

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, index: int) -> RawRecord:
        row = self._data[index]
        return RawRecord(
            key=_text(row["key"]), image=bytes(row["image"]), caption=_text(row["caption"])
        )


def _text(value: bytes | str | np.ndarray) -> str:
    """TFDS ``Text`` features come back as bytes."""
    value = value.item() if isinstance(value, np.ndarray) else value
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def open_source(
    path: str | Path, *, image_column: str = "image", caption_column: str = "caption"
) -> RecordSource:
    """The source at ``path``: a built dataset (``dataset_info.json`` inside), parquet (a
    ``.parquet`` file or a folder of them with no images), or a folder of images.

    ``image_column`` applies to parquet; ``caption_column`` to parquet and ``metadata.jsonl``.
    """
    p = Path(path)
    if (p / "dataset_info.json").is_file():
        return DatasetSource(p)
    if p.is_file() and p.suffix == ".parquet":
        return ParquetSource(p, image_column=image_column, caption_column=caption_column)
    if p.is_dir() and any(p.glob("*.parquet")):
        return ParquetSource(p, image_column=image_column, caption_column=caption_column)
    if p.is_dir():
        return FolderSource(p, caption_column=caption_column)
    raise FileNotFoundError(
        f"{str(p)!r} is neither a folder of images, a parquet file or folder, nor a dataset"
    )


__all__ = [
    "DatasetSource",
    "FolderSource",
    "ParquetSource",
    "RawRecord",
    "RecordSource",
    "SKIP_REASONS",
    "decode_image",
    "open_source",
    "skip_reason",
]
