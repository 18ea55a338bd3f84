"""MeanFlow distillation of FLUX.1-lite-8B into a 4-step student (spec section 4).

Command (a TPU v5p-32 slice = 16 devices, or 8x H100/H200; FSDP over every device):

    distill-jax train --config configs/meanflow.py --workdir gs://BUCKET/runs/meanflow \
        --config.teacher.path=/ckpt/flux-lite-8b-rescaled --config.data.path=/data/mj-latents

Which teacher: a rescaled (time_scale=1) FLUX.1-lite-8B (`configs/rescale.py`), the paper's
route; or the stock one directly with ``--config.model.time_embed_float32=True`` (the JVP through
a float32 time embedding) or, for a float32 student, ``--config.loss.time_derivative=
finite_difference`` (NVIDIA rCM's). Measured on the toy world (README, *From stock FLUX
weights*; the same stock teacher, 800 distillation steps each): rescaling first gave the better
MeanFlow student at every step count (1 / 2 / 4 steps: 58.2 / 73.2 / 76.8% against 45.5 /
63.3 / 68.2% directly, by the finite difference) for a rescale stage of 500 steps (0.988x the
stock teacher's accuracy). Rescale first when the stage is affordable; distil directly when it
is not.

The paper's hyperparameters (spec 4.4): AdamW 1e-6 constant, weight decay 1e-4, clip 1.0, global
batch 256 at 512 px, (r, t) from sorted logit-normal(-0.4, 1) pairs with 75% r != t, label
dropout 0.1, CFG-MeanFlow omega 1, kappa 0.5 on t in [0, 1], adaptive weighting p 1, c 1e-3.
The defaults fix the paper code's slips (spec 7); `--config.loss.paper_slips=True` alone
reproduces them all (the loss's, bfloat16 time arithmetic and the Δ embedder copied from the time
embedder). Expected: a 4-step student near the teacher (the paper finds MeanFlow needs about 4
steps).

The paper's ablation found its best MeanFlow run with a squared loss and CFG on flow times
[0.3, 0.8] only: ``configs/meanflow.py:gamma2,window`` (either alone too;
``distill_jax.config.MEANFLOW_VARIANTS``).

CPU-sized variant:

    distill-jax train --config configs/meanflow.py:runlocal --workdir /tmp/meanflow
"""

import ml_collections

from distill_jax.config import base_config, flux_lite_512, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = flux_lite_512(base_config())
    c.method = "meanflow"
    c.model.overrides = {"time_scale": 1.0}
    c.total_steps, c.checkpoint_every = 100_000, 1000
    c.data.batch_size = 256
    c.optim.lr = 1e-6
    return variant(c, arg, "configs/meanflow.py")
