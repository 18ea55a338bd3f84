"""The memory plan of a training run (``distill-jax train --dry-run``), from abstract shapes.

:func:`plan_memory` builds the run's state and teacher on the configured mesh without allocating
them and reports bytes per device: the state exactly (from the shardings), the backward pass's
residuals from ``eval_shape``, and optionally XLA's compiled temporary bytes.
"""

from __future__ import annotations

import math
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from distill_jax.config import check_config
from distill_jax.methods import METHODS
from distill_jax.models.flux import Flux, FluxConfig
from distill_jax.sharding import abstract_sharded, axis_rules, state_shardings
from distill_jax.train import BATCH_AXES, Setup, layout, make_setup, mesh_and_rules


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
    extrapolates linearly, since an unrolled full-depth 8B compile needs more host memory than a
    laptop has. A model with scanned blocks (``scan_layers``) compiles to a program whose size
    does not grow with depth: there ``"extrapolate"`` compiles the real step, as ``"full"``
    (``plan["compiled"]`` says which was done). On a CPU stand-in XLA schedules for speed and
    ignores rematerialization, so these are upper bounds, not accelerator figures.
    """
    check_config(config)
    mesh, rules = mesh_and_rules(config)
    setup = make_setup(config, mesh, rules, *abstract_teacher(config, mesh, rules), abstract=True)
    sharded = abstract_sharded(setup.abstract, setup.state_sh)
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
    if compile == "extrapolate" and cfg.scan_layers:
        compile = "full"
    plan["compiled"] = compile
    if compile == "full":
        plan["activations_gib"] = _step_temp_bytes(config, mesh, rules, setup, sharded) / gib
    elif compile == "extrapolate":
        measured = {}
        for depth in ((1, 1), (2, 1), (1, 2)):
            small = _with_depth(config, *depth)
            s_setup = make_setup(
                small, mesh, rules, *abstract_teacher(small, mesh, rules), abstract=True
            )
            s_sharded = abstract_sharded(s_setup.abstract, s_setup.state_sh)
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


def abstract_inputs(config, cfg: FluxConfig, sharding=None, replicated=None) -> tuple[dict, dict]:
    """``(batch, aux)`` of the configured run for the student structure ``cfg``, as
    ``jax.ShapeDtypeStruct`` (with ``sharding`` for the batch, ``replicated`` for aux)."""
    dc = config.data
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


def _residual_bytes(config, setup: Setup) -> int:
    """Global bytes of the residuals the loss's backward pass keeps (``jax.vjp`` under
    ``eval_shape``), parameter-shaped ones (the weights themselves) excluded."""
    batch, aux = abstract_inputs(config, setup.student_cfg)
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


def lower_step(config: ml_collections.ConfigDict) -> jax.stages.Lowered:
    """The configured run's train step, jitted as the trainer jits it and lowered for abstract
    state, teacher and batch on the configured mesh (nothing is allocated); ``.compile()`` it
    for XLA's program, memory and cost figures (benchmarks/compile_scan.py)."""
    check_config(config)
    mesh, rules = mesh_and_rules(config)
    setup = make_setup(config, mesh, rules, *abstract_teacher(config, mesh, rules), abstract=True)
    return _lower(config, mesh, rules, setup, abstract_sharded(setup.abstract, setup.state_sh))


def _lower(config, mesh, rules, setup: Setup, sharded) -> jax.stages.Lowered:
    batch_sh = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    replicated = NamedSharding(mesh, PartitionSpec())
    batch, aux = abstract_inputs(config, setup.student_cfg, batch_sh, replicated)
    key = jax.ShapeDtypeStruct(setup.root.shape, setup.root.dtype, sharding=replicated)
    with jax.set_mesh(mesh), axis_rules(rules):
        return jax.jit(
            setup.step_fn, out_shardings=(setup.state_sh, replicated), donate_argnums=(0,)
        ).lower(sharded, setup.teacher_params, batch, aux, key)


def _step_temp_bytes(config, mesh, rules, setup: Setup, sharded) -> int:
    """Temporary bytes per device of the compiled step for ``config.data``'s batch shapes.
    Note: XLA:CPU's figure does not reflect rematerialization (it schedules for speed)."""
    compiled = _lower(config, mesh, rules, setup, sharded).compile()
    return int(getattr(compiled.memory_analysis(), "temp_size_in_bytes", 0))


def abstract_teacher(config, mesh, rules) -> tuple[FluxConfig, Any]:
    """The teacher :func:`distill_jax.train.load_teacher` would build, as abstract arrays with
    their shardings (a random ``config.model.preset``: ``teacher.path`` is not read)."""
    cfg = layout(config, FluxConfig.preset(config.model.preset, **config.model.overrides))
    if not METHODS[config.method].teacher:
        return cfg, None
    abstract = nnx.state(nnx.eval_shape(lambda: Flux(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    shardings = state_shardings(abstract, mesh, rules)
    return cfg, abstract_sharded(abstract, shardings)
