"""Flat ``{dotted path: array}`` views of NNX parameters, the currency of the port tables."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import numpy as np
from flax import nnx


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def param_shapes(model: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of every ``nnx.Param`` leaf; works on abstract models from ``nnx.eval_shape``."""
    return {
        _key(p): tuple(v.get_value().shape)
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def flat_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every ``nnx.Param`` as a host NumPy array, keyed by dotted path."""
    return {
        _key(p): np.asarray(jax.device_get(v.get_value()))
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


def load_flat_params(model: nnx.Module, flat: Mapping[str, np.ndarray]) -> None:
    """Writes arrays into the model's ``nnx.Param`` leaves in place, keeping their dtype.

    Every leaf must be given exactly once and with its shape; the error lists all problems.
    """
    state = nnx.state(model, nnx.Param)
    leaves = dict((_key(p), v) for p, v in nnx.to_flat_state(state))
    problems = [f"missing {k!r} {tuple(v.get_value().shape)}" for k, v in leaves.items()
                if k not in flat]
    problems += [f"unexpected {k!r}" for k in flat if k not in leaves]
    problems += [
        f"{k!r} has shape {tuple(np.shape(flat[k]))}, expected {tuple(v.get_value().shape)}"
        for k, v in leaves.items()
        if k in flat and tuple(np.shape(flat[k])) != tuple(v.get_value().shape)
    ]
    if problems:
        from distill_jax.port.table import PortError

        raise PortError("loading parameters", problems)
    for k, v in leaves.items():
        v.set_value(jax.numpy.asarray(flat[k], dtype=v.get_value().dtype))
