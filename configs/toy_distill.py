"""Distilling the toy teacher with sCM or MeanFlow: the students of `distill-jax demo`.

The demo (``distill_jax.demo.run_demo``) trains both with these settings and measures them:

    distill-jax demo --workdir /tmp/demo            # or: make demo

One student on its own, written as the toy pipeline folder ``WORKDIR/student``:

    distill-jax train --config configs/toy_distill.py:scm --workdir /tmp/toy_scm \
        --config.teacher.path=distill_jax/assets/toy_teacher

The teacher must be a toy pipeline folder (the shipped one, or ``WORKDIR/student`` of
``configs/toy_teacher.py``): its text encoder captions the shapes input. Sized for 2 CPU cores
(a few minutes each). Expected: sCM's 1-2-step samples and MeanFlow's 4-step samples close to
the teacher's 16-step accuracy (the demo's report says how close).

Arguments: ``scm`` or ``meanflow``, optionally ``,runlocal`` (a few steps: ``scm,runlocal``).
"""

import ml_collections

from distill_jax.config import toy_config


def get_config(arg: str | None = "scm") -> ml_collections.ConfigDict:
    method, _, variant = (arg or "scm").partition(",")
    if method not in ("scm", "meanflow") or variant not in ("", "runlocal"):
        raise ValueError(
            f"configs/toy_distill.py: unknown argument {arg!r} (use scm or meanflow, "
            "optionally followed by ,runlocal)"
        )
    c = toy_config(method)
    if variant == "runlocal":
        c.total_steps, c.log_every, c.checkpoint_every = 8, 4, 8
        c.data.batch_size = 8
    return c
