"""The toy teacher of the shapes world: a tiny FLUX MMDiT trained from scratch by flow matching.

It ships in the package (``distill_jax/assets/toy_teacher``); this trains it again (12000 steps
at batch 64: 27 minutes on 2 CPU cores alone, 48 shared; ``distill_jax/assets/toy_teacher/
toy.json`` records the shipped one's command, steps, wall time, final loss and held-out
accuracy: 98.8% overall on 512 held-out prompts at 16 steps) and writes the toy pipeline folder
``WORKDIR/student`` (EMA parameters in bfloat16, with the text encoder and the autoencoder):

    distill-jax train --config configs/toy_teacher.py --workdir /tmp/toy_teacher
    distill-jax sample /tmp/toy_teacher/student --prompt "a red circle" --height 32 \
        --width 32 --guidance none --steps 16 --out /tmp/toy_images

The data are the shapes world's training split rendered on the fly (``config.data.kind =
"shapes"``), as latents of the mask-and-colour autoencoder fitted to the first 4096 training
renders (``data.ae_kind = "mask_colour"``: per 8x8-pixel patch 13 principal components of the
object's coverage and its 3 colour channels; ``[16, 4, 4]`` per image, 4 tokens of 64 channels,
one per cell of the world's 2x2 grid); captions through a frozen toy text encoder of word
embeddings, each with its neighbours' folded in (``data.text_context = 2``), plus positions
(``data.text_layers = 0``), fixed random weights drawn from ``config.seed``, so a retrained
teacher differs from the shipped one in those weights too; 10% of captions dropped to "". Flow
times are logit-normal(1, 1) (``loss.flow_matching.logit_mean = 1``): an object's cell and
colour are decided at high noise, which logit-normal(0, 1) rarely visits. `distill-jax demo
--teacher /tmp/toy_teacher/student` measures it at 1, 2, 4, 8 and 16 Euler steps. The README's
demo section says what was changed from the first toy teachers and why.

Arguments: ``stock`` trains it at ``time_scale`` 1000, as stock FLUX embeds time (4000 steps;
the start of ``configs/rescale.py:toy``); ``runlocal`` is the CPU-sized variant (a few steps,
seconds); ``stock,runlocal`` both.
"""

import ml_collections

from distill_jax.config import toy_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = toy_config("flow_matching")
    names = [a for a in (arg or "").split(",") if a]
    unknown = [a for a in names if a not in ("runlocal", "stock")]
    if unknown:
        raise ValueError(
            f"configs/toy_teacher.py: unknown argument {arg!r} (use stock, runlocal, both "
            "comma-separated, or nothing)"
        )
    if "stock" in names:
        c.model.overrides.time_scale = 1000.0  # embeds 1000 t, as stock FLUX does
        c.total_steps = 4000
    if "runlocal" in names:
        c.total_steps, c.log_every, c.checkpoint_every = 20, 5, 10
        c.data.batch_size = 16
        c.optim.warmup_steps = 0
    return c
