"""T2I-Distill checkpoints: a torch ``.pt`` holding ``{"module": state_dict}`` in diffusers naming.

The paper's training scripts save the student's state dict this way (spec t2i-distill.md section
3.3), with the students' extra heads ``timestep_embedder2.*`` (MeanFlow) and ``logvar_linear.*``
(sCM) beside the stock FLUX keys. Files are read with ``torch.load(weights_only=True)``, which
refuses any pickle holding more than tensors and plain containers, and memory-mapped where the
file allows it, so tensors are paged in one at a time as the conversion reads them. The zip's
CRC-32s, which ``torch.load`` ignores, are checked first, so a corrupt file is refused rather
than read as other weights.

torch is needed only here; without it the error says how to install it.
"""

from __future__ import annotations

import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

_CRC_CHUNK = 16 << 20
INSTALL = "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"reading or writing a .pt checkpoint needs PyTorch; install the CPU build with: "
            f"{INSTALL}"
        ) from None
    return torch


def _numpy_dtype(torch_dtype: Any) -> np.dtype:
    torch = _torch()
    special = {
        torch.bfloat16: ml_dtypes.bfloat16,
        torch.float8_e4m3fn: ml_dtypes.float8_e4m3fn,
        torch.float8_e5m2: ml_dtypes.float8_e5m2,
    }
    if torch_dtype in special:
        return np.dtype(special[torch_dtype])
    return torch.empty(0, dtype=torch_dtype).numpy().dtype


def to_numpy(tensor: Any) -> np.ndarray:
    """A CPU tensor as a NumPy array (bfloat16 and float8 through ``ml_dtypes``), sharing memory."""
    torch = _torch()
    tensor = tensor.detach().contiguous()
    bits = {
        torch.bfloat16: torch.int16,
        torch.float8_e4m3fn: torch.uint8,
        torch.float8_e5m2: torch.uint8,
    }.get(tensor.dtype)
    if bits is None:
        return tensor.numpy()
    return tensor.view(bits).numpy().view(_numpy_dtype(tensor.dtype))


def from_numpy(array: np.ndarray) -> Any:
    """The inverse of :func:`to_numpy`: a torch tensor sharing the array's memory."""
    torch = _torch()
    array = np.asarray(array, order="C")  # not ascontiguousarray: it turns scalars into [1]
    if not array.flags.writeable:  # torch tensors are always writable; share nothing read-only
        array = array.copy()
    special = {
        np.dtype(ml_dtypes.bfloat16): (np.int16, torch.bfloat16),
        np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, torch.float8_e4m3fn),
        np.dtype(ml_dtypes.float8_e5m2): (np.uint8, torch.float8_e5m2),
    }
    if array.dtype in special:
        bits, dtype = special[array.dtype]
        return torch.from_numpy(array.view(bits)).view(dtype)
    return torch.from_numpy(array)


class TorchStateDict(Mapping[str, np.ndarray]):
    """A state dict from a ``.pt`` as a mapping of NumPy arrays, converted key by key.

    Gives ``shape_of``, ``dtype_of`` and ``file_of`` without touching tensor data, as
    :class:`~distill_jax.port.safetensors_io.SafetensorsFile` does.
    """

    def __init__(self, path: Path, tensors: Mapping[str, Any]):
        self.path = path
        self._tensors = tensors

    def __getitem__(self, key: str) -> np.ndarray:
        return to_numpy(self._tensors[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __contains__(self, key: object) -> bool:
        return key in self._tensors

    def shape_of(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype_of(self, key: str) -> np.dtype:
        return _numpy_dtype(self._tensors[key].dtype)

    def file_of(self, key: str) -> str:
        return self.path.name

    @property
    def files(self) -> list[Path]:
        return [self.path]


def _load(path: Path) -> Any:
    torch = _torch()
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "zipfile" not in str(err) and "mmap" not in str(err):
            raise
    # The pre-1.6 (non-zip) format cannot be memory-mapped; it is read whole.
    return torch.load(path, map_location="cpu", weights_only=True)


def _check_crcs(path: Path) -> None:
    """Reads every record of a zip-format ``.pt`` through ``zipfile``, which checks each CRC-32
    and local header; ``torch.load`` checks neither, so a flipped byte would load other weights
    silently."""
    try:
        if not zipfile.is_zipfile(path):  # the pre-1.6 format has no checksums
            return
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                with archive.open(info) as record:
                    while record.read(_CRC_CHUNK):
                        pass
    except Exception as err:  # BadZipFile, EOFError, NotImplementedError, zlib.error, ...
        raise ValueError(
            f"{path}: corrupt PyTorch checkpoint ({type(err).__name__}: {err})"
        ) from None


def load_pt(path: str | Path) -> TorchStateDict:
    """The state dict of a T2I-Distill ``.pt`` (``{"module": state_dict}``, or a bare state dict).

    Raises ``ValueError`` naming the file for a pickle holding anything but tensors and plain
    containers (it is never executed), for a truncated or corrupt file (the zip format's CRC-32s
    are checked), for another structure, or for non-tensor entries.
    """
    path = Path(path)
    torch = _torch()
    _check_crcs(path)
    try:
        obj = _load(path)
    except pickle.UnpicklingError as err:
        why = re.search(r"WeightsUnpickler error: ([^\n]*)", str(err))
        raise ValueError(
            f"{path}: refused to unpickle: it holds more than tensors and plain containers "
            f"({why.group(1).strip() if why else 'unsupported pickle'}). Only "
            "torch.load(weights_only=True) files are read, because loading any other pickle can "
            "run arbitrary code; re-save it as torch.save({'module': model.state_dict()}, path)."
        ) from None
    except Exception as err:  # torch raises RuntimeError, EOFError, KeyError, ... on corrupt files
        why = str(err).strip().split("\n")[0][:200]
        raise ValueError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt "
            f"({type(err).__name__}: {why})"
        ) from None
    if isinstance(obj, Mapping) and "module" in obj:
        obj = obj["module"]
    if not isinstance(obj, Mapping):
        raise ValueError(
            f"{path}: expected {{'module': state_dict}} or a state dict, got {type(obj).__name__}"
        )
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        shown = ", ".join(bad[:10]) + (f" and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise ValueError(
            f"{path}: expected {{'module': state_dict}} of tensors, but {len(bad)} entr(y/ies) are "
            f"not tensors: {shown}"
        )
    return TorchStateDict(path, dict(obj))


def save_pt(path: str | Path, state_dict: Mapping[str, np.ndarray]) -> None:
    """Writes ``{"module": state_dict}`` as the paper's scripts do (``torch.save``)."""
    torch = _torch()
    torch.save({"module": {k: from_numpy(v) for k, v in state_dict.items()}}, Path(path))
