"""The one training loop: flow matching, time-scale rescaling, sCM and MeanFlow.

``train(config, workdir)`` builds the mesh, the frozen teacher and the student (born sharded),
restores the newest checkpoint in ``workdir`` if there is one, and runs a single jitted step

    step(state, teacher_params, batch, aux, key) -> (state, metrics)

with explicit shardings and the state donated. The teacher is a separate argument and is never
checkpointed. Batches are ``{"latents": [B, C, h, w] (standard units), "t5": [B, S, Dt],
"pooled": [B, P]}``; ``aux`` holds the unconditional embeddings for MeanFlow's CFG.

Read top to bottom: config -> models -> loss -> step -> state -> loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax import distributed, losses
from distill_jax.checkpoint import Checkpoints, Preemption
from distill_jax.config import check_config
from distill_jax.data import input_pipeline
from distill_jax.data.synthetic import SyntheticLatents
from distill_jax.metrics import MetricWriter, peak_tflops
from distill_jax.models.flux import Flux, FluxConfig, reset_delta_embedder
from distill_jax.parameterization import sample_logit_normal, trigflow_velocity
from distill_jax.pipeline.latents import image_ids, pack
from distill_jax.sharding import (
    DEFAULT_RULES,
    assert_not_replicated,
    axis_rules,
    make_mesh,
    state_shardings,
)

log = logging.getLogger(__name__)
sg = jax.lax.stop_gradient
BATCH_AXES = ("data", "fsdp")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


# --- models ---------------------------------------------------------------------------------


def model_configs(
    config: ml_collections.ConfigDict, teacher_cfg: FluxConfig | None = None
) -> tuple[FluxConfig, FluxConfig]:
    """(teacher, student) structures for the method. The teacher of sCM/MeanFlow runs at
    ``time_scale`` 1 (a rescaled teacher, spec 2); ``rescale`` distils a stock teacher (1000)
    into a ``time_scale`` 1 student."""
    if teacher_cfg is None:
        teacher_cfg = getattr(FluxConfig, config.model.preset)().replace(
            **dict(config.model.overrides)
        )
    m = config.method
    student = teacher_cfg
    if m == "scm":
        student = teacher_cfg.replace(logvar_head=True)
    elif m == "meanflow":
        student = teacher_cfg.replace(delta_embed=True, delta_init=config.model.delta_init)
    elif m == "rescale":
        student = teacher_cfg.replace(time_scale=1.0)
    if m in ("scm", "meanflow") and teacher_cfg.time_scale != 1.0:
        raise ValueError(
            f"{m} needs a teacher with time_scale=1 (got {teacher_cfg.time_scale}); rescale the "
            "stock teacher first (method 'rescale', spec section 2.2)"
        )
    return teacher_cfg, student


def _dtype(name: str):
    return {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[name]


def _graphdef(cfg: FluxConfig, config, attn_impl: str) -> nnx.GraphDef:
    abstract = nnx.eval_shape(
        lambda: Flux(
            cfg,
            rngs=nnx.Rngs(0),
            dtype=_dtype(config.model.dtype),
            remat=config.model.remat,
            attn_impl=attn_impl,
        )
    )
    return nnx.split(abstract)[0]


# --- loss -----------------------------------------------------------------------------------


def make_loss_fn(config, student_gd, jvp_gd, teacher_gd) -> Callable:
    """``loss_fn(params, teacher_params, batch, aux, key, step) -> (loss, metrics)``."""
    lc, method = config.loss, config.method
    slips = losses.paper_slips(method) if lc.paper_slips and method in ("scm", "meanflow") else {}
    guidance_values = jnp.asarray(lc.guidance_values, jnp.float32)
    # A separate tangent pass only when it uses another attention than the gradient pass;
    # otherwise the losses take the student's forward from the JVP's primal (one pass, not two).
    separate_tangent = config.model.jvp_attn_impl != config.model.attn_impl

    def loss_fn(params, teacher_params, batch, aux, key, step):
        k_g, k_loss = jax.random.split(key)
        latents = batch["latents"].astype(jnp.float32)
        x0 = pack(latents)  # [B, L, 4C]
        img_ids = image_ids(*latents.shape[2:])  # static: from the latent grid
        txt_ids = np.zeros((batch["t5"].shape[1], 3), np.float32)

        def call(gd, params, x, t, cond, **kw):
            model = nnx.merge(gd, params)
            g = cond["g"] if model.guidance_in is not None else None
            return model(x, cond["t5"], cond["pooled"], t, img_ids, txt_ids, g, **kw)

        g = jax.random.choice(k_g, guidance_values, (x0.shape[0],))
        cond = {"t5": batch["t5"], "pooled": batch["pooled"], "g": g}

        if method == "flow_matching":
            return losses.flow_matching_loss(
                lambda x, s, c: call(student_gd, params, x, s, c),
                x0,
                k_loss,
                cond=cond,
                time_sampler=partial(sample_logit_normal, mean=lc.fm_time_mean, std=lc.fm_time_std),
            )
        if method == "rescale":

            def with_g(c, gg):
                return {**c, "g": gg if gg is not None else c["g"]}

            return losses.rescale_regression_loss(
                lambda x, s, gg, c: call(student_gd, params, x, s, with_g(c, gg)),
                lambda x, s, gg, c: call(teacher_gd, teacher_params, x, s, with_g(c, gg)),
                x0,
                k_loss,
                cond=cond,
                guidance_range=tuple(lc.rescale_guidance_range),
            )
        if method == "scm":

            def student_fn(x_hat, t, c, gd=student_gd):
                def flow(xs, s):
                    return call(gd, params, xs, s, c, return_logvar=True)

                F, logvar = trigflow_velocity(flow, x_hat, t, has_aux=True)
                if config.model.logvar_time == "trig":  # the paper's choice (spec 7.9)
                    logvar = nnx.merge(gd, params).logvar_at(
                        t, c["pooled"], c["g"] if "guidance_in" in params else None
                    )
                return F, logvar

            def teacher_fn(x_hat, t, c):
                return trigflow_velocity(
                    lambda xs, s: call(teacher_gd, teacher_params, xs, s, c), x_hat, t
                )

            return losses.scm_loss(
                student_fn,
                teacher_fn,
                x0,
                k_loss,
                step=step,
                cond=cond,
                sigma_d=lc.sigma_d,
                p_mean=lc.p_mean,
                p_std=lc.p_std,
                tangent_warmup_steps=lc.tangent_warmup_steps,
                tangent_norm_c=lc.tangent_norm_c,
                tangent_fn=(
                    (lambda xh, tt, c: student_fn(xh, tt, c, gd=jvp_gd))
                    if separate_tangent
                    else None
                ),
                **slips,
            )
        if method == "meanflow":
            uncond = {
                "t5": jnp.broadcast_to(aux["uncond_t5"], batch["t5"].shape),
                "pooled": jnp.broadcast_to(aux["uncond_pooled"], batch["pooled"].shape),
                "g": g,
            }
            return losses.meanflow_loss(
                lambda z, t, d, c: call(student_gd, params, z, t, c, timestep2=d),
                lambda z, t, c: call(teacher_gd, teacher_params, z, t, c),
                x0,
                k_loss,
                cond=cond,
                uncond=uncond,
                cfg_prob=lc.cfg_prob,
                use_cfg=lc.use_cfg,
                omega=lc.omega,
                kappa=lc.kappa,
                cfg_t_min=lc.cfg_t_min,
                cfg_t_max=lc.cfg_t_max,
                adaptive_p=lc.adaptive_p,
                adaptive_c=lc.adaptive_c,
                mu=lc.mu,
                sigma=lc.sigma,
                ratio_r_neq_t=lc.ratio_r_neq_t,
                tangent_fn=(
                    (lambda z, t, d, c: call(jvp_gd, params, z, t, c, timestep2=d))
                    if separate_tangent
                    else None
                ),
                **slips,
            )
        raise ValueError(f"unknown method {method!r}")

    return loss_fn


# --- optimizer and step ---------------------------------------------------------------------


def make_optimizer(oc, total_steps: int) -> tuple[optax.GradientTransformation, Callable]:
    if oc.schedule == "constant":
        schedule = optax.constant_schedule(oc.lr)
    elif oc.schedule == "cosine":
        schedule = optax.cosine_decay_schedule(oc.lr, max(total_steps - oc.warmup_steps, 1))
    elif oc.schedule == "linear":
        schedule = optax.linear_schedule(oc.lr, 0.0, max(total_steps - oc.warmup_steps, 1))
    else:
        raise ValueError(f"config.optim.schedule={oc.schedule!r}: constant, cosine or linear")
    if oc.warmup_steps:
        schedule = optax.join_schedules(
            [optax.linear_schedule(0.0, oc.lr, oc.warmup_steps), schedule], [oc.warmup_steps]
        )
    tx = optax.chain(
        optax.clip_by_global_norm(oc.clip) if oc.clip > 0 else optax.identity(),
        optax.adamw(schedule, b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay),
    )
    return tx, schedule


def _all_finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def make_step(config, loss_fn, tx, schedule) -> Callable:
    accum, decay = config.grad_accum, config.optim.ema_decay

    def step_fn(state, teacher_params, batch, aux, key):
        step = state["step"]
        key = jax.random.fold_in(key, step)
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        params = state["params"]
        if accum == 1:
            (loss, metrics), grads = grad_fn(params, teacher_params, batch, aux, key, step)
        else:  # micro-batches in a scan: one optimizer step, activations of one micro-batch
            micro = jax.tree.map(lambda x: x.reshape(accum, -1, *x.shape[1:]), batch)

            def body(carry, xs):
                mb, i = xs
                (loss_i, m), g = grad_fn(
                    params, teacher_params, mb, aux, jax.random.fold_in(key, i), step
                )
                return jax.tree.map(jnp.add, carry, (loss_i, m, g)), None

            zeros = jax.tree.map(
                jnp.zeros_like,
                jax.eval_shape(
                    lambda: grad_fn(
                        params, teacher_params, jax.tree.map(lambda x: x[0], micro), aux, key, step
                    )
                ),
            )
            zeros = (zeros[0][0], zeros[0][1], zeros[1])
            (loss, metrics, grads), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum)))
            loss, metrics, grads = jax.tree.map(lambda x: x / accum, (loss, metrics, grads))

        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A finite gradient can still give a non-finite update (a NaN learning rate, say).
        finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(new_params)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)  # noqa: E731
        new = dict(state)
        new["params"] = keep(new_params, params)
        new["opt_state"] = keep(opt_state, state["opt_state"])
        if state.get("ema") is not None:
            ema = jax.tree.map(
                lambda e, p: decay * e + (1 - decay) * p, state["ema"], new["params"]
            )
            new["ema"] = keep(ema, state["ema"])
        new["step"] = step + 1
        new["nonfinite_streak"] = jnp.where(finite, 0, state["nonfinite_streak"] + 1)
        new["nonfinite_total"] = state["nonfinite_total"] + (~finite).astype(jnp.int32)
        metrics = {f"{config.method}/{k.split('/')[-1]}": v for k, v in metrics.items()}
        metrics.update(
            {
                "train/loss": loss,
                "train/grad_norm": optax.global_norm(grads),
                "train/param_norm": optax.global_norm(new["params"]),
                "train/update_norm": optax.global_norm(updates),
                "train/lr": schedule(step),
                "train/skipped_steps": new["nonfinite_total"],
            }
        )
        return new, metrics

    return step_fn


# --- state ----------------------------------------------------------------------------------


def _copy_shared(student: Flux, teacher_params: nnx.State) -> None:
    """Student parameters that the teacher has are set to the teacher's (cast to f32)."""
    source = dict(nnx.to_flat_state(teacher_params))
    for path, var in nnx.to_flat_state(nnx.state(student, nnx.Param)):
        if path in source:
            var.set_value(source[path].get_value().astype(var.get_value().dtype))


