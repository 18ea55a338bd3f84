"""The methods table: it agrees with the config, and each method's loss settings are exactly the
keyword arguments of its pure loss (the trainer passes them as ``**config.loss.<method>``); the
paper's slips: one switch sets them all, an explicit setting wins, the step applies them."""

import inspect

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from distill_jax import config, losses
from distill_jax.methods import (
    METHODS,
    SLIP_METHODS,
    loss_switches,
    make_loss_fn,
    model_configs,
    resolve,
    time_dtype,
)
from distill_jax.models.flux import DELTA_INITS, Flux

PURE_LOSS = {
    "flow_matching": losses.flow_matching_loss,
    "rescale": losses.rescale_regression_loss,
    "scm": losses.scm_loss,
    "meanflow": losses.meanflow_loss,
}


def test_the_table_is_the_configs_list_of_methods():
    assert tuple(METHODS) == config.METHODS


@pytest.mark.parametrize("method", config.METHODS)
def test_loss_settings_are_keywords_of_the_pure_loss(method):
    keywords = {
        name
        for name, p in inspect.signature(PURE_LOSS[method]).parameters.items()
        if p.kind == p.KEYWORD_ONLY
    }
    fields = set(config.base_config().loss[method])
    assert fields and fields <= keywords, fields - keywords
    if method in SLIP_METHODS:  # the slips switch the same loss's own keywords
        assert not fields & set(losses.paper_slips(method)["loss"])
        assert set(losses.paper_slips(method)["loss"]) <= keywords


def test_paper_slips_lists_the_auto_settings_values():
    """Each method's slips name the paper's value of an "auto" setting; the model switches are
    config.model fields with the model's own values."""
    for method in SLIP_METHODS:
        slips = losses.paper_slips(method)
        assert set(slips) == {"loss", "model"} and slips["model"]
        for name, value in slips["model"].items():
            assert value == config.AUTO_SETTINGS[f"model.{name}"][1]
        assert jnp.dtype(slips["loss"]["time_dtype"]).name == "bfloat16"
    assert config.AUTO_SETTINGS["loss.time_dtype"][1] == "bfloat16"
    assert set(config.AUTO_SETTINGS["model.delta_init"]) == set(DELTA_INITS)


@pytest.mark.parametrize(
    "method, overrides, want",
    [
        ("scm", [], ("float32", "flow", "zero")),
        ("scm", ["--config.loss.paper_slips=True"], ("bfloat16", "trig", "zero")),
        ("meanflow", [], ("float32", "flow", "zero")),
        ("meanflow", ["--config.loss.paper_slips=True"], ("bfloat16", "flow", "copy")),
        # an explicit setting on the command line wins over the switch
        (
            "meanflow",
            ["--config.loss.paper_slips=True", "--config.model.delta_init=zero"],
            ("bfloat16", "flow", "zero"),
        ),
        (
            "scm",
            ["--config.loss.paper_slips=True", "--config.loss.time_dtype=float32"],
            ("float32", "trig", "zero"),
        ),
        ("scm", ["--config.model.logvar_time=trig"], ("float32", "trig", "zero")),
        ("flow_matching", ["--config.loss.paper_slips=True"], ("float32", "flow", "zero")),
    ],
)
def test_paper_slips_alone_sets_every_auto_setting(method, overrides, want):
    """``--config.loss.paper_slips=True`` on the method's config (configs/*.py) gives the paper's
    time dtype and model switches; an explicit value wins; the given config stays as it was."""
    c = config.load_config(f"configs/{method}.py:runlocal", overrides)
    before = c.to_dict()
    r = resolve(c)
    assert (r.loss.time_dtype, r.model.logvar_time, r.model.delta_init) == want
    assert c.to_dict() == before and resolve(r) is r
    assert time_dtype(c) == jnp.dtype(want[0])
    if method in SLIP_METHODS:
        assert loss_switches(c)["time_dtype"] == jnp.dtype(want[0])
    _, student = model_configs(c)
    if method == "meanflow":
        assert student.delta_init == want[2]


@pytest.mark.parametrize("method", SLIP_METHODS)
def test_the_step_gives_every_time_computation_the_effective_dtype(method, monkeypatch):
    """With the switch on, the trainer's step (traced abstractly, no compute) builds its models
    with ``time_dtype`` bfloat16, hands it to the pure loss with the paper's other loss slips,
    and (sCM) to the TrigFlow wrapper of student and teacher."""
    from distill_jax import methods
    from distill_jax.train import _graphdef

    calls = {"loss": [], "wrapper": []}
    pure, wrapper = getattr(losses, f"{method}_loss"), methods.trigflow_velocity

    def spy(name, fn):
        return lambda *a, **kw: calls[name].append(kw) or fn(*a, **kw)

    monkeypatch.setattr(losses, f"{method}_loss", spy("loss", pure))
    monkeypatch.setattr(methods, "trigflow_velocity", spy("wrapper", wrapper))
    c = config.base_config()
    c.method, c.loss.paper_slips = method, True
    c.model.overrides = {"time_scale": 1.0}
    c.model.dtype, c.data.batch_size, c.data.latent_grid = "float32", 2, (4, 4)
    teacher_cfg, student_cfg = model_configs(c)
    structures = ((student_cfg, "xla"), (student_cfg, "blockwise"), (teacher_cfg, "xla"))
    gds = [_graphdef(cfg, c, impl) for cfg, impl in structures]
    params = [nnx.state(nnx.eval_shape(lambda cfg=cfg: Flux(cfg, rngs=nnx.Rngs(0))), nnx.Param)
              for cfg in (student_cfg, teacher_cfg)]  # fmt: skip
    for gd, p in zip(gds, params[:1] + params, strict=True):
        assert nnx.merge(gd, p).time_dtype == jnp.bfloat16
    batch = {
        "latents": jax.ShapeDtypeStruct((2, 4, 4, 4), jnp.float32),
        "t5": jax.ShapeDtypeStruct((2, 8, student_cfg.context_dim), jnp.float32),
        "pooled": jax.ShapeDtypeStruct((2, student_cfg.pooled_dim), jnp.float32),
    }
    aux = {"uncond_t5": batch["t5"], "uncond_pooled": batch["pooled"]}
    loss_fn = make_loss_fn(c, *gds)
    jax.eval_shape(loss_fn, *params, batch, aux, jax.random.key(0), 0)
    (kw,) = calls["loss"]
    for name, value in losses.paper_slips(method)["loss"].items():
        assert kw[name] == value, name
    # sCM: the student in its tangent and gradient passes (their graphdefs differ), the teacher
    assert len(calls["wrapper"]) == (3 if method == "scm" else 0)
    assert all(k["time_dtype"] == jnp.bfloat16 for k in calls["wrapper"])


@pytest.mark.parametrize(
    "spec", ["configs/meanflow.py:gamma2,window", "configs/toy_distill.py:meanflow,gamma2,window"]
)
def test_meanflow_ablation_variants_set_the_papers_values(spec):
    """gamma2: the weight 1 / (loss + c)^p with p = -1 (a squared loss); window: CFG-MeanFlow on
    flow times [0.3, 0.8] only (the paper's best MeanFlow run, its ablation)."""
    m = config.load_config(spec).loss.meanflow
    assert (m.adaptive_p, m.use_cfg, m.cfg_t_min, m.cfg_t_max) == (-1.0, True, 0.3, 0.8)
