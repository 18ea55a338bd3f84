"""Throughput of the sCM and MeanFlow training steps, with and without remat (issue 6), CPU.

The trainer's whole step, ``distill_jax.train.make_step`` (loss and gradient, global-norm clip,
AdamW, the non-finite guard), jitted with the state donated, on the mid-size MMDiT of
benchmarks/losses.py (width 512, 2 + 4 blocks, 1024 image + 128 text tokens, batch 2, float32),
for per-block rematerialization ``"none"`` and ``"full"``. Prints steps per second, tokens per
second (image + text tokens of the batch, ``TOKENS`` per step), what autodiff keeps for the
backward (``residuals_mb``, the quantity remat controls; as in benchmarks/remat.py) and XLA's
temporary memory of the step, as a final JSON line.

    .venv/bin/python benchmarks/train_step.py [--repeats 2] [--attn-impl auto|xla]
        [--jvp-attn-impl blockwise|xla]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable

import jax
from common import median_seconds  # noqa: E402
from losses import (  # noqa: E402
    DESCRIPTION,
    TOKENS,
    add_attn_flags,
    batch_and_aux,
    mid_config,
    models,
)

from distill_jax.train import make_init_fn, make_optimizer, make_step  # noqa: E402


@dataclasses.dataclass
class CompiledStep:
    run: Callable[[], None]  # advances a donated train state by one step
    compile_s: float
    temp_bytes: int  # XLA's temporary memory of the step (scheduler-dependent on CPU)
    residual_bytes: int  # what autodiff keeps for the backward (parameters included)
    hlo_text: str  # the compiled program (benchmarks/profile_step.py reads its op names)


def compiled_step(
    method: str,
    remat: str = "none",
    jvp_attn_impl: str | None = None,
    attn_impl: str | None = None,
) -> CompiledStep:
    """The trainer's jitted step of ``method`` on the mid-size model, ready to run."""
    config = mid_config(method, remat, jvp_attn_impl, attn_impl)
    m = models(config)
    teacher_params = m.teacher_params
    tx, schedule = make_optimizer(config.optim, config.total_steps)
    loss_fn = m.loss_fn(config)
    step_fn = make_step(config, loss_fn, tx, schedule)
    key = jax.random.key(0)
    # Jitted, as the trainer does: eagerly, the student's copies of the teacher's parameters
    # would share the teacher's buffers, which the donated step must not consume.
    state = jax.jit(make_init_fn(config, m.student_cfg, tx, {}))(teacher_params, key)
    batch, aux = jax.device_put(batch_and_aux())
    residuals = jax.eval_shape(
        lambda p: jax.vjp(lambda q: loss_fn(q, teacher_params, batch, aux, key, 0)[0], p)[1],
        state["params"],
    )
    start = time.perf_counter()
    compiled = (
        jax.jit(step_fn, donate_argnums=(0,))
        .lower(state, teacher_params, batch, aux, key)
        .compile()
    )
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], teacher_params, batch, aux, key)
        jax.block_until_ready(metrics)

    return CompiledStep(
        run,
        compile_s,
        getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0),
        sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(residuals)),
        compiled.as_text(),
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    add_attn_flags(parser)
    args = parser.parse_args()
    results = {}
    for method in ("scm", "meanflow"):
        for remat in ("none", "full"):
            step = compiled_step(method, remat, args.jvp_attn_impl, args.attn_impl)
            seconds = median_seconds(step.run, args.repeats, f"{method} remat={remat}")
            results[f"{method}/remat_{remat}"] = {
                "median_s": round(seconds, 3),
                "steps_per_s": round(1.0 / seconds, 4),
                "tokens_per_s": round(TOKENS / seconds, 1),
                "residuals_mb": round(step.residual_bytes / 1e6, 1),
                "temp_mb": round(step.temp_bytes / 1e6, 1),
                "compile_s": round(step.compile_s, 1),
            }
    print(
        json.dumps(
            {
                "benchmark": "train_step",
                "device": jax.devices()[0].device_kind,
                "config": DESCRIPTION,
                "tokens_per_step": TOKENS,
                "attn_impl": args.attn_impl,
                "jvp_attn_impl": args.jvp_attn_impl,
                "repeats": args.repeats,
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()