def make_init_fn(config, student_cfg, tx, refits: dict) -> Callable:
    """``init(teacher_params, key) -> state``; jitted by the caller into its shardings."""

    def init(teacher_params, key):
        student = Flux(student_cfg, rngs=nnx.Rngs(key), dtype=_dtype(config.model.dtype))
        if teacher_params is not None:
            _copy_shared(student, teacher_params)
            if student_cfg.delta_embed:
                reset_delta_embedder(student, student_cfg.delta_init)
            for path, value in refits.items():  # the rescale method's least-squares refits
                node = student
                for part in path.split(".")[:-1]:
                    node = getattr(node, part)
                getattr(node, path.split(".")[-1]).set_value(value)
        params = nnx.state(student, nnx.Param)
        return {
            "step": jnp.zeros((), jnp.int32),
            "params": params,
            "opt_state": tx.init(params),
            "ema": params if config.optim.ema_decay > 0 else None,
            "nonfinite_streak": jnp.zeros((), jnp.int32),
            "nonfinite_total": jnp.zeros((), jnp.int32),
        }

    return init


def rescale_refits(teacher_params: nnx.State, student_cfg: FluxConfig) -> dict[str, np.ndarray]:
    """Least-squares refits of the time (and guidance) embedders' first layers (spec 2.2)."""
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


