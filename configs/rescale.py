"""Rescales a stock FLUX teacher (time_scale 1000) into the time_scale 1 teacher sCM and
MeanFlow need (spec section 2.2; the paper's repository never shows this step).

First the time and guidance embedders' first layers are refit by least squares so that the
unscaled sinusoid reproduces the stock embedding on a dense grid; then the whole model regresses
onto the stock model's velocity, ||v_1(x_s; s, g) - v_1000(x_s; s, g)||^2, s ~ U[0, 1],
g ~ U[2, 5].

Command (TPU v5p-32 or 8x H100/H200):

    distill-jax convert Freepik/flux.1-lite-8B /ckpt/flux-lite-8b          # a local copy
    distill-jax train --config configs/rescale.py --workdir /runs/rescale \
        --config.teacher.path=/ckpt/flux-lite-8b --config.data.path=/data/mj-latents

Expected: the regression loss falls by orders of magnitude within a few thousand steps; the
rescaled model's velocity should then agree with the stock one to a few percent (relative)
across s in [0, 1] and g in [2, 5] before it is used as a distillation teacher.

CPU-sized variant:

    distill-jax train --config configs/rescale.py:runlocal --workdir /tmp/rescale
"""

import ml_collections

from distill_jax.config import base_config, flux_lite_512, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = flux_lite_512(base_config())
    c.method = "rescale"
    c.total_steps, c.checkpoint_every = 5000, 500
    c.data.batch_size = 64
    c.optim.lr, c.optim.warmup_steps = 1e-5, 100
    return variant(c, arg, "configs/rescale.py")
