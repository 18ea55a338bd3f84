"""``convert``, ``export`` and the loaders against the PyTorch models that wrote or read the files.

Every checkpoint is tiny, random and written here by diffusers / transformers / torch /
``safetensors.numpy`` (never by the code under test, except where a test says so). Tolerances:
float32 throughout; the transformer agrees to 5e-5 of the reference's max |value| (as in
test_flux.py), the text encoders and the VAE to 1e-5 (as in their own tests).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import struct
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from diffusers import FluxTransformer2DModel
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from flax import nnx
from test_flux import REL_TOL, Case, assert_close, inputs, state_dict, torch_flux, torch_forward
from test_text_encoding import tiny_flux_pipeline

from distill_jax.convert import convert, detect_format, export
from distill_jax.folders import load_flux, load_model, load_pipeline, save_model
from distill_jax.models.autoencoder import to_nchw, to_nhwc
from distill_jax.models.flux import FluxConfig
from distill_jax.pipeline.pipeline import Pipeline
from distill_jax.port.flux import flux_from_diffusers, flux_to_bfl
from distill_jax.port.formats import MARKER
from distill_jax.port.params import flat_params
from distill_jax.port.safetensors_io import SafetensorsError
from distill_jax.port.table import PortError
from distill_jax.sharding import make_mesh, state_shardings

ENCODER_TOL = 1e-5
# FLUX's head width (128), so that the RoPE axes (16, 56, 56) and the whole structure can be
# inferred from the tensors alone; the other widths fit test_text_encoding's tiny pipeline.
WIDE = FluxConfig(
    num_double=1,
    num_single=2,
    num_heads=1,
    head_dim=128,
    in_channels=16,
    context_dim=32,
    pooled_dim=32,
)


@functools.partial(jax.jit, static_argnames=("graphdef", "method", "flags"))
def _apply(state, arrays, *, graphdef, method, flags):
    return getattr(nnx.merge(graphdef, state), method)(**arrays, **dict(flags))


def run(model, method="__call__", flags=(), **arrays):
    """``model.method(**arrays)`` jitted once per model structure: one compilation instead of
    hundreds of eager op compilations."""
    graphdef, state = nnx.split(model)
    return _apply(state, arrays, graphdef=graphdef, method=method, flags=tuple(flags))


def no_leftovers(parent, *keep):
    """Nothing but ``keep`` in ``parent``: no temporary folder of a failed conversion."""
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


# --- a diffusers pipeline folder --------------------------------------------------------------


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    pipe = tiny_flux_pipeline(root / "build", WIDE)
    with torch.no_grad():  # norm scales away from 1 too, so that no swap can hide
        for p in pipe.transformer.parameters():
            p.normal_(0.0, 0.2)
    pipe.save_pretrained(root / "flux")
    return pipe, root / "flux"


@pytest.fixture(scope="module")
def converted(pipeline_dir, tmp_path_factory):
    _, src = pipeline_dir
    return convert(src, tmp_path_factory.mktemp("out") / "jax", dtype="float32", progress=False)


# (ours, reference) output pairs of each converted component and its PyTorch original
def _transformer(pipe, model):
    x = inputs(Case(model.cfg))
    return [(run(model, **x), torch_forward(pipe.transformer, x))]


def _clip(pipe, model):
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 77)).astype(np.int32)
    with torch.no_grad():
        ref = pipe.text_encoder(input_ids=torch.tensor(ids, dtype=torch.long))
    hidden, pooled = run(model, input_ids=ids)
    return [(hidden, ref.last_hidden_state.numpy()), (pooled, ref.pooler_output.numpy())]


def _t5(pipe, model):
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 12)).astype(np.int32)
    with torch.no_grad():
        ref = pipe.text_encoder_2(input_ids=torch.tensor(ids, dtype=torch.long))
    return [(run(model, input_ids=ids), ref.last_hidden_state.numpy())]


def _vae(pipe, model):
    z = np.random.default_rng(0).standard_normal((1, 4, 4, model.cfg.latent_channels))
    with torch.no_grad():
        ref = pipe.vae.decode(torch.tensor(np.asarray(to_nchw(z)), dtype=torch.float32)).sample
    return [(run(model, "decode", latents=z.astype(np.float32)), to_nhwc(ref.numpy()))]


FORWARDS = {"transformer": _transformer, "text_encoder": _clip, "text_encoder_2": _t5, "vae": _vae}


@pytest.mark.parametrize("component", list(FORWARDS))
def test_pipeline_folder_matches_torch(pipeline_dir, converted, component):
    pipe, src = pipeline_dir
    model = load_model(converted, component=component)
    for ours, ref in FORWARDS[component](pipe, model):
        assert_close(ours, ref, rel=REL_TOL if component == "transformer" else ENCODER_TOL)
    meta = json.loads((converted / component / "config.json").read_text())
    assert meta["dtype"] == "float32" and meta["source"]["format"] == "diffusers"
    hashed = {
        f: hashlib.sha256((src / f).read_bytes()).hexdigest() for f in meta["source"]["sha256"]
    }
    assert hashed == meta["source"]["sha256"] and f"{component}/config.json" in hashed


def test_pipeline_folder_copies_tokenizers_and_loads(pipeline_dir, converted):
    pipe, src = pipeline_dir
    for folder in ("tokenizer", "tokenizer_2", "scheduler"):
        for f in (src / folder).iterdir():
            assert (converted / folder / f.name).read_bytes() == f.read_bytes()
    pipeline = load_pipeline(converted)
    assert isinstance(pipeline, Pipeline)
    prompt = "a red cube on the moon"
    assert pipeline.t5_tokenizer(prompt).input_ids == pipe.tokenizer_2(prompt).input_ids
    assert pipeline.clip_tokenizer(prompt).input_ids == pipe.tokenizer(prompt).input_ids
    np.testing.assert_array_equal(
        flat_params(pipeline.transformer)["img_in.kernel"],
        pipe.transformer.x_embedder.weight.detach().numpy().T,
    )


def test_sample_verb_on_the_converted_pipeline(converted, tmp_path):
    """``distill-jax sample`` end to end: load_pipeline -> generate -> PNGs (the sampler's numbers
    are checked against diffusers in the pipeline's own tests)."""
    from PIL import Image

    from distill_jax import cli

    argv = [
        "sample",
        str(converted),
        "--prompt",
        "a red cube",
        "--prompt",
        "three green stars",
        "--out",
        str(tmp_path / "img"),
        "--height",
        "32",
        "--width",
        "48",
        "--steps",
        "2",
        "--max-sequence-length",
        "16",
    ]
    assert cli.main(argv) == 0
    images = [Image.open(tmp_path / "img" / f"0000{i}.png") for i in range(2)]
    assert [im.size for im in images] == [(48, 32)] * 2
    assert np.asarray(images[0]).std() > 0 and (tmp_path / "img" / "grid.png").is_file()


def test_relative_paths_convert_sample_and_export(pipeline_dir, tmp_path, monkeypatch):
    """The first commands a user types, run in the folder that holds the checkpoint: every path
    relative (Orbax itself accepts only absolute ones)."""
    import os

    from distill_jax import cli

    _, src = pipeline_dir
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(src, tmp_path)
    assert cli.main(["convert", rel, "out", "--dtype", "float32", "--no-progress"]) == 0
    assert load_flux("out").cfg.num_double > 0
    argv = [
        "sample",
        "out",
        "--prompt",
        "a cube",
        "--out",
        "img",
        "--height",
        "32",
        "--width",
        "32",
        "--steps",
        "1",
        "--max-sequence-length",
        "16",
    ]
    assert cli.main(argv) == 0 and os.path.isfile("img/00000.png")
    argv = ["export", "out", "exported", "--format", "diffusers", "--no-progress"]
    assert cli.main(argv) == 0 and os.path.isfile("exported/config.json")


def test_components_subset(pipeline_dir, tmp_path):
    _, src = pipeline_dir
    out = convert(src, tmp_path / "jax", components=["vae"], progress=False)
    assert json.loads((out / "distill_jax.json").read_text())["components"] == ["vae"]
    assert not (out / "transformer").exists() and (out / "tokenizer").is_dir()


# --- single transformers: sharded folder, BFL file, T2I-Distill .pt ---------------------------


def test_sharded_transformer_folder(tmp_path):
    cfg = WIDE
    ref = torch_flux(cfg)
    ref.save_pretrained(tmp_path / "src", max_shard_size="1MB")
    assert len(list((tmp_path / "src").glob("*.safetensors"))) > 3
    assert detect_format(tmp_path / "src") == "diffusers"
    model = load_flux(convert(tmp_path / "src", tmp_path / "jax", progress=False))
    assert model.cfg == cfg
    x = inputs(Case(cfg))
    assert_close(run(model, **x), torch_forward(ref, x))


@pytest.mark.parametrize("with_config", [False, True])
def test_bfl_file(tmp_path, with_config):
    """BFL tensors come from our BFL table (checked against diffusers' own single-file converter
    at full width in test_flux.py); the structure is inferred, or read from a config.json."""
    cfg = WIDE
    ref = torch_flux(cfg)
    bfl = flux_to_bfl(flux_from_diffusers(state_dict(ref), cfg))
    safetensors.numpy.save_file(bfl, tmp_path / "flux.safetensors")
    config = None
    if with_config:
        config = tmp_path / "config.json"
        config.write_text(json.dumps(cfg.to_diffusers()))
    assert detect_format(tmp_path / "flux.safetensors") == "bfl"
    out = convert(tmp_path / "flux.safetensors", tmp_path / "jax", config=config, progress=False)
    model = load_flux(out)
    assert model.cfg == cfg
    x = inputs(Case(cfg))
    assert_close(run(model, **x), torch_forward(ref, x))


class WithHeads(torch.nn.Module):
    """The paper's dual-timestep conditioning over diffusers' embedder: ``temb + E2(phi(delta))``
    (spec t2i-distill.md 1.2), remembering ``temb`` for the sCM log-variance head."""

    def __init__(self, inner, embedder2, delta):
        super().__init__()
        self.inner, self.embedder2, self.delta = inner, embedder2, delta
        self.proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)

    def forward(self, timestep, guidance, pooled):
        self.temb = self.inner(timestep, guidance, pooled)
        if self.embedder2 is not None:
            self.temb = self.temb + self.embedder2(self.proj(self.delta))
        return self.temb