# --- data -----------------------------------------------------------------------------------


def host_rows(sharding: NamedSharding, global_batch: int) -> np.ndarray:
    """The rows of a ``[global_batch, ...]`` array that this host's devices hold under
    ``sharding``: what this host reads of each global batch (sorted)."""
    index = sharding.addressable_devices_indices_map((global_batch,))
    return np.asarray(
        sorted({r for idx in index.values() for r in range(*idx[0].indices(global_batch))})
    )


def make_input(config, student_cfg: FluxConfig, rows: np.ndarray | None = None):
    """A grain iterator of this host's ``rows`` of every global batch (default: all rows; see
    :func:`distill_jax.data.input_pipeline.global_batches`) with ``get_state``/``set_state``, and
    ``aux``. The sequence of global batches does not depend on the number of processes."""
    dc = config.data
    if dc.kind == "synthetic":
        source = SyntheticLatents(
            channels=dc.latent_channels,
            grid=tuple(dc.latent_grid),
            text_len=dc.text_len,
            context_dim=student_cfg.context_dim,
            pooled_dim=student_cfg.pooled_dim,
            seed=dc.shuffle_seed,
            size=dc.synthetic_size,
        )
        aux = {
            "uncond_t5": np.zeros((dc.text_len, student_cfg.context_dim), np.float32),
            "uncond_pooled": np.zeros((student_cfg.pooled_dim,), np.float32),
        }
        batches = input_pipeline.global_batches(
            source, global_batch=dc.batch_size, rows=rows, seed=dc.shuffle_seed
        )
        return iter(batches), aux
    if dc.kind == "latents":
        return _prepared_latents(dc, rows)
    raise ValueError(f"config.data.kind={dc.kind!r}: 'synthetic' or 'latents'")


