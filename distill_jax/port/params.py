"""Flat ``{dotted path: array}`` views of NNX parameters, the currency of the port tables."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from flax import nnx

from distill_jax.port.table import PortError, Rule, to_target

M = TypeVar("M", bound=nnx.Module)


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


def _check(leaves: Mapping[str, nnx.Variable], flat: Mapping[str, np.ndarray]) -> None:
    problems = [
        f"missing {k!r} {tuple(v.get_value().shape)}" for k, v in leaves.items() if k not in flat
    ]
    problems += [f"unexpected {k!r}" for k in flat if k not in leaves]
    problems += [
        f"{k!r} has shape {tuple(np.shape(flat[k]))}, expected {tuple(v.get_value().shape)}"
        for k, v in leaves.items()
        if k in flat and tuple(np.shape(flat[k])) != tuple(v.get_value().shape)
    ]
    if problems:
        raise PortError("loading parameters", problems)


def load_flat_params(model: nnx.Module, flat: Mapping[str, np.ndarray]) -> None:
    """Writes arrays into the model's ``nnx.Param`` leaves in place, keeping their dtype.

    Every leaf must be given exactly once and with its shape; the error lists all problems.
    """
    leaves = dict((_key(p), v) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    _check(leaves, flat)
    for k, v in leaves.items():
        v.set_value(jax.numpy.asarray(flat[k], dtype=v.get_value().dtype))


def from_flat_params(abstract: nnx.Module, flat: Mapping[str, np.ndarray]) -> nnx.Module:
    """A concrete model from an abstract one (``nnx.eval_shape``) and its parameters.

    No random initialisation is run: every leaf comes from ``flat``, cast to the leaf's dtype.
    """
    graphdef, state = nnx.split(abstract)
    leaves = dict((_key(p), v) for p, v in nnx.to_flat_state(state))
    _check(leaves, flat)
    for k, v in leaves.items():
        if not isinstance(v, nnx.Param):
            raise TypeError(f"{k!r} is a {type(v).__name__}, only nnx.Param leaves can be filled")
        v.set_value(jax.numpy.asarray(flat[k], dtype=v.get_value().dtype))
    return nnx.merge(graphdef, state)


def from_state_dict(
    model: type[M],
    cfg: Any,
    state_dict: Mapping[str, Any],
    rules: Sequence[Rule],
    *,
    what: str,
    **kw: Any,
) -> M:
    """``model(cfg, **kw)`` holding the tensors of ``state_dict`` (NumPy-convertible arrays, or a
    lazy mapping) mapped through the key table ``rules``.

    No random initialisation is run: the model is built abstract (``nnx.eval_shape``) and every
    leaf comes from the state dict, cast to ``param_dtype``. Raises :class:`PortError` listing
    every missing, unexpected or mis-shaped key.
    """
    abstract = nnx.eval_shape(lambda: model(cfg, rngs=nnx.Rngs(0), **kw))
    return from_flat_params(
        abstract, to_target(state_dict, rules, param_shapes(abstract), what=what)
    )
