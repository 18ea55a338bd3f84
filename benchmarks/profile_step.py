"""Where the time of one sCM training step goes on CPU (issue 17): XLA's own per-op profile.

The trainer's jitted step (``distill_jax.train.make_step``, state donated) on the mid-size MMDiT
of benchmarks/losses.py (width 512, 2 + 4 blocks, 1024 image + 128 text tokens, batch 2,
float32), traced with ``jax.profiler`` for ``--steps`` steps after one warm step. The CPU runtime
records one event per executed HLO op (thunk); each op's *self* time (its own, minus the ops it
runs inside it: a scan's body under its while loop) is attributed by the op's metadata, which the
code names with ``jax.named_scope``:

- network: ``teacher``, ``tangent`` (the JVP pass of a separate tangent graphdef), ``student``
  forward and ``student backward`` (ops under ``transpose(...)``), ``optimizer`` (clip, AdamW,
  EMA, the non-finite guard), ``loss`` (the rest);
- kind: ``attention`` (every op inside :func:`distill_jax.models.attention.attention`), ``norm``
  (layer and RMS norms), ``matmul`` (dots, convolutions and fusions around one), ``other``.

``idle_s`` is the traced step's wall time during which no op ran: dispatch, argument handling,
the host-device transfer of the metrics, and the profiler's own cost per recorded op (large for
the blockwise sweep's many small ops: compare ``wall_s_per_step`` with the untraced
``untraced_wall_s_per_step``). Independent ops may run at once on several cores, so the
ops' summed self time can exceed the wall time; shares are of that sum. Prints the tables and,
as a final JSON line, seconds per step by network, by kind and by both, and the ten costliest
ops.

    .venv/bin/python benchmarks/profile_step.py [--method scm] [--steps 3]
        [--attn-impl auto|xla] [--jvp-attn-impl blockwise|xla]
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
from common import median_seconds  # noqa: E402
from losses import DESCRIPTION, add_attn_flags  # noqa: E402
from train_step import compiled_step  # noqa: E402

# `%name = type opcode(...` ... `metadata={op_name="..."` in XLA's HLO text.
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?\b([\w\-]+)\((.*)$")
OP_NAME = re.compile(r'op_name="([^"]*)"')
MATMUL_OPCODES = ("dot", "convolution", "custom-call")
NETWORKS = ("teacher", "tangent", "student", "student backward", "optimizer", "loss")
KINDS = ("attention", "norm", "matmul", "other")


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str, bool]]:
    """``{instruction: (opcode, op_name, contains a dot)}`` for every instruction of the module
    (a fusion counts as a matmul when its fused computation holds a dot)."""
    ops, computation, dots = {}, None, set()
    calls = {}
    for line in hlo_text.splitlines():
        if line and not line[0].isspace() and "{" in line:  # a computation's header
            computation = line.split()[1 if line.startswith("ENTRY") else 0].lstrip("%")
            continue
        match = INSTRUCTION.match(line)
        if not match:
            continue
        name, opcode, rest = match.groups()
        op_name = OP_NAME.search(rest)
        ops[name] = (opcode, op_name.group(1) if op_name else "", False)
        if opcode in ("dot", "convolution"):
            dots.add(computation)
        called = re.search(r"calls=%?([\w.\-]+)", rest)
        if opcode == "fusion" and called:
            calls[name] = called.group(1)
    return {
        name: (opcode, op_name, opcode in MATMUL_OPCODES or calls.get(name) in dots)
        for name, (opcode, op_name, _) in ops.items()
    }


def network(op_name: str) -> str:
    parts = op_name.split("/")
    if any(p == "optimizer" for p in parts):
        return "optimizer"
    for role in ("teacher", "tangent", "student"):
        hits = [p for p in parts if re.fullmatch(rf"(\w+\()*{role}\)*", p)]
        if hits:
            backward = "transpose(" in op_name
            return f"{role} backward" if backward and role == "student" else role
    return "loss"


def kind(op_name: str, has_dot: bool) -> str:
    parts = op_name.split("/")
    if "attention" in parts:
        return "attention"
    if "norm" in parts:
        return "norm"
    return "matmul" if has_dot else "other"


def self_times(events: list[dict]) -> list[tuple[str, float]]:
    """``(hlo_op, self seconds)`` of the profile's op events, nested ones subtracted."""
    out = []
    by_thread = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and "hlo_op" in e.get("args", {}):
            by_thread[e["tid"]].append(e)
    for evs in by_thread.values():
        evs.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[list] = []  # [end, name, self]
        for e in evs:
            while stack and stack[-1][0] <= e["ts"]:
                _, name, own = stack.pop()
                out.append((name, own))
            if stack:
                stack[-1][2] -= e["dur"]
            stack.append([e["ts"] + e["dur"], e["args"]["hlo_op"], e["dur"]])
        out.extend((name, own) for _, name, own in stack)
    return [(name, own * 1e-6) for name, own in out]  # microseconds -> seconds


