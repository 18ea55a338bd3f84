"""Meshes, the logical-axis rules table, activation constraints and the replication check.

Parameters carry *logical* axis names in their ``logical_axes`` variable metadata (see
:func:`axes`); a short rules table maps each logical name onto mesh axes. Models never see a mesh:
retargeting a topology is a change of mesh shape or rules, never of model code.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axis (or tuple of axes, or None for replicated). The whole table.
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),  # activations: batch over every data-parallel axis
    ("embed", "fsdp"),  # model width D: ZeRO-3 style parameter sharding
    ("heads", "tensor"),  # fused H*K projection outputs (q, k, v, attention out)
    ("mlp", "tensor"),  # feed-forward hidden
    # AdaLN modulation outputs (6D, 3D, 2D). Kept off "tensor": with embed->fsdp, mod->tensor and
    # a (2, 2, 2) mesh, XLA's CPU partitioner (jax 0.10.2) miscompiles the split of the
    # modulation vector (tests/test_flux.py::test_sharded_parameters_and_forward). The weights
    # stay sharded through "embed".
    ("mod", None),
    ("vocab", "tensor"),  # token embedding tables
    ("conv_out", "tensor"),  # convolution output channels
    ("conv_in", None),
    ("seq", None),
    ("act_embed", None),
    ("norm", None),  # per-head or per-channel norm scales
    ("io", None),  # small input/output dims (latent channels, pooled dims)
    # The leading axis of stacked (scanned) blocks: each scan step needs its whole layer, so
    # sharding it would gather every layer on every step; the other axes keep their rules.
    ("layers", None),
)

_rules: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("rules", default=None)


def axes(*names: str | None) -> dict[str, tuple[str | None, ...]]:
    """Variable metadata naming the logical axes of a parameter: ``kernel_metadata=axes(...)``."""
    return {"logical_axes": tuple(names)}


def make_mesh(shape: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with axes ``(data, fsdp, tensor)``; a size of -1 takes the remaining devices."""
    devices = list(devices if devices is not None else jax.devices())
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
    sizes = [int(shape.get(a, 1)) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(shape)}")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes, strict=True))} needs {math.prod(sizes)} devices, "
            f"{len(devices)} are available"
        )
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES)


def logical_to_spec(names: Sequence[str | None] | None, rules=None) -> PartitionSpec:
    """Resolves logical axis names to a ``PartitionSpec``; a mesh axis is used at most once."""
    if names is None:
        return PartitionSpec()
    table = dict(DEFAULT_RULES if rules is None else rules)
    used: set[str] = set()
    out = []
    for name in names:
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules table")
        targets = (target,) if isinstance(target, str) else tuple(target or ())
        targets = tuple(t for t in targets if t not in used)
        used.update(targets)
        out.append(targets[0] if len(targets) == 1 else (targets or None))
    return PartitionSpec(*out)


def _divisible(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide a dimension, so small tiny-model dims stay legal."""
    out = []
    for dim, entry in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)), strict=True):
        names = (entry,) if isinstance(entry, str) else tuple(entry or ())
        size = math.prod(mesh.shape[n] for n in names)
        out.append(entry if size and dim % size == 0 else None)
    return PartitionSpec(*out)


def variable_spec(var: Any, mesh: Mesh, rules=None) -> PartitionSpec:
    names = var.get_metadata("logical_axes", None) if isinstance(var, nnx.Variable) else None
    value = var.get_value() if isinstance(var, nnx.Variable) else var
    return _divisible(logical_to_spec(names, rules), np.shape(value), mesh)


def state_shardings(state: nnx.State, mesh: Mesh, rules=None) -> nnx.State:
    """``NamedSharding`` for every leaf of an (abstract) NNX state, from its logical axes."""
    return jax.tree.map(
        lambda v: (
            v.replace(NamedSharding(mesh, variable_spec(v, mesh, rules)))
            if isinstance(v, nnx.Variable)
            else NamedSharding(mesh, PartitionSpec())
        ),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def abstract_sharded(tree: Any, shardings: Any = None) -> Any:
    """``tree`` as ``jax.ShapeDtypeStruct`` leaves carrying ``shardings`` (a tree of the same
    structure; default: each leaf's own ``.sharding``): what Orbax restores and ``jax.jit``
    lowers into. ``tree`` may be concrete or abstract."""
    if shardings is None:
        return jax.tree.map(
            lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree
        )
    return jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings
    )


@contextlib.contextmanager
def axis_rules(rules) -> Iterator[None]:
    """Sets the rules that :func:`constrain` resolves activation names with."""
    token = _rules.set(tuple(rules))
    try:
        yield
    finally:
        _rules.reset(token)


def activation_spec(shape: Sequence[int], *names: str | None, mesh=None) -> PartitionSpec:
    """The ``PartitionSpec`` of an activation of ``shape`` with logical ``names``, under the rules
    set by :func:`axis_rules` (default rules otherwise) and the active (or given) mesh."""
    mesh = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
    return _divisible(logical_to_spec(names, _rules.get()), shape, mesh)


def constrain(x: jax.Array, *names: str | None) -> jax.Array:
    """Constrains an activation to its logical sharding when a mesh is active; else a no-op."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, activation_spec(x.shape, *names, mesh=mesh))


def assert_not_replicated(state: Any, shardings: Any, *, min_bytes: int = 1 << 20) -> None:
    """Raises if any leaf of at least ``min_bytes`` is fully replicated over a multi-device mesh.

    ``state`` may be abstract (``jax.ShapeDtypeStruct``); ``shardings`` has the same structure.
    A variable stacked on a leading ``layers`` axis (scanned blocks) is judged per layer, as the
    per-block variables it stands for would be.
    """
    offenders = []
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    leaves = jax.tree_util.tree_leaves_with_path(state, is_leaf=is_var)
    specs = jax.tree_util.tree_leaves(shardings, is_leaf=lambda s: isinstance(s, NamedSharding))
    for (path, leaf), sharding in zip(leaves, specs, strict=True):
        if sharding.mesh.size == 1:
            return
        layers = 1
        if is_var(leaf):
            names, leaf = leaf.get_metadata("logical_axes", None) or (), leaf.get_value()
            layers = leaf.shape[0] if names[:1] == ("layers",) else 1
        nbytes = math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize // layers
        if nbytes >= min_bytes and all(e is None for e in sharding.spec):
            offenders.append(f"{jax.tree_util.keystr(path)} {tuple(leaf.shape)} ({nbytes} bytes)")
    if offenders:
        raise AssertionError(
            f"{len(offenders)} array(s) of at least {min_bytes} bytes are fully replicated; "
            "give them logical axes or a rule:\n  " + "\n  ".join(offenders)
        )


def init_sharded(make: Any, mesh: Mesh, rules=None) -> nnx.Module:
    """Builds the module returned by ``make()`` straight into its shardings.

    The abstract state comes from ``nnx.eval_shape``; the initialiser is jitted with those
    shardings as outputs, so no device ever holds the whole model.
    """
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh, rules)

    @jax.jit
    def init():
        state = nnx.split(make())[1]
        return jax.lax.with_sharding_constraint(state, shardings)

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
