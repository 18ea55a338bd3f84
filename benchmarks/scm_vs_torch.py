"""One full sCM (or MeanFlow) distillation step in JAX against the paper's PyTorch (issue 8), CPU.

Both sides do the same work on the mid-size MMDiT of benchmarks/losses.py (width 512, 2 + 4
blocks, 1024 image + 128 text tokens, batch 2, float32): teacher forward, student JVP (MeanFlow:
also the two CFG student passes), student forward and backward, global-norm clip, AdamW.

- JAX: the trainer's step (``distill_jax.train.make_step``), jitted, state donated, with the
  trainer's attention (``--attn-impl``, default ``"auto"``: blockwise on CPU) and tangent-pass
  attention (``--jvp-attn-impl``, default blockwise). When the two are the same, the losses
  take the student's forward from the JVP's primal; ``--attn-impl xla`` runs the two-pass
  program with XLA's attention.
- PyTorch: the paper transcription of ``tests/torch_reference.py`` on diffusers'
  ``FluxTransformer2DModel``, eager, ``torch.func.jvp`` under math attention (the other passes
  use PyTorch's default SDPA kernel, the faster choice), ``torch.optim.AdamW``; with 1 and with
  2 threads (the machine is shared; the faster setting is the reference). Every MeanFlow sample
  is conditional and inside the CFG window, so PyTorch runs one JVP over the batch, as JAX does.

Prints median seconds per step over ``--repeats`` and ``jax_over_torch`` (against the faster
thread setting) as a final JSON line. Target: <= 0.7 (issue 17). The JSON also gives the FLOPs
per step of the JAX step and of the trainer's flow-matching step from XLA's cost analysis, and
their ratio, which does not depend on the machine (benchmarks/losses.py's ``step_flops``; issue
17: sCM <= 2.2, ideally about 2.0).

    .venv/bin/python benchmarks/scm_vs_torch.py [--method scm|meanflow] [--repeats 3]
        [--attn-impl auto|xla] [--jvp-attn-impl blockwise|xla]

benchmarks/meanflow_vs_torch.py runs the MeanFlow comparison.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable

import jax
import torch
from diffusers import FluxTransformer2DModel

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
import torch_reference as ref  # noqa: E402
from common import median_seconds  # noqa: E402
from losses import (  # noqa: E402
    BATCH,
    DESCRIPTION,
    LATENT,
    MID,
    TEXT,
    add_attn_flags,
    flops_fields,
)
from train_step import compiled_step  # noqa: E402


def torch_step(method: str) -> Callable[[], None]:
    """``run()``: one eager PyTorch distillation step (loss, backward, clip 1.0, AdamW)."""
    cfg = MID
    diffusers_cfg = {k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    h, w = LATENT[0] // 2, LATENT[1] // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None, :]
    img_ids, txt_ids = ids.reshape(-1, 3), torch.zeros(TEXT, 3)
    torch.manual_seed(0)
    teacher = ref.X1Flux(FluxTransformer2DModel(**diffusers_cfg), img_ids, txt_ids)
    teacher.requires_grad_(False)
    heads = {"logvar_head": True} if method == "scm" else {"delta_embed": True}
    student = ref.X1Flux(FluxTransformer2DModel(**diffusers_cfg), img_ids, txt_ids, **heads)
    opt = torch.optim.AdamW(
        student.parameters(), lr=1e-6, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4
    )
    x0 = torch.randn(BATCH, h * w, cfg.in_channels)
    noise = torch.randn_like(x0)
    cond = {
        "txt": torch.randn(BATCH, TEXT, cfg.context_dim),
        "pooled": torch.randn(BATCH, cfg.pooled_dim),
        "g": torch.full((BATCH,), 4.5),
    }
    uncond = {"txt": torch.zeros_like(cond["txt"]), "pooled": torch.zeros_like(cond["pooled"])}
    uncond["g"] = cond["g"]

    def loss():
        if method == "scm":
            t = torch.linspace(0.4, 1.2, BATCH)
            return ref.scm_loss(student, teacher, x0, noise, t, cond, step=1000)[0]
        r, t = torch.linspace(0.1, 0.4, BATCH), torch.linspace(0.6, 0.9, BATCH)
        drop = torch.zeros(BATCH, dtype=torch.bool)
        return ref.meanflow_loss(student, teacher, x0, noise, r, t, drop, cond, uncond)[0]

    def run():
        opt.zero_grad(set_to_none=True)
        loss().backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()

    return run


def main(method: str | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=("scm", "meanflow"), default=method or "scm")
    parser.add_argument("--repeats", type=int, default=3)
    add_attn_flags(parser)
    args = parser.parse_args()

    step = compiled_step(args.method, jvp_attn_impl=args.jvp_attn_impl, attn_impl=args.attn_impl)
    jax_s = median_seconds(step.run, args.repeats, f"jax {args.method}")
    compile_s = step.compile_s
    del step  # the JAX state and teacher
    torch_run = torch_step(args.method)
    torch_s = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        torch_s[threads] = median_seconds(torch_run, args.repeats, f"torch {threads} thread(s)")
    best = min(torch_s.values())
    print(
        json.dumps(
            {
                "benchmark": f"{args.method}_vs_torch",
                "device": jax.devices()[0].device_kind,
                "config": DESCRIPTION,
                "jax_median_s": round(jax_s, 3),
                "torch_median_s": {f"{n}_threads": round(s, 3) for n, s in torch_s.items()},
                "jax_over_torch": round(jax_s / best, 3),
                "jax_over_torch_per_threads": {
                    f"{n}_threads": round(jax_s / s, 3) for n, s in torch_s.items()
                },
                "target": 0.7,
                "jax_compile_s": round(compile_s, 1),
                **flops_fields(("flow_matching", args.method), args.jvp_attn_impl, args.attn_impl),
                "jax_attn_impl": args.attn_impl,
                "jax_jvp_attn_impl": args.jvp_attn_impl,
                "repeats": args.repeats,
            }
        )
    )


if __name__ == "__main__":
    main()
