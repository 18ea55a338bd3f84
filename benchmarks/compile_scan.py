"""Compile time and program size of the sCM train step, scanned blocks vs unrolled (issue 17).

The real step of ``configs/scm.py`` (FLUX.1-lite-8B structure, bfloat16 compute, full per-block
remat, global batch 256 at 512 px, FSDP over every device) on 8 fake CPU devices, lowered from
abstract shapes (:func:`distill_jax.memory.lower_step`: nothing is allocated) and compiled with
``jax.jit(...).lower(...).compile()``, at depths 2 + 4 and 8 + 38 (the real model), with
``model.scan_layers`` on and off. Each case runs in its own process, stopped when its resident
memory passes ``--max-rss-gb`` or it runs past ``--timeout-s`` (then its figures say so). Per
case: lowering and compile seconds, the StableHLO and the compiled HLO text sizes, XLA's memory
per device (arguments, outputs, temporaries), its FLOPs per device (XLA's count, which sees a
scan's body once, and every block counted), and the process's peak resident memory. Prints one
line per case, then a JSON object.

    .venv/bin/python benchmarks/compile_scan.py [--depths 2+4,8+38] [--layouts scanned,unrolled]
        [--max-rss-gb 16] [--timeout-s 1800]
"""

from __future__ import annotations

import os

# Before JAX is imported anywhere: 8 CPU devices stand in for the accelerators.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

GIB = 1 << 30
ROOT = Path(__file__).resolve().parent.parent


def measure(num_double: int, num_single: int, scan: bool) -> dict:
    """Lowers and compiles one case in this process; returns its figures."""
    import jax

    from distill_jax.config import load_config
    from distill_jax.memory import abstract_inputs, abstract_teacher, lower_step
    from distill_jax.train import mesh_and_rules, unrolled_flops

    config = load_config(
        str(ROOT / "configs/scm.py"),
        [f"--config.model.scan_layers={scan}"],
    )
    config.model.overrides = {
        **dict(config.model.overrides),
        "num_double": num_double,
        "num_single": num_single,
    }
    assert len(jax.devices()) == 8, jax.devices()
    start = time.perf_counter()
    lowered = lower_step(config)
    lower_s = time.perf_counter() - start
    stablehlo_chars = len(lowered.as_text())
    start = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    teacher_cfg = abstract_teacher(config, *mesh_and_rules(config))[0]
    return {
        "lower_s": round(lower_s, 1),
        "compile_s": round(compile_s, 1),
        "stablehlo_chars": stablehlo_chars,
        "hlo_chars": len(compiled.as_text()),
        "argument_gib": round(mem.argument_size_in_bytes / GIB, 3),
        "output_gib": round(mem.output_size_in_bytes / GIB, 3),
        "alias_gib": round(mem.alias_size_in_bytes / GIB, 3),
        "temp_gib": round(mem.temp_size_in_bytes / GIB, 3),
        # XLA's count: a scan's body is counted once, so scanned programs under-report.
        "xla_flops_per_device": float(cost.get("flops", 0.0)) if cost else None,
        # Every block counted (lowered unrolled at depths 1-2, extrapolated): what the trainer
        # reports for scanned models.
        "unrolled_flops_per_device": unrolled_flops(
            config, teacher_cfg, *abstract_inputs(config, teacher_cfg)
        ),
    }


def _rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def run_case(num_double: int, num_single: int, scan: bool, max_rss: int, timeout: float) -> dict:
    """One case in a child process, watched: stopped past ``max_rss`` bytes or ``timeout`` s."""
    args = [sys.executable, __file__, "--one", f"{num_double}+{num_single}", f"--scan={scan}"]
    child = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    start, peak, stopped = time.perf_counter(), 0, None
    while child.poll() is None:
        peak = max(peak, _rss_bytes(child.pid))
        elapsed = time.perf_counter() - start
        if peak > max_rss or elapsed > timeout:
            stopped = "memory" if peak > max_rss else "timeout"
            child.kill()
            child.wait()
            break
        time.sleep(0.5)
    out = {"peak_rss_gib": round(peak / GIB, 2), "wall_s": round(time.perf_counter() - start, 1)}
    if stopped:
        return {**out, "stopped": f"{stopped} (limits {max_rss / GIB:.0f} GiB, {timeout:.0f} s)"}
    lines = child.stdout.read().strip().splitlines()
    if child.returncode != 0 or not lines:
        return {**out, "stopped": f"exit code {child.returncode}"}
    return {**json.loads(lines[-1]), **out}


def cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depths", default="2+4,8+38", help="double+single, comma-separated")
    parser.add_argument("--layouts", default="scanned,unrolled", help="either or both")
    parser.add_argument("--max-rss-gb", type=float, default=16.0)
    parser.add_argument("--timeout-s", type=float, default=1800.0)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one case
    parser.add_argument("--scan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        d, s = map(int, args.one.split("+"))
        print(json.dumps(measure(d, s, args.scan == "True")))
        return
    results = {}
    for depth in args.depths.split(","):
        d, s = map(int, depth.split("+"))
        for layout in args.layouts.split(","):
            scan, name = layout == "scanned", f"{depth} {layout}"
            results[name] = run_case(d, s, scan, args.max_rss_gb * GIB, args.timeout_s)
            print(name, results[name], flush=True)
    ratios = {}
    for depth in args.depths.split(","):
        a, b = results.get(f"{depth} scanned", {}), results.get(f"{depth} unrolled", {})
        if "compile_s" in a and "compile_s" in b:
            ratios[depth] = {
                "compile_time": round(b["compile_s"] / a["compile_s"], 2),
                "hlo_size": round(b["hlo_chars"] / a["hlo_chars"], 2),
            }
    print(
        json.dumps(
            {
                "benchmark": "compile_scan",
                "cpu": cpu_model(),
                "cpu_count": os.cpu_count(),
                "config": "configs/scm.py (FLUX.1-lite-8B width, bf16, remat full, batch 256 at "
                "512 px), 8 fake CPU devices, FSDP 8",
                "results": results,
                "unrolled_over_scanned": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