def t2i_distill_student(cfg: FluxConfig, seed: int = 0):
    """(diffusers model, embedder2 or None, logvar Linear or None, the .pt state dict)."""
    ref = torch_flux(cfg, seed)
    torch.manual_seed(seed + 1)
    emb2 = TimestepEmbedding(256, cfg.hidden) if cfg.delta_embed else None
    logvar = torch.nn.Linear(cfg.hidden, 1) if cfg.logvar_head else None
    sd = dict(ref.state_dict())
    for prefix, module in (("timestep_embedder2", emb2), ("logvar_linear", logvar)):
        if module is not None:
            sd.update({f"{prefix}.{k}": v for k, v in module.state_dict().items()})
    return ref, emb2, logvar, sd


@pytest.mark.parametrize("heads", [False, True])
def test_t2i_distill_pt(tmp_path, heads):
    """A time_scale=1 student: diffusers (which multiplies by 1000) is fed t/1000 and g/1000.
    With heads: MeanFlow's Δ-time embedder and sCM's log-variance head."""
    cfg = WIDE.replace(time_scale=1.0, delta_embed=heads, logvar_head=heads)
    ref, emb2, logvar, sd = t2i_distill_student(cfg)
    torch.save({"module": sd}, tmp_path / "student.pt")
    model = load_flux(convert(tmp_path / "student.pt", tmp_path / "jax", progress=False))
    assert model.cfg == cfg
    x = inputs(Case(cfg))
    delta = np.array([0.3, 0.0], np.float32)
    ref.time_text_embed = WithHeads(ref.time_text_embed, emb2, torch.tensor(delta))
    kw = {"timestep2": delta} if cfg.delta_embed else {}
    out = run(model, **x, **kw, flags={"return_logvar": heads}.items())
    assert_close(out[0] if cfg.logvar_head else out, torch_forward(ref, x, time_divisor=1000.0))
    if cfg.logvar_head:
        with torch.no_grad():
            assert_close(out[1], logvar(ref.time_text_embed.temb)[:, 0].numpy())


