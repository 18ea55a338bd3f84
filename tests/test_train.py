"""The training loop: every method learns, resume is bit-exact, damaged checkpoints are skipped,
sharded training equals unsharded, non-finite steps are skipped and counted.

Runs on 8 fake CPU devices (tests/conftest.py) with tiny models and float32 compute.
"""

import json
import logging
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from distill_jax.config import base_config, load_config
from distill_jax.data.training import make_input
from distill_jax.methods import model_configs
from distill_jax.train import NonFiniteError, train


def tiny(method: str, **changes) -> "ml_collections.ConfigDict":  # noqa: F821
    c = base_config()
    c.method = method
    c.model.overrides = {} if method in ("rescale", "flow_matching") else {"time_scale": 1.0}
    c.model.dtype = "float32"
    c.total_steps, c.log_every, c.checkpoint_every = 6, 1, 3
    c.async_checkpoints = False
    c.optim.lr = 3e-3
    c.optim.weight_decay = 0.0
    c.loss.scm.tangent_warmup_steps = 2
    c.data.latent_grid, c.data.latent_channels, c.data.batch_size = (4, 4), 4, 8
    for key, value in changes.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def leaves(tree) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(jax.device_get(tree))]


@pytest.mark.parametrize("method", ["flow_matching", "rescale", "scm", "meanflow"])
def test_runlocal_config_learns_on_a_fixed_batch(method, tmp_path):
    """Times and noise are redrawn every step, so the batch is large enough (32) for the
    5-step means to show the trend."""
    config = load_config(
        f"configs/{method}.py:runlocal",
        [
            "--config.total_steps=30",
            "--config.log_every=1",
            "--config.checkpoint_every=1000",
            "--config.data.synthetic_size=32",
            "--config.data.batch_size=32",
            "--config.optim.lr=3e-3",
        ],
    )
    run = train(config, tmp_path)
    # MeanFlow's adaptive weighting makes its loss ~ e / (e + c), near 1 until the error e is
    # tiny; its raw squared error is the measure of progress.
    metric = "meanflow/mse" if method == "meanflow" else "train/loss"
    loss = [m[metric] for m in run.metrics]
    assert len(loss) == 30 and np.all(np.isfinite(loss))
    first, last = np.mean(loss[:5]), np.mean(loss[-5:])
    assert last < first - 0.1 * abs(first), loss
    assert run.metrics[-1]["train/skipped_steps"] == 0
    assert (tmp_path / "checkpoints" / "30").is_dir()
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_resume_after_preemption_is_bit_exact(tmp_path):
    straight = train(tiny("scm"), tmp_path / "straight")

    def preempt(step, _):
        if step == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    first = train(tiny("scm"), tmp_path / "resumed", on_step=preempt)
    assert first.stopped_early and int(first.state["step"]) == 3
    second = train(tiny("scm"), tmp_path / "resumed")
    assert int(second.state["step"]) == 6 and not second.stopped_early
    for a, b in zip(leaves(straight.state), leaves(second.state), strict=True):
        np.testing.assert_array_equal(a, b)


def test_damaged_checkpoint_falls_back_to_previous_step(tmp_path):
    train(tiny("flow_matching"), tmp_path)  # checkpoints at steps 3 and 6
    ckpts = tmp_path / "checkpoints"
    # A save that crashed before Orbax's final rename (a temporary folder) is not a step; a step
    # folder whose state is unreadable is moved aside and the previous step is used.
    shutil.copytree(ckpts / "6", ckpts / "9.orbax-checkpoint-tmp-1234")
    shutil.rmtree(ckpts / "6" / "state")
    run = train(tiny("flow_matching", total_steps=7), tmp_path)
    assert run.metrics[0]["step"] == 4  # resumed from step 3
    assert (ckpts / "6.unreadable").is_dir() and (ckpts / "7").is_dir()


