"""The toy teacher of the shapes world: a tiny FLUX MMDiT trained from scratch by flow matching.

It ships in the package (``distill_jax/assets/toy_teacher``); this reproduces it (2 CPU cores,
about half an hour; see ``distill_jax/assets/toy_teacher/toy.json`` for the wall time and accuracy
of the shipped one):

    python -m distill_jax.toy train-teacher --workdir /tmp/toy_teacher \
        --out distill_jax/assets/toy_teacher

The data are the shapes world's training split rendered on the fly (32x32 pixels as 16 tokens
of 192 channels, 2x2 tokens per cell of the world's 2x2 grid; captions through the frozen toy
text encoder, 10% of captions dropped to ""), so the trainer gets them as
``train(config, workdir, data=toy.shapes_input(...))`` rather than through ``config.data``.
Flow times are logit-normal(1, 1) (``loss.fm_time_mean = 1``): an object's cell and colour are
decided at high noise, which logit-normal(0, 1) rarely visits. `distill-jax demo` measures the
teacher at 1, 2, 4 and 16 Euler steps.

CPU-sized variant (a few steps, seconds): ``get_config("runlocal")``.
"""

import ml_collections

from distill_jax.toy import toy_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = toy_config("flow_matching")
    if arg == "runlocal":
        c.total_steps, c.log_every, c.checkpoint_every = 20, 5, 10
        c.data.batch_size = 16
        c.optim.warmup_steps = 0
    elif arg:
        raise ValueError(
            f"configs/toy_teacher.py: unknown argument {arg!r} (use runlocal or nothing)"
        )
    return c