# --- export -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A converted T2I-Distill student with both heads, and its .pt state dict."""
    tmp = tmp_path_factory.mktemp("student")
    cfg = FluxConfig.tiny().replace(time_scale=1.0, delta_embed=True, logvar_head=True)
    _, _, _, sd = t2i_distill_student(cfg)
    torch.save({"module": sd}, tmp / "student.pt")
    config = tmp / "config.json"
    config.write_text(json.dumps(cfg.to_diffusers()))
    return convert(tmp / "student.pt", tmp / "jax", config=config, progress=False), sd


def test_export_diffusers_loads_in_diffusers(student, tmp_path):
    path, sd = student
    out = export(path, tmp_path / "hf", max_shard_bytes=20_000, progress=False)
    assert len(list(out.glob("*.safetensors"))) > 2
    assert (out / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model, info = FluxTransformer2DModel.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == [] and info["mismatched_keys"] == []
    for k, v in model.state_dict().items():
        assert torch.equal(v, sd[k]), k
    heads = {"timestep_embedder2", "logvar_linear"}  # not diffusers modules
    assert {k.split(".")[0] for k in info["unexpected_keys"]} == heads
    exported = {}
    for f in out.glob("*.safetensors"):
        exported.update(safetensors.numpy.load_file(f))
    assert sorted(exported) == sorted(sd)  # the extra heads too, in the paper's names
    assert all(np.array_equal(exported[k], sd[k].numpy()) for k in sd)
    # and our own reader takes it back with its time scale and heads
    again = load_flux(convert(out, tmp_path / "jax", progress=False))
    assert again.cfg == load_flux(path).cfg


def test_export_t2i_distill_loads_in_the_papers_way(student, tmp_path):
    path, sd = student
    out = export(path, tmp_path / "student.pt", format="t2i-distill", progress=False)
    module = torch.load(out, map_location="cpu", weights_only=True)["module"]
    assert sorted(module) == sorted(sd) and all(torch.equal(module[k], sd[k]) for k in sd)
    cfg = load_flux(path).cfg
    model = FluxTransformer2DModel(
        **{k: v for k, v in cfg.to_diffusers().items() if not k.startswith("_")}
    )
    missing, unexpected = model.load_state_dict(module, strict=False)
    assert missing == []
    assert {k.split(".")[0] for k in unexpected} == {"timestep_embedder2", "logvar_linear"}


def test_save_model_then_export(tmp_path):
    cfg = FluxConfig.tiny()
    ref = torch_flux(cfg)
    path = save_model(flux_from_diffusers(state_dict(ref), cfg), tmp_path / "trained")
    out = export(path, tmp_path / "hf", progress=False)
    model = FluxTransformer2DModel.from_pretrained(out)
    assert all(torch.equal(v, ref.state_dict()[k]) for k, v in model.state_dict().items())


# --- dtypes and meshes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source,asked,stored",
    [
        ("float32", None, "float32"),
        ("bfloat16", None, "bfloat16"),
        ("float32", "bfloat16", "bfloat16"),
    ],
)
def test_dtypes(tmp_path, source, asked, stored):
    cfg = FluxConfig.tiny()
    ref = torch_flux(cfg).to(getattr(torch, source))
    ref.save_pretrained(tmp_path / "src")
    out = convert(tmp_path / "src", tmp_path / "jax", dtype=asked, progress=False)
    model = load_flux(out)
    kernel = model.img_in.kernel.get_value()
    assert kernel.dtype == jnp.dtype(stored)
    expect = ref.x_embedder.weight.detach().float().numpy().T.astype(jnp.dtype(stored))
    np.testing.assert_array_equal(np.asarray(kernel, np.float32), expect.astype(np.float32))
    as_f32 = load_flux(out, dtype="float32").img_in.kernel.get_value()
    assert as_f32.dtype == np.float32 and np.array_equal(as_f32, np.asarray(kernel, np.float32))


