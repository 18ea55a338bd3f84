"""How far the paper's bfloat16 time arithmetic moves a distillation step (issue 19), CPU.

The trainer's own set-up (``distill_jax.train.make_setup``: random tiny teacher, the student
initialised from it, the jitted loss and gradient of ``distill_jax.methods.make_loss_fn``) for
sCM and MeanFlow with ``config.loss.paper_slips=True``, run twice on the same parameters, batch
and keys: ``config.loss.time_dtype=float32`` and ``bfloat16`` (the paper's roundings: times, Δ,
the TrigFlow wrapper's s and n(s), the embeddings' inputs, the coefficients; spec 7.6). The
networks compute in float32 in both, so only the time arithmetic differs.

Per draw of times and noise (``--draws`` keys): the relative difference of the loss
``|L_bf16 - L_f32| / |L_f32|`` and the relative L2 of the gradient ``||g_bf16 - g_f32|| /
||g_f32||`` (MeanFlow's loss is ~1 by its adaptive weight, so its mean square error is reported
too); for scale, the relative L2 between the float32 gradients of consecutive draws (the step's
own sampling noise). Prints medians and maxima as a final JSON line.

    .venv/bin/python benchmarks/paper_arithmetic.py [--draws 8] [--batch 16]
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from distill_jax.config import base_config  # noqa: E402
from distill_jax.sharding import axis_rules  # noqa: E402
from distill_jax.train import load_teacher, make_setup, mesh_and_rules  # noqa: E402

GRID, CHANNELS, TEXT = (8, 8), 4, 8  # latent 4 x 8 x 8 -> 16 packed tokens of 16 channels
SCM_STEP = 3000  # tangent warmup r = 0.75 of 4000: both terms of the target direction count
DESCRIPTION = "tiny FLUX (1+1 blocks, width 32, guidance), 16+8 tokens, float32 compute, CPU"


def tiny_config(method: str, time_dtype: str, batch: int) -> ml_collections.ConfigDict:
    c = base_config()
    c.method = method
    c.loss.paper_slips, c.loss.time_dtype = True, time_dtype
    c.model.preset = "tiny"
    c.model.overrides = ml_collections.ConfigDict({"time_scale": 1.0})  # a rescaled teacher
    c.model.dtype = "float32"
    c.mesh.devices = 1
    c.data.batch_size, c.data.latent_grid = batch, GRID
    c.data.latent_channels, c.data.text_len = CHANNELS, TEXT
    return c


def batch_and_aux(cfg, batch: int, seed: int = 0) -> tuple[dict, dict]:
    """A trainer batch and the unconditional embeddings, standard normal float32."""
    rng = np.random.default_rng(seed)
    normal = lambda *shape: rng.standard_normal(shape, np.float32)  # noqa: E731
    return {
        "latents": normal(batch, CHANNELS, *GRID),
        "t5": normal(batch, TEXT, cfg.context_dim),
        "pooled": normal(batch, cfg.pooled_dim),
    }, {"uncond_t5": normal(TEXT, cfg.context_dim), "uncond_pooled": normal(cfg.pooled_dim)}


def measure(method: str, draws: int, batch: int) -> dict:
    runs = {}
    for time_dtype in ("float32", "bfloat16"):
        config = tiny_config(method, time_dtype, batch)
        mesh, rules = mesh_and_rules(config)
        setup = make_setup(config, mesh, rules, *load_teacher(config, mesh, rules))
        with jax.set_mesh(mesh), axis_rules(rules):
            if time_dtype == "float32":  # one student for both runs (the same init)
                params = jax.jit(setup.init_fn)(setup.teacher_params, setup.root)["params"]
                data = batch_and_aux(setup.student_cfg, batch)
            grad_fn = jax.jit(jax.value_and_grad(setup.loss_fn, has_aux=True))
            step = SCM_STEP if method == "scm" else 0
            runs[time_dtype] = [
                jax.device_get(
                    grad_fn(params, setup.teacher_params, *data, jax.random.key(i), step)
                )
                for i in range(draws)
            ]
    loss_rel, grad_rel, mse_rel, noise = [], [], [], []
    for i, (((l32, m32), g32), ((l16, m16), g16)) in enumerate(
        zip(runs["float32"], runs["bfloat16"], strict=True)
    ):
        loss_rel.append(abs(float(l16 - l32)) / abs(float(l32)))
        diff = jax.tree.map(lambda a, b: a - b, g16, g32)
        grad_rel.append(float(optax.global_norm(diff) / optax.global_norm(g32)))
        if method == "meanflow":
            mse_rel.append(
                abs(float(m16["meanflow/mse"] - m32["meanflow/mse"])) / m32["meanflow/mse"]
            )
        if i:
            prev = runs["float32"][i - 1][1]
            between = jax.tree.map(lambda a, b: a - b, g32, prev)
            noise.append(float(optax.global_norm(between) / optax.global_norm(prev)))

    def summary(xs):
        return {"median": float(f"{np.median(xs):.3g}"), "max": float(f"{np.max(xs):.3g}")}

    out = {"loss_rel_diff": summary(loss_rel), "grad_rel_l2": summary(grad_rel)}
    if mse_rel:
        out["mse_rel_diff"] = summary(mse_rel)
    out["grad_rel_l2_between_draws_f32"] = summary(noise)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=8, help="keys (times, noise) per method")
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    result = {
        "benchmark": "paper_arithmetic",
        "device": jax.devices()[0].device_kind,
        "config": DESCRIPTION + f", batch {args.batch}",
        "draws": args.draws,
    }
    for method in ("scm", "meanflow"):
        result[method] = measure(method, args.draws, args.batch)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
