"""One attention op for the backward *and* the tangent pass (issue 17), CPU, float32.

Checks ``distill_jax.models.attention``'s ``"hijax"`` implementation, a
``jax.experimental.hijax.VJPHiPrimitive`` whose forward and backward are a fused kernel's (here
XLA's, standing in for cuDNN or splash) and whose tangent is the blockwise sweep (4-token tiles),
against ``jax.nn.dot_product_attention`` on tiny shapes (float32, 1e-5), and records which rule
each transformation ran (the op's methods are wrapped with counters):

- ``forward``: the value, no rule;
- ``jvp``: ``jax.jvp`` runs the tangent rule, not the backward;
- ``grad``: ``jax.grad`` runs the fused backward, never differentiates the tangent;
- ``grad_of_jvp_primal``: sCM's one-pass pattern, ``jax.grad`` of a loss of the JVP's primal
  with the tangent stop-gradiented: the tangent rule and the fused backward;
- ``grad_through_tangent``: ``jax.grad`` of a loss of the tangent too (second order): also
  differentiates the tangent (through the sweep);

each plain, under ``jax.jit``, ``jax.checkpoint`` (a remat policy; also with ``jax_remat3``)
and ``jax.lax.scan`` (scanned blocks), as the trainer's step composes them. Without the op's
second primitive (a tangent whose transpose is the fused backward), reverse mode through
``jax.checkpoint`` would transpose the blockwise sweep instead: checkpoint linearizes by JVP.

Prints one line per check and a final JSON line ``{"all_ok": ..., "checks": {name: "ok" |
error}, "rules": {name: [rules run]}}``.

    .venv/bin/python benchmarks/hijax_attention.py
"""

from __future__ import annotations

import collections
import functools
import json
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from distill_jax.models import attention as attention_module
from distill_jax.models.attention import Blockwise, Hijax

SHAPE = (2, 12, 2, 8)  # [B, T, H, K]
TOL = 1e-5
OP = Hijax("xla", Blockwise(4, 4))
CALLS = collections.Counter()  # rule -> times traced
RULES = {  # (class, method) -> what it means
    ("_Attention", "jvp"): "tangent rule",
    ("_Attention", "vjp_fwd"): "fused backward",
    ("_AttentionTangent", "transpose"): "fused backward",
    ("_AttentionTangent", "vjp_fwd"): "tangent differentiated",
    ("_AttentionTangent", "jvp"): "tangent differentiated",
}


def _count(rule, method):
    @functools.wraps(method)
    def counted(*args, **kwargs):
        CALLS[rule] += 1
        return method(*args, **kwargs)

    return counted


for (cls_name, name), rule in RULES.items():
    cls = getattr(attention_module, cls_name)
    setattr(cls, name, _count(rule, getattr(cls, name)))


def attention(q, k, v):
    return attention_module.attention(q, k, v, impl=OP)


def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def assert_close(actual, desired, what):
    for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(d), rtol=TOL, atol=TOL, err_msg=what)


# ---- the checks: each returns (value with the op, value with the reference) ------------------


def loss_of_jvp_primal(f, params, xs, dxs):
    """sCM's pattern: the JVP's primal is differentiated, its tangent is stop-gradiented."""
    out, d_out = jax.jvp(lambda *x: f(*(a * p for a, p in zip(x, params, strict=True))), xs, dxs)
    return jnp.sum(out * jax.lax.stop_gradient(d_out)) + jnp.sum(jnp.sin(out))


def loss_through_tangent(f, params, xs, dxs):
    out, d_out = jax.jvp(lambda *x: f(*(a * p for a, p in zip(x, params, strict=True))), xs, dxs)
    return jnp.sum(jnp.sin(out) * d_out)


def scanned(f):
    """``f`` applied twice as the body of a ``jax.lax.scan`` (scanned blocks)."""

    def g(q, k, v):
        def body(x, _):
            return f(x, k, v), None

        return jax.lax.scan(body, q, None, length=2)[0]

    return g


