"""Temporary memory of the JVP through one FLUX.1-dev double block, per attention implementation.

The sCM / MeanFlow tangent pass is ``jax.jvp`` through the student. This compiles (never runs)
the JVP of one full-width double block (D = 3072 = 24 heads x 128) at 1024^2 resolution:
T = 4,608 tokens (L = 4,096 image + S = 512 text), batch 1, bfloat16 weights and activations,
with tangents on the image stream, the text stream and the conditioning vector. The block is
built with ``nnx.eval_shape`` and lowered with ``jax.ShapeDtypeStruct`` inputs, so nothing is
allocated; figures are XLA's ``memory_analysis().temp_size_in_bytes`` for the compiling backend
(CPU by default, no accelerator needed; GPU and TPU compilers fuse differently, so their figures
differ). ``attention_only_jvp_temp_gb`` is the same for the JVP of the attention call alone. For
scale, one [1, 24, 4608, 4608] score matrix is 1.02 GB in bfloat16 and 2.04 GB in float32.

``"none"`` is the block with its attention replaced by ``v`` (no attention at all): the floor
that no attention kernel can go below, the memory of the rest of the block. On CPU it is large in
bfloat16, because XLA's CPU compiler computes bfloat16 dots in float32 on float32 copies of the
weights (compare ``forward_temp_gb`` with ``--dtype float32``); accelerators do not.
``attention_added_fraction_of_plain`` is what each attention adds to that floor, over plain's
total: the tangent pass's attention memory (issue 17: <= 10%).
``timing`` gives median wall seconds of the jitted JVP and gradient of attention alone, float32,
at a size the running machine can execute (``--time-shape``).

    .venv/bin/python benchmarks/jvp_attention_memory.py [--tokens 4096 512] [--dtype float32]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from distill_jax.models.attention import Blockwise, attention  # noqa: E402
from distill_jax.models.flux import DoubleBlock, FluxConfig  # noqa: E402

GB = 1e9
TIME_SHAPE = (2, 1152, 8, 64)  # the attention of benchmarks/remat.py's mid-size FLUX
IMPLS = {
    "none": "none",  # no attention: the block's other memory
    "plain": "plain",
    "xla": "xla",
    "blockwise": "blockwise",  # Blockwise(512, 512)
    "blockwise_q256_kv256": Blockwise(256, 256),
    "blockwise_q1024_kv1024": Blockwise(1024, 1024),
    "blockwise_qall_kv512": Blockwise(1 << 30, 512),  # every query at once, no outer loop
}


def jvp_memory(
    impl, cfg: FluxConfig, n_img: int, n_txt: int, batch: int, dtype=jnp.bfloat16
) -> dict[str, float]:
    """Compiled temp / argument / output bytes (GB) of the block's forward and its JVP."""
    bf16 = dtype
    no_attention = impl == "none"
    block = nnx.eval_shape(
        lambda: DoubleBlock(
            cfg,
            rngs=nnx.Rngs(0),
            dtype=bf16,
            param_dtype=bf16,
            attn_impl="plain" if no_attention else impl,
        )
    )
    graphdef, state = nnx.split(block)
    d, t = cfg.hidden, n_img + n_txt
    img = jax.ShapeDtypeStruct((batch, n_img, d), bf16)
    txt = jax.ShapeDtypeStruct((batch, n_txt, d), bf16)
    vec = jax.ShapeDtypeStruct((batch, d), bf16)
    rope = jax.ShapeDtypeStruct((1, t, cfg.head_dim // 2), jnp.float32)

    def forward(state, img, txt, vec, cos, sin):
        return nnx.merge(graphdef, state)(img, txt, vec, cos, sin)

    def tangent(state, img, txt, vec, cos, sin, d_img, d_txt, d_vec):
        def f(i, x, v):
            return forward(state, i, x, v, cos, sin)

        return jax.jvp(f, (img, txt, vec), (d_img, d_txt, d_vec))

    out = {}
    for name, fn, args in (
        ("forward", forward, (state, img, txt, vec, rope, rope)),
        ("jvp", tangent, (state, img, txt, vec, rope, rope, img, txt, vec)),
    ):
        start = time.perf_counter()
        with (
            mock.patch("distill_jax.models.flux.attention", lambda q, k, v, impl: v)
            if no_attention
            else contextlib.nullcontext()
        ):
            mem = jax.jit(fn).lower(*args).compile().memory_analysis()
        out[f"{name}_temp_gb"] = round(mem.temp_size_in_bytes / GB, 3)
        out[f"{name}_compile_s"] = round(time.perf_counter() - start, 1)
        if name == "jvp":
            out["jvp_args_gb"] = round(mem.argument_size_in_bytes / GB, 3)
            out["jvp_output_gb"] = round(mem.output_size_in_bytes / GB, 3)
    return out


def attention_jvp_memory(impl, cfg: FluxConfig, t: int, batch: int, dtype=jnp.bfloat16) -> float:
    """Compiled temp bytes (GB) of the JVP of the attention call alone, ``[B, T, H, K]``."""
    if impl == "none":
        return 0.0
    x = jax.ShapeDtypeStruct((batch, t, cfg.num_heads, cfg.head_dim), dtype)

    def tangent(q, k, v):
        return jax.jvp(lambda *a: attention(*a, impl=impl), (q, k, v), (q, k, v))

    mem = jax.jit(tangent).lower(x, x, x).compile().memory_analysis()
    return round(mem.temp_size_in_bytes / GB, 3)


def attention_times(impl, shape: tuple[int, ...], repeats: int) -> dict[str, float]:
    """Median seconds of the jitted JVP and gradient of attention alone on random float32 inputs."""
    rng = np.random.default_rng(0)
    q, k, v, dq, dk, dv = (jnp.asarray(rng.standard_normal(shape), jnp.float32) for _ in range(6))

    def f(*a):
        return attention(*a, impl=impl)

    jvp = jax.jit(lambda *a: jax.jvp(f, a[:3], a[3:]))
    grad = jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2)))
    out = {}
    for name, fn, args in (("jvp", jvp, (q, k, v, dq, dk, dv)), ("grad", grad, (q, k, v))):
        jax.block_until_ready(fn(*args))  # compile
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - start)
        out[f"{name}_median_s"] = round(statistics.median(times), 3)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs=2, default=(4096, 512), metavar=("L", "S"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    parser.add_argument(
        "--time-shape", type=int, nargs=4, default=TIME_SHAPE, metavar=("B", "T", "H", "K")
    )
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cfg = FluxConfig.flux1_dev()
    n_img, n_txt = args.tokens
    dtype = jnp.dtype(args.dtype)

    results = {}
    for name in tqdm(args.impls, desc="compile", unit="impl"):
        results[name] = jvp_memory(IMPLS[name], cfg, n_img, n_txt, args.batch, dtype)
        results[name]["attention_only_jvp_temp_gb"] = attention_jvp_memory(
            IMPLS[name], cfg, n_img + n_txt, args.batch, dtype
        )
        tqdm.write(f"{name}: {results[name]}")
    summary = {
        "benchmark": "jvp_attention_memory",
        "backend": jax.default_backend(),
        "config": (
            f"FLUX.1-dev double block, D={cfg.hidden} ({cfg.num_heads}x{cfg.head_dim}), "
            f"T={n_img + n_txt} ({n_img} image + {n_txt} text), batch {args.batch}, {args.dtype}"
        ),
        "results": results,
    }
    shape = tuple(args.time_shape)
    summary["timing_shape_bthk_float32"] = list(shape)
    summary["timing"] = {
        name: attention_times(IMPLS[name], shape, args.repeats)
        for name in tqdm(args.impls, desc="time", unit="impl")
        if name != "none"
    }
    if "plain" in results:
        plain = results["plain"]["jvp_temp_gb"]
        summary["jvp_temp_fraction_of_plain"] = {
            name: round(r["jvp_temp_gb"] / plain, 3) for name, r in results.items()
        }
        plain_alone = results["plain"]["attention_only_jvp_temp_gb"]
        summary["attention_only_fraction_of_plain"] = {
            name: round(r["attention_only_jvp_temp_gb"] / plain_alone, 3)
            for name, r in results.items()
        }
        if "none" in results:
            floor = results["none"]["jvp_temp_gb"]
            summary["attention_added_fraction_of_plain"] = {
                name: round((r["jvp_temp_gb"] - floor) / plain, 3) for name, r in results.items()
            }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
