"""Streaming conversion at FLUX width: seconds, GB/s and peak memory against the checkpoint size.

Writes a synthetic diffusers transformer checkpoint (FLUX.1 width 3072 = 24 x 128, 3 double + 4
single blocks, bfloat16, about 3.3 GB in 1 GB shards plus an index) one tensor at a time, then runs
``distill-jax convert`` on it in a subprocess and reports the subprocess's wall time, GB/s and peak
resident memory (``os.wait4`` rusage) as a multiple of the checkpoint size, next to the same
process's resident memory after imports only. Target: peak RSS <= 1.2 x size + 1 GiB. The files
are deleted at the end unless ``--keep``.

    .venv/bin/python benchmarks/convert.py [--double 3] [--single 4] [--dtype bfloat16] [--dir /tmp]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from distill_jax.models.flux import FluxConfig  # noqa: E402
from distill_jax.port.flux import abstract_flux, diffusers_rules  # noqa: E402
from distill_jax.port.params import param_shapes  # noqa: E402
from distill_jax.port.safetensors_io import write_sharded  # noqa: E402

GIB = 1 << 30


def write_checkpoint(folder: Path, cfg: FluxConfig, dtype: np.dtype) -> tuple[int, int]:
    """A diffusers transformer folder of random weights; returns (bytes, tensors). Each tensor
    is cut from one random pool, so writing needs one tensor of memory and little compute."""
    shapes = param_shapes(abstract_flux(cfg))
    specs = [
        (key, dtype, tuple(shape))
        for r in diffusers_rules(cfg)
        for key, shape in zip(r.sources, r.transform.source_shapes(shapes[r.target]), strict=True)
    ]
    pool = (np.random.default_rng(0).standard_normal(1 << 24) * 0.02).astype(dtype)

    def tensors():
        for i, (key, _, shape) in enumerate(specs):
            yield key, np.resize(np.roll(pool, i), shape)

    folder.mkdir(parents=True)
    write_sharded(
        folder,
        "diffusion_pytorch_model",
        specs,
        tensors(),
        max_shard_bytes=GIB,
        metadata={"format": "pt"},
    )
    (folder / "config.json").write_text(json.dumps(cfg.to_diffusers()))
    size = sum(int(np.prod(s)) * dtype.itemsize for _, _, s in specs)
    return size, len(specs)


def run(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of a child process."""
    start = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv} failed with status {status}")
    return seconds, usage.ru_maxrss * 1024  # Linux reports KiB


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--double", type=int, default=3)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--dir", default=None, help="where to write (default: the temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the files")
    args = parser.parse_args()

    cfg = FluxConfig.flux1_dev().replace(num_double=args.double, num_single=args.single)
    work = Path(tempfile.mkdtemp(prefix="distill-jax-convert-", dir=args.dir))
    try:
        start = time.perf_counter()
        size, count = write_checkpoint(work / "src", cfg, np.dtype(jnp.dtype(args.dtype)))
        write_s = time.perf_counter() - start
        _, baseline = run([sys.executable, "-c", "import distill_jax.convert, distill_jax.cli"])
        seconds, peak = run(
            [
                sys.executable,
                "-m",
                "distill_jax.cli",
                "convert",
                str(work / "src"),
                str(work / "jax"),
                "--no-progress",
            ]
        )
        on_disk = sum(f.stat().st_size for f in (work / "jax").rglob("*") if f.is_file())
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    target = 1.2 * size + GIB
    print(
        json.dumps(
            {
                "benchmark": "convert",
                "checkpoint": f"FLUX width 3072, {args.double} double + {args.single} single "
                f"blocks, {args.dtype}, {count} tensors in 1 GB shards",
                "checkpoint_gb": round(size / 1e9, 3),
                "write_s": round(write_s, 1),
                "convert_s": round(seconds, 1),
                "gb_per_s": round(size / 1e9 / seconds, 3),
                "converted_gb_on_disk": round(on_disk / 1e9, 3),
                "peak_rss_gb": round(peak / 1e9, 3),
                "peak_rss_over_size": round(peak / size, 3),
                "import_only_rss_gb": round(baseline / 1e9, 3),
                "target_rss_gb": round(target / 1e9, 3),
                "within_target": peak <= target,
                "cpus": os.cpu_count(),
            }
        )
    )


if __name__ == "__main__":
    main()
