"""sCM distillation of FLUX.1-lite-8B into a 1-2-step student (spec section 3).

Command (a TPU v5p-32 slice = 16 devices, or 8x H100/H200; FSDP over every device):

    distill-jax train --config configs/scm.py --workdir gs://BUCKET/runs/scm \
        --config.teacher.path=/ckpt/flux-lite-8b-rescaled --config.data.path=/data/mj-latents

Which teacher: a rescaled (time_scale=1) FLUX.1-lite-8B (`configs/rescale.py`), the paper's
route; or the stock one directly with ``--config.model.time_embed_float32=True`` (the JVP through
a float32 time embedding) or, for a float32 student, ``--config.loss.time_derivative=
finite_difference`` (NVIDIA rCM's). Measured on the toy world (README, *From stock FLUX
weights*; the same stock teacher, 800 distillation steps each): rescaling first gave the better
sCM student at every step count (1 / 2 / 4 steps: 61.7 / 69.9 / 75.4% against 54.9 / 63.7 /
68.8% directly, by the finite difference) for a rescale stage of 500 steps (0.988x the stock
teacher's accuracy) that nearly doubled the wall time. Rescale first when the stage is
affordable; distil directly when it is not.

Hyperparameters are the paper's (spec 3.3): AdamW 1e-6 constant, weight decay 1e-4, clip 1.0,
global batch 256 at 512 px, tangent warmup 4000 steps, tan t ~ LogNormal(ln 2 + 0.2, 1.6),
embedded guidance in {4, 4.5, 5}. Expected: a 2-step student close to the teacher's 28-step
GenEval (the paper reports sCM as its best 1-2-step method); track `scm/g_norm`,
`scm/tangent_norm` and the loss, which falls below zero as the log-variance head learns.
The defaults fix the paper code's slips (spec 7); `--config.loss.paper_slips=True` alone
reproduces them (bfloat16 time arithmetic, the log-variance head on TrigFlow time).

CPU-sized variant (a tiny random model on synthetic latents, seconds):

    distill-jax train --config configs/scm.py:runlocal --workdir /tmp/scm
"""

import ml_collections

from distill_jax.config import base_config, flux_lite_512, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = flux_lite_512(base_config())
    c.method = "scm"
    c.model.overrides = {"time_scale": 1.0}
    c.total_steps, c.checkpoint_every = 100_000, 1000
    c.data.batch_size = 256
    c.optim.lr = 1e-6
    return variant(c, arg, "configs/scm.py")