@pytest.mark.parametrize("component", list(FORWARDS))
def test_restore_onto_a_mesh(converted, component):
    assert len(jax.devices()) == 8, "tests/conftest.py sets 8 fake CPU devices"
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = load_model(converted, component=component, mesh=mesh)
    plain = flat_params(load_model(converted, component=component))
    expected = dict(nnx.to_flat_state(state_shardings(nnx.state(model, nnx.Param), mesh)))
    sharded = 0
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        value, want = var.get_value(), expected[path].get_value()
        assert value.sharding.is_equivalent_to(want, value.ndim), path
        np.testing.assert_array_equal(np.asarray(value), plain[".".join(map(str, path))])
        sharded += any(want.spec)
    assert sharded > 0  # some leaves really are split across devices


def test_safetensors_io_against_the_safetensors_library(tmp_path):
    """Our streaming writer is read by the library, and ours reads what the library writes:
    bfloat16, float16, float32, integers, a scalar and an empty tensor, several shards."""
    import safetensors.torch

    from distill_jax.port.safetensors_io import open_safetensors, write_sharded
    from distill_jax.port.torch_pt import from_numpy, to_numpy

    rng = np.random.default_rng(0)
    arrays = {
        "a.bf16": rng.standard_normal((3, 5)).astype(jnp.bfloat16),
        "b.f16": rng.standard_normal(7).astype(np.float16),
        "c.f32": rng.standard_normal((2, 2, 2)).astype(np.float32),
        "d.i64": np.arange(4, dtype=np.int64),
        "e.scalar": np.float32(2.5).reshape(()),
        "f.empty": np.zeros((0, 3), np.float32),
    }
    specs = [(k, v.dtype, v.shape) for k, v in arrays.items()]
    write_sharded(tmp_path, "m", specs, iter(arrays.items()), max_shard_bytes=40)
    theirs = {}
    for f in sorted(tmp_path.glob("m-*.safetensors")):
        theirs.update(safetensors.torch.load_file(f))
    assert len(list(tmp_path.glob("m-*.safetensors"))) > 2 and sorted(theirs) == sorted(arrays)
    ours = open_safetensors(tmp_path / "m.safetensors.index.json")
    for k, v in arrays.items():
        assert to_numpy(theirs[k]).dtype == v.dtype and ours[k].dtype == v.dtype
        np.testing.assert_array_equal(to_numpy(theirs[k]), v)
        np.testing.assert_array_equal(ours[k], v)
    safetensors.torch.save_file({k: from_numpy(v) for k, v in arrays.items()}, tmp_path / "t.st")
    back = open_safetensors(tmp_path / "t.st")
    assert all(
        np.array_equal(back[k], v) and back.shape_of(k) == v.shape for k, v in arrays.items()
    )


