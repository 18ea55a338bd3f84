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

    monkeypatch.setattr("distill_jax.convert.load_pipeline", load_pipeline)
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
