"""Flow-matching training or fine-tuning of a FLUX MMDiT (e.g. a teacher on new data).

Fine-tuning FLUX.1-lite-8B at time_scale 1 (an alternative to `configs/rescale.py`'s
regression, on real data; TPU v5p-32 or 8x H100/H200):

    distill-jax train --config configs/flow_matching.py --workdir /runs/fm \
        --config.teacher.path=/ckpt/flux-lite-8b --config.data.path=/data/mj-latents

With an empty teacher.path the model is trained from scratch (the toy teacher of the demo).
Expected: the loss ||v - (eps - x0)||^2 decreases steadily (FLUX latents: near 0.3-0.5).

CPU-sized variant:

    distill-jax train --config configs/flow_matching.py:runlocal --workdir /tmp/fm
"""

import ml_collections

from distill_jax.config import base_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = base_config()
    c.method = "flow_matching"
    c.total_steps = 20_000
    c.checkpoint_every = 1000
    c.model.preset = "flux1_lite_8b"
    c.model.overrides = {"time_scale": 1.0}
    c.model.dtype = "bfloat16"
    c.model.remat = "full"
    c.data.kind = "latents"
    c.data.latent_grid, c.data.latent_channels, c.data.text_len = (64, 64), 16, 256  # 512 px
    c.data.batch_size = 64
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 100
    c.mesh.data, c.mesh.fsdp = 1, -1
    if arg == "runlocal":
        c.total_steps, c.log_every, c.checkpoint_every = 20, 5, 10
        c.model.preset = "tiny"
        c.model.dtype, c.model.remat = "float32", "none"
        c.data.kind = "synthetic"
        c.data.batch_size, c.data.latent_grid, c.data.latent_channels = 8, (4, 4), 4
        c.optim.lr, c.optim.warmup_steps = 1e-3, 0
        c.mesh.data, c.mesh.fsdp = -1, 1
    elif arg:
        raise ValueError(
            f"configs/flow_matching.py: unknown argument {arg!r} (use runlocal or nothing)"
        )
    return c
