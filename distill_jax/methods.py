"""The four training methods as short adapters between the config and the pure losses.

:data:`METHODS` maps ``config.method`` to a :class:`Method`: how the student's structure follows
from the teacher's, and how one step's loss calls the pure loss of :mod:`distill_jax.losses` with
the networks bound, ``**config.loss.<method>`` (whose fields are that loss's keywords) and the
paper's slips when ``config.loss.paper_slips`` is set. :func:`make_loss_fn` does what every method
shares: packing the latents, drawing the embedded guidance, calling the networks.

The settings that ``config.loss.paper_slips`` decides when they are ``"auto"``
(:data:`distill_jax.config.AUTO_SETTINGS`: the time dtype and the model switches) take their
effective values in one place, :func:`resolve`, which the functions here apply to the config they
are given and the trainer applies once to the config it logs and checkpoints.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from distill_jax import distributed, losses
from distill_jax.config import AUTO_SETTINGS
from distill_jax.losses.finite_difference import check_time_derivative
from distill_jax.models.attention import auto_impl
from distill_jax.models.flux import FluxConfig
from distill_jax.parameterization import trigflow_velocity
from distill_jax.pipeline.latents import image_ids, pack

log = logging.getLogger(__name__)
Array = jax.Array


@dataclasses.dataclass(frozen=True)
class Nets:
    """One step's networks. ``call(graphdef, params, x, t, cond, **kw) -> v`` runs a FLUX model
    on packed latents ``x [B, L, 4C]`` at flow time ``t [B]`` with ``cond = {"t5", "pooled",
    "g"}``; ``tangent_gd`` is the tangent (JVP) pass's structure, or None when the losses take
    the student's forward from the JVP's primal (same attention in both passes)."""

    call: Callable[..., Array]
    params: nnx.State
    teacher_params: nnx.State | None
    student_gd: nnx.GraphDef
    tangent_gd: nnx.GraphDef | None
    teacher_gd: nnx.GraphDef

    def student(self, x: Array, t: Array, cond: dict, **kw: Any) -> Array:
        return self.call(self.student_gd, self.params, x, t, cond, **kw)

    def teacher(self, x: Array, t: Array, cond: dict, **kw: Any) -> Array:
        return self.call(self.teacher_gd, self.teacher_params, x, t, cond, **kw)


# --- the paper's slips and the effective settings -----------------------------------------------

SLIP_METHODS = ("scm", "meanflow")  # the methods of losses.paper_slips


def slips(config: ml_collections.ConfigDict) -> dict[str, dict[str, Any]]:
    """``losses.paper_slips(config.method)`` when ``config.loss.paper_slips`` is set and the
    method has slips, else none: ``{"loss": {...}, "model": {...}}``."""
    if config.loss.paper_slips and config.method in SLIP_METHODS:
        return losses.paper_slips(config.method)
    return {"loss": {}, "model": {}}


def resolve(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with its ``"auto"`` settings (:data:`~distill_jax.config.AUTO_SETTINGS`) at
    their effective values: the paper's (:func:`slips`) when ``config.loss.paper_slips`` is set,
    else the fixed default. A value set in a config file or on the command line is kept, so it
    wins over the switch. ``model.attn_impl="auto"`` becomes the default backend's attention
    (:func:`~distill_jax.models.attention.auto_impl`), except on GPU, where the choice also
    depends on the head dimension: the model resolves it when it is built. Returns a copy
    (``config`` itself when nothing is ``"auto"``)."""
    auto = [path for path in AUTO_SETTINGS if config[path] == "auto"]
    backend = jax.default_backend()
    attention = config.model.attn_impl == "auto" and backend not in ("gpu", "cuda")
    if not auto and not attention:
        return config
    paper = slips(config)
    out = config.copy_and_resolve_references()
    for path in auto:
        group, name = path.split(".")
        value = paper[group].get(name, AUTO_SETTINGS[path][0])
        out[group][name] = jnp.dtype(value).name if name == "time_dtype" else value
    if attention:  # the head dimension matters only for GPU's cuDNN kernel
        out.model.attn_impl = auto_impl(backend, jnp.dtype(config.model.dtype))
    return out


def time_dtype(config: ml_collections.ConfigDict) -> Any:
    """The effective ``config.loss.time_dtype`` as a dtype: the losses', the TrigFlow wrapper's
    and (``Flux(time_dtype=)``) the models' time arithmetic."""
    return jnp.dtype(resolve(config).loss.time_dtype)


