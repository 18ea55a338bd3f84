"""Step time and model-FLOPs utilisation of the trainer's sCM and flow-matching steps at FLUX
width (issue 17), on whatever devices JAX sees.

The configs of a real run (``configs/scm.py``, ``configs/flow_matching.py``: FLUX.1-lite-8B width
3072, bfloat16 compute, full per-block remat, FSDP over every device) with the depth reduced to
``--double`` + ``--single`` blocks (so one accelerator holds the state: float32 masters, AdamW
and EMA), on synthetic 512 px latents (``--latent`` 64 x 64 x 16, 256 text tokens) and a random
teacher. The trainer's own pieces build and place everything (``load_teacher``, ``make_setup``,
``make_input``), as ``distill-jax train`` does; the jitted step is timed over ``--steps`` steps
after ``--warmup``. FLOPs per device per step are the model's, from XLA's cost analysis with
every block and attention counted (``distill_jax.train.unrolled_flops``: the figure behind the
trainer's ``perf/tflops_per_device``; a fused kernel's custom call would count as nothing), MFU
is achieved FLOP/s over the device's dense bfloat16 peak (``distill_jax.metrics.PEAK_TFLOPS``,
or ``--peak-tflops``); on CPU there is no peak and MFU is left out. Prints a final JSON line.

    .venv/bin/python benchmarks/train_mfu.py [--double 2 --single 4] [--batch 8]
        [--attn-impl hijax --jvp-attn-impl hijax]  # one attention op, one student graphdef
    .venv/bin/python benchmarks/train_mfu.py --preset mid --latent 16 --batch 2 \
        --dtype float32 --remat none  # a CPU try
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time

import jax
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax.metrics import peak_tflops
from distill_jax.sharding import axis_rules
from distill_jax.train import (
    BATCH_AXES,
    _flops,
    batch_placer,
    host_rows,
    load_teacher,
    make_input,
    make_setup,
    mesh_and_rules,
)

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def config_of(method: str, args):
    spec = importlib.util.spec_from_file_location(method, os.path.join(CONFIGS, f"{method}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.model.preset = args.preset
    c.model.overrides = {
        **c.model.overrides,
        "num_double": args.double,
        "num_single": args.single,
        "scan_layers": False,
    }
    c.model.dtype, c.model.remat = args.dtype, args.remat
    c.model.attn_impl = args.attn_impl or c.model.attn_impl
    c.model.jvp_attn_impl = args.jvp_attn_impl or c.model.jvp_attn_impl
    c.data.kind, c.data.batch_size = "synthetic", args.batch
    c.data.latent_grid, c.data.latent_channels = (args.latent, args.latent), 16
    c.data.synthetic_size = args.batch
    return c


def measure(method: str, args) -> dict:
    config = config_of(method, args)
    mesh, rules = mesh_and_rules(config)
    teacher_cfg, teacher_params = load_teacher(config, mesh, rules)
    setup = make_setup(config, mesh, rules, teacher_cfg, teacher_params)
    batch_sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    replicated = NamedSharding(mesh, PartitionSpec())
    rows = host_rows(batch_sh, config.data.batch_size)
    data, aux = make_input(config, setup.student_cfg, rows)
    batch = batch_placer(batch_sh, rows, config.data.batch_size)(next(data))
    aux = jax.device_put(aux, replicated)
    with jax.set_mesh(mesh), axis_rules(rules):
        state = jax.jit(setup.init_fn, out_shardings=setup.state_sh)(
            setup.teacher_params, setup.root, None
        )
        start = time.perf_counter()
        compiled = (
            jax.jit(
                setup.step_fn,
                in_shardings=(setup.state_sh, setup.teacher_sh, batch_sh, replicated, replicated),
                out_shardings=(setup.state_sh, replicated),
                donate_argnums=(0,),
            )
            .lower(state, setup.teacher_params, batch, aux, setup.root)
            .compile()
        )
        compile_s = time.perf_counter() - start
        flops = _flops(config, teacher_cfg, batch, aux)
        for _ in range(args.warmup):
            state, metrics = compiled(state, setup.teacher_params, batch, aux, setup.root)
        jax.block_until_ready(metrics)
        start = time.perf_counter()
        for _ in range(args.steps):
            state, metrics = compiled(state, setup.teacher_params, batch, aux, setup.root)
        jax.block_until_ready(metrics)
        seconds = (time.perf_counter() - start) / args.steps
    memory = compiled.memory_analysis()
    out = {
        "step_s": round(seconds, 4),
        "compile_s": round(compile_s, 1),
        "flops_per_device": flops,
        "tflops_per_device": round(flops / seconds / 1e12, 2) if flops else None,
        "temp_gb_per_device": round(getattr(memory, "temp_size_in_bytes", 0) / 1e9, 2),
        "loss": float(jax.device_get(metrics["train/loss"])),
    }
    peak = args.peak_tflops or peak_tflops(jax.devices()[0].device_kind)
    if peak and flops:
        out["mfu"] = round(flops / seconds / 1e12 / peak, 4)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=("scm", "flow_matching"))
    parser.add_argument("--preset", default="flux1_lite_8b")
    parser.add_argument("--double", type=int, default=2)
    parser.add_argument("--single", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8, help="global batch")
    parser.add_argument("--latent", type=int, default=64, help="latent side (512 px: 64)")
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--remat", default="full", choices=("none", "dots", "full"))
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=None, help="per device, bf16 dense")
    parser.add_argument("--attn-impl", default=None, help="config.model.attn_impl (default: auto)")
    parser.add_argument(
        "--jvp-attn-impl", default=None, help="config.model.jvp_attn_impl (default: blockwise)"
    )
    args = parser.parse_args()
    results = {m: measure(m, args) for m in args.methods}
    if "scm" in results and "flow_matching" in results:
        scm, fm = results["scm"], results["flow_matching"]
        results["scm_over_flow_matching"] = {
            "time": round(scm["step_s"] / fm["step_s"], 3),
            "flops": round(scm["flops_per_device"] / fm["flops_per_device"], 3)
            if scm["flops_per_device"] and fm["flops_per_device"]
            else None,
        }
    print(
        json.dumps(
            {
                "benchmark": "train_mfu",
                "device": jax.devices()[0].device_kind,
                "devices": jax.device_count(),
                "config": (
                    f"{args.preset} width, {args.double}+{args.single} blocks, "
                    f"{args.latent}x{args.latent}x16 latents, global batch {args.batch}, "
                    f"{args.dtype}, remat {args.remat}"
                ),
                "attn_impl": args.attn_impl or "auto",
                "jvp_attn_impl": args.jvp_attn_impl or "blockwise",
                **results,
            }
        )
    )


if __name__ == "__main__":
    main()
