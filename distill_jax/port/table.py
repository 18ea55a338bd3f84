"""Declarative key tables between PyTorch state dicts and flat NNX parameter dicts.

A table is a list of :class:`Rule`. Each rule names one target leaf (a dotted NNX path such as
``double_blocks.0.img_attn.qkv.kernel``), the source keys it is built from, and a named
:class:`Transform` that maps the source arrays onto the target array and back. Conversion in
either direction is strict: every source tensor is read exactly once, every target leaf is written
exactly once, and every shape is checked; all problems are collected and reported in one
:class:`PortError`.

Arrays are NumPy (or anything ``np.asarray`` accepts). The source mapping is only ever indexed
once per key, so lazy mappings (memory-mapped safetensors) stream naturally.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

Shape = tuple[int, ...]


class PortError(ValueError):
    """A conversion failed; the message lists every missing, unexpected and mis-shaped key."""

    def __init__(self, what: str, problems: Sequence[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{what}: {len(self.problems)} problem(s)\n{lines}")


@dataclasses.dataclass(frozen=True)
class Transform:
    """A named, invertible map between source arrays and one target array.

    ``forward(sources) -> target``; ``inverse(target) -> sources``; ``source_shapes(target_shape)``
    gives the shapes the sources must have, so shapes are checked before any data is read.
    """

    name: str
    forward: Callable[[Sequence[np.ndarray]], np.ndarray]
    inverse: Callable[[np.ndarray], list[np.ndarray]]
    source_shapes: Callable[[Shape], list[Shape]]


def _t(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.swapaxes(x, -1, -2))


IDENTITY = Transform("identity", lambda s: s[0], lambda t: [t], lambda shape: [shape])

# torch Linear weight [out, in] <-> Flax kernel [in, out].
LINEAR = Transform(
    "linear", lambda s: _t(s[0]), lambda t: [_t(t)], lambda shape: [tuple(reversed(shape))]
)

# torch Conv2d weight [O, I, kh, kw] <-> Flax kernel [kh, kw, I, O].
CONV = Transform(
    "conv",
    lambda s: np.ascontiguousarray(np.transpose(s[0], (2, 3, 1, 0))),
    lambda t: [np.ascontiguousarray(np.transpose(t, (3, 2, 0, 1)))],
    lambda shape: [(shape[3], shape[2], shape[0], shape[1])],
)


def _halves_swapped(x: np.ndarray) -> np.ndarray:
    a, b = np.split(x, 2, axis=-1)
    return np.ascontiguousarray(np.concatenate([b, a], axis=-1))


# AdaLN output [shift, scale] (BFL, ours) <-> [scale, shift] (diffusers' AdaLayerNormContinuous).
SWAP_SCALE_SHIFT_LINEAR = Transform(
    "swap_scale_shift_linear",
    lambda s: _halves_swapped(_t(s[0])),
    lambda t: [_t(_halves_swapped(t))],
    lambda shape: [tuple(reversed(shape))],
)
SWAP_SCALE_SHIFT_BIAS = Transform(
    "swap_scale_shift_bias",
    lambda s: _halves_swapped(s[0]),
    lambda t: [_halves_swapped(t)],
    lambda shape: [shape],
)


def fused_linear(sizes: Sequence[int]) -> Transform:
    """Several torch Linear weights ``[out_i, in]`` <-> one kernel ``[in, sum(out_i)]``."""
    cuts = np.cumsum(sizes)[:-1].tolist()

    def source_shapes(shape: Shape) -> list[Shape]:
        return [(n, shape[0]) for n in sizes]

    return Transform(
        f"fused_linear{tuple(sizes)}",
        lambda s: _t(np.concatenate(list(s), axis=0)),
        lambda t: [np.ascontiguousarray(p) for p in np.split(_t(t), cuts, axis=0)],
        source_shapes,
    )


def fused_bias(sizes: Sequence[int]) -> Transform:
    """Several biases ``[out_i]`` <-> one bias ``[sum(out_i)]``."""
    cuts = np.cumsum(sizes)[:-1].tolist()
    return Transform(
        f"fused_bias{tuple(sizes)}",
        lambda s: np.concatenate(list(s), axis=0),
        lambda t: [np.ascontiguousarray(p) for p in np.split(t, cuts, axis=0)],
        lambda shape: [(n,) for n in sizes],
    )


@dataclasses.dataclass(frozen=True)
class Rule:
    """One target leaf, built from ``sources`` by ``transform``."""

    target: str
    sources: tuple[str, ...]
    transform: Transform = IDENTITY


def rule(target: str, *sources: str, transform: Transform = IDENTITY) -> Rule:
    return Rule(target, tuple(sources), transform)


def linear(target: str, source: str, *, bias: bool = True) -> list[Rule]:
    """A Linear layer: ``{source}.weight`` -> ``{target}.kernel`` and the bias."""
    rules = [rule(f"{target}.kernel", f"{source}.weight", transform=LINEAR)]
    if bias:
        rules.append(rule(f"{target}.bias", f"{source}.bias"))
    return rules


def fused(target: str, sources: Sequence[str], sizes: Sequence[int]) -> list[Rule]:
    """A Linear whose output is the concatenation of several torch Linears (e.g. fused qkv)."""
    return [
        rule(f"{target}.kernel", *(f"{s}.weight" for s in sources), transform=fused_linear(sizes)),
        rule(f"{target}.bias", *(f"{s}.bias" for s in sources), transform=fused_bias(sizes)),
    ]


def stacked(transform: Transform, n: int) -> Transform:
    """``transform`` applied to each of ``n`` layers' sources (given layer after layer), the
    targets stacked on a leading layer axis: ``[n, *target]``. Filled layer by layer, so that
    memory holds the stacked target and one layer's sources."""

    def forward(sources: Sequence[np.ndarray]) -> np.ndarray:
        k = len(sources) // n
        first = np.asarray(transform.forward(sources[:k]))
        out = np.empty((n, *first.shape), first.dtype)
        out[0] = first
        for i in range(1, n):
            out[i] = transform.forward(sources[i * k : (i + 1) * k])
        return out

    return Transform(
        f"stacked{n}_{transform.name}",
        forward,
        lambda t: [p for i in range(n) for p in transform.inverse(t[i])],
        lambda shape: transform.source_shapes(tuple(shape[1:])) * n,
    )


