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

CPU-sized variant (a tiny random model on synthetic latents, seconds):

    distill-jax train --config configs/scm.py:runlocal --workdir /tmp/scm
"""

import ml_collections

from distill_jax.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.method = "scm"
    c.total_steps = 100_000
    c.checkpoint_every = 1000
    c.model.preset = "flux1_lite_8b"
    c.model.overrides = {"time_scale": 1.0}
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.data.kind = "latents"
    c.data.latent_grid, c.data.latent_channels, c.data.text_len = (64, 64), 16, 256  # 512 px
    c.data.batch_size = 256
    c.optim.lr = 1e-6
    c.mesh.data, c.mesh.fsdp = 1, -1
    if arg == "runlocal":
        c.total_steps, c.log_every, c.checkpoint_every = 20, 5, 10
        c.model.preset = "tiny"
        c.model.dtype, c.model.remat = "float32", "none"
        c.data.kind = "synthetic"
        c.data.batch_size, c.data.latent_grid, c.data.latent_channels = 8, (4, 4), 4
        c.optim.lr = 1e-3
        c.loss.tangent_warmup_steps = 10
        c.mesh.data, c.mesh.fsdp = -1, 1
    elif arg:
        raise ValueError(f"configs/scm.py: unknown argument {arg!r} (use runlocal or nothing)")
    return c
