"""Rescales a stock FLUX teacher (time_scale 1000) into the time_scale 1 teacher sCM and
MeanFlow need (spec section 2.2; the paper's repository never shows this step).

First the time and guidance embedders' first layers are refit by least squares so that the
unscaled sinusoid reproduces the stock embedding on a dense grid; then the whole model regresses
onto the stock model's velocity v_1000(x_s; s, g), s ~ U[0, 1], g ~ U[2, 5], by
``config.loss.rescale.loss``: ``"mse"`` (default) or ``"smooth_l1"`` (the paper's, with
``smooth_l1_beta``).

The paper's recipe: smooth-L1 regression at 1024 px, batch 128, 120K iterations (its rescaled
FLUX.1-lite teacher then scores the stock one's GenEval, 53.58). That is 15.4M samples, each one
stock forward and one student forward and backward at 4,608 tokens: about 5e21 FLOPs (an
estimate from the model's size, 2 x 8B x tokens per forward plus attention, times 4), of order
3,500 H100-hours at 40% MFU, far more than the distillation itself (sCM: 3K iterations). This
config's default, 5K steps at 512 px and batch 64, is a start, not the paper's run; measure the
rescaled teacher before distilling from it. A route without this stage: the sCM and MeanFlow
configs' ``loss.time_derivative="finite_difference"`` with ``model.time_embed_float32`` (README,
Training).

Command (TPU v5p-32 or 8x H100/H200):

    distill-jax convert Freepik/flux.1-lite-8B /ckpt/flux-lite-8b          # a local copy
    distill-jax train --config configs/rescale.py --workdir /runs/rescale \
        --config.teacher.path=/ckpt/flux-lite-8b --config.data.path=/data/mj-latents \
        --config.loss.rescale.loss=smooth_l1

Expected: the regression loss falls by orders of magnitude within a few thousand steps; the
rescaled model's velocity should then agree with the stock one to a few percent (relative)
across s in [0, 1] and g in [2, 5] before it is used as a distillation teacher.

Variants:

- ``configs/rescale.py:toy``: the same stage on the shapes world, from a toy teacher trained at
  ``time_scale`` 1000 as stock FLUX is (``configs/toy_teacher.py:stock``); 2000 steps at batch
  64 (minutes on 2 CPU cores), written as a toy pipeline folder that `distill-jax demo
  --teacher` and ``configs/toy_distill.py`` take:

      distill-jax train --config configs/toy_teacher.py:stock --workdir /tmp/stock
      distill-jax train --config configs/rescale.py:toy --workdir /tmp/rescaled \
          --config.teacher.path=/tmp/stock/student

- ``configs/rescale.py:runlocal``: a tiny random model on synthetic latents (seconds).
"""

import ml_collections

from distill_jax.config import base_config, flux_lite_512, toy_config, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    if arg == "toy":
        return toy_config("rescale")
    c = flux_lite_512(base_config())
    c.method = "rescale"
    c.total_steps, c.checkpoint_every = 5000, 500
    c.data.batch_size = 64
    c.optim.lr, c.optim.warmup_steps = 1e-5, 100
    return variant(c, arg, "configs/rescale.py")
