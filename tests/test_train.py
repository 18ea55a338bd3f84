"""The training loop: every method learns, resume is bit-exact, damaged checkpoints are skipped,
sharded training equals unsharded, non-finite steps are skipped and counted.

Runs on 8 fake CPU devices (tests/conftest.py) with tiny models and float32 compute.
"""

import os
import shutil
import signal

import jax
import numpy as np
import pytest

from distill_jax.config import base_config, load_config
from distill_jax.train import NonFiniteError, make_input, model_configs, train


def tiny(method: str, **changes) -> "ml_collections.ConfigDict":  # noqa: F821
    c = base_config()
    c.method = method
    c.model.overrides = {} if method in ("rescale", "flow_matching") else {"time_scale": 1.0}
    c.model.dtype = "float32"
    c.total_steps, c.log_every, c.checkpoint_every = 6, 1, 3
    c.async_checkpoints = False
    c.optim.lr = 3e-3
    c.optim.weight_decay = 0.0
    c.loss.tangent_warmup_steps = 2
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


@pytest.mark.parametrize("method", ["scm", "meanflow"])
def test_one_pass_tangent_matches_a_separate_tangent_pass(method, tmp_path):
    """With the same attention in both passes the losses take the student's forward from the
    JVP's primal (one pass); with another attention for the tangent they run two passes. Both
    programs give the same loss and gradient norm at the same parameters (a learning rate of
    1e-9 keeps the parameters equal across the three steps; float32 rounding apart)."""
    runs = [
        train(
            tiny(method, **{"total_steps": 3, "optim.lr": 1e-9, "model.jvp_attn_impl": impl}),
            tmp_path / impl,
        )
        for impl in ("xla", "blockwise")  # attn_impl is "xla": one pass, then two
    ]
    for a, b in zip(runs[0].metrics, runs[1].metrics, strict=True):
        for key in ("train/loss", "train/grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-6), (key, a, b)


def test_flow_matching_time_shift(tmp_path):
    """``loss.fm_time_mean`` shifts the logit-normal flow times: the logged mean time matches
    E[sigmoid(N(mean, 1))] (by quadrature) for mean 0 and 1.5."""
    z = np.linspace(-8, 8, 4001)
    for mean in (0.0, 1.5):
        config = tiny("flow_matching", **{"total_steps": 8, "data.batch_size": 64})
        config.loss.fm_time_mean = mean
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