def _prepared_latents(dc, rows):
    """Batches of a ``distill-jax prepare`` dataset in the trainer's layout: standard-unit
    latents ``(z - shift) * scale`` as ``[B, C, h, w]``, float32 embeddings."""
    from distill_jax.data import builders
    from distill_jax.data.prepare import UNCOND_FILE

    if not dc.path:
        raise ValueError("config.data.kind='latents' needs config.data.path (a prepare output)")
    meta = builders.load_info(dc.path).metadata
    scale, shift = float(meta["scaling_factor"]), float(meta["shift_factor"])
    uncond_path = Path(dc.path) / UNCOND_FILE
    if not uncond_path.is_file():
        raise FileNotFoundError(
            f"{uncond_path} is missing: re-run `distill-jax prepare` on "
            "this dataset (it writes the unconditional embeddings)"
        )
    with np.load(uncond_path) as f:
        aux = {"uncond_t5": f["t5"], "uncond_pooled": f["pooled"]}

    def to_trainer(b):
        z = (np.asarray(b["latents"], np.float32) - shift) * scale  # [B, h, w, C]
        return {
            "latents": np.ascontiguousarray(z.transpose(0, 3, 1, 2)),
            "t5": np.asarray(b["t5"], np.float32),
            "pooled": np.asarray(b["pooled"], np.float32),
        }

    ds = input_pipeline.latent_batches(
        dc.path, global_batch=dc.batch_size, rows=rows, seed=dc.shuffle_seed
    )
    return iter(ds.map(to_trainer)), aux


def batch_placer(sharding: NamedSharding, rows: np.ndarray, size: int) -> Callable:
    """``place(batch) -> global arrays under sharding``, for batches holding this host's ``rows``
    of a global batch of ``size``."""
    position = np.full(size, -1)
    position[rows] = np.arange(len(rows))

    def put(v):
        v = np.asarray(v)
        if len(v) != len(rows):
            raise ValueError(
                f"the input gave {len(v)} rows; this host holds {len(rows)} of the global batch"
            )
        return jax.make_array_from_callback(
            (size, *v.shape[1:]), sharding, lambda idx: v[position[idx[0]]]
        )

    return lambda batch: {k: put(v) for k, v in batch.items()}


# --- the loop -------------------------------------------------------------------------------


@dataclasses.dataclass
class Run:
    """What ``train`` built: handy for notebooks and tests."""

    state: dict
    student_cfg: FluxConfig
    graphdef: nnx.GraphDef
    metrics: list[dict]
    stopped_early: bool  # by a preemption notice or Ctrl-C, after saving a checkpoint
    stop_signal: int | None = None  # the signal that stopped it (SIGTERM, SIGINT)

    def student(self) -> Flux:
        """The trained student on the host (gathered from every process: all must call it)."""
        return nnx.merge(self.graphdef, distributed.host_values(self.state["params"]))