def layers(prefix: str, per_layer: Sequence[Sequence[Rule]], *, stack: bool) -> list[Rule]:
    """The rules of a list of layers, ``per_layer[i]`` filling ``{prefix}.{i}.…``: as they are,
    or (``stack``) one rule per name filling ``{prefix}.…`` of shape ``[n, …]`` from every
    layer's sources (the layout of scanned blocks)."""
    if not stack or not per_layer:
        return [r for rules in per_layer for r in rules]
    n, out = len(per_layer), []
    for j, first in enumerate(per_layer[0]):
        name = first.target.removeprefix(f"{prefix}.0.")
        same = [rules[j] for rules in per_layer]
        for i, r in enumerate(same):
            if r.target != f"{prefix}.{i}.{name}" or r.transform.name != first.transform.name:
                raise AssertionError(f"layer {i} of {prefix}: rule {r} does not match {first}")
        sources = tuple(s for r in same for s in r.sources)
        out.append(Rule(f"{prefix}.{name}", sources, stacked(first.transform, n)))
    return out


def _shape_of(source: Mapping[str, object], key: str) -> Shape:
    shape_of = getattr(source, "shape_of", None)  # lazy mappings give shapes without reading
    return tuple(shape_of(key)) if shape_of else tuple(np.shape(source[key]))


def _check_unique(rules: Sequence[Rule]) -> None:
    seen_t, seen_s = set(), set()
    for r in rules:
        if r.target in seen_t:
            raise AssertionError(f"table writes target {r.target!r} twice")
        seen_t.add(r.target)
        for s in r.sources:
            if s in seen_s:
                raise AssertionError(f"table reads source {s!r} twice")
            seen_s.add(s)


def to_target(
    source: Mapping[str, object],
    rules: Sequence[Rule],
    target_shapes: Mapping[str, Shape],
    *,
    what: str = "conversion",
    dtype: np.dtype | None = None,
    on_leaf: Callable[[str, np.ndarray], None] | None = None,
) -> dict[str, np.ndarray]:
    """Applies ``rules`` to the source mapping; returns ``{target path: array}``.

    ``target_shapes`` are the shapes the model expects (from ``nnx.eval_shape``). Every problem
    (missing or unexpected source keys, source or target shapes, targets no rule fills or rules
    that fill no target) is collected first, before any tensor is read, and raised as one
    :class:`PortError`. ``dtype`` casts each leaf (the one place where dtype conversion happens);
    ``on_leaf`` lets a caller consume leaves one at a time instead of holding all of them.
    """
    _check_unique(rules)
    problems: list[str] = []
    wanted = {s for r in rules for s in r.sources}
    for key in sorted(set(source) - wanted):
        problems.append(f"unexpected source key {key!r} {_shape_of(source, key)}")
    ruled = {r.target for r in rules}
    for path in sorted(set(target_shapes) - ruled):
        problems.append(f"no rule fills model parameter {path!r} {tuple(target_shapes[path])}")
    for r in rules:
        if r.target not in target_shapes:
            problems.append(f"rule target {r.target!r} is not a model parameter ({r.sources})")
            continue
        expect = r.transform.source_shapes(tuple(target_shapes[r.target]))
        for key, shape in zip(r.sources, expect, strict=True):
            if key not in source:
                problems.append(f"missing source key {key!r} (expected shape {shape})")
            elif (got := _shape_of(source, key)) != tuple(shape):
                problems.append(
                    f"source key {key!r} has shape {got}, expected {tuple(shape)} "
                    f"(for {r.target!r} {tuple(target_shapes[r.target])})"
                )
    if problems:
        raise PortError(what, problems)

    out: dict[str, np.ndarray] = {}
    for r in rules:
        arr = np.asarray(r.transform.forward([np.asarray(source[k]) for k in r.sources]))
        if dtype is not None:
            arr = arr.astype(dtype, copy=False)
        if on_leaf is None:
            out[r.target] = arr
        else:
            on_leaf(r.target, arr)
    return out


def to_source(
    target: Mapping[str, np.ndarray], rules: Sequence[Rule], *, what: str = "export"
) -> dict[str, np.ndarray]:
    """The inverse of :func:`to_target`: ``{target path: array}`` -> ``{source key: array}``."""
    _check_unique(rules)
    ruled = {r.target for r in rules}
    problems = [f"model parameter {p!r} has no rule" for p in sorted(set(target) - ruled)]
    problems += [f"model lacks parameter {p!r}" for p in sorted(ruled - set(target))]
    if problems:
        raise PortError(what, problems)
    out: dict[str, np.ndarray] = {}
    for r in rules:
        parts = r.transform.inverse(np.asarray(target[r.target]))
        out.update(zip(r.sources, parts, strict=True))
    return out