def loss_switches(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The sCM / MeanFlow loss's slips (none unless ``config.loss.paper_slips``), its
    ``time_dtype``, the config's effective one (an explicit setting wins over the slips'), and
    its ``time_derivative`` and ``fd_dt`` (``config.loss``)."""
    return {
        **slips(config)["loss"],
        "time_dtype": time_dtype(config),
        "time_derivative": config.loss.time_derivative,
        "fd_dt": config.loss.fd_dt,
    }


def direct_route(config: ml_collections.ConfigDict) -> bool:
    """Whether sCM / MeanFlow are set up to distil a stock (``time_scale`` 1000) teacher without
    the rescale stage, as NVIDIA's rCM: the time derivative by a finite difference
    (``config.loss.time_derivative``) or the JVP through a float32 time embedding
    (``config.model.time_embed_float32``)."""
    return config.loss.time_derivative == "finite_difference" or config.model.time_embed_float32


# --- the adapters: (config, nets, x0, key, cond, aux, step) -> (loss, metrics) ------------------


def _flow_matching(config, nets: Nets, x0, key, cond, aux, step):
    return losses.flow_matching_loss(nets.student, x0, key, cond=cond, **config.loss.flow_matching)


def _rescale(config, nets: Nets, x0, key, cond, aux, step):
    def with_g(c, g):  # the loss draws its own guidance (or None without a guidance embedder)
        return {**c, "g": g if g is not None else c["g"]}

    return losses.rescale_regression_loss(
        lambda x, s, g, c: nets.student(x, s, with_g(c, g)),
        lambda x, s, g, c: nets.teacher(x, s, with_g(c, g)),
        x0,
        key,
        cond=cond,
        **config.loss.rescale,
    )


def _scm(config, nets: Nets, x0, key, cond, aux, step):
    switches = loss_switches(config)
    td = switches["time_dtype"]  # the wrapper's s and n(s) too (spec 7.6)

    def student_fn(x_hat, t, c, gd=nets.student_gd):
        def flow(xs, s):
            return nets.call(gd, nets.params, xs, s, c, return_logvar=True)

        F, logvar = trigflow_velocity(flow, x_hat, t, has_aux=True, time_dtype=td)
        if config.model.logvar_time == "trig":  # the paper's choice (spec 7.9)
            g = c["g"] if "guidance_in" in nets.params else None
            logvar = nnx.merge(gd, nets.params).logvar_at(t, c["pooled"], g)
        return F, logvar

    def teacher_fn(x_hat, t, c):
        return trigflow_velocity(lambda xs, s: nets.teacher(xs, s, c), x_hat, t, time_dtype=td)

    tangent_fn = None
    if nets.tangent_gd is not None:
        tangent_fn = lambda xh, t, c: student_fn(xh, t, c, gd=nets.tangent_gd)  # noqa: E731
    return losses.scm_loss(
        student_fn,
        teacher_fn,
        x0,
        key,
        step=step,
        cond=cond,
        tangent_fn=tangent_fn,
        **config.loss.scm,
        **switches,
    )


def _meanflow(config, nets: Nets, x0, key, cond, aux, step):
    uncond = {
        "t5": jnp.broadcast_to(aux["uncond_t5"], cond["t5"].shape),
        "pooled": jnp.broadcast_to(aux["uncond_pooled"], cond["pooled"].shape),
        "g": cond["g"],
    }
    tangent_fn = None
    if nets.tangent_gd is not None:

        def tangent_fn(z, t, d, c):
            return nets.call(nets.tangent_gd, nets.params, z, t, c, timestep2=d)

    return losses.meanflow_loss(
        lambda z, t, d, c: nets.student(z, t, c, timestep2=d),
        nets.teacher,
        x0,
        key,
        cond=cond,
        uncond=uncond,
        tangent_fn=tangent_fn,
        **config.loss.meanflow,
        **loss_switches(config),
    )


def rescale_refits(teacher_params: nnx.State, student_cfg: FluxConfig) -> dict[str, Array]:
    """Least-squares refits of the time (and guidance) embedders' first layers (spec 2.2):
    ``{"time_in.in_layer.kernel": ..., ...}``, set in the student after the teacher's copy."""
    out = {}
    # Grids fine enough for the x1000 sinusoid (spacing well under pi / 1000).
    for name, grid in (
        ("time_in", np.linspace(0.0, 1.0, 8193)),
        ("guidance_in", np.linspace(0.0, 10.0, 32769)),
    ):
        if name not in teacher_params:
            continue
        layer = teacher_params[name]["in_layer"]
        kernel, bias, residual = losses.refit_time_embedding(
            distributed.host_values(layer["kernel"].get_value()).astype(np.float64),
            distributed.host_values(layer["bias"].get_value()).astype(np.float64),
            grid=grid,
            dim=student_cfg.time_embed_dim,
        )
        log.info("rescale: refit %s.in_layer, relative residual %.2e", name, residual)
        out[f"{name}.in_layer.kernel"] = jnp.asarray(kernel, jnp.float32)
        out[f"{name}.in_layer.bias"] = jnp.asarray(bias, jnp.float32)
    return out


# --- the table ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Method:
    """One method: ``student(teacher_cfg, config.model) -> student_cfg``;
    ``loss(config, nets, x0, key, cond, aux, step) -> (loss, metrics)``, an adapter above;
    ``teacher``: whether it needs a teacher (flow matching trains without one);
    ``rescaled_teacher``: whether the teacher must run at ``time_scale`` 1 (spec 2);
    ``refits(teacher_params, student_cfg)``: values set in the student after the teacher's copy."""

    student: Callable[[FluxConfig, ml_collections.ConfigDict], FluxConfig]
    loss: Callable[..., tuple[Array, dict[str, Array]]]
    teacher: bool = True
    rescaled_teacher: bool = False
    refits: Callable[[nnx.State, FluxConfig], dict[str, Array]] | None = None