def _teacher(config, mesh, rules) -> tuple[FluxConfig, nnx.State | None]:
    if config.teacher.path:
        from distill_jax.convert import load_flux

        model = load_flux(config.teacher.path, mesh=mesh)
        return model.cfg, nnx.state(model, nnx.Param)
    cfg = getattr(FluxConfig, config.model.preset)().replace(**dict(config.model.overrides))
    if config.method == "flow_matching":
        return cfg, None  # trained from scratch
    # A random teacher (tests, benchmarks): born sharded like any other state.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))))
    shardings = state_shardings(abstract, mesh, rules)
    params = jax.jit(
        lambda: nnx.state(Flux(cfg, rngs=nnx.Rngs(config.seed + 1)), nnx.Param),
        out_shardings=shardings,
    )()
    return cfg, params


def mesh_and_rules(config) -> tuple[Any, tuple]:
    devices = jax.devices()
    if config.mesh.devices > 0:
        devices = devices[: config.mesh.devices]
    mesh = make_mesh(
        {"data": config.mesh.data, "fsdp": config.mesh.fsdp, "tensor": config.mesh.tensor}, devices
    )
    rules = tuple({**dict(DEFAULT_RULES), **dict(config.mesh.rules)}.items())
    return mesh, rules


@dataclasses.dataclass
class _Setup:
    """Everything the step needs, concrete or (for the memory plan) abstract."""

    student_cfg: FluxConfig
    student_gd: nnx.GraphDef
    loss_fn: Callable
    step_fn: Callable
    init_fn: Callable
    teacher_params: Any
    teacher_sh: Any
    abstract: dict
    state_sh: dict
    root: jax.Array


def _setup(config, mesh, rules, teacher: Flux | None = None, *, abstract: bool = False) -> _Setup:
    if teacher is not None:
        params = nnx.state(teacher, nnx.Param)
        shardings = state_shardings(params, mesh, rules)
        teacher_cfg, teacher_params = teacher.cfg, jax.device_put(params, shardings)
    elif abstract:
        teacher_cfg, teacher_params = _abstract_teacher(config, mesh, rules)
    else:
        teacher_cfg, teacher_params = _teacher(config, mesh, rules)
    teacher_cfg, student_cfg = model_configs(config, teacher_cfg)
    student_gd = _graphdef(student_cfg, config, config.model.attn_impl)
    jvp_gd = _graphdef(student_cfg, config, config.model.jvp_attn_impl)
    teacher_gd = _graphdef(teacher_cfg, config, config.model.attn_impl)

    tx, schedule = make_optimizer(config.optim, config.total_steps)
    refits = {}
    if config.method == "rescale" and not abstract:
        refits = rescale_refits(teacher_params, student_cfg)
    init_fn = make_init_fn(config, student_cfg, tx, refits)
    root = jax.random.key(config.seed)
    with jax.set_mesh(mesh):
        abstract_state = jax.eval_shape(init_fn, teacher_params, root)
        param_sh = state_shardings(
            nnx.state(nnx.eval_shape(lambda: Flux(student_cfg, rngs=nnx.Rngs(0)))), mesh, rules
        )
        state_sh = _state_shardings(abstract_state, param_sh, mesh)
    if mesh.size > 1:  # parameters, optimizer state and EMA alike
        assert_not_replicated(
            abstract_state, state_sh, min_bytes=config.mesh.replicated_threshold_bytes
        )
    loss_fn = make_loss_fn(config, student_gd, jvp_gd, teacher_gd)
    teacher_sh = (
        None if teacher_params is None else jax.tree.map(lambda x: x.sharding, teacher_params)
    )
    return _Setup(
        student_cfg,
        student_gd,
        loss_fn,
        make_step(config, loss_fn, tx, schedule),
        init_fn,
        teacher_params,
        teacher_sh,
        abstract_state,
        state_sh,
        root,
    )


def _abstract_teacher(config, mesh, rules) -> tuple[FluxConfig, Any]:
    cfg = getattr(FluxConfig, config.model.preset)().replace(**dict(config.model.overrides))
    if config.method == "flow_matching":
        return cfg, None
    abstract = nnx.state(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = state_shardings(abstract, mesh, rules)
    return cfg, jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh), abstract, shardings
    )


