"""sCM and MeanFlow on a FLUX MMDiT against an independent PyTorch transcription of the paper.

The reference (``tests/torch_reference.py``) is written from the spec on top of diffusers'
``FluxTransformer2DModel``, in the paper's units and control flow, with ``torch.func.jvp`` under
math attention. Both sides see the same weights (converted by ``flux_from_diffusers``), noise,
times, guidance and dropout mask; torch's gradients are mapped onto our parameter paths by the
port table. Tiny model (1 double + 1 single block, width 32, guidance on), batch 3, float32;
our tangent pass runs on blockwise attention (the trainer's default) through ``tangent_fn``.

Tolerances (float32): loss values and metrics to ``VALUE_RTOL`` relative; each gradient leaf to
``GRAD_RTOL`` of its own largest entry (floored at 1e-2 of the largest gradient anywhere, for
leaves whose gradient is nearly zero). The MeanFlow loss itself is ~1 by construction (adaptive
weight p = 1), so its mean square error ``meanflow/mse`` and the gradients carry the check.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference as ref
from diffusers import FluxTransformer2DModel
from flax import nnx

from distill_jax import losses
from distill_jax.models.attention import Blockwise
from distill_jax.models.flux import Flux, FluxConfig
from distill_jax.parameterization import trigflow_velocity
from distill_jax.port.flux import abstract_flux, diffusers_rules, flux_from_diffusers
from distill_jax.port.params import param_shapes
from distill_jax.port.table import to_target

VALUE_RTOL, GRAD_RTOL = 1e-5, 3e-5  # measured: <= 1.6e-6 and <= 4.4e-6
TEACHER_CFG = FluxConfig.tiny().replace(time_scale=1.0)
STUDENT_CFG = {
    "scm": TEACHER_CFG.replace(logvar_head=True),
    "meanflow": TEACHER_CFG.replace(delta_embed=True),
}
B, GRID, TEXT = 3, (4, 6), 5
SCM_STEP = 3000  # tangent warmup r = 0.75: both terms of the target direction count
# Three MeanFlow samples, one per branch of spec 4.3.7: CFG (t in [0, 0.8]); dropped (uncond,
# here with r = t); conditional but outside the CFG window (t > 0.8).
MF_R, MF_T, MF_DROP, MF_CFG_T_MAX = [0.2, 0.5, 0.4], [0.6, 0.5, 0.9], [False, True, False], 0.8
SCM_T = [0.3, 0.9, 1.3]
# The tangent pass's attention (the trainer's default is blockwise): T = 29 tokens make 4 tiles,
# the last one padded.
BLOCKWISE = Blockwise(block_q=8, block_kv=8)


@dataclasses.dataclass(frozen=True)
class Case:
    """A loss and its switches: the same keywords drive the transcription and our side (where
    ``logvar_time`` is wiring, as ``config.model.logvar_time``; the rest are loss keywords)."""

    method: str
    switches: dict[str, Any]


CASES = {
    # paper_slips() but float32 times, and the logvar head on trig time (spec 7.9)
    "scm_paper": Case("scm", {"logvar_time": "trig"}),
    "scm_fixed": Case("scm", {"logvar_time": "flow"}),
    "meanflow_paper": Case(
        "meanflow", {"tangent_velocity": "ground_truth", "cfg_at_r_equals_t": False}
    ),
    "meanflow_fixed": Case("meanflow", {"tangent_velocity": "teacher", "cfg_at_r_equals_t": True}),
    "meanflow_no_cfg": Case("meanflow", {"use_cfg": False, "tangent_velocity": "ground_truth"}),
}


def _image_ids(h: int, w: int) -> np.ndarray:
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1], ids[..., 2] = np.arange(h)[:, None], np.arange(w)[None, :]
    return ids.reshape(h * w, 3)


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every weight random (norm scales and heads too), so that no swap can hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


@dataclasses.dataclass
class World:
    """Torch models and their JAX conversions, and the fixed inputs both sides share."""

    torch_teacher: ref.X1Flux
    torch_students: dict[str, ref.X1Flux]
    teacher: Flux
    students: dict[str, Flux]
    data: dict[str, np.ndarray]


@pytest.fixture(scope="module")
def world() -> World:
    rng = np.random.default_rng(0)
    L, C = GRID[0] * GRID[1], TEACHER_CFG.in_channels
    data = {
        "x0": rng.standard_normal((B, L, C)),
        "noise": rng.standard_normal((B, L, C)),
        "txt": rng.standard_normal((B, TEXT, TEACHER_CFG.context_dim)),
        "pooled": rng.standard_normal((B, TEACHER_CFG.pooled_dim)),
        "uncond_txt": rng.standard_normal((TEXT, TEACHER_CFG.context_dim)),
        "uncond_pooled": rng.standard_normal((TEACHER_CFG.pooled_dim,)),
        "g": np.array([4.0, 4.5, 5.0]),
        "scm_t": np.array(SCM_T),
        "r": np.array(MF_R),
        "t": np.array(MF_T),
        "img_ids": _image_ids(*GRID),
        "txt_ids": np.zeros((TEXT, 3)),
    }
    data = {k: v.astype(np.float32) for k, v in data.items()}
    data["drop"] = np.array(MF_DROP)
    ids = torch.tensor(data["img_ids"]), torch.tensor(data["txt_ids"])

    def torch_model(seed: int, **heads) -> ref.X1Flux:
        diffusers_cfg = {k: v for k, v in TEACHER_CFG.to_diffusers().items() if k[0] != "_"}
        model = ref.X1Flux(FluxTransformer2DModel(**diffusers_cfg), *ids, **heads)
        _randomize(model, seed)
        return model

    torch_teacher = torch_model(0)
    torch_students = {
        "scm": torch_model(1, logvar_head=True),
        "meanflow": torch_model(2, delta_embed=True),
    }
    return World(
        torch_teacher,
        torch_students,
        flux_from_diffusers(ref.state_dict_numpy(torch_teacher), TEACHER_CFG),
        {
            m: flux_from_diffusers(ref.state_dict_numpy(s), STUDENT_CFG[m])
            for m, s in torch_students.items()
        },
        data,
    )


# --- the two sides ----------------------------------------------------------------------------

Result = tuple[float, dict[str, float], dict[str, np.ndarray]]  # loss, metrics, gradients
# XLA's CPU backend optimisations roughly double the compile time of these programs and change
# nothing that matters at a tiny size: the tests compile without them.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def torch_side(w: World, case: Case) -> Result:
    """The transcription's loss, metrics (named as ours) and gradients (on our paths)."""
    d = {k: torch.tensor(v) for k, v in w.data.items()}
    student = w.torch_students[case.method]
    student.zero_grad(set_to_none=True)
    cond = {"txt": d["txt"], "pooled": d["pooled"], "g": d["g"]}
    if case.method == "scm":
        loss, metrics = ref.scm_loss(
            student, w.torch_teacher, d["x0"], d["noise"], d["scm_t"], cond, step=SCM_STEP,
            **case.switches,
        )  # fmt: skip
    else:
        uncond = {
            "txt": d["uncond_txt"].expand_as(d["txt"]),
            "pooled": d["uncond_pooled"].expand_as(d["pooled"]),
            "g": d["g"],
        }
        loss, metrics = ref.meanflow_loss(
            student, w.torch_teacher, d["x0"], d["noise"], d["r"], d["t"], d["drop"], cond,
            uncond, cfg_t_max=MF_CFG_T_MAX, **case.switches,
        )  # fmt: skip
    loss.backward()
    cfg = STUDENT_CFG[case.method]
    grads = to_target(
        ref.grads_numpy(student), diffusers_rules(cfg), param_shapes(abstract_flux(cfg))
    )
    metrics = {f"{case.method}/{k}": float(v) for k, v in metrics.items()}
    return float(loss.detach()), metrics, grads


