"""One process x 4 devices against two processes x 2 devices: the sCM runlocal step, CPU.

Runs ``distill-jax train --config configs/scm.py:runlocal`` as a user would, once as one process
with 4 fake CPU devices and once as two processes with 2 each, joined by jax.distributed through
an explicit coordinator on localhost (gloo collectives; ``distill_jax.distributed.launch_local``).
Both runs use the same mesh (data=4) and global batch. Reports, per topology, the time from
launch to the first step (interpreter start, imports, the distributed runtime, model init,
compilation: read from process 0's "step compiled" log line) and the steady-state steps per
second (the trainer's own ``perf/steps_per_second`` over the last ``--steps // 2`` steps), the
median of ``--repeats`` runs taken alternately. No compilation cache. Final line: JSON.

    .venv/bin/python benchmarks/multihost.py [--steps 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import ast
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

from distill_jax import distributed  # noqa: E402

# Process 0's log line, possibly behind a progress bar's carriage returns.
COMPILED = re.compile(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) p0/\d+ INFO \S+: step compiled")


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(
            line.split(":", 1)[1].strip() for line in out.splitlines() if "Model name" in line
        )
    except (OSError, StopIteration):
        return platform.processor()


def _when(stamp: str) -> float:
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def run(topology: str, steps: int, workdir: Path) -> dict:
    """One training run; returns launch -> first step seconds and steady steps per second."""
    command = [
        sys.executable,
        "-m",
        "distill_jax.cli",
        "train",
        "--config",
        f"{REPO}/configs/scm.py:runlocal",
        "--workdir",
        str(workdir),
        f"--config.total_steps={steps}",
        f"--config.log_every={steps // 2}",
        f"--config.checkpoint_every={10 * steps}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    logs = workdir / "logs"
    start = time.time()
    if topology == "1x4":
        logs.mkdir(parents=True)
        with open(logs / "process_0.log", "w") as out:
            flags = "--xla_force_host_platform_device_count=4"
            code = subprocess.run(
                command,
                env=env | {"JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags},
                stdout=out,
                stderr=subprocess.STDOUT,
            ).returncode
        codes = [code]
    else:
        codes = distributed.launch_local(command, 2, 2, env=env, log_dir=str(logs))
    text = (logs / "process_0.log").read_text()
    if any(codes):
        raise RuntimeError(f"{topology}: exit codes {codes}\n{text[-3000:]}")
    compiled = COMPILED.search(text).group(1)
    summary = next(line for line in text.splitlines() if f"step {steps}: " in line)
    metrics = ast.literal_eval(summary.split(f"step {steps}: ", 1)[1])
    return {
        "first_step_s": _when(compiled) - start,
        "steps_per_second": metrics["perf/steps_per_second"],
        "wall_s": time.time() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[dict]] = {"1x4": [], "2x2": []}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for topology in results:
                out = run(topology, args.steps, Path(tmp) / f"{topology}-{r}")
                results[topology].append(out)
                print(topology, r, json.dumps(out), flush=True)
    summary = {
        "benchmark": "multihost",
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "steps": args.steps,
        "repeats": args.repeats,
    }
    for topology, runs in results.items():
        summary[f"{topology}_first_step_s"] = statistics.median(r["first_step_s"] for r in runs)
        summary[f"{topology}_steps_per_second"] = statistics.median(
            r["steps_per_second"] for r in runs
        )
    summary["2x2_over_1x4_steps_per_second"] = (
        summary["2x2_steps_per_second"] / summary["1x4_steps_per_second"]
    )
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
