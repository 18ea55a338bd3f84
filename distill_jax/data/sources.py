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
the same on every host and every run, which is what sharding and resuming rely on. Decoding
reads the image's header first and skips, without decoding, an image larger than
:data:`MAX_PIXELS` or more elongated than :data:`MAX_ASPECT_RATIO` (a few hundred bytes can
declare gigapixels). It applies the EXIF orientation and maps 16-bit and float images to 8 bits.
"""

from __future__ import annotations

import bisect
import dataclasses
import io
import json
import logging
import math
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from PIL import Image, ImageOps

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
METADATA_FILE = "metadata.jsonl"  # the Hugging Face imagefolder name
FILE_NAME_KEY = "file_name"

# Why a record is skipped; the keys of every skip count this package reports.
MISSING_IMAGE = "missing_image"
UNDECODABLE_IMAGE = "undecodable_image"
MISSING_CAPTION = "missing_caption"
OVERSIZED_IMAGE = "oversized_image"
SKIP_REASONS = (MISSING_IMAGE, UNDECODABLE_IMAGE, MISSING_CAPTION, OVERSIZED_IMAGE)
# What PIL raises for bytes it cannot decode (truncated, not an image, absurdly large).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)

# Images are cropped to a centre square of side --resolution, so pixels beyond a few times R^2
# are thrown away. 40 megapixels (160 MB decoded, as PIL holds RGB in 4 bytes a pixel: 2.6 GB
# for 16 decoding threads) admits the camera and generated images of text-to-image sets, and
# stays under PIL's own decompression-bomb limit (Image.MAX_IMAGE_PIXELS, 89 MP). An aspect
# ratio above 10 keeps under 10% of the image in the crop, and resizing the short side to R
# makes it R^2 * ratio pixels: a 1 x 10^7 strip would become 512 x 5 * 10^9.
MAX_PIXELS = 40_000_000
MAX_ASPECT_RATIO = 10.0


class OversizedImage(ValueError):
    """An image whose header declares more pixels, or a longer side, than the limits allow."""


def check_image_limits(max_pixels: float, max_aspect_ratio: float) -> None:
    """Raises ``ValueError`` unless ``0 < max_pixels <= PIL's limit`` and ``max_aspect_ratio >= 1``
    are finite. PIL refuses (or warns about) images over ``Image.MAX_IMAGE_PIXELS`` before this
    package sees their size, so a larger ``max_pixels`` could not be honoured."""
    pil_limit = Image.MAX_IMAGE_PIXELS or math.inf
    if not (math.isfinite(max_pixels) and 0 < max_pixels <= pil_limit):
        raise ValueError(f"max_pixels={max_pixels} must be finite and in (0, {pil_limit}]")
    if not (math.isfinite(max_aspect_ratio) and max_aspect_ratio >= 1):
        raise ValueError(f"max_aspect_ratio={max_aspect_ratio} must be finite and >= 1")


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


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode -> 8-bit RGB (alpha dropped, palettes expanded).

    PIL's own ``convert`` clips 16-bit and float values to 8 bits, turning them white or black.
    Here 16-bit values (modes ``I;16*``, and ``I`` when every value is in [0, 65535]) become
    ``round(v / 257)``; float values (mode ``F``) in [0, 1] become ``round(255 v)``. Other
    integer or float ranges have no agreed meaning and raise ``ValueError``.
    """
    if img.mode == "RGB":
        return img  # convert() would copy it
    if not (img.mode in ("I", "F") or img.mode.startswith("I;16")):
        return img.convert("RGB")
    a = np.asarray(img)
    if img.mode == "F":
        if not np.all((a >= 0) & (a <= 1)):  # NaN fails too
            raise ValueError(f"float image with values outside [0, 1]: {a.min()}..{a.max()}")
        a = np.rint(a * np.float32(255))
    else:
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"mode {img.mode} values outside [0, 65535]: {a.min()}..{a.max()}")
        a = (a.astype(np.int64) + 128) // 257  # round(v / 257): 257 is odd, so no ties
    return Image.fromarray(a.astype(np.uint8), "L").convert("RGB")


