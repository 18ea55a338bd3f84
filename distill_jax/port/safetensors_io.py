"""Streaming safetensors: read one tensor at a time, write one tensor at a time.

Reading is the ``safetensors`` library's ``safe_open(path, framework="numpy", backend="pread")``:
it checks every claim of the header against the file when it is opened (dtype, shape x item size
= byte span, offsets tiling the buffer exactly, the buffer's length), and reads each tensor with
``pread(2)`` into a fresh array. Not the default ``mmap`` backend: pages of a map stay resident,
and counted in the process's memory, for as long as the map lives, so converting a 24 GB
checkpoint through one would look like (and under pressure be) a 24 GB process. The library's
errors name neither the file nor (mostly) the tensor, so a refused file is read again here to say
which and why (:func:`_diagnose`). bfloat16 and float8 arrays come out as ``ml_dtypes`` types
(importing ``ml_dtypes`` registers their names with NumPy).

The format (huggingface/safetensors): an 8-byte little-endian header length ``N``, ``N`` bytes of
JSON ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}``,
then the data buffer; offsets are relative to the buffer, and the tensors tile it exactly, in
order, without gaps. Writing stays here (:func:`write_sharded`): the library's writers take every
tensor of a file at once (``save_file`` a dict, ``serialize_file`` pointers to live buffers), so a
10 GB shard would need 10 GB of memory; ours writes the header from the specs and then each tensor
as it arrives.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path

import ml_dtypes
import numpy as np
import safetensors

DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype(np.uint16),
    "I16": np.dtype(np.int16),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U64": np.dtype(np.uint64),
    "I64": np.dtype(np.int64),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
CODES: dict[np.dtype, str] = {v: k for k, v in DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20  # the safetensors library's own limit

Spec = tuple[str, np.dtype, tuple[int, ...]]  # (key, dtype, shape) of a tensor to write


class SafetensorsError(ValueError):
    """A safetensors file is malformed; the message names the file and what is wrong."""


def _entry_problem(key: str, entry: object) -> str | None:
    if not isinstance(entry, dict):
        return f"{key!r}: entry is {type(entry).__name__}, not an object"
    code, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if code not in DTYPES:
        return f"{key!r}: unknown dtype {code!r} (known: {sorted(DTYPES)})"
    if not (isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)):
        return f"{key!r}: shape {shape!r} is not a list of non-negative integers"
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(type(o) is int for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        return f"{key!r}: data_offsets {offsets!r} are not [begin, end] with begin <= end"
    nbytes = math.prod(shape) * DTYPES[code].itemsize
    if offsets[1] - offsets[0] != nbytes:
        return (
            f"{key!r}: {code}{list(shape)} needs {nbytes} bytes but data_offsets {offsets} span "
            f"{offsets[1] - offsets[0]}"
        )
    return None


def _diagnose(path: Path) -> str | None:
    """Why the library refused ``path``, where its message would not name the tensor: a shape,
    dtype or offsets entry that lies (each one named), data cut short, or JSON it cannot parse.
    None otherwise (a header length that does not fit, gaps, overlaps, trailing bytes, bad
    metadata: the library's own message says it, with the tensor where there is one)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else size
        if n > MAX_HEADER_BYTES or 8 + n > size:
            return None
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"header is not valid JSON ({err})"
    except RecursionError:
        return "header JSON is nested too deeply"
    if not isinstance(header, dict):
        return None
    header.pop("__metadata__", None)
    found = {key: _entry_problem(key, entry) for key, entry in header.items()}
    problems = [p for p in found.values() if p]
    buffer = size - 8 - n
    problems += [
        f"{key!r} ends at data byte {header[key]['data_offsets'][1]} but the file holds only "
        f"{buffer} data bytes: the file is truncated"
        for key, problem in found.items()
        if not problem and header[key]["data_offsets"][1] > buffer
    ]
    if not problems:
        return None
    lines = "\n".join(f"  - {p}" for p in problems)
    return f"corrupt safetensors header, {len(problems)} problem(s)\n{lines}"


class SafetensorsFile(Mapping[str, np.ndarray]):
    """A lazy, read-only mapping over one safetensors file; ``f[key]`` reads that tensor only.

    Also gives ``shape_of``, ``dtype_of`` and ``file_of`` from the header, without reading data.
    Raises :class:`SafetensorsError` naming the file (and the tensor) when the library refuses it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = safetensors.safe_open(self.path, framework="numpy", backend="pread")
        except safetensors.SafetensorError as err:
            why = _diagnose(self.path) or f"not a readable safetensors file ({err})"
            raise SafetensorsError(f"{self.path}: {why}") from None
        self.metadata = self._file.metadata() or {}
        self._specs = {}
        for key in self._file.offset_keys():
            view = self._file.get_slice(key)
            if view.get_dtype() not in DTYPES:
                raise SafetensorsError(
                    f"{self.path}: {key!r} is {view.get_dtype()}, which is not read "
                    f"(known: {sorted(DTYPES)})"
                )
            self._specs[key] = (DTYPES[view.get_dtype()], tuple(view.get_shape()))

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self._specs:
            raise KeyError(key)
        try:
            return self._file.get_tensor(key)
        except safetensors.SafetensorError as err:  # e.g. the file shrank after it was opened
            raise SafetensorsError(f"{self.path}: cannot read {key!r} ({err})") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._specs)

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, key: object) -> bool:
        return key in self._specs

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self._specs[key][1]

    def dtype_of(self, key: str) -> np.dtype:
        return self._specs[key][0]

    def file_of(self, key: str) -> str:
        return self.path.name

    @property
    def files(self) -> list[Path]:
        return [self.path]


class ShardedSafetensors(Mapping[str, np.ndarray]):
    """Several safetensors files behind one ``*.safetensors.index.json`` (``weight_map``).

    The index and the shards must agree exactly: a key the index places in a shard that lacks it,
    or a tensor in a shard the index does not list, is an error naming both.
    """

    def __init__(self, index_path: str | Path):
        self.index_path = Path(index_path)
        try:
            index = json.loads(self.index_path.read_text())
            weight_map = index["weight_map"]
        except (
            json.JSONDecodeError,
            UnicodeDecodeError,
            RecursionError,
            KeyError,
            TypeError,
        ) as err:
            raise SafetensorsError(
                f"{self.index_path}: not a safetensors index with a weight_map ({err!r})"
            ) from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(n, str) for k, n in weight_map.items()
        ):
            raise SafetensorsError(
                f"{self.index_path}: weight_map must map tensor names to shard file names"
            )
        folder = self.index_path.parent
        names = sorted(set(weight_map.values()))
        # Shards live beside the index: a path that leaves the folder is never opened.
        outside = [n for n in names if n in ("", ".", "..") or Path(n).name != n or "\\" in n]
        if outside:
            raise SafetensorsError(
                f"{self.index_path}: shard names must be plain file names in {folder}, "
                f"got {outside}"
            )
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise SafetensorsError(f"{self.index_path}: shard file(s) {missing} do not exist")
        self.shards = {n: SafetensorsFile(folder / n) for n in names}
        problems = []
        for key, name in weight_map.items():
            if key not in self.shards[name]:
                problems.append(f"{key!r}: the index places it in {name}, which lacks it")
        for name, shard in self.shards.items():
            for key in shard:
                if weight_map.get(key) != name:
                    problems.append(f"{key!r} is in {name} but the index does not list it there")
        if problems:
            lines = "\n".join(f"  - {p}" for p in problems)
            raise SafetensorsError(
                f"{self.index_path}: index and shards disagree, {len(problems)} problem(s)\n{lines}"
            )
        self._where = {k: self.shards[n] for k, n in weight_map.items()}

    def __getitem__(self, key: str) -> np.ndarray:
        return self._where[key][key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def shape_of(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape_of(key)

    def dtype_of(self, key: str) -> np.dtype:
        return self._where[key].dtype_of(key)

    def file_of(self, key: str) -> str:
        return self._where[key].path.name

    @property
    def files(self) -> list[Path]:
        return [self.index_path] + [s.path for s in self.shards.values()]


def open_safetensors(path: str | Path) -> SafetensorsFile | ShardedSafetensors:
    """A lazy mapping over ``path``: a ``*.safetensors.index.json`` opens every shard it lists."""
    path = Path(path)
    return ShardedSafetensors(path) if path.name.endswith(".index.json") else SafetensorsFile(path)


def _header_bytes(specs: Sequence[Spec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for key, dtype, shape in specs:
        if np.dtype(dtype) not in CODES:
            raise SafetensorsError(f"{key!r}: dtype {dtype} has no safetensors code")
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        header[key] = {
            "dtype": CODES[np.dtype(dtype)],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data buffer starts 8-byte aligned, as the library writes
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors(
    path: str | Path,
    specs: Sequence[Spec],
    arrays: Iterator[tuple[str, np.ndarray]],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Writes ``len(specs)`` tensors taken one at a time from ``arrays``, in ``specs`` order.

    The header is written first from ``specs``; each ``(key, array)`` drawn from the iterator must
    then match its spec exactly (key, dtype, shape), so at most one tensor is in memory here.
    """
    with open(path, "wb") as f:
        f.write(_header_bytes(specs, metadata))
        for key, dtype, shape in specs:
            try:
                got_key, arr = next(arrays)
            except StopIteration:
                raise SafetensorsError(f"{path}: ran out of tensors before {key!r}") from None
            arr = np.asarray(arr)
            if (got_key, arr.dtype, arr.shape) != (key, np.dtype(dtype), tuple(shape)):
                raise SafetensorsError(
                    f"{path}: expected {key!r} {np.dtype(dtype)}{list(shape)}, "
                    f"got {got_key!r} {arr.dtype}{list(arr.shape)}"
                )
            f.write(memoryview(np.ascontiguousarray(arr).reshape(-1).view(np.uint8)))


def plan_shards(specs: Sequence[Spec], max_shard_bytes: int) -> list[list[Spec]]:
    """Consecutive groups of at most ``max_shard_bytes`` (a larger tensor gets a shard alone)."""
    shards: list[list[Spec]] = [[]]
    size = 0
    for spec in specs:
        nbytes = math.prod(spec[2]) * np.dtype(spec[1]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    return shards


def write_sharded(
    folder: str | Path,
    stem: str,
    specs: Sequence[Spec],
    arrays: Iterable[tuple[str, np.ndarray]],
    *,
    max_shard_bytes: int,
    metadata: Mapping[str, str] | None = None,
) -> list[Path]:
    """Shards ``{stem}-00001-of-0000N.safetensors`` plus ``{stem}.safetensors.index.json``, the
    layout diffusers' and transformers' ``from_pretrained`` read. Returns the files written."""
    folder = Path(folder)
    groups = plan_shards(specs, max_shard_bytes)
    it = iter(arrays)
    weight_map, files = {}, []
    for i, group in enumerate(groups):
        name = f"{stem}-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        write_safetensors(folder / name, group, it, metadata=metadata)
        weight_map.update({key: name for key, _, _ in group})
        files.append(folder / name)
    if next(it, None) is not None:
        raise SafetensorsError(f"{folder}: more tensors given than the {len(specs)} planned")
    total = sum(math.prod(s) * np.dtype(d).itemsize for _, d, s in specs)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    files.append(folder / f"{stem}.safetensors.index.json")
    files[-1].write_text(json.dumps(index, indent=2) + "\n")
    return files