def train(
    config: ml_collections.ConfigDict,
    workdir: str | Path,
    *,
    data: tuple[Any, dict] | None = None,
    teacher: Flux | None = None,
    on_step: Callable[[int, dict], None] | None = None,
) -> Run:
    """Runs (or resumes) the training described by ``config``, checkpointing into ``workdir``.

    ``teacher``: optionally an in-memory teacher replacing ``config.teacher.path`` (its
    parameters are placed on the mesh by the rules; it is not modified).
    ``data``: optionally ``(iterator, aux)`` replacing the input described by ``config.data``;
    the iterator yields per-host batches and has grain's ``get_state``/``set_state``.
    ``on_step(step, metrics)`` is called after every logged step with host metrics.
    """
    check_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if config.multihost:
        distributed.initialize()  # auto-detected cluster; a no-op when the CLI joined already
    mesh, rules = mesh_and_rules(config)
    log.info(
        "process %d/%d, %d devices (%s), mesh %s",
        jax.process_index(),
        jax.process_count(),
        jax.device_count(),
        jax.devices()[0].device_kind,
        dict(mesh.shape),
    )

    setup = _setup(config, mesh, rules, teacher)
    teacher_params, state_sh, init_fn, root = (
        setup.teacher_params,
        setup.state_sh,
        setup.init_fn,
        setup.root,
    )

    ckpt = Checkpoints(workdir, keep=config.keep_checkpoints, async_save=config.async_checkpoints)
    batch_sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    rows = host_rows(batch_sh, config.data.batch_size)
    place = batch_placer(batch_sh, rows, config.data.batch_size)
    data_iter, aux = data if data is not None else make_input(config, setup.student_cfg, rows)
    abstract_sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), setup.abstract, state_sh
    )
    config_json = json.loads(config.to_json_best_effort())
    restored = ckpt.restore_latest(abstract_sharded, config=config_json)
    if restored is not None:
        step0, state, _, data_state = restored
        data_iter.set_state(data_state["iterator"])
        log.info("resumed from step %d", step0)
    else:
        with jax.set_mesh(mesh):
            state = jax.jit(init_fn, out_shardings=state_sh)(teacher_params, root)

    replicated = NamedSharding(mesh, PartitionSpec())
    teacher_sh = setup.teacher_sh
    jitted = jax.jit(
        setup.step_fn,
        in_shardings=(state_sh, teacher_sh, batch_sh, replicated, replicated),
        out_shardings=(state_sh, replicated),
        donate_argnums=(0,),
    )
    aux = jax.device_put(aux, replicated)
    # The step's key lives replicated on the mesh (not on one device) before the loop starts.
    root = jax.jit(lambda: jax.random.key(config.seed), out_shardings=replicated)()
    writer = MetricWriter(workdir) if distributed.is_primary() else None

    def save(step, force=False):
        ckpt.save(
            step,
            state,
            ema=None,
            config=config_json,
            data={"iterator": data_iter.get_state()},
            force=force,
        )

    history, stopped, compiled, flops = [], False, None, None
    step = int(jax.device_get(state["step"]))
    peak = peak_tflops(jax.devices()[0].device_kind) or config.peak_tflops_per_device
    from tqdm.auto import tqdm

    bar = tqdm(
        total=config.total_steps,
        initial=step,
        desc=f"train {config.method}",
        disable=not distributed.is_primary(),
        dynamic_ncols=True,
    )
    # The batch is the loop's one intended host-to-device transfer; any other is an error.
    guard = partial(jax.transfer_guard, "disallow")
    try:
        with (
            Preemption() as preempt,
            jax.set_mesh(mesh),
            axis_rules(rules),
            contextlib.closing(bar),
        ):
            t_last, n_last = time.perf_counter(), step
            while step < config.total_steps:
                batch = place(next(data_iter))
                if compiled is None:  # compile once; the executable also gives the FLOP count
                    start = time.perf_counter()
                    compiled = jitted.lower(state, teacher_params, batch, aux, root).compile()
                    flops = _flops(compiled)
                    log.info(
                        "step compiled in %.1f s (%s FLOPs per device per step)",
                        time.perf_counter() - start,
                        f"{flops:.3g}" if flops else "unknown",
                    )
                with guard():
                    state, metrics = compiled(state, teacher_params, batch, aux, root)
                step += 1
                bar.update(1)
                logged = step % config.log_every == 0 or step == config.total_steps
                # The skip counter is read only where metrics are pulled anyway (no per-step sync).
                streak = int(jax.device_get(state["nonfinite_streak"])) if logged else 0
                if streak > config.max_consecutive_nonfinite:
                    save(step, force=True)
                    ckpt.close()
                    limit = config.max_consecutive_nonfinite
                    raise NonFiniteError(
                        f"{streak} consecutive steps had a non-finite loss, gradient or update "
                        f"(limit config.max_consecutive_nonfinite={limit}, checked every "
                        f"config.log_every={config.log_every} steps); stopped at step {step} "
                        f"with the last good parameters saved in {ckpt.directory}"
                    )
                if logged:
                    host = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    now = time.perf_counter()
                    rate = (step - n_last) / max(now - t_last, 1e-9)
                    t_last, n_last = now, step
                    host["perf/steps_per_second"] = rate
                    if flops:
                        host["perf/tflops_per_device"] = flops * rate / 1e12
                        if peak:
                            host["perf/mfu"] = host["perf/tflops_per_device"] / peak
                    history.append({"step": step, **host})
                    bar.set_postfix(loss=f"{host['train/loss']:.4g}", rate=f"{rate:.2f}/s")
                    if writer:
                        writer.write(step, host)
                    if on_step:
                        on_step(step, host)
                if step % config.checkpoint_every == 0:
                    save(step)
                if preempt.reached(step):
                    save(step, force=True)
                    stopped = True
                    break
            if not stopped and step not in ckpt.steps():
                save(step, force=True)
    except BaseException:  # an error, or a second Ctrl-C: finish the save in flight
        ckpt.close_after_error()
        raise
    finally:
        if writer:
            writer.close()
    ckpt.close()
    return Run(
        state=state,
        student_cfg=setup.student_cfg,
        graphdef=setup.student_gd,
        metrics=history,
        stopped_early=stopped,
        stop_signal=preempt.signum if stopped else None,
    )


