"""The toy teacher of the shapes world: a tiny FLUX MMDiT trained from scratch by flow matching.

It ships in the package (``distill_jax/assets/toy_teacher``); this trains it again (2 CPU cores,
about half an hour; see ``distill_jax/assets/toy_teacher/toy.json`` for the wall time and loss of
the shipped one) and writes the toy pipeline folder ``WORKDIR/student`` (EMA parameters in
bfloat16, with the text encoder):

    distill-jax train --config configs/toy_teacher.py --workdir /tmp/toy_teacher
    distill-jax sample /tmp/toy_teacher/student --prompt "a red circle" --height 32 \
        --width 32 --guidance none --steps 16 --out /tmp/toy_images

The data are the shapes world's training split rendered on the fly (``config.data.kind =
"shapes"``: 32x32 pixels as 16 tokens of 192 channels, 2x2 tokens per cell of the world's 2x2
grid; captions through a frozen toy text encoder with fixed random weights drawn from
``config.seed``, so a retrained teacher differs from the shipped one in those weights too; 10%
of captions dropped to ""). Flow times are logit-normal(1, 1) (``loss.flow_matching.logit_mean
= 1``): an object's cell and colour are decided at high noise, which logit-normal(0, 1) rarely
visits. `distill-jax demo --teacher /tmp/toy_teacher/student` measures it at 1, 2, 4 and 16
Euler steps.

CPU-sized variant (a few steps, seconds): ``get_config("runlocal")``.
"""

import ml_collections

from distill_jax.config import toy_config


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