# --- bad inputs: each a clear error, nothing left behind --------------------------------------


def _diffusers_file(tmp_path):
    """A single-file transformer folder and its safetensors file."""
    torch_flux(FluxConfig.tiny()).save_pretrained(tmp_path / "src")
    return tmp_path / "src", tmp_path / "src" / "diffusion_pytorch_model.safetensors"


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + n]))
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def bad_truncated(tmp_path):
    src, f = _diffusers_file(tmp_path)
    f.write_bytes(f.read_bytes()[:-100])
    return src, {}, SafetensorsError, r"diffusion_pytorch_model\.safetensors.*truncated"


def bad_header_json(tmp_path):
    src, f = _diffusers_file(tmp_path)
    raw = bytearray(f.read_bytes())
    raw[8:12] = b"#!?x"
    f.write_bytes(bytes(raw))
    return (
        src,
        {},
        SafetensorsError,
        r"diffusion_pytorch_model\.safetensors: header is not valid JSON",
    )


def bad_header_sizes(tmp_path):
    src, f = _diffusers_file(tmp_path)

    def lie(header):
        header["proj_out.bias"]["shape"] = [17]
        return header

    _rewrite_header(f, lie)
    return src, {}, SafetensorsError, r"'proj_out.bias': F32\[17\] needs 68 bytes but data_offsets"


def bad_layout(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.npz").write_bytes(b"not a checkpoint")
    return tmp_path / "src", {}, ValueError, r"unknown layout: .*src.*weights\.npz"


def bad_keys_in_shards(tmp_path):
    """Missing, unexpected and mis-shaped keys, each named with its shard file."""
    sd = state_dict(torch_flux(FluxConfig.tiny()))
    del sd["transformer_blocks.0.attn.to_k.bias"]
    sd["transformer_blocks.0.attn.extra.weight"] = np.zeros((3, 3), np.float32)
    sd["transformer_blocks.0.ff.net.2.weight"] = np.zeros((32, 100), np.float32)
    src = tmp_path / "src"
    src.mkdir()
    keys = sorted(sd)
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2 :])):
        name = f"diffusion_pytorch_model-0000{i + 1}-of-00002.safetensors"
        safetensors.numpy.save_file({k: sd[k] for k in part}, src / name)
        weight_map.update(dict.fromkeys(part, name))
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    (src / "config.json").write_text(json.dumps(FluxConfig.tiny().to_diffusers()))
    extra, ff = "transformer_blocks.0.attn.extra.weight", "transformer_blocks.0.ff.net.2.weight"
    return (
        src,
        {},
        PortError,
        [
            r"3 problem\(s\)",
            r"missing source key 'transformer_blocks.0.attn.to_k.bias'",
            rf"source key '{ff}' has shape \(32, 100\), expected \(32, 128\) "
            rf".* \[{weight_map[ff]}\]",
            rf"unexpected source key '{extra}' \(3, 3\) \[{weight_map[extra]}\]",
        ],
    )


def bad_depth(tmp_path):
    cfg = WIDE
    safetensors.numpy.save_file(
        flux_to_bfl(flux_from_diffusers(state_dict(torch_flux(cfg)), cfg)),
        tmp_path / "f.safetensors",
    )
    (tmp_path / "config.json").write_text(json.dumps(cfg.replace(num_double=3).to_diffusers()))
    return (
        tmp_path / "f.safetensors",
        {"config": tmp_path / "config.json"},
        ValueError,
        (
            r"config\.json does not match the weights in .*f\.safetensors: num_layers is 3 in .* "
            r"but 1 in the weights"
        ),
    )


def bad_pickle(tmp_path):
    torch.save({"module": {"w": torch.zeros(2)}, "opt": torch.optim.SGD}, tmp_path / "s.pt")
    return tmp_path / "s.pt", {}, ValueError, r"s\.pt: refused to unpickle.*SGD"


def bad_integer_weight(tmp_path):
    cfg = WIDE
    sd = dict(torch_flux(cfg).state_dict())
    sd["proj_out.bias"] = sd["proj_out.bias"].to(torch.int32)
    torch.save({"module": sd}, tmp_path / "s.pt")
    return tmp_path / "s.pt", {}, PortError, r"'proj_out.bias' \[s\.pt\] is int32, not a float"