def decode_image(
    data: bytes, *, max_pixels: float = MAX_PIXELS, max_aspect_ratio: float = MAX_ASPECT_RATIO
) -> Image.Image:
    """Encoded bytes -> a fully decoded RGB PIL image, turned by its EXIF orientation.

    Raises :class:`OversizedImage` (before any decoding) for an image over ``max_pixels`` or with
    a longer side over ``max_aspect_ratio`` times its shorter one, also when PIL's own
    decompression-bomb check fires first, and otherwise one of :data:`DECODE_ERRORS` for
    truncated or undecodable bytes, including truncated PNGs: PIL's ``LOAD_TRUNCATED_IMAGES``
    stays off. Modes are mapped to 8 bits as :func:`_to_rgb` says.
    """
    try:
        img = Image.open(io.BytesIO(data))  # lazy: reads the header only
        w, h = img.size
        if w * h > max_pixels or max(w, h) > max_aspect_ratio * min(w, h):
            raise OversizedImage(
                f"{w}x{h} image: limits are {max_pixels} pixels, aspect ratio {max_aspect_ratio}"
            )
        ImageOps.exif_transpose(img, in_place=True)  # decodes
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise OversizedImage(str(e)) from e  # the warning is raised when filtered as an error
    except TypeError as e:  # PIL's TIFF reader given a tag of the wrong type (a float offset)
        raise ValueError(f"malformed image ({e})") from e
    return _to_rgb(img)


def decode_failure(key: str, error: Exception) -> str:
    """The skip reason of a record whose :func:`decode_image` raised ``error``; logs it."""
    reason = OVERSIZED_IMAGE if isinstance(error, OversizedImage) else UNDECODABLE_IMAGE
    log.warning("skipping %s: %s (%s)", key, reason, error)
    return reason


def skip_reason(
    record: RawRecord,
    *,
    max_pixels: float = MAX_PIXELS,
    max_aspect_ratio: float = MAX_ASPECT_RATIO,
) -> str | None:
    """Why ``record`` cannot be used (one of :data:`SKIP_REASONS`), or ``None`` when it can.

    Decodes the image fully: a header that parses is not enough to catch a truncated file.
    """
    if record.image is None:
        return MISSING_IMAGE
    if record.caption is None:
        return MISSING_CAPTION
    try:
        decode_image(record.image, max_pixels=max_pixels, max_aspect_ratio=max_aspect_ratio)
    except DECODE_ERRORS as e:
        return decode_failure(record.key, e)
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
        with path.open("rb") as f:
            for n, raw in enumerate(f, 1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise ValueError(f"{path}:{n}: not UTF-8 ({e.reason} at byte {e.start})") from e
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
                except RecursionError as e:  # deep nesting: json recurses per level
                    raise ValueError(f"{path}:{n}: JSON nested too deeply") from e
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
            text = _read_regular(path.with_suffix(".txt"))
            caption = None if text is None else _caption(text.decode("utf-8", errors="replace"))
        return RawRecord(key=name, image=_read_regular(path), caption=caption)


def _read_regular(path: Path) -> bytes | None:
    """The bytes of ``path`` if it is a regular file (never a device or a FIFO, which could
    block), else ``None``, as for a name the file system refuses (too long, say) or a failed
    read."""
    try:
        return path.read_bytes() if path.is_file() else None
    except OSError:
        return None


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
            meta = _parquet_file(path)
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
                try:
                    table = _parquet_file(self.paths[f]).read_row_group(
                        group, columns=list(self.columns)
                    )
                except (pa.ArrowException, OSError) as e:
                    raise ValueError(
                        f"{self.paths[f]}: row group {group} unreadable ({_first_line(e)})"
                    ) from e
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


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def _parquet_file(path: Path) -> pq.ParquetFile:
    """The open file; a damaged one (truncated, not parquet) raises ``ValueError`` naming it."""
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise ValueError(f"{path}: not a readable parquet file ({_first_line(e)})") from e


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
    "MAX_ASPECT_RATIO",
    "MAX_PIXELS",
    "OversizedImage",
    "ParquetSource",
    "RawRecord",
    "RecordSource",
    "SKIP_REASONS",
    "check_image_limits",
    "decode_image",
    "open_source",
    "skip_reason",
]
