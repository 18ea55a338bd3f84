"""Memory and time of a FLUX training step (value and gradient) per block remat policy.

Mid-size config (the one of benchmarks/flux_forward.py): width 512 (8 heads x 64), 2 double +
4 single blocks, 1024 image + 128 text tokens, batch 2, float32, XLA attention. For each policy
of ``distill_jax.models.flux.REMAT_POLICIES``, for ``jax.value_and_grad`` of a squared-error loss
over all parameters:

- ``residuals_mb``: what autodiff keeps from the forward for the backward (the leaves of
  ``jax.vjp``'s closure, under ``jax.eval_shape``; parameters included). This is what a remat
  policy controls, and it does not depend on the backend's scheduler.
- ``temp_mb``: XLA's compiled temporary memory of the step on the running backend.
- ``median_step_s``: median wall time of the compiled step.

    .venv/bin/python benchmarks/remat.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from common import flux_inputs  # noqa: E402
from flax import nnx
from tqdm import tqdm

from distill_jax.models.flux import REMAT_POLICIES, Flux, FluxConfig  # noqa: E402

CFG = FluxConfig.mid()
BATCH, GRID, TEXT = 2, (32, 32), 128
MB = 1e6


def nbytes(tree) -> int:
    return sum(math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def measure(policy: str, x: dict, target: np.ndarray, repeats: int) -> dict[str, float]:
    graphdef, params, rest = nnx.split(Flux(CFG, rngs=nnx.Rngs(0), remat=policy), nnx.Param, ...)

    def loss(p, x, target):
        return jnp.mean(jnp.square(nnx.merge(graphdef, p, rest)(**x) - target))

    residuals = jax.eval_shape(lambda p: jax.vjp(lambda p: loss(p, x, target), p)[1], params)

    @jax.jit
    def step(params, x, target):
        return jax.value_and_grad(loss)(params, x, target)

    start = time.perf_counter()
    compiled = step.lower(params, x, target).compile()
    compile_s = time.perf_counter() - start
    mem = compiled.memory_analysis()
    jax.block_until_ready(compiled(params, x, target))  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(params, x, target))
        times.append(time.perf_counter() - start)
    return {
        "residuals_mb": round(nbytes(residuals) / MB, 1),
        "temp_mb": round(mem.temp_size_in_bytes / MB, 1),
        "median_step_s": round(statistics.median(times), 3),
        "compile_s": round(compile_s, 1),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    x = jax.device_put(flux_inputs(CFG, BATCH, GRID, TEXT, rng))
    target = jnp.asarray(rng.standard_normal((BATCH, GRID[0] * GRID[1], CFG.out), np.float32))

    results = {}
    for policy in tqdm(REMAT_POLICIES, desc="remat", unit="policy"):
        results[policy] = measure(policy, x, target, args.repeats)
        tqdm.write(f"{policy}: {results[policy]}")
    base = results["none"]
    params = nnx.state(nnx.eval_shape(lambda: Flux(CFG, rngs=nnx.Rngs(0))), nnx.Param)
    print(
        json.dumps(
            {
                "benchmark": "remat",
                "device": jax.devices()[0].device_kind,
                "config": "width 512 (8x64), 2 double + 4 single, 1024+128 tokens, batch 2, "
                "float32, value_and_grad of all parameters",
                "params_mb": round(nbytes(params) / MB, 1),
                "results": results,
                "relative_to_none": {
                    p: {
                        "residuals": round(r["residuals_mb"] / base["residuals_mb"], 3),
                        "temp": round(r["temp_mb"] / base["temp_mb"], 3),
                        "step_time": round(r["median_step_s"] / base["median_step_s"], 3),
                    }
                    for p, r in results.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
