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

from distill_jax.config import base_config, flux_lite_512, variant


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = flux_lite_512(base_config())
    c.method = "flow_matching"
    c.model.overrides = {"time_scale": 1.0}
    c.total_steps, c.checkpoint_every = 20_000, 1000
    c.data.batch_size = 64
    c.optim.lr, c.optim.warmup_steps = 1e-5, 100
    return variant(c, arg, "configs/flow_matching.py")