def _index_naming(tmp_path, weight_map_of) -> Path:
    """A sharded transformer folder whose index is ``weight_map_of(shard_name, keys)``; a real
    shard sits outside the folder, where a path in the index could reach it."""
    sd = state_dict(torch_flux(FluxConfig.tiny()))
    (tmp_path / "outside").mkdir()
    safetensors.numpy.save_file(sd, tmp_path / "outside" / "evil.safetensors")
    src = tmp_path / "src"
    src.mkdir()
    index = {"metadata": {}, "weight_map": weight_map_of("../outside/evil.safetensors", sd)}
    (src / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    (src / "config.json").write_text(json.dumps(FluxConfig.tiny().to_diffusers()))
    return src


def bad_index_leaves_the_folder(tmp_path):
    src = _index_naming(tmp_path, lambda name, sd: dict.fromkeys(sd, name))
    message = (
        r"shard names must be plain file names in .*src, got \['\.\./outside/evil\.safetensors'\]"
    )
    return src, {}, SafetensorsError, message


def bad_index_absolute(tmp_path):
    src = _index_naming(tmp_path, lambda name, sd: dict.fromkeys(sd, "/etc/passwd"))
    return src, {}, SafetensorsError, r"plain file names .*\['/etc/passwd'\]"


def bad_index_list(tmp_path):
    src = _index_naming(tmp_path, lambda name, sd: [name])
    return src, {}, SafetensorsError, r"weight_map must map tensor names to shard file names"


def _edit_file(path, edit):
    """Rewrites a safetensors file with ``edit(state dict)`` applied (the library writes it)."""
    sd = safetensors.numpy.load_file(path)
    edit(sd)
    safetensors.numpy.save_file(sd, path)


def bad_nan_weight(tmp_path):
    """A NaN in to_k: the fused qkv leaf is split back to name to_k alone, with its file."""
    src, f = _diffusers_file(tmp_path)
    _edit_file(
        f, lambda sd: sd["transformer_blocks.0.attn.to_k.weight"].__setitem__((1, 2), np.nan)
    )
    return (
        src,
        {},
        PortError,
        r"1 NaN or Inf value\(s\) in 'transformer_blocks\.0\.attn\.to_k\.weight' "
        r"\[diffusion_pytorch_model\.safetensors\] \(as float32\); pass --allow-nonfinite",
    )


def bad_inf_bias(tmp_path):
    src, f = _diffusers_file(tmp_path)
    _edit_file(f, lambda sd: sd["proj_out.bias"].__setitem__(slice(0, 3), -np.inf))
    return src, {}, PortError, r"3 NaN or Inf value\(s\) in 'proj_out\.bias' \[diffusion_pytorch"


def bad_rank1_x_embedder(tmp_path):
    src, f = _diffusers_file(tmp_path)
    _edit_file(f, lambda sd: sd.__setitem__("x_embedder.weight", sd["x_embedder.weight"][0]))
    return (
        src,
        {},
        ValueError,
        r"^\S*src: 'x_embedder\.weight' \[diffusion_pytorch_model\.safetensors\] has shape "
        r"\(16,\), expected 2 non-zero dimension\(s\)$",
    )


def bad_header_deep(tmp_path):
    src, f = _diffusers_file(tmp_path)
    deep = b"[" * 100_000 + b"]" * 100_000
    f.write_bytes(struct.pack("<Q", len(deep)) + deep)
    return src, {}, SafetensorsError, r"diffusion_pytorch_model\.safetensors: header JSON is nested"


def bad_index_not_utf8(tmp_path):
    src = _index_naming(tmp_path, lambda name, sd: dict.fromkeys(sd, name))
    index = src / "diffusion_pytorch_model.safetensors.index.json"
    index.write_bytes(b'{"weight_map": {"\xff\xfe": 1}}')
    return src, {}, SafetensorsError, r"index\.json: not a safetensors index .*utf-8"


def bad_config_not_utf8(tmp_path):
    src, _ = _diffusers_file(tmp_path)
    (src / "config.json").write_bytes(b'{"_class_name": "\xff"}')
    return src, {}, ValueError, r"src/config\.json: not valid JSON .*utf-8"


def bad_pt_truncated(tmp_path):
    torch.save({"module": dict(torch_flux(WIDE).state_dict())}, tmp_path / "s.pt")
    raw = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "s.pt").write_bytes(raw[: len(raw) // 2])
    return tmp_path / "s.pt", {}, ValueError, r"^\S*s\.pt: not a readable PyTorch checkpoint, trunc"


def bad_pt_flipped_byte(tmp_path):
    """torch.load never checks the zip's CRC-32s; load_pt does."""
    sd = dict(torch_flux(WIDE).state_dict())
    torch.save({"module": sd}, tmp_path / "s.pt")
    raw = bytearray((tmp_path / "s.pt").read_bytes())
    at = raw.find(sd["proj_out.weight"].numpy().tobytes())
    raw[at + 5] ^= 0x10
    (tmp_path / "s.pt").write_bytes(bytes(raw))
    return (
        tmp_path / "s.pt",
        {},
        ValueError,
        r"^\S*s\.pt: corrupt PyTorch checkpoint \(BadZipFile: Bad CRC-32",
    )


def bad_time_scale_in_exported_config(tmp_path):
    src, _ = _diffusers_file(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "_distill_jax": {"time_scale": "1000"}}))
    return (
        src,
        {},
        ValueError,
        r"src/config\.json: _distill_jax: time_scale='1000': expected a finite",
    )


