"""Distilling the toy teacher with sCM or MeanFlow: the students of `distill-jax demo`.

The demo (``distill_jax.demo.run_demo``) trains both with these settings and measures them:

    distill-jax demo --workdir /tmp/demo            # or: make demo

One student on its own, written as the toy pipeline folder ``WORKDIR/student``:

    distill-jax train --config configs/toy_distill.py:scm --workdir /tmp/toy_scm \
        --config.teacher.path=distill_jax/assets/toy_teacher

The teacher must be a toy pipeline folder (the shipped one, or ``WORKDIR/student`` of
``configs/toy_teacher.py``): its text encoder captions the shapes input and its autoencoder
encodes it. Sized for 2 CPU cores (about 2 minutes each: 800 steps at batch 32; low learning
rates, 2e-5 for sCM and 5e-5 for MeanFlow, keep the samples free of a film of noise; MeanFlow
with the paper's squared loss, ``adaptive_p = -1``). Measured (README, the demo; the teacher
at 98.8%): sCM at 1 / 2 / 4 steps 73% / 84% / 91% of the teacher's 16-step accuracy, MeanFlow
72% / 89% / 95%.

Arguments: ``scm`` or ``meanflow``, optionally followed by ``,runlocal`` (a few steps:
``scm,runlocal``) and, for MeanFlow, the paper's ablation settings ``,gamma2`` and ``,window``
(:data:`distill_jax.config.MEANFLOW_VARIANTS`).
"""

import ml_collections

from distill_jax.config import MEANFLOW_VARIANTS, toy_config


def get_config(arg: str | None = "scm") -> ml_collections.ConfigDict:
    method, *extra = (arg or "scm").split(",")
    allowed = ["runlocal", *(MEANFLOW_VARIANTS if method == "meanflow" else ())]
    if method not in ("scm", "meanflow") or any(e not in allowed for e in extra):
        raise ValueError(
            f"configs/toy_distill.py: unknown argument {arg!r} (use scm or meanflow, "
            f"optionally followed by any of ,{', ,'.join(allowed)})"
        )
    c = toy_config(method)
    for e in extra:
        if e == "runlocal":
            c.total_steps, c.log_every, c.checkpoint_every = 8, 4, 8
            c.data.batch_size = 8
        else:
            c.loss.meanflow.update(MEANFLOW_VARIANTS[e])
    return c