def _state_shardings(abstract: dict, param_sh: nnx.State, mesh) -> dict:
    """Parameters, EMA and every optimizer sub-state shaped like the parameters (Adam's mu and
    nu) take the parameters' shardings; everything else (counters) is replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())
    params_def = jax.tree.structure(abstract["params"])

    def for_subtree(x):
        if isinstance(x, nnx.State) and jax.tree.structure(x) == params_def:
            return param_sh
        return jax.tree.map(lambda _: replicated, x)

    return jax.tree.map(for_subtree, abstract, is_leaf=lambda x: isinstance(x, nnx.State))


def _flops(compiled) -> float | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 (FLOP counts are informative only)
        return None
    cost = cost[0] if isinstance(cost, list | tuple) else cost
    return float(cost.get("flops", 0.0)) or None if cost else None


def per_device_bytes(tree: Any) -> int:
    """Bytes one device holds of a tree of sharded (abstract) arrays."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        if leaf is None:
            continue
        shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def plan_memory(config: ml_collections.ConfigDict, *, compile: str = "none") -> dict[str, Any]:
    """Per-device memory of the configured run, without allocating it (``train --dry-run``).

    Builds the state and teacher abstractly on the configured mesh (fake CPU devices can stand
    in: ``XLA_FLAGS=--xla_force_host_platform_device_count=N``) and returns bytes per device for
    parameters, optimizer state, EMA and teacher (exact, from the shardings) and the step's
    activations the backward pass keeps (``residuals_gib``: the loss's VJP residuals under
    ``eval_shape``, which reflect the remat policy, spread over the batch shards). These need
    no compilation. Not included: the transient working set of one block's passes.

    ``compile``: ``"full"`` also compiles the step and reports XLA's temporary bytes
    (``activations_gib``); ``"extrapolate"`` compiles at depths (1, 1), (2, 1) and (1, 2) and
    extrapolates linearly, since a full-depth 8B compile needs more host memory than a laptop
    has. On a CPU stand-in XLA schedules for speed and ignores rematerialization, so these are
    upper bounds, not accelerator figures.
    """
    check_config(config)
    mesh, rules = mesh_and_rules(config)
    setup = _setup(config, mesh, rules, abstract=True)
    sharded = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        setup.abstract,
        setup.state_sh,
    )
    gib = 1 << 30
    cfg = setup.student_cfg
    plan = {
        "method": config.method,
        "mesh": dict(mesh.shape),
        "devices": mesh.size,
        "global_batch": config.data.batch_size,
        "depth": [cfg.num_double, cfg.num_single],
        "student_parameters": sum(
            math.prod(x.shape) for x in jax.tree.leaves(setup.abstract["params"])
        ),
        "params_gib": per_device_bytes(sharded["params"]) / gib,
        "optimizer_gib": per_device_bytes(sharded["opt_state"]) / gib,
        "ema_gib": per_device_bytes(sharded["ema"]) / gib if sharded["ema"] is not None else 0.0,
        "teacher_gib": per_device_bytes(setup.teacher_params) / gib
        if setup.teacher_params is not None
        else 0.0,
    }
    # What autodiff keeps between the forward and backward passes (respects remat; shapes only).
    batch_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    plan["residuals_gib"] = _residual_bytes(config, setup) / batch_shards / gib
    start = time.perf_counter()
    if compile == "full":
        plan["activations_gib"] = _step_temp_bytes(config, mesh, rules, setup, sharded) / gib
    elif compile == "extrapolate":
        measured = {}
        for depth in ((1, 1), (2, 1), (1, 2)):
            small = _with_depth(config, *depth)
            s_setup = _setup(small, mesh, rules, abstract=True)
            s_sharded = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                s_setup.abstract,
                s_setup.state_sh,
            )
            measured[depth] = _step_temp_bytes(small, mesh, rules, s_setup, s_sharded)
        per_double = measured[(2, 1)] - measured[(1, 1)]
        per_single = measured[(1, 2)] - measured[(1, 1)]
        total = (
            measured[(1, 1)] + per_double * (cfg.num_double - 1) + per_single * (cfg.num_single - 1)
        )
        plan["activations_gib"] = total / gib
        plan["activations_extrapolated"] = {
            "at_1+1_gib": measured[(1, 1)] / gib,
            "per_double_block_gib": per_double / gib,
            "per_single_block_gib": per_single / gib,
        }
    elif compile != "none":
        raise ValueError(f"compile={compile!r}: 'none', 'full' or 'extrapolate'")
    plan["compile_s"] = time.perf_counter() - start
    plan["total_gib"] = sum(
        plan[k] for k in ("params_gib", "optimizer_gib", "ema_gib", "teacher_gib", "residuals_gib")
    )
    return plan