BAD = [
    bad_nan_weight,
    bad_inf_bias,
    bad_rank1_x_embedder,
    bad_header_deep,
    bad_index_not_utf8,
    bad_config_not_utf8,
    bad_pt_truncated,
    bad_pt_flipped_byte,
    bad_time_scale_in_exported_config,
    bad_index_leaves_the_folder,
    bad_index_absolute,
    bad_index_list,
    bad_truncated,
    bad_header_json,
    bad_header_sizes,
    bad_layout,
    bad_keys_in_shards,
    bad_depth,
    bad_pickle,
    bad_integer_weight,
]


@pytest.mark.parametrize("make", BAD, ids=lambda f: f.__name__)
def test_bad_inputs_name_the_culprit(tmp_path, make):
    src, kw, error, messages = make(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(error) as err:
        convert(src, out / "jax", progress=False, **kw)
    for message in [messages] if isinstance(messages, str) else messages:
        assert re.search(message, str(err.value), re.S), (message, str(err.value))
    no_leftovers(out)


def test_existing_destination_is_untouched(tmp_path):
    src, _ = _diffusers_file(tmp_path)
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"jax exists; pass --overwrite"):
        convert(src, tmp_path / "jax", progress=False)
    assert (tmp_path / "jax" / "mine.txt").read_text() == "keep me"
    convert(src, tmp_path / "jax", overwrite=True, progress=False)
    assert not (tmp_path / "jax" / "mine.txt").exists() and (tmp_path / "jax" / MARKER).is_file()
    no_leftovers(tmp_path, "src", "jax")


def test_failure_mid_write_leaves_nothing(tmp_path, monkeypatch):
    """A read error after several Orbax batches were written: the old DST survives, the
    temporary folder is gone."""
    src, _ = _diffusers_file(tmp_path)
    (tmp_path / "jax").mkdir()
    (tmp_path / "jax" / "mine.txt").write_text("keep me")
    from distill_jax.port import safetensors_io

    reads = []
    original = safetensors_io.SafetensorsFile.__getitem__

    def failing(self, key):
        reads.append(key)
        if len(reads) == 40:
            raise OSError("disk on fire")
        return original(self, key)

    monkeypatch.setattr(safetensors_io.SafetensorsFile, "__getitem__", failing)
    with pytest.raises(OSError, match="disk on fire"):
        convert(src, tmp_path / "jax", overwrite=True, progress=False, batch_bytes=10_000)
    assert (tmp_path / "jax" / "mine.txt").read_text() == "keep me"
    no_leftovers(tmp_path, "src", "jax")


def test_pt_without_torch_says_how_to_install_it(tmp_path, monkeypatch):
    torch.save({"module": dict(torch_flux(WIDE).state_dict())}, tmp_path / "s.pt")
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch now raises ImportError
    with pytest.raises(ImportError, match=r"needs PyTorch.*pip install torch==2\.13\.0"):
        convert(tmp_path / "s.pt", tmp_path / "jax", progress=False)
    no_leftovers(tmp_path, "s.pt")


def test_export_refuses_what_is_not_a_converted_transformer(converted, tmp_path):
    with pytest.raises(
        ValueError, match=r"is not a converted distill-jax folder with a transformer"
    ):
        export(tmp_path, tmp_path / "hf")
    with pytest.raises(ValueError, match=r"vae holds a vae, not a transformer"):
        export(converted / "vae", tmp_path / "hf")
    (tmp_path / "hf").mkdir()
    with pytest.raises(FileExistsError, match=r"hf exists; pass --overwrite"):
        export(converted, tmp_path / "hf")
    with pytest.raises(ValueError, match=r"export format 'onnx'"):
        export(converted, tmp_path / "x", format="onnx")


