"""Distillation losses as pure functions of arrays and callables, each returning (loss, metrics).

The defaults fix the slips of the paper's code (spec section 7); :func:`paper_slips` returns the
settings that reproduce them, in one place: the losses' keyword arguments and the trainer's model
switches (``config.model``, which the trainer's ``config.loss.paper_slips`` sets too):

| switch | default (fixed) | paper's code | spec |
|---|---|---|---|
| ``meanflow_loss(tangent_velocity=)`` | ``"teacher"``: tangent and target both use v_T | ``"ground_truth"``: tangent ``eps - x0`` in the non-CFG branch | 7.2 |
| ``meanflow_loss(cfg_at_r_equals_t=)`` | ``True``: u_c, u_0 at delta = 0 | ``False``: at the sample's own t - r | 7.3 |
| ``scm_loss / meanflow_loss(time_dtype=)`` | ``float32`` times and coefficients | ``bfloat16``: also Δ = t - r, the TrigFlow wrapper's s and n(s), the models' time inputs | 7.6 |
| ``config.model.logvar_time`` (sCM) | ``"flow"``: the log-variance head on flow time s | ``"trig"``: on TrigFlow time t | 7.9 |
| ``config.model.delta_init`` (MeanFlow) | ``"zero"``: student equals teacher at r = t | ``"copy"`` of the time embedder | 7.10 |
"""  # noqa: E501

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from distill_jax.losses.flow_matching import flow_matching_loss
from distill_jax.losses.meanflow import meanflow_dudt, meanflow_loss
from distill_jax.losses.rescale import (
    refit_time_embedding,
    rescale_regression_loss,
    timestep_sinusoid,
)
from distill_jax.losses.scm import scm_loss, scm_tangent

__all__ = [
    "flow_matching_loss",
    "meanflow_dudt",
    "meanflow_loss",
    "paper_slips",
    "refit_time_embedding",
    "rescale_regression_loss",
    "scm_loss",
    "scm_tangent",
    "timestep_sinusoid",
]


def paper_slips(method: str) -> dict[str, dict[str, Any]]:
    """The paper's code, slips included (spec 7.2, 7.3, 7.6, 7.9, 7.10), for ``"scm"`` or
    ``"meanflow"``: ``{"loss": keyword arguments of scm_loss / meanflow_loss, "model": values
    of the trainer's config.model switches}``.

    Example: ``meanflow_loss(student, teacher, x0, key, cond=c, uncond=u,
    **paper_slips("meanflow")["loss"])``; build the MeanFlow student's Δ embedder as
    ``paper_slips("meanflow")["model"]["delta_init"]`` says. With ``time_dtype=bfloat16`` the
    callables round alike: ``trigflow_velocity(time_dtype=)``, ``Flux(time_dtype=)``.
    """
    if method == "scm":
        return {"loss": {"time_dtype": jnp.bfloat16}, "model": {"logvar_time": "trig"}}
    if method == "meanflow":
        return {
            "loss": {
                "tangent_velocity": "ground_truth",
                "cfg_at_r_equals_t": False,
                "time_dtype": jnp.bfloat16,
            },
            "model": {"delta_init": "copy"},
        }
    raise ValueError(f"unknown method {method!r}; expected 'scm' or 'meanflow'")