def _abstract_inputs(config, setup: _Setup, sharding=None, replicated=None):
    dc, cfg = config.data, setup.student_cfg
    b = dc.batch_size
    batch = {
        "latents": jax.ShapeDtypeStruct(
            (b, dc.latent_channels, *dc.latent_grid), jnp.float32, sharding=sharding
        ),
        "t5": jax.ShapeDtypeStruct(
            (b, dc.text_len, cfg.context_dim), jnp.float32, sharding=sharding
        ),
        "pooled": jax.ShapeDtypeStruct((b, cfg.pooled_dim), jnp.float32, sharding=sharding),
    }
    aux = {
        "uncond_t5": jax.ShapeDtypeStruct(
            (dc.text_len, cfg.context_dim), jnp.float32, sharding=replicated
        ),
        "uncond_pooled": jax.ShapeDtypeStruct((cfg.pooled_dim,), jnp.float32, sharding=replicated),
    }
    return batch, aux


def _residual_bytes(config, setup: _Setup) -> int:
    """Global bytes of the residuals the loss's backward pass keeps (``jax.vjp`` under
    ``eval_shape``), parameter-shaped ones (the weights themselves) excluded."""
    batch, aux = _abstract_inputs(config, setup)
    params = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup.abstract["params"]
    )
    teacher = (
        None
        if setup.teacher_params is None
        else jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), setup.teacher_params)
    )

    def residuals(p, t, b, a, k):
        return jax.vjp(lambda q: setup.loss_fn(q, t, b, a, k, 0)[0], p)[1]

    out = jax.eval_shape(residuals, params, teacher, batch, aux, setup.root)
    param_shapes = {tuple(x.shape) for x in jax.tree.leaves(params)}
    return sum(
        math.prod(x.shape) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(out)
        if tuple(x.shape) not in param_shapes
    )


def _with_depth(config, num_double: int, num_single: int) -> ml_collections.ConfigDict:
    small = ml_collections.ConfigDict(config.to_dict())
    small.model.overrides = {
        **dict(config.model.overrides),
        "num_double": num_double,
        "num_single": num_single,
    }
    small.mesh.replicated_threshold_bytes = config.mesh.replicated_threshold_bytes
    return small


def _step_temp_bytes(config, mesh, rules, setup: _Setup, sharded) -> int:
    """Temporary bytes per device of the compiled step for ``config.data``'s batch shapes.
    Note: XLA:CPU's figure does not reflect rematerialization (it schedules for speed)."""
    batch_sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch, aux = _abstract_inputs(config, setup, batch_sh, replicated)
    key = jax.ShapeDtypeStruct(setup.root.shape, setup.root.dtype, sharding=replicated)
    with jax.set_mesh(mesh), axis_rules(rules):
        compiled = (
            jax.jit(setup.step_fn, out_shardings=(setup.state_sh, replicated), donate_argnums=(0,))
            .lower(sharded, setup.teacher_params, batch, aux, key)
            .compile()
        )
    return int(getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0))
