"""Parameter checksums that survive sharding: recorded at conversion, verified at load.

For an array of N elements with raw bits ``b_i`` (bfloat16 and float16 as uint16, float32 as
uint32, widened to uint32) and row-major flat index ``i``, each of two 32-bit sums is

    S_s = sum_i fmix32(b_i xor (i * G + s))  mod 2**32,     s in SEEDS,

with murmur3's finalizer ``fmix32``. It depends on every bit and every position (a flipped byte,
swapped rows or a transposed kernel change it), and a modular sum does not care how the elements
are split or ordered, so the same number comes out of a NumPy loop over chunks of a host array
(:func:`host_checksum`, during the streaming conversion) and out of one jitted reduction over
arrays sharded in any way across any number of hosts (:func:`checksums`, at load), where no host
holds a whole array. Both evaluate the one formula, :func:`_sums`, written against the array
namespace. It detects corruption, not tampering: it is not a cryptographic hash.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

ALGORITHM = "fmix32-sum-v1"  # recorded beside the checksums, so a future change is recognised
SEEDS = (0x9E3779B9, 0x7F4A7C15)
_GOLDEN = 0x9E3779B1
_CHUNK = 1 << 16  # elements per NumPy step: the temporaries stay in the L2 cache


def _fmix32(xp: Any, h: Any) -> Any:
    h = h ^ (h >> 16)
    h = h * xp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * xp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _sums(xp: Any, bits: Any, index: Any) -> list[Any]:
    """The two uint32 sums over elements with uint32 ``bits`` at uint32 flat ``index``."""
    k = index * xp.uint32(_GOLDEN)
    return [xp.sum(_fmix32(xp, bits ^ (k + xp.uint32(s))), dtype=xp.uint32) for s in SEEDS]


def _hex(sums: Any) -> str:
    return "".join(f"{int(s):08x}" for s in sums)


def _uint(itemsize: int, what: str) -> np.dtype:
    if itemsize not in (2, 4):
        raise ValueError(f"checksums cover 2- and 4-byte dtypes, not {what}")
    return np.dtype(np.uint16 if itemsize == 2 else np.uint32)


def _check_size(size: int, what: str) -> None:
    if size >= 1 << 32:  # the index is uint32
        raise ValueError(f"checksums cover arrays of fewer than 2**32 elements, not {what}")


def host_checksum(array: np.ndarray) -> str:
    """The checksum of a host array, as 16 hex digits (chunk by chunk: no full-size temporary)."""
    array = np.ascontiguousarray(array)
    _check_size(array.size, str(array.shape))
    bits = array.reshape(-1).view(_uint(array.itemsize, str(array.dtype)))
    total = np.zeros(len(SEEDS), np.uint32)
    for start in range(0, bits.size, _CHUNK):
        chunk = bits[start : start + _CHUNK].astype(np.uint32)
        index = np.arange(start, start + chunk.size, dtype=np.uint32)
        total += np.array(_sums(np, chunk, index), np.uint32)
    return _hex(total)


def _device_sums(x: jax.Array, cast: Any) -> jax.Array:
    if cast is not None:
        x = x.astype(cast)
    bits = jax.lax.bitcast_convert_type(x, _uint(x.dtype.itemsize, str(x.dtype)))
    index = jnp.zeros(x.shape, jnp.uint32)  # row-major flat index, built per shard by XLA
    for axis, n in enumerate(x.shape):
        index = index * jnp.uint32(n) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    return jnp.stack(_sums(jnp, bits.astype(jnp.uint32), index))


@functools.partial(jax.jit, static_argnames="cast")
def _tree_sums(params: dict[str, jax.Array], cast: Any = None) -> dict[str, jax.Array]:
    return {k: _device_sums(v, cast) for k, v in params.items()}


def checksums(params: Mapping[str, jax.Array], cast: Any = None) -> dict[str, str]:
    """``{name: 16 hex digits}`` of (possibly sharded, multi-host) arrays, in one jitted call;
    ``cast`` first casts every array to that dtype (exactly back to the stored dtype, after a
    widening load). Equal to :func:`host_checksum` of the same values."""
    for k, v in params.items():
        _check_size(v.size, repr(k))
    cast = None if cast is None else np.dtype(cast)
    sums = _tree_sums(dict(params), cast=cast)
    # Replicated results: every host reads its own copy, whatever the parameters' sharding.
    return {k: _hex(np.asarray(v.addressable_data(0))) for k, v in sums.items()}


def record(sums: Mapping[str, str]) -> dict[str, Any]:
    """The ``checksums`` entry of a converted component's config.json."""
    return {"algorithm": ALGORITHM, "params": dict(sorted(sums.items()))}


def verify(
    folder: Path,
    recorded: Any,
    params: Mapping[str, jax.Array | np.ndarray],
    stored: np.dtype,
    *,
    subset: bool = False,
) -> str:
    """Checks parameters restored from ``folder`` (possibly sharded, in one dtype; or NumPy
    arrays, checked on the host) against the :func:`record` in its config.json, comparing the
    stored dtype's bits (after an exact cast back when the load widened them). ``subset``: only
    ``params``' names are compared (a streaming export checks a batch at a time). Returns what
    was checked, for the log: a folder written before checksums, or a load narrower than the
    stored dtype, is unverified. Raises ValueError naming the folder and the parameters that
    differ."""
    if recorded is None:
        return "unverified: the folder predates checksums"
    if not (
        isinstance(recorded, dict)
        and recorded.get("algorithm") == ALGORITHM
        and isinstance(recorded.get("params"), dict)
    ):
        raise ValueError(f"{folder / 'config.json'}: unreadable checksums (convert it again)")
    dtype = np.dtype(next(iter(params.values())).dtype)
    if dtype.itemsize < stored.itemsize:
        return f"unverified: narrowed from the stored {stored.name}"
    cast = None if dtype == stored else stored
    if all(isinstance(v, np.ndarray) for v in params.values()):
        found = {k: host_checksum(v if cast is None else v.astype(cast)) for k, v in params.items()}
    else:
        found = checksums(params, cast=cast)
    want = recorded["params"]
    names = set(found) if subset else set(found) | set(want)
    wrong = sorted(k for k in names if found.get(k) != want.get(k))
    if wrong:
        more = f" and {len(wrong) - 5} more" if len(wrong) > 5 else ""
        raise ValueError(
            f"{folder / 'params'}: {len(wrong)} parameter(s) do not match the checksums recorded "
            f"when the folder was written ({', '.join(map(repr, wrong[:5]))}{more}): the "
            "checkpoint is corrupt; convert it again"
        )
    return f"{len(found)} checksums verified"