def busy_seconds(events: list[dict]) -> float:
    """Seconds during which at least one op ran (the union of the op events' intervals)."""
    spans = sorted(
        (e["ts"], e["ts"] + e["dur"])
        for e in events
        if e.get("ph") == "X" and "hlo_op" in e.get("args", {})
    )
    busy, end = 0.0, float("-inf")
    for lo, hi in spans:
        if hi > end:
            busy += hi - max(lo, end)
            end = hi
    return busy * 1e-6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("scm", "meanflow", "flow_matching"), default="scm")
    parser.add_argument("--steps", type=int, default=3)
    add_attn_flags(parser)
    args = parser.parse_args()

    step = compiled_step(args.method, jvp_attn_impl=args.jvp_attn_impl, attn_impl=args.attn_impl)
    ops = hlo_ops(step.hlo_text)
    step.run()  # warm
    untraced = median_seconds(step.run, args.steps)  # the profiler's events cost time of their own
    with tempfile.TemporaryDirectory() as trace_dir:
        start = time.perf_counter()
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            for _ in range(args.steps):
                step.run()
        wall = (time.perf_counter() - start) / args.steps
        (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace

    table = collections.defaultdict(float)
    per_op = collections.defaultdict(float)
    unknown = 0.0
    for name, seconds in self_times(events):
        seconds /= args.steps
        if name not in ops:
            unknown += seconds
            continue
        opcode, op_name, has_dot = ops[name]
        table[network(op_name), kind(op_name, has_dot)] += seconds
        per_op[name] += seconds
    ops_s = sum(table.values()) + unknown

    def total(index, key):
        return round(sum(s for k, s in table.items() if k[index] == key), 4)

    by_network = {n: total(0, n) for n in NETWORKS}
    by_kind = {k: total(1, k) for k in KINDS}
    both = {f"{n}/{k}": round(s, 4) for (n, k), s in sorted(table.items(), key=lambda x: -x[1])}
    top = [
        {
            "op": name,
            "opcode": ops[name][0],
            "seconds": round(s, 4),
            "op_name": ops[name][1][-160:],
        }
        for name, s in sorted(per_op.items(), key=lambda x: -x[1])[:10]
    ]
    idle = wall - busy_seconds(events) / args.steps
    print(f"{args.method} step, {DESCRIPTION}: {untraced:.3f} s untraced")
    print(f"  traced: {wall:.3f} s wall, {idle:.3f} s of it with no op running")
    print(f"  ops' self time summed over threads: {ops_s:.3f} s")
    for title, rows in (("network", by_network), ("kind", by_kind), ("network/kind", both)):
        print(f"  by {title}:")
        for key, s in rows.items():
            print(f"    {key:32s} {s:8.3f} s  {100 * s / ops_s:5.1f}%")
    print(
        json.dumps(
            {
                "benchmark": "profile_step",
                "device": jax.devices()[0].device_kind,
                "config": DESCRIPTION,
                "method": args.method,
                "attn_impl": args.attn_impl,
                "jvp_attn_impl": args.jvp_attn_impl,
                "steps": args.steps,
                "untraced_wall_s_per_step": round(untraced, 3),
                "wall_s_per_step": round(wall, 3),
                "ops_s_per_step": round(ops_s, 3),
                "idle_s": round(idle, 3),
                "unattributed_ops_s": round(unknown, 4),
                "by_network_s": by_network,
                "by_kind_s": by_kind,
                "by_network_and_kind_s": both,
                "top_ops": top,
            }
        )
    )


if __name__ == "__main__":
    main()