def _call(model: Flux, d: dict, x, s, c, **kw):
    return model(x, c["t5"], c["pooled"], s, d["img_ids"], d["txt_ids"], c["g"], **kw)


def jax_loss_fn(
    w: World, case: Case, student_gd: nnx.GraphDef, tangent_gd: nnx.GraphDef | None
) -> Callable[[nnx.State], tuple[jax.Array, dict]]:
    """``params -> (loss, metrics)``, wired as ``distill_jax.methods.make_loss_fn`` wires it: the
    student's structure ``student_gd``, and ``tangent_gd`` for the tangent (JVP) pass (None:
    one pass, the student's forward taken from the JVP's primal)."""
    d = {k: jnp.asarray(v) for k, v in w.data.items()}
    teacher = w.teacher
    cond = {"t5": d["txt"], "pooled": d["pooled"], "g": d["g"]}
    key = jax.random.key(0)  # unused: every random input is fixed
    kw = dict(case.switches)

    def tangent_fn(student_fn):
        return None if tangent_gd is None else functools.partial(student_fn, gd=tangent_gd)

    if case.method == "scm":
        logvar_time = kw.pop("logvar_time")

        def loss_fn(params):
            def student_fn(x_hat, t, c, gd=student_gd):
                model = nnx.merge(gd, params)
                flow = lambda xs, s: _call(model, d, xs, s, c, return_logvar=True)  # noqa: E731
                F, logvar = trigflow_velocity(flow, x_hat, t, has_aux=True)
                if logvar_time == "trig":
                    logvar = model.logvar_at(t, c["pooled"], c["g"])
                return F, logvar

            def teacher_fn(x_hat, t, c):
                return trigflow_velocity(lambda xs, s: _call(teacher, d, xs, s, c), x_hat, t)

            return losses.scm_loss(
                student_fn, teacher_fn, d["x0"], key, step=SCM_STEP, cond=cond,
                t=d["scm_t"], noise=d["noise"],
                tangent_fn=tangent_fn(student_fn), **kw,
            )  # fmt: skip

        return loss_fn

    uncond = {
        "t5": jnp.broadcast_to(d["uncond_txt"], d["txt"].shape),
        "pooled": jnp.broadcast_to(d["uncond_pooled"], d["pooled"].shape),
        "g": d["g"],
    }

    def loss_fn(params):
        def student_fn(z, t, delta, c, gd=student_gd):
            return _call(nnx.merge(gd, params), d, z, t, c, timestep2=delta)

        return losses.meanflow_loss(
            student_fn, lambda z, t, c: _call(teacher, d, z, t, c), d["x0"], key, cond=cond,
            uncond=uncond, cfg_t_max=MF_CFG_T_MAX, r=d["r"], t=d["t"], noise=d["noise"],
            drop=d["drop"], tangent_fn=tangent_fn(student_fn), **kw,
        )  # fmt: skip

    return loss_fn