METHODS: dict[str, Method] = {
    "flow_matching": Method(lambda cfg, m: cfg, _flow_matching, teacher=False),
    # A stock teacher (time_scale 1000) distilled into a time_scale 1 student.
    "rescale": Method(lambda cfg, m: cfg.replace(time_scale=1.0), _rescale, refits=rescale_refits),
    "scm": Method(lambda cfg, m: cfg.replace(logvar_head=True), _scm, rescaled_teacher=True),
    "meanflow": Method(
        lambda cfg, m: cfg.replace(delta_embed=True, delta_init=m.delta_init),
        _meanflow,
        rescaled_teacher=True,
    ),
}


def model_configs(
    config: ml_collections.ConfigDict, teacher_cfg: FluxConfig | None = None
) -> tuple[FluxConfig, FluxConfig]:
    """(teacher, student) structures for ``config.method`` (the teacher by default from
    ``config.model.preset`` and ``overrides``). The teacher of sCM/MeanFlow runs at
    ``time_scale`` 1 (a rescaled teacher, spec 2), or at any scale with float32 times when
    :func:`direct_route` is set. ``config.model.time_embed_float32`` sets the student's
    ``FluxConfig.time_embed_float32``."""
    config = resolve(config)
    if teacher_cfg is None:
        teacher_cfg = FluxConfig.preset(config.model.preset, **config.model.overrides)
    method = METHODS[config.method]
    td = jnp.dtype(config.loss.time_dtype)
    # sCM and MeanFlow use the time derivative (and refuse it with bfloat16 times); others not
    check_time_derivative(
        config.loss.time_derivative, config.loss.fd_dt, td if method.rescaled_teacher else "float32"
    )
    if method.rescaled_teacher and teacher_cfg.time_scale != 1.0:
        if not direct_route(config):
            raise ValueError(
                f"{config.method} needs a teacher with time_scale=1 (got "
                f"{teacher_cfg.time_scale}); rescale the stock teacher first (method 'rescale', "
                "spec section 2.2), or distil it directly with "
                "config.loss.time_derivative='finite_difference' or "
                "config.model.time_embed_float32=True"
            )
        if td != jnp.dtype(jnp.float32):
            raise ValueError(
                f"{config.method} from a teacher at time_scale={teacher_cfg.time_scale} needs "
                f"config.loss.time_dtype='float32' (got {td.name}: bfloat16 times scaled by "
                f"{teacher_cfg.time_scale} lose the sinusoid's phase)"
            )
    student = method.student(teacher_cfg, config.model)
    if config.model.time_embed_float32:
        student = student.replace(time_embed_float32=True)
    return teacher_cfg, student


def make_loss_fn(config, student_gd, jvp_gd, teacher_gd) -> Callable:
    """``loss_fn(params, teacher_params, batch, aux, key, step) -> (loss, metrics)`` for
    ``config.method``; batches as in :mod:`distill_jax.train`. The graphdefs' ``time_dtype``
    should be :func:`time_dtype` of ``config``, as :mod:`distill_jax.train` builds them."""
    config = resolve(config)
    adapter = METHODS[config.method].loss
    guidance_values = jnp.asarray(config.loss.guidance_values, jnp.float32)
    # A separate tangent pass only when it has another structure (attention) than the gradient
    # pass; otherwise the losses take the student's forward from the JVP's primal (one pass).
    separate_tangent = jvp_gd != student_gd

    def loss_fn(params, teacher_params, batch, aux, key, step):
        k_g, k_loss = jax.random.split(key)
        latents = batch["latents"].astype(jnp.float32)
        x0 = pack(latents)  # [B, L, 4C]
        img_ids = image_ids(*latents.shape[2:])  # static: from the latent grid
        txt_ids = np.zeros((batch["t5"].shape[1], 3), np.float32)

        def call(gd, params, x, t, cond, **kw):
            # The scope names each network's ops in HLO metadata and in profiles.
            role = "teacher" if gd is teacher_gd else "student"
            role = "tangent" if separate_tangent and gd is jvp_gd else role
            with jax.named_scope(role):
                model = nnx.merge(gd, params)
                g = cond["g"] if model.guidance_in is not None else None
                return model(x, cond["t5"], cond["pooled"], t, img_ids, txt_ids, g, **kw)

        g = jax.random.choice(k_g, guidance_values, (x0.shape[0],))
        cond = {"t5": batch["t5"], "pooled": batch["pooled"], "g": g}
        nets = Nets(
            call,
            params,
            teacher_params,
            student_gd,
            jvp_gd if separate_tangent else None,
            teacher_gd,
        )
        return adapter(config, nets, x0, k_loss, cond, aux, step)

    return loss_fn
