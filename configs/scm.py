"""sCM distillation of FLUX.1-lite-8B into a 1-2-step student (spec section 3).

Command (a TPU v5p-32 slice = 16 devices, or 8x H100/H200; FSDP over every device):

    distill-jax train --config configs/scm.py --workdir gs://BUCKET/runs/scm \
        --config.teacher.path=/ckpt/flux-lite-8b-rescaled --config.data.path=/data/mj-latents

The teacher must be a rescaled (time_scale=1) FLUX.1-lite-8B: `configs/rescale.py` makes one.
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