def jax_side(w: World, case: Case, tangent_impl: Any) -> Result:
    """Our loss, metrics and gradients: the student on XLA attention, its tangent pass on
    ``tangent_impl`` (sharing the parameters; None: one pass on XLA attention)."""
    student = w.students[case.method]
    params = nnx.state(student, nnx.Param)
    student_gd, tangent_gd = (
        None if impl is None else nnx.split(abstract_flux(student.cfg, attn_impl=impl))[0]
        for impl in ("xla", tangent_impl)
    )
    loss_fn = jax_loss_fn(w, case, student_gd, tangent_gd)
    step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
    (loss, metrics), grads = step.lower(params).compile(FAST_COMPILE)(params)
    flat = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(grads)}
    return float(loss), {k: float(v) for k, v in metrics.items()}, flat


@pytest.fixture(scope="module")
def results(world) -> Callable[..., Result]:
    """``results(side, case name, tangent_impl)``, each computed once per module."""
    cache: dict[tuple, Result] = {}

    def get(side: str, name: str, tangent_impl: Any = BLOCKWISE) -> Result:
        key = (side, name, tangent_impl)
        if key not in cache:
            case = CASES[name]
            cache[key] = (
                torch_side(world, case) if side == "torch" else jax_side(world, case, tangent_impl)
            )
        return cache[key]

    return get


def grad_error(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> tuple[str, float]:
    """The leaf with the largest error relative to its own scale (floored, see the docstring)."""
    assert sorted(got) == sorted(want)
    floor = 1e-2 * max(np.abs(g).max() for g in want.values())
    errors = {k: np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), floor) for k in want}
    worst = max(errors, key=errors.get)
    return worst, float(errors[worst])


def assert_same(got: Result, want: Result) -> None:
    loss, metrics, grads = got
    np.testing.assert_allclose(loss, want[0], rtol=VALUE_RTOL)
    for k, v in want[1].items():  # the transcription's metrics are a subset of ours
        np.testing.assert_allclose(metrics[k], v, rtol=VALUE_RTOL, err_msg=k)
    worst, err = grad_error(grads, want[2])
    assert err < GRAD_RTOL, f"gradient of {worst}: relative error {err:.2e}"


# --- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_loss_and_gradients_match_torch_transcription(results, name):
    assert_same(results("jax", name), results("torch", name))


def test_paper_cases_are_the_paper_slips():
    """The "paper" cases are ``losses.paper_slips`` (float32 times kept, spec 7.6)."""
    for method in ("scm", "meanflow"):
        slips = losses.paper_slips(method)
        loss = {k: v for k, v in slips["loss"].items() if k != "time_dtype"}
        switches = dict(CASES[f"{method}_paper"].switches)
        # a config switch (spec 7.9); the Δ embedder's init is the weights' business here
        assert switches.pop("logvar_time", "trig") == slips["model"].get("logvar_time", "trig")
        assert switches == loss


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_switches_change_the_gradients(results, method):
    """The parity above cannot pass by ignoring a switch: each case's gradients differ from every
    other case's of the same method by far more than the tolerance."""
    names = [n for n, c in CASES.items() if c.method == method]
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            _, err = grad_error(results("torch", a)[2], results("torch", b)[2])
            assert err > 100 * GRAD_RTOL, (a, b, err)


@pytest.mark.parametrize("name", ["scm_paper", "meanflow_paper"])
def test_tangent_pass_on_blockwise_or_xla_attention_gives_the_same_loss(results, name):
    """The tangent pass on blockwise attention (its own JVP rule; 4 tiles, the last one padded;
    the trainer's default ``config.model.jvp_attn_impl``) and on XLA attention, and one pass
    (the student's forward from the JVP's primal), give the same loss, metrics
    (``scm/tangent_norm``, ``meanflow/dudt_norm`` among them) and gradients."""
    assert_same(results("jax", name, BLOCKWISE), results("jax", name, "xla"))
    assert_same(results("jax", name, None), results("jax", name, "xla"))