# --- checksums --------------------------------------------------------------------------------


def _reference_checksum(array: np.ndarray) -> str:
    """The checksum's formula element by element in Python integers (port/checksum.py)."""
    from distill_jax.port.checksum import SEEDS

    m = 0xFFFFFFFF

    def fmix(h):
        h ^= h >> 16
        h = h * 0x85EBCA6B & m
        h ^= h >> 13
        h = h * 0xC2B2AE35 & m
        return h ^ (h >> 16)

    bits = array.reshape(-1).view(np.uint16 if array.itemsize == 2 else np.uint32).tolist()
    sums = [sum(fmix(b ^ (i * 0x9E3779B1 + s) & m) for i, b in enumerate(bits)) & m for s in SEEDS]
    return "".join(f"{x:08x}" for x in sums)


def test_checksum_is_one_formula_on_host_and_on_sharded_devices():
    """NumPy chunk by chunk (across a chunk boundary), jitted over arrays sharded on 8 devices,
    and after a widening load (cast back): all equal to the formula; and a flipped bit, two
    swapped elements or a transpose change it."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from distill_jax.port.checksum import checksums, host_checksum

    rng = np.random.default_rng(0)
    special = rng.standard_normal((4, 6, 2)).astype(jnp.bfloat16)
    special[0, 1, 0], special[3, 5, 1] = np.nan, -np.inf
    arrays = {
        "long": (rng.standard_normal(70_000).astype(np.float32), P("data")),
        "bf16": (special, P("fsdp", "tensor", None)),
        "square": (rng.standard_normal((8, 8)).astype(np.float32), P(None, ("fsdp", "tensor"))),
        "scalar": (np.float32(3.5).reshape(()), P()),
        "empty": (np.zeros((0, 4), jnp.bfloat16), P()),
    }
    expected = {k: _reference_checksum(a) for k, (a, _) in arrays.items()}
    assert {k: host_checksum(a) for k, (a, _) in arrays.items()} == expected
    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    sharded = {k: jax.device_put(a, NamedSharding(mesh, spec)) for k, (a, spec) in arrays.items()}
    assert checksums(sharded) == expected
    widened = {"bf16": jax.device_put(special.astype(np.float32), NamedSharding(mesh, P("data")))}
    assert checksums(widened, cast=jnp.bfloat16) == {"bf16": expected["bf16"]}
    square = arrays["square"][0]
    flipped = square.copy()
    flipped.view(np.uint32)[3, 4] ^= 1 << 7
    swapped = square.copy()
    swapped[[2, 5]] = swapped[[5, 2]]
    for other in (flipped, swapped, square.T):
        assert host_checksum(other) != expected["square"]


@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory):
    """A tiny diffusers transformer folder (float32)."""
    src = tmp_path_factory.mktemp("tiny") / "src"
    torch_flux(FluxConfig.tiny()).save_pretrained(src)
    return src


@pytest.mark.parametrize("time_scale", [float("nan"), 0, -1.0, "1000", True, float("inf")])
def test_convert_refuses_a_bad_time_scale(tiny_source, tmp_path, time_scale):
    src = tiny_source
    with pytest.raises(ValueError, match=r"^time_scale=.*: expected a finite number > 0"):
        convert(src, tmp_path / "jax", time_scale=time_scale, progress=False)
    no_leftovers(tmp_path)


def test_allow_nonfinite_converts_them_with_a_warning(tmp_path, caplog):
    """Refused by default (bad_nan_weight); with --allow-nonfinite converted where they were,
    counted in a warning, and the folder loads verified."""
    import logging

    from distill_jax import cli

    src, f = _diffusers_file(tmp_path)
    _edit_file(
        f, lambda sd: sd["transformer_blocks.0.attn.to_k.weight"].__setitem__((1, 2), np.nan)
    )
    argv = ["convert", str(src), str(tmp_path / "jax"), "--allow-nonfinite", "--no-progress"]
    with caplog.at_level(logging.WARNING, logger="distill_jax.convert"):
        assert cli.main(argv) == 0
    assert re.search(
        r"transformer: converted 1 NaN or Inf value\(s\), as allowed, in 1 tensor\(s\): "
        r"'transformer_blocks\.0\.attn\.to_k\.weight' \[diffusion_pytorch_model\.safetensors\]",
        caplog.text,
    ), caplog.text
    kernel = np.asarray(
        load_flux(tmp_path / "jax").double_blocks[0].img_attn.qkv.kernel.get_value()
    )
    d = FluxConfig.tiny().hidden
    assert (
        np.isnan(kernel[2, d + 1]) and np.isnan(kernel).sum() == 1
    )  # to_k [out, in] -> [in, d+out]