def rematted(f):
    return jax.checkpoint(f, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)


def remat3(check):
    """``check`` under jax.checkpoint with ``jax_remat3`` (the hijax rewrite of remat)."""

    def run(f, *args):
        previous = jax.config.jax_remat3
        jax.config.update("jax_remat3", True)
        try:
            return check(rematted(f), *args)
        finally:
            jax.config.update("jax_remat3", previous)

    return run


ALL_RULES = set(RULES.values())
# name -> (check, rules it must run, rules it must not run)
CHECKS = {
    "forward": (lambda f, xs, dxs, ps: f(*xs), set(), ALL_RULES),
    "jvp": (
        lambda f, xs, dxs, ps: jax.jvp(f, xs, dxs),
        {"tangent rule"},
        {"fused backward", "tangent differentiated"},
    ),
    "grad": (
        lambda f, xs, dxs, ps: jax.grad(lambda *x: jnp.sum(jnp.sin(f(*x))), (0, 1, 2))(*xs),
        {"fused backward"},
        {"tangent differentiated"},
    ),
    "grad_of_jvp_primal": (
        lambda f, xs, dxs, ps: jax.grad(lambda p: loss_of_jvp_primal(f, p, xs, dxs))(ps),
        {"tangent rule", "fused backward"},
        set(),
    ),
    "grad_through_tangent": (
        lambda f, xs, dxs, ps: jax.grad(lambda p: loss_through_tangent(f, p, xs, dxs))(ps),
        ALL_RULES,
        set(),
    ),
}
WRAPPERS = {
    "": lambda check: check,
    "jit/": lambda check: jax.jit(check, static_argnums=0),
    "checkpoint/": lambda check: lambda f, *a: check(rematted(f), *a),
    "checkpoint_remat3/": remat3,
    "scan/": lambda check: lambda f, *a: check(scanned(f), *a),
    "jit/scan/checkpoint/": lambda check: jax.jit(
        lambda f, *a: check(scanned(rematted(f)), *a), static_argnums=0
    ),
}


def run_check(name, wrapper, inputs) -> tuple[str, list[str]]:
    """("ok" or what went wrong, the rules the op ran)."""
    check, required, forbidden = CHECKS[name]
    run = WRAPPERS[wrapper](check)
    jax.clear_caches()  # every check traces afresh, so that CALLS sees every rule it runs
    CALLS.clear()
    rules = set()
    try:
        actual = run(attention, *inputs)
        rules = set(CALLS)
        desired = run(reference, *inputs)
        assert_close(actual, desired, wrapper + name)
        if not required <= rules or rules & forbidden:
            return f"must run {sorted(required)}, not {sorted(forbidden)}", sorted(rules)
        return "ok", sorted(rules)
    except Exception as e:  # noqa: BLE001 (the report is the point)
        traceback.print_exc()
        return f"{type(e).__name__}: {e}".strip()[:2000], sorted(rules)


def main():
    rng = np.random.default_rng(0)
    normal = lambda: jnp.asarray(rng.standard_normal(SHAPE, np.float32))  # noqa: E731
    xs, dxs = (normal(), normal(), normal()), (normal(), normal(), normal())
    ps = tuple(1.0 + 0.1 * normal() for _ in range(3))
    results, rules = {}, {}
    for wrapper in WRAPPERS:
        for name in CHECKS:
            key = wrapper + name
            results[key], rules[key] = run_check(name, wrapper, (xs, dxs, ps))
            print(f"{key:40s} {results[key].splitlines()[0]:8s} ran {rules[key]}")
    print(
        json.dumps(
            {
                "benchmark": "hijax_attention",
                "jax": jax.__version__,
                "shape_bthk": SHAPE,
                "tolerance": TOL,
                "all_ok": all(r == "ok" for r in results.values()),
                "checks": results,
                "rules": rules,
            }
        )
    )


if __name__ == "__main__":
    main()