def test_sharded_training_matches_unsharded(tmp_path):
    one = train(tiny("meanflow", **{"mesh.devices": 1, "total_steps": 3}), tmp_path / "one")
    eight = train(
        tiny("meanflow", **{"mesh.data": 2, "mesh.fsdp": 4, "total_steps": 3}), tmp_path / "eight"
    )
    kernel = eight.state["params"]["double_blocks"][0]["img_attn"]["qkv"]["kernel"].get_value()
    assert kernel.sharding.spec[0] == "fsdp"
    for a, b in zip(leaves(one.state["params"]), leaves(eight.state["params"]), strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_one_pass_tangent_matches_a_separate_tangent_pass(tmp_path):
    """With the same attention in both passes the losses take the student's forward from the
    JVP's primal (one pass); with another attention for the tangent they run two passes. Both
    programs give the same loss and gradient norm at the same parameters (a learning rate of
    1e-9 keeps the parameters equal across the three steps; float32 rounding apart). sCM here;
    MeanFlow's one and two passes agree in tests/test_loss_parity.py (blockwise or XLA tangent
    against XLA attention)."""
    method = "scm"
    runs = [
        train(
            tiny(method, **{"total_steps": 3, "optim.lr": 1e-9, "model.jvp_attn_impl": impl}),
            tmp_path / impl,
        )
        for impl in ("blockwise", "xla")  # attn_impl "auto" is blockwise on CPU: one pass, two
    ]
    for a, b in zip(runs[0].metrics, runs[1].metrics, strict=True):
        for key in ("train/loss", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)


def test_flow_matching_time_shift(tmp_path):
    """``loss.flow_matching.logit_mean`` shifts the logit-normal flow times: the logged mean time
    matches E[sigmoid(N(mean, 1))] (by quadrature) for mean 0 and 1.5."""
    z = np.linspace(-8, 8, 4001)
    for mean in (0.0, 1.5):
        config = tiny("flow_matching", **{"total_steps": 8, "data.batch_size": 64})
        config.loss.flow_matching.logit_mean = mean
        run = train(config, tmp_path / str(mean))
        got = np.mean([m["flow_matching/mean_time"] for m in run.metrics])
        pdf = np.exp(-0.5 * z**2)
        want = np.sum(pdf / (1 + np.exp(-(z + mean)))) / np.sum(pdf)
        assert abs(got - want) < 0.03, (mean, got, want)  # 512 draws: std of the mean ~0.01


def test_replication_check_fires_without_a_rule(tmp_path):
    config = tiny(
        "flow_matching", **{"mesh.data": 2, "mesh.fsdp": 4, "mesh.replicated_threshold_bytes": 1024}
    )
    config.mesh.rules = {"embed": None}
    with pytest.raises(AssertionError, match="fully replicated"):
        train(config, tmp_path)


def test_non_finite_batches_are_skipped_then_stop_the_run(tmp_path):
    config = tiny("flow_matching", total_steps=8, max_consecutive_nonfinite=2)
    _, student = model_configs(config)
    it, aux = make_input(config, student)
    step = {"n": 0}

    class Poisoned:
        def __next__(self):
            step["n"] += 1
            batch = next(it)
            if step["n"] == 2 or step["n"] >= 5:
                batch = {**batch, "latents": np.full_like(batch["latents"], np.nan)}
            return batch

        def get_state(self):
            return it.get_state()

        def set_state(self, s):
            it.set_state(s)

    seen = []
    with pytest.raises(NonFiniteError, match="3 consecutive steps"):
        train(config, tmp_path, data=(Poisoned(), aux), on_step=lambda s, m: seen.append(m))
    assert seen[1]["train/skipped_steps"] == 1 and seen[2]["train/skipped_steps"] == 1
    assert np.isfinite(seen[0]["train/loss"]) and np.isnan(seen[1]["train/loss"])
    assert seen[-1]["train/skipped_steps"] == 3
    assert (tmp_path / "checkpoints" / "7").is_dir()  # the last good parameters are saved


def test_config_typos_fail():
    with pytest.raises(ValueError, match=r"no field config.optim.learning_rate; did you mean"):
        load_config("configs/scm.py:runlocal", ["--config.optim.learning_rate=1e-3"])
    with pytest.raises(ValueError, match="--config.field=value"):
        load_config("configs/scm.py:runlocal", ["optim.lr=1e-3"])


def test_the_logged_config_has_the_effective_values(tmp_path, caplog):
    """``--config.loss.paper_slips=True`` alone: the config logged at the start (before the
    teacher loads, here a missing folder) shows the settings it set, not "auto"."""
    config = load_config(
        "configs/meanflow.py:runlocal",
        ["--config.loss.paper_slips=True", f"--config.teacher.path={tmp_path / 'absent'}"],
    )
    with caplog.at_level(logging.INFO, "distill_jax.train"), pytest.raises(ValueError, match="abs"):
        train(config, tmp_path / "run")
    assert "delta_init: copy" in caplog.text and "time_dtype: bfloat16" in caplog.text
    assert "auto" not in caplog.text
    assert "'tangent_velocity': 'ground_truth'" in caplog.text  # the loss's switches


def test_cli_train_runs_and_rejects_typos(tmp_path, capsys):
    from distill_jax.cli import main

    # the same program as the runlocal scm test above: the compilation cache serves both
    args = [
        "train",
        "--config",
        "configs/scm.py:runlocal",
        "--workdir",
        str(tmp_path),
        "--config.total_steps=2",
        "--config.log_every=1",
        "--config.checkpoint_every=1000",
        "--config.data.synthetic_size=32",
        "--config.data.batch_size=32",
        "--config.optim.lr=3e-3",
    ]
    assert main(args) == 0
    assert (tmp_path / "checkpoints" / "2").is_dir()
    typo = ["--config.optim.learning_rate=1"]
    assert main(["train", "--config", "configs/scm.py:runlocal", "--workdir", "x", *typo]) == 1
    assert "no field config.optim.learning_rate" in capsys.readouterr().err
    assert main(["sample", "x", "--prompt", "p", "--out", "o", "--config.seed=1"]) == 2
    assert "is a train option" in capsys.readouterr().err


def test_keep_zero_keeps_every_checkpoint(tmp_path):
    train(tiny("flow_matching", total_steps=4, checkpoint_every=1, keep_checkpoints=0), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["1", "2", "3", "4"]


def test_resuming_another_run_is_refused_and_renames_nothing(tmp_path):
    """A workdir of a finished sCM run, resumed as flow matching (another state structure): an
    error names the differing field; every step stays where it was."""
    train(tiny("scm"), tmp_path)
    before = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    with pytest.raises(ValueError, match=r"another run.*method: 'scm' -> 'flow_matching'"):
        train(tiny("flow_matching", total_steps=9), tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == before == ["3", "6"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("optim.lr", float("nan"), "config.optim.lr=nan is not finite"),
        ("loss.guidance_values", (4.0, float("inf")), "config.loss.guidance_values"),
        ("log_every", 0, "config.log_every=0 must be >= 1"),
        ("checkpoint_every", 0, "config.checkpoint_every=0 must be >= 1"),
        ("keep_checkpoints", -1, "config.keep_checkpoints=-1"),
    ],
)
def test_bad_run_settings_are_refused_before_anything_runs(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(".", r"\.")):
        train(tiny("flow_matching", **{field: value}), tmp_path)
    assert not (tmp_path / "checkpoints").exists()


def save_flux(folder, cfg, seed: int) -> dict:
    """A float32 FLUX folder as `distill-jax convert` writes it; returns its parameters by path."""
    from flax import nnx

    from distill_jax.folders import save_model
    from distill_jax.models.flux import Flux

    model = Flux(cfg, rngs=nnx.Rngs(seed))
    save_model(model, folder)
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def flat_params(state) -> dict:
    from flax import nnx

    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(jax.device_get(state))}


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_init_checkpoint_sets_every_parameter_it_has(method, tmp_path):
    """The student starts with the folder's parameters exactly; a head the folder lacks keeps the
    init it has without one (sCM's log-variance head), and MeanFlow's Δ-time embedder restarts
    from the folder's time embedder ("zero": its first layer, a zero output layer)."""
    from distill_jax.models.flux import FluxConfig
    from distill_jax.train import load_init, load_teacher, make_setup, mesh_and_rules

    saved = save_flux(tmp_path / "init", FluxConfig.tiny().replace(time_scale=1.0), seed=7)
    config = tiny(method, **{"teacher.init_checkpoint": str(tmp_path / "init")})
    mesh, rules = mesh_and_rules(config)
    teacher_cfg, teacher_params = load_teacher(config, mesh, rules)
    setup = make_setup(config, mesh, rules, teacher_cfg, teacher_params)
    init_params = load_init(config, setup.student_cfg, mesh, rules)
    init = jax.jit(setup.init_fn)
    got = flat_params(init(teacher_params, setup.root, init_params)["params"])
    default = flat_params(init(teacher_params, setup.root)["params"])

    assert set(saved) < set(got)
    for path, value in got.items():
        if path in saved:
            np.testing.assert_array_equal(value, saved[path], err_msg=str(path))
        elif path[0] == "delta_in":
            want = saved[("time_in", *path[1:])] if path[1] == "in_layer" else np.zeros_like(value)
            np.testing.assert_array_equal(value, want, err_msg=str(path))
        else:
            assert path[0] == "logvar", path
            np.testing.assert_array_equal(value, default[path], err_msg=str(path))
    kernel = ("img_in", "kernel")  # the teacher's in the default: another random draw
    assert np.abs(got[kernel] - default[kernel]).max() > 0.1

    save_flux(tmp_path / "stock", FluxConfig.tiny(), seed=7)  # time_scale 1000
    config.teacher.init_checkpoint = str(tmp_path / "stock")
    with pytest.raises(ValueError, match="runs at time_scale 1000"):
        load_init(config, setup.student_cfg, mesh, rules)


def test_init_checkpoint_starts_a_run_and_resume_uses_the_runs_checkpoints(tmp_path):
    """A run starts from the folder (after 3 Adam steps of 3e-3 every parameter is within 0.05 of
    it, where a random start is not); its resume reads its own checkpoint, not the folder (gone)."""
    from distill_jax.models.flux import FluxConfig

    saved = save_flux(tmp_path / "init", FluxConfig.tiny(), seed=7)
    config = tiny("flow_matching", **{"teacher.init_checkpoint": str(tmp_path / "init")})
    config.total_steps = 3
    run = train(config, tmp_path / "run")
    got = flat_params(run.state["params"])
    assert got.keys() == saved.keys()
    assert max(np.max(np.abs(got[p] - saved[p])) for p in saved) < 0.05

    shutil.rmtree(tmp_path / "init")
    config.total_steps = 4
    resumed = train(config, tmp_path / "run")
    assert [m["step"] for m in resumed.metrics] == [4]


def test_toy_teacher_runlocal_writes_a_toy_pipeline_that_samples(tmp_path):
    """`distill-jax train --config configs/toy_teacher.py:runlocal` trains on the shapes world and
    writes WORKDIR/student: a toy pipeline folder (EMA transformer in bfloat16, the text encoder
    that captioned the input, the fitted autoencoder, the training time and the held-out accuracy
    as written) that load_pipeline reads and generate samples at 32x32."""
    from flax import nnx

    from distill_jax.cli import main
    from distill_jax.data import shapes
    from distill_jax.folders import load_pipeline
    from distill_jax.pipeline.generate import generate
    from distill_jax.pipeline.toy import ToyPipeline, new_text_encoder

    args = ["--config.total_steps=1", "--config.data.batch_size=8", "--config.mesh.devices=1"]
    workdir = tmp_path / "teacher"
    assert (
        main(
            [
                "train",
                "--config",
                "configs/toy_teacher.py:runlocal",
                "--workdir",
                str(workdir),
                *args,
            ]
        )
        == 0
    )
    pipe = load_pipeline(workdir / "student")
    assert isinstance(pipe, ToyPipeline) and pipe.vocab == shapes.VOCAB
    assert (
        json.loads((workdir / "student" / "transformer" / "config.json").read_text())["dtype"]
        == "bfloat16"
    )
    want = nnx.state(new_text_encoder(len(shapes.VOCAB), seed=0, num_layers=0), nnx.Param)
    for a, b in zip(leaves(nnx.state(pipe.t5, nnx.Param)), leaves(want), strict=True):
        np.testing.assert_array_equal(a, b.astype(jax.numpy.bfloat16).astype(np.float32))
    images = generate(pipe, ["a red circle", ""], height=32, width=32, steps=2, guidance=None)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    assert (pipe.autoencoder.channels, pipe.autoencoder.patch) == (16, 8)
    meta = json.loads((workdir / "student" / "toy.json").read_text())
    assert meta["training"]["steps"] == 1 and meta["training"]["seconds"] > 0
    evaluation = meta["evaluation"]  # the teacher's held-out accuracy, as written
    assert (evaluation["prompts"], evaluation["steps"]) == (512, 16)
    assert 0 <= evaluation["accuracy"]["overall"] <= 1 and evaluation["background_noise"] >= 0


def test_stock_teacher_to_rescaled_to_scm_and_directly(tmp_path):
    """The whole route from stock weights on a tiny model: a flow-matching teacher at time_scale
    1000 is written; the rescale stage turns it into a time_scale 1 folder; sCM distils that
    one; and sCM with the finite-difference time derivative distils the stock one directly
    (its student keeps time_scale 1000). Every step is finite and each student is written."""
    from distill_jax.folders import load_flux

    stock = train(tiny("flow_matching"), tmp_path / "stock")
    assert load_flux(tmp_path / "stock" / "student").cfg.time_scale == 1000.0
    rescale = tiny("rescale", **{"teacher.path": str(tmp_path / "stock" / "student")})
    rescaled = train(rescale, tmp_path / "rescaled")
    assert load_flux(tmp_path / "rescaled" / "student").cfg.time_scale == 1.0
    scm = tiny("scm", **{"teacher.path": str(tmp_path / "rescaled" / "student")})
    scm.model.overrides = {}
    student = train(scm, tmp_path / "scm")
    direct = tiny(
        "scm",
        **{
            "teacher.path": str(tmp_path / "stock" / "student"),
            "loss.time_derivative": "finite_difference",
        },
    )
    direct.model.overrides = {}
    direct_run = train(direct, tmp_path / "direct")
    for run in (stock, rescaled, student, direct_run):
        assert all(np.isfinite(m["train/loss"]) for m in run.metrics)
        assert run.metrics[-1]["train/skipped_steps"] == 0
    assert load_flux(tmp_path / "scm" / "student").cfg.logvar_head
    assert load_flux(tmp_path / "direct" / "student").cfg.time_scale == 1000.0
    with pytest.raises(ValueError, match="time_scale"):  # jvp through 1000 t: rescale first
        plain = tiny("scm", **{"teacher.path": str(tmp_path / "stock" / "student")})
        plain.model.overrides = {}
        train(plain, tmp_path / "refused")
