"""The ``distill-jax`` command: verbs end to end on tiny checkpoints, their help, bad usage."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from test_flux import torch_flux

from distill_jax import cli
from distill_jax.models.flux import FluxConfig

HELP = {
    "convert": [
        "SRC",
        "DST",
        "--format",
        "--dtype",
        "--time-scale",
        "--components",
        "--config",
        "--overwrite",
    ],
    "export": ["SRC", "DST", "--format", "diffusers", "t2i-distill", "--max-shard-size"],
    "sample": [
        "CKPT",
        "--prompt",
        "--out",
        "--method",
        "--steps",
        "--guidance",
        "--height",
        "--width",
        "--seed",
        "--init-noise",
        "--max-sequence-length",
    ],
}


@pytest.mark.parametrize("verb", list(HELP))
def test_help(verb, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main([verb, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: distill-jax {verb}")
    assert [f for f in HELP[verb] if f not in out] == []


def test_convert_then_export(tmp_path):
    ref = torch_flux(FluxConfig.tiny())
    ref.save_pretrained(tmp_path / "src")
    argv = [
        "convert",
        str(tmp_path / "src"),
        str(tmp_path / "jax"),
        "--dtype",
        "float32",
        "--time-scale",
        "1",
        "--no-progress",
    ]
    assert cli.main(argv) == 0
    meta = json.loads((tmp_path / "jax" / "transformer" / "config.json").read_text())
    assert meta["dtype"] == "float32" and meta["config"]["time_scale"] == 1.0
    out = tmp_path / "student.pt"
    argv = ["export", str(tmp_path / "jax"), str(out), "--format", "t2i-distill", "--no-progress"]
    assert cli.main(argv) == 0
    module = torch.load(out, map_location="cpu", weights_only=True)["module"]
    assert sorted(module) == sorted(ref.state_dict())
    assert all(torch.equal(module[k], v) for k, v in ref.state_dict().items())


BAD_USAGE = [
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["convert", "src-only"], "the following arguments are required: DST"),
    (["convert", "a", "b", "--dtype", "float16"], "argument --dtype: invalid choice: 'float16'"),
    (["convert", "a", "b", "--time-scale", "10"], "argument --time-scale: invalid choice: 10.0"),
    (["export", "a", "b"], "the following arguments are required: --format"),
    (
        ["export", "a", "b", "--format", "diffusers", "--max-shard-size", "lots"],
        "'lots' is not a size",
    ),
    (["sample", "ckpt", "--out", "o"], "the following arguments are required: --prompt"),
    (
        ["sample", "ckpt", "--prompt", "p", "--out", "o", "--method", "ddim"],
        "argument --method: invalid choice: 'ddim'",
    ),
]


@pytest.mark.parametrize("argv,message", BAD_USAGE)
def test_bad_usage_exits_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_input_exits_1_with_the_reason(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("distill-jax convert: error: ") and "missing does not exist" in err
    torch_flux(FluxConfig.tiny()).save_pretrained(tmp_path / "src")
    argv = ["convert", str(tmp_path / "src"), str(tmp_path / "out"), "--components", "unet,vae"]
    assert cli.main(argv) == 1
    assert "unknown component(s) ['unet']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_sample_passes_every_flag(tmp_path, monkeypatch):
    """The verb's wiring: flags -> load_pipeline -> generate -> save_images (the sampler itself
    is tested against diffusers in the pipeline's tests)."""
    calls = {}
    stub = types.SimpleNamespace(latent_channels=4, vae_scale_factor=8)

    def load_pipeline(path, *, dtype=None):
        calls["load"] = (path, dtype)
        return stub

    def generate(pipeline, prompts, **kw):
        calls["generate"] = (pipeline, prompts, kw)
        return np.full((len(prompts), 16, 16, 3), 7, np.uint8)

    monkeypatch.setattr("distill_jax.folders.load_pipeline", load_pipeline)
    monkeypatch.setattr("distill_jax.pipeline.generate.generate", generate)
    noise = np.random.default_rng(0).standard_normal((2, 4, 2, 2)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    argv = [
        "sample",
        "ckpt",
        "--prompt",
        "a cube",
        "--prompt",
        "a star",
        "--out",
        str(tmp_path / "img"),
        "--method",
        "meanflow",
        "--steps",
        "4",
        "--guidance",
        "none",
        "--height",
        "16",
        "--width",
        "16",
        "--seed",
        "7",
        "--init-noise",
        str(tmp_path / "noise.npy"),
        "--max-sequence-length",
        "32",
        "--dtype",
        "bfloat16",
    ]
    assert cli.main(argv) == 0
    assert calls["load"] == ("ckpt", "bfloat16")
    pipeline, prompts, kw = calls["generate"]
    assert pipeline is stub and prompts == ["a cube", "a star"]
    np.testing.assert_array_equal(kw.pop("init_noise"), noise)
    assert kw == dict(
        height=16,
        width=16,
        steps=4,
        guidance=None,
        seed=7,
        method="meanflow",
        max_sequence_length=32,
    )
    assert sorted(p.name for p in (tmp_path / "img").iterdir()) == [
        "00000.png",
        "00001.png",
        "grid.png",
    ]


# --- one line for every failure, before anything is loaded ------------------------------------

TRAIN = ["train", "--config", "configs/scm.py:runlocal", "--workdir", "unused"]
BAD_TRAIN = [
    (["--config.optim.lrr=1"], "has no field config.optim.lrr; did you mean config.optim.lr?"),
    (["--config.totl_steps=3"], "did you mean config.total_steps?"),
    (["--config.optim.lr=abc"], "--config.optim.lr=abc: could not convert string to float"),
    (["--config.total_steps=1.5"], "--config.total_steps=1.5: invalid literal for int()"),
    (["--config.checkpoint_every=0"], "config.checkpoint_every=0 must be >= 1"),
    (["--config.seed=4294967296"], "config.seed=4294967296 must be in [0, 2**32)"),
    (["--config.optim.lr=nan"], "config.optim.lr=nan is not finite"),
    (
        ["--config.model.delta_init=cpy"],
        "config.model.delta_init='cpy'; choose one of ('auto', 'zero', 'copy')",
    ),
    (["--config.loss.time_dtype=bf16"], "config.loss.time_dtype='bf16'; choose one of"),
]


def _one_error_line(capsys, verb: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"distill-jax {verb}: error: "), err
    return lines[0]


@pytest.mark.parametrize("overrides,message", BAD_TRAIN)
def test_config_mistakes_are_one_line(overrides, message, capsys):
    assert cli.main(TRAIN + overrides) == 1
    assert message in _one_error_line(capsys, "train")


@pytest.mark.parametrize(
    "spec,message",
    [
        ("configs/nope.py", "config file 'configs/nope.py' does not exist"),
        ("configs/scm.py:bogus", "configs/scm.py: unknown argument 'bogus'"),
        ("configs/scm.py:gamma2", "configs/scm.py: unknown argument 'gamma2' (use runlocal or"),
        ("configs/toy_distill.py:scm,window", "unknown argument 'scm,window'"),
    ],
)
def test_config_file_mistakes_are_one_line(spec, message, capsys):
    assert cli.main(["train", "--config", spec, "--workdir", "unused"]) == 1
    assert message in _one_error_line(capsys, "train")


SAMPLE = ["sample", "ckpt", "--prompt", "a cube", "--out", "unused"]
BAD_SAMPLE = [  # refused before the pipeline is loaded
    (["--height", "65536"], "height=65536 must be in [16, 4096]"),
    (["--width", "100"], "width=100 must be a positive multiple of 16"),
    (["--steps", "1000000000"], "steps=1000000000 must be in [1, 1000]"),
    (["--steps", "0"], "steps=0 must be in [1, 1000]"),
    (["--guidance", "nan"], "guidance=nan must be a finite number"),
    (["--max-sequence-length", "100000"], "max_sequence_length=100000 must be in [1, 512]"),
    (["--seed", str(2**64)], f"seed={2**64} must be in [0, 4294967295]"),
    (["--seed", "-1"], "seed=-1 must be in [0, 4294967295]"),
    (["--prompt", "caf\udce9"], "prompt 1 ('caf\\udce9') is not valid UTF-8 text"),
]


@pytest.mark.parametrize("extra,message", BAD_SAMPLE)
def test_sample_requests_are_checked_before_loading(extra, message, capsys, monkeypatch):
    loaded = []
    monkeypatch.setattr("distill_jax.folders.load_pipeline", lambda *a, **k: loaded.append(a))
    assert cli.main(SAMPLE + extra) == 1
    assert message in _one_error_line(capsys, "sample")
    assert loaded == []


def _bad_noise(tmp_path, kind: str) -> str:
    good = np.zeros((1, 4, 2, 2), np.float32)
    path = tmp_path / f"{kind}.npy"
    if kind == "npz":
        path = tmp_path / "noise.npz"
        np.savez(path, noise=good)
    elif kind == "pickle":
        np.save(path, np.array([{"a": 1}], dtype=object))
    elif kind == "truncated":
        np.save(path, good)
        path.write_bytes(path.read_bytes()[:-8])
    else:
        values = {"int": good.astype(np.int32), "complex": good.astype(np.complex64)}
        values["nan"] = np.full_like(good, np.nan)
        np.save(path, values[kind])
    return str(path)


@pytest.mark.parametrize(
    "kind,message",
    [
        ("npz", "an .npz archive; save the one array with np.save"),
        ("pickle", "not a readable .npy array"),
        ("truncated", "not a readable .npy array"),
        ("int", "init_noise is int32; expected standard normal floats"),
        ("complex", "init_noise is complex64; expected standard normal floats"),
        ("nan", "init_noise has 16 non-finite value(s) of 16"),
    ],
)
def test_bad_init_noise_is_refused(kind, message, tmp_path, capsys, monkeypatch):
    stub = types.SimpleNamespace(latent_channels=4, vae_scale_factor=8)
    monkeypatch.setattr("distill_jax.folders.load_pipeline", lambda *a, **k: stub)
    argv = SAMPLE + ["--height", "16", "--width", "16", "--init-noise", _bad_noise(tmp_path, kind)]
    assert cli.main(argv) == 1
    line = _one_error_line(capsys, "sample")
    assert message in line and (kind not in ("npz", "pickle", "truncated") or kind in line)


def test_unexpected_errors_are_one_line_with_the_traceback_under_verbose(
    capsys, caplog, monkeypatch
):
    def broken(*args, **kwargs):
        raise KeyError("transformer")

    monkeypatch.setattr("distill_jax.convert.convert", broken)
    assert cli.main(["convert", "a", "b"]) == 1
    line = _one_error_line(capsys, "convert")
    assert line.endswith("KeyError: 'transformer' (--verbose shows where)")
    assert "Traceback" not in caplog.text
    assert cli.main(["-v", "convert", "a", "b"]) == 1
    _one_error_line(capsys, "convert")
    assert "Traceback" in caplog.text and "in broken" in caplog.text


def test_ctrl_c_is_one_line_and_status_130(capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("distill_jax.convert.convert", interrupted)
    assert cli.main(["convert", "a", "b"]) == 130
    assert capsys.readouterr().err.strip() == "distill-jax convert: interrupted"
