"""The one training loop: flow matching, time-scale rescaling, sCM and MeanFlow.

``train(config, workdir)`` builds the mesh, the frozen teacher and the student (born sharded),
restores the newest checkpoint in ``workdir`` if there is one, runs a single jitted step

    step(state, teacher_params, batch, aux, key) -> (state, metrics)

with explicit shardings and the state donated, and at the end writes the student to
``workdir/student`` (:func:`save_student`). The teacher is a separate argument and is never
checkpointed. Batches are ``{"latents": [B, C, h, w] (standard units), "t5": [B, S, Dt],
"pooled": [B, P]}`` (:mod:`distill_jax.data.training`); ``aux`` holds the unconditional
embeddings for MeanFlow's CFG. What differs between the methods (the student's structure, the
loss) is in :mod:`distill_jax.methods`; the memory plan of a run in :mod:`distill_jax.memory`.

Read top to bottom: optimizer -> step -> state -> teacher -> set-up -> loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax import distributed
from distill_jax.checkpoint import Checkpoints, Preemption
from distill_jax.config import check_config
from distill_jax.data.training import (
    batch_placer,
    host_rows,
    make_input,
    shapes_text_encoder,
    shapes_world,
    toy_pipeline,
)
from distill_jax.methods import (
    METHODS,
    SLIP_METHODS,
    loss_switches,
    make_loss_fn,
    model_configs,
    resolve,
    time_dtype,
)
from distill_jax.metrics import MetricWriter, peak_tflops
from distill_jax.models.attention import resolve_impl
from distill_jax.models.flux import Flux, FluxConfig, relayout, reset_delta_embedder
from distill_jax.sharding import (
    DEFAULT_RULES,
    abstract_sharded,
    assert_not_replicated,
    axis_rules,
    make_mesh,
    state_shardings,
)

log = logging.getLogger(__name__)
BATCH_AXES = ("data", "fsdp")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


# --- models ---------------------------------------------------------------------------------


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
            time_dtype=time_dtype(config),
        )
    )
    return nnx.split(abstract)[0]


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

        with jax.named_scope("optimizer"):
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


def _copy_shared(student: Flux, params: nnx.State) -> None:
    """Student parameters that ``params`` has (same path) are set to them, cast to the student's
    dtype (float32)."""
    source = dict(nnx.to_flat_state(params))
    for path, var in nnx.to_flat_state(nnx.state(student, nnx.Param)):
        if path in source:
            var.set_value(source[path].get_value().astype(var.get_value().dtype))


def make_init_fn(config, student_cfg, tx, refits: dict) -> Callable:
    """``init(teacher_params, key, init_params=None) -> state``; jitted by the caller into its
    shardings. The student's parameters: random, then the teacher's where the student has the
    same ones (plus the method's ``refits``), then ``init_params``' where it has them
    (``config.teacher.init_checkpoint``). MeanFlow's Δ-time embedder restarts from the time
    embedder unless ``init_params`` hold one."""

    def init(teacher_params, key, init_params=None):
        student = Flux(student_cfg, rngs=nnx.Rngs(key), dtype=_dtype(config.model.dtype))
        if teacher_params is not None:
            _copy_shared(student, teacher_params)
            for path, value in refits.items():  # the rescale method's least-squares refits
                node = student
                for part in path.split(".")[:-1]:
                    node = getattr(node, part)
                getattr(node, path.split(".")[-1]).set_value(value)
        if init_params is not None:
            _copy_shared(student, init_params)
        loaded = teacher_params is not None or init_params is not None
        if student_cfg.delta_embed and loaded and "delta_in" not in (init_params or {}):
            reset_delta_embedder(student, student_cfg.delta_init)
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


# --- teacher and student initialisation --------------------------------------------------------


def load_teacher(
    config: ml_collections.ConfigDict, mesh, rules, teacher: Flux | None = None
) -> tuple[FluxConfig, nnx.State | None]:
    """The frozen teacher's structure and parameters on the mesh: ``teacher`` if given, else
    ``config.teacher.path``, else (tests, benchmarks) a random ``config.model.preset``; no
    parameters for a method that trains without a teacher. Its blocks are in the layout of
    ``config.model.scan_layers`` (restacked if they come in the other one)."""
    if teacher is not None:
        params = nnx.state(teacher, nnx.Param)
        params = jax.device_put(params, state_shardings(params, mesh, rules))
        return _in_layout(config, teacher.cfg, params, mesh, rules)
    if config.teacher.path:
        from distill_jax.folders import load_flux

        model = load_flux(config.teacher.path, mesh=mesh)
        return _in_layout(config, model.cfg, nnx.state(model, nnx.Param), mesh, rules)
    cfg = layout(config, FluxConfig.preset(config.model.preset, **config.model.overrides))
    if not METHODS[config.method].teacher:
        return cfg, None  # trained from scratch
    # A random teacher (tests, benchmarks): born sharded like any other state.
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))))
    shardings = state_shardings(abstract, mesh, rules)
    params = jax.jit(
        lambda: nnx.state(Flux(cfg, rngs=nnx.Rngs(config.seed + 1)), nnx.Param),
        out_shardings=shardings,
    )()
    return cfg, params


def layout(config: ml_collections.ConfigDict, cfg: FluxConfig) -> FluxConfig:
    """``cfg`` with the block layout of ``config.model.scan_layers`` (None keeps ``cfg``'s)."""
    scan = config.model.scan_layers
    return cfg if scan is None or scan == cfg.scan_layers else cfg.replace(scan_layers=scan)


def _restacked(params: nnx.State, scan_layers: bool, mesh, rules) -> nnx.State:
    """``params`` in the block layout ``scan_layers`` (:func:`relayout`), born sharded."""
    move = partial(relayout, scan_layers=scan_layers)
    shardings = state_shardings(jax.eval_shape(move, params), mesh, rules)
    with jax.set_mesh(mesh):
        return jax.jit(move, out_shardings=shardings)(params)


def _in_layout(config, cfg: FluxConfig, params: nnx.State, mesh, rules):
    """``(cfg, params)`` in the block layout of ``config.model.scan_layers``."""
    want = layout(config, cfg)
    if want.scan_layers != cfg.scan_layers:
        log.info(
            "teacher blocks restacked: scan_layers %s -> %s", cfg.scan_layers, want.scan_layers
        )
        params = _restacked(params, want.scan_layers, mesh, rules)
    return want, params


def load_init(
    config: ml_collections.ConfigDict, student_cfg: FluxConfig, mesh, rules
) -> nnx.State | None:
    """The parameters of ``config.teacher.init_checkpoint`` (a converted FLUX folder) on the
    mesh, or None without one. They must run at the student's time scale and match its shapes
    wherever both have a parameter; parameters the student lacks are ignored (and logged)."""
    path = config.teacher.init_checkpoint
    if not path:
        return None
    from distill_jax.folders import load_flux

    model = load_flux(path, mesh=mesh, rules=rules)
    if model.cfg.time_scale != student_cfg.time_scale:
        raise ValueError(
            f"config.teacher.init_checkpoint={path!r} runs at time_scale "
            f"{model.cfg.time_scale}; the {config.method} student at {student_cfg.time_scale}"
        )
    params = nnx.state(model, nnx.Param)
    if model.cfg.scan_layers != student_cfg.scan_layers:
        params = _restacked(params, student_cfg.scan_layers, mesh, rules)
    student = nnx.eval_shape(lambda: Flux(student_cfg, rngs=nnx.Rngs(0)))
    want = {p: v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(student, nnx.Param))}
    have = {p: v.get_value().shape for p, v in nnx.to_flat_state(params)}
    name = lambda p: ".".join(map(str, p))  # noqa: E731
    wrong = [
        f"{name(p)}: {have[p]} (student {want[p]})" for p in have if want.get(p, have[p]) != have[p]
    ]
    if wrong or not set(have) & set(want):
        raise ValueError(
            f"config.teacher.init_checkpoint={path!r} does not fit the {config.method} student: "
            + ("; ".join(wrong) if wrong else "no parameter in common")
        )
    unused = sorted(name(p) for p in have if p not in want)
    kept = sorted(name(p) for p in want if p not in have)
    log.info(
        "student initialised from %s: %d parameters (kept their init: %s; unused: %s)",
        path,
        len(have) - len(unused),
        kept or "none",
        unused or "none",
    )
    return params


# --- set-up ---------------------------------------------------------------------------------


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
class Setup:
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


def make_setup(
    config: ml_collections.ConfigDict,
    mesh,
    rules,
    teacher_cfg: FluxConfig,
    teacher_params: Any,
    *,
    abstract: bool = False,
) -> Setup:
    """Structures, loss, step, initialiser and state shardings of the run, for the teacher
    ``(teacher_cfg, teacher_params)`` (from :func:`load_teacher`, or abstract arrays with
    shardings when ``abstract``: then nothing is computed from the teacher's values)."""
    method = METHODS[config.method]
    teacher_cfg, student_cfg = model_configs(config, teacher_cfg)
    student_gd = _graphdef(student_cfg, config, config.model.attn_impl)
    jvp_gd = _graphdef(student_cfg, config, config.model.jvp_attn_impl)
    teacher_gd = _graphdef(teacher_cfg, config, config.model.attn_impl)

    tx, schedule = make_optimizer(config.optim, config.total_steps)
    refits = {}
    if method.refits is not None and not abstract:
        refits = method.refits(teacher_params, student_cfg)
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
    return Setup(
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
    seconds: float = 0.0  # wall time of this call's training loop

    def student(self) -> Flux:
        """The trained student on the host (gathered from every process: all must call it)."""
        return nnx.merge(self.graphdef, distributed.host_values(self.state["params"]))


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
    config = resolve(config)  # what runs: the "auto" settings at their effective values
    log.info("config:\n%s", config)
    if config.method in SLIP_METHODS:
        log.info("the %s loss's switches: %s", config.method, loss_switches(config))
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

    teacher_cfg, teacher_params = load_teacher(config, mesh, rules, teacher)
    setup = make_setup(config, mesh, rules, teacher_cfg, teacher_params)
    # "auto" is left only on GPU by resolve: cuDNN needs the head dim
    attn = resolve_impl(config.model.attn_impl, _dtype(config.model.dtype), teacher_cfg.head_dim)
    log.info("attention: %s forward and backward, %s tangent", attn, config.model.jvp_attn_impl)
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
    config_json = json.loads(config.to_json_best_effort())
    restored = ckpt.restore_latest(abstract_sharded(setup.abstract, state_sh), config=config_json)
    if restored is not None:
        step0, state, _, data_state = restored
        data_iter.set_state(data_state["iterator"])
        log.info("resumed from step %d", step0)
    else:  # a new run: the init checkpoint is read only now
        init_params = load_init(config, setup.student_cfg, mesh, rules)
        with jax.set_mesh(mesh):
            state = jax.jit(init_fn, out_shardings=state_sh)(teacher_params, root, init_params)

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
            loop_start = time.perf_counter()
            t_last, n_last = loop_start, step
            while step < config.total_steps:
                batch = place(next(data_iter))
                if compiled is None:  # compile once; the executable also gives the FLOP count
                    start = time.perf_counter()
                    compiled = jitted.lower(state, teacher_params, batch, aux, root).compile()
                    flops = _flops(config, teacher_cfg, batch, aux)
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
    run = Run(
        state=state,
        student_cfg=setup.student_cfg,
        graphdef=setup.student_gd,
        metrics=history,
        stopped_early=stopped,
        stop_signal=preempt.signum if stopped else None,
        seconds=time.perf_counter() - loop_start,
    )
    if not stopped:
        save_student(config, run, workdir / "student")
    return run


def save_student(config: ml_collections.ConfigDict, run: Run, dst: Path) -> Path:
    """Writes the trained student (its EMA when ``config.optim.ema_decay > 0``) to ``dst`` in
    ``config.save_dtype`` (default: as trained) as a converted folder
    (:func:`~distill_jax.folders.save_model`, checksums recorded; every process must call
    this). For the shapes world it is a whole toy pipeline folder, with the text encoder that
    captioned the input (:func:`~distill_jax.folders.save_toy`): what `distill-jax sample`,
    `distill-jax geneval` and ``load_pipeline`` read; a toy teacher trained from scratch (flow
    matching) also records its held-out accuracy as written (:func:`distill_jax.demo.measure_toy`:
    512 prompts at its full number of steps; one process only)."""
    from distill_jax import folders

    params = run.state["ema"] if run.state.get("ema") is not None else run.state["params"]
    student = nnx.merge(run.graphdef, params)
    dtype = config.save_dtype or None
    if config.data.kind != "shapes":
        path = folders.save_model(student, dst, overwrite=True, dtype=dtype)
    else:
        graphdef, text = nnx.split(shapes_text_encoder(config))
        text = nnx.merge(graphdef, jax.device_get(text))  # host arrays: process 0 writes them
        training = {
            "method": config.method,
            "steps": int(jax.device_get(run.state["step"])),
            "final_loss": run.metrics[-1]["train/loss"] if run.metrics else None,
            "seconds": round(run.seconds, 1),
        }
        pipeline = toy_pipeline(student, text, shapes_world(config))
        path = folders.save_toy(pipeline, dst, {"training": training}, dtype=dtype)
        if config.method == "flow_matching" and jax.process_count() == 1:
            from distill_jax.demo import measure_toy

            measured = measure_toy(folders.load_pipeline(path))
            folders.save_toy_meta(
                path,
                {"training": training, "evaluation": measured, "teacher_steps": measured["steps"]},
            )
    log.info("student written to %s", path)
    return path


def flop_counting(config, head_dim: int) -> ml_collections.ConfigDict:
    """``config`` with loop-free attention (``"plain"``) of the same structure, for counting.

    XLA's cost analysis counts a loop's body once (the blockwise sweep as one tile) and a
    kernel's custom call (cuDNN, splash) as nothing. The copy runs the same matmuls in plain
    einsums: in both passes when they share one attention (one student forward per step), else
    plain and XLA's (two passes, as the configured program runs them)."""
    attn, jvp = (
        resolve_impl(impl, _dtype(config.model.dtype), head_dim)
        for impl in (config.model.attn_impl, config.model.jvp_attn_impl)
    )
    one_pass = attn == jvp
    out = config.copy_and_resolve_references()
    out.model.attn_impl, out.model.jvp_attn_impl = "plain", "plain" if one_pass else "xla"
    return out


def unrolled_flops(config, teacher_cfg: FluxConfig, batch, aux) -> float:
    """FLOPs per device of the configured step for the teacher structure ``teacher_cfg`` on
    batches shaped as ``batch`` and ``aux`` (arrays or ``jax.ShapeDtypeStruct``), every block
    and every attention counted (the model's FLOPs: attention as :func:`flop_counting` runs
    it). XLA's cost analysis counts a loop's body once, so a step with scanned blocks
    under-reports by about the depth; here the step is lowered (not compiled) with the blocks
    unrolled at depths (1, 1), (2, 1) and (1, 2), its global count divided over the mesh, and
    extrapolated to the real depth: exact, as every block of a kind costs the same."""
    config = flop_counting(config, teacher_cfg.head_dim)
    mesh, rules = mesh_and_rules(config)
    shapes = lambda tree: jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)  # noqa: E731

    def flops(num_double: int, num_single: int) -> float:
        cfg = teacher_cfg.replace(num_double=num_double, num_single=num_single, scan_layers=False)
        teacher = None
        if METHODS[config.method].teacher:
            teacher = nnx.state(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))), nnx.Param)
        setup = make_setup(config, mesh, rules, cfg, teacher, abstract=True)
        with jax.set_mesh(mesh), axis_rules(rules):
            lowered = jax.jit(setup.step_fn).lower(
                setup.abstract, teacher, shapes(batch), shapes(aux), setup.root
            )
        cost = lowered.cost_analysis()
        cost = cost[0] if isinstance(cost, list | tuple) else cost
        return float(cost["flops"]) / mesh.size

    base = flops(1, 1)
    per_double, per_single = flops(2, 1) - base, flops(1, 2) - base
    n_double, n_single = teacher_cfg.num_double, teacher_cfg.num_single
    return base + per_double * (n_double - 1) + per_single * (n_single - 1)


def _flops(config, teacher_cfg, batch, aux) -> float | None:
    try:
        return unrolled_flops(config, teacher_cfg, batch, aux)
    except Exception:  # noqa: BLE001 (FLOP counts are informative only)
        log.warning("no FLOP count (MFU is not logged)", exc_info=True)
        return None
