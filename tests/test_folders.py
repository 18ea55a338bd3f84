"""Converted folders (``distill_jax.folders``): checksums recorded by ``convert`` and
``save_model`` and verified at load, and damaged folders or config.json refused with one line
naming the file. Loading against the PyTorch models is in test_convert.py.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from test_flux import state_dict, torch_flux

from distill_jax.convert import convert, export
from distill_jax.folders import load_flux, save_model
from distill_jax.models.flux import FluxConfig
from distill_jax.port.flux import flux_from_diffusers
from distill_jax.port.params import flat_params
from distill_jax.sharding import make_mesh


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """A converted tiny transformer (float32) and its diffusers source folder."""
    tmp = tmp_path_factory.mktemp("tiny")
    torch_flux(FluxConfig.tiny()).save_pretrained(tmp / "src")
    return convert(tmp / "src", tmp / "jax", progress=False), tmp / "src"


def _copy(folder, tmp_path):

    return Path(shutil.copytree(folder, tmp_path / "copy"))


def _refusal(folder) -> str:
    """The message with which ``load_flux`` refuses ``folder``."""
    with pytest.raises(ValueError) as err:
        load_flux(folder)
    return str(err.value)


def _edit_meta(folder, edit):
    path = folder / "transformer" / "config.json"
    meta = json.loads(path.read_text())
    edit(meta)
    path.write_text(json.dumps(meta))
    return folder / "transformer"


def test_converted_and_saved_folders_record_checksums(tiny_folder, tmp_path):
    """convert records every parameter's checksum; save_model records the same ones from arrays
    sharded across 8 devices; both folders load verified."""
    from distill_jax.port.checksum import host_checksum

    folder, _ = tiny_folder
    recorded = json.loads((folder / "transformer" / "config.json").read_text())["checksums"]
    model = load_flux(folder, mesh=make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    flat = flat_params(model)
    assert recorded["params"] == {k: host_checksum(v) for k, v in flat.items()}
    saved = save_model(model, tmp_path / "saved")
    assert json.loads((saved / "config.json").read_text())["checksums"] == recorded
    np.testing.assert_array_equal(
        flat_params(load_flux(saved))["img_in.kernel"], flat["img_in.kernel"]
    )


def _other_weights(folder):
    """The params of a model that differs in one element of img_in.kernel: what a flipped byte
    in a data file loads, silently without checksums."""

    model = load_flux(folder)
    kernel = model.img_in.kernel
    kernel.set_value(kernel.get_value().at[3, 1].add(1e-3))
    other = save_model(model, folder.parent / "other")
    shutil.rmtree(folder / "transformer" / "params")
    shutil.copytree(other / "params", folder / "transformer" / "params")


def _edited_checksum(folder):
    def edit(meta):
        sums = meta["checksums"]["params"]
        sums["img_in.kernel"] = sums["img_in.kernel"][::-1]

    _edit_meta(folder, edit)


@pytest.mark.parametrize("damage", [_other_weights, _edited_checksum], ids=lambda f: f.__name__)
def test_load_refuses_weights_that_differ_from_their_checksums(tiny_folder, tmp_path, damage):
    folder = _copy(tiny_folder[0], tmp_path)
    damage(folder)
    message = _refusal(folder)
    assert re.fullmatch(
        rf"{folder}/transformer/params: 1 parameter\(s\) do not match the checksums recorded .*"
        r"\('img_in\.kernel'\): the checkpoint is corrupt; convert it again",
        message,
    ), message
    with pytest.raises(ValueError, match=r"params: 1 parameter\(s\) do not match.*img_in"):
        export(folder, tmp_path / "exported", format="diffusers", progress=False)
    assert not (tmp_path / "exported").exists()


def test_checksums_after_widening_and_narrowing_loads(tmp_path, caplog):
    """bfloat16 stored, float32 loaded: verified after the exact cast back. float32 stored,
    bfloat16 loaded: not verifiable, said in the log. No checksums at all (a folder written
    before them): loads, said in the log."""
    import logging

    model = flux_from_diffusers(state_dict(torch_flux(FluxConfig.tiny())), FluxConfig.tiny())
    bf16 = save_model(model, tmp_path / "bf16" / "transformer", dtype="bfloat16")
    f32 = save_model(model, tmp_path / "f32" / "transformer")
    assert load_flux(bf16, dtype="float32").img_in.kernel.get_value().dtype == jnp.float32
    for folder in (tmp_path / "bf16", tmp_path / "f32"):
        _edited_checksum(folder)
    with pytest.raises(ValueError, match=r"bf16/transformer/params: 1 parameter\(s\) do not"):
        load_flux(bf16, dtype="float32")
    with caplog.at_level(logging.INFO, logger="distill_jax.folders"):
        load_flux(f32, dtype="bfloat16")
        assert "unverified: narrowed from the stored float32" in caplog.text
        _edit_meta(tmp_path / "f32", lambda meta: meta.pop("checksums"))
        load_flux(f32)
        assert "unverified: the folder predates checksums" in caplog.text


def test_truncated_orbax_file_names_the_folder(tiny_folder, tmp_path):
    folder = _copy(tiny_folder[0], tmp_path)
    data = [f for f in (folder / "transformer" / "params").rglob("d/*") if f.is_file()]
    assert data
    for f in data:
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    message = _refusal(folder)
    assert re.fullmatch(
        rf"{folder}/transformer/params: cannot read the parameters \(.*\); the folder is "
        r"damaged or incomplete: convert \(or save\) it again",
        message,
    ), message


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("time_scale", None, r"missing field 'time_scale'"),
        ("time_scale", float("nan"), r"time_scale is NaN, expected float"),
        ("time_scale", 0.0, r"time_scale=0\.0: expected a finite number > 0"),
        ("time_scale", -1000.0, r"time_scale=-1000\.0: expected a finite number > 0"),
        ("time_scale", "1000", r"time_scale is \"1000\", expected float"),
        ("num_double", 2.0, r"num_double is 2\.0, expected int"),
        ("num_heads", "2", r"num_heads is \"2\", expected int"),
        ("guidance_embed", 1, r"guidance_embed is 1, expected bool"),
        ("axes_dim", [4, 6.0, 6], r"axes_dim is \[4, 6\.0, 6\], expected tuple"),
        ("out_channels", True, r"out_channels is true, expected int \| None"),
        ("colour", "red", r"unknown field 'colour'"),
    ],
)
def test_bad_converted_config_is_one_line_naming_file_and_field(
    tiny_folder, tmp_path, field, value, message
):
    def edit(meta):
        if value is None:
            del meta["config"][field]
        else:
            meta["config"][field] = value

    folder = _edit_meta(_copy(tiny_folder[0], tmp_path), edit)
    refused = _refusal(folder)
    assert "\n" not in refused, refused
    assert re.match(rf"{folder}/config\.json: bad FluxConfig.*{message}", refused), refused


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda meta: meta.update(config=[1, 2]), r"'config' is a list, not an object"),
        (lambda meta: meta.update(dtype="float64"), r"dtype 'float64' is not one of"),
        (lambda meta: meta.update(checksums={"algorithm": "md5"}), r"unreadable checksums"),
    ],
)
def test_bad_converted_meta_names_the_file(tiny_folder, tmp_path, edit, message):
    folder = _edit_meta(_copy(tiny_folder[0], tmp_path), edit)
    with pytest.raises(ValueError, match=rf"^{folder}/config\.json: {message}"):
        load_flux(folder)
