"""Seeded fuzzing of everything a weights file can say: safetensors headers, sharded indexes,
``.pt`` files and converted ``config.json``. Each mutant must end in one of two ways:

- a clean refusal: a ValueError or OSError (SafetensorsError and PortError are ValueErrors) whose
  message names the file;
- a correct read: the model parameters built from it equal those built from the original tensors.

The readers are driven as ``convert`` drives them (the lazy reader, the float-only view, the key
table with its shape checks), without writing Orbax checkpoints, so hundreds of mutants run in
seconds. Originals are written by ``safetensors.numpy`` and ``torch.save``. Byte flips in a
safetensors file stay inside its header: the format has no checksum of its data, so a flipped data
byte reads as another value in any reader (converted folders have checksums for that; .pt files
have the zip's CRC-32s, which are checked, so their flips go anywhere).
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx

from distill_jax.convert import _Tracked
from distill_jax.folders import config_from_json
from distill_jax.models.autoencoder import AutoencoderConfig
from distill_jax.models.clip import CLIPTextConfig
from distill_jax.models.flux import SCAN_FROM_BLOCKS, Flux, FluxConfig
from distill_jax.models.t5 import T5Config
from distill_jax.port.flux import diffusers_rules
from distill_jax.port.params import param_shapes
from distill_jax.port.safetensors_io import open_safetensors
from distill_jax.port.table import to_source, to_target
from distill_jax.port.torch_pt import load_pt

SEED = 20240613
CFG = FluxConfig.tiny()
RULES = diffusers_rules(CFG)
SHAPES = param_shapes(nnx.eval_shape(lambda: Flux(CFG, rngs=nnx.Rngs(0))))
INDEX = "diffusion_pytorch_model.safetensors.index.json"
# Free text that readers ignore: a flip there must not be refused (nor may it change a tensor).
METADATA = {"format": "pt", "note": "converted for the fuzz tests; " * 60}


@pytest.fixture(scope="module")
def originals():
    """A tiny FLUX in diffusers naming (float32) and the parameters it converts to."""
    rng = np.random.default_rng(SEED)
    leaves = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    return to_source(leaves, RULES), leaves


def outcome(read, path: Path, named: str, leaves) -> str:
    """``"refused"`` or ``"read"``, asserting that a refusal names ``named`` and a read is exact."""
    try:
        source = read(path)
        tracked = _Tracked(source, f"transformer from {path}")
        tracked.strict = True  # floats only, as convert reads weights
        got = to_target(tracked, RULES, SHAPES, what=f"transformer from {path}")
    except (ValueError, OSError) as err:
        assert named in str(err), f"the error does not name {named}: {err}"
        return "refused"
    assert sorted(got) == sorted(leaves)
    for k, v in leaves.items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
    return "read"


# --- mutants: each a function (rng, original bytes or object) -> mutated bytes ------------------


def _split(raw: bytes) -> tuple[int, dict]:
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n])


def _with_header(raw: bytes, header: dict | bytes) -> bytes:
    n, _ = _split(raw)
    new = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(new)) + new + raw[8 + n :]


def _flip(rng, raw: bytes, lo: int, hi: int) -> bytes:
    out = bytearray(raw)
    out[int(rng.integers(lo, hi))] ^= 1 << int(rng.integers(8))
    return bytes(out)


def _lie(rng, raw: bytes) -> bytes:
    """One header entry lies about its dtype, shape or offsets, or has a field of a wrong type."""
    _, header = _split(raw)
    key = str(rng.choice(sorted(k for k in header if k != "__metadata__")))
    entry = header[key]
    field = str(rng.choice(["dtype", "shape", "data_offsets"]))
    choices = {
        "dtype": ["I32", "U32", "F16", "BF16", "F64", "I8", "F8_E4M3", "BOOL", "Q4", 32, None],
        "shape": [
            [int(d) for d in rng.integers(0, 70, size=int(rng.integers(0, 4)))],
            list(reversed(entry["shape"])) + [1],
            [2**62, 2**62],
            [-1] + entry["shape"],
            [True] * len(entry["shape"]),
            [float(d) for d in entry["shape"]],
            "16",
            [[d] for d in entry["shape"]],
        ],
        "data_offsets": [
            [entry["data_offsets"][0] + 4, entry["data_offsets"][1] + 4],
            [entry["data_offsets"][1], entry["data_offsets"][0]],
            [0, entry["data_offsets"][1] - entry["data_offsets"][0]],
            [entry["data_offsets"][0], 2**64],
            [-4, entry["data_offsets"][1]],
            [entry["data_offsets"][0]],
            [float(o) for o in entry["data_offsets"]],
        ],
    }[field]
    entry[field] = choices[int(rng.integers(len(choices)))]
    if entry[field] is None:
        del entry[field]
    return _with_header(raw, header)


def _nested(depth: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


def safetensors_mutants(rng, raw: bytes) -> list[tuple[str, bytes]]:
    n, _ = _split(raw)
    out = [("header flip", _flip(rng, raw, 8, 8 + n)) for _ in range(80)]
    out += [("length flip", _flip(rng, raw, 0, 8)) for _ in range(16)]
    out += [("truncated", raw[: int(rng.integers(0, len(raw)))]) for _ in range(40)]
    out += [("lie", _lie(rng, raw)) for _ in range(60)]
    out += [
        ("huge length", struct.pack("<Q", length) + raw[8:])
        for length in (2**64 - 1, 2**63, 100 << 20, (100 << 20) + 1, len(raw), len(raw) - 7)
    ]
    out += [
        ("deep", _with_header(raw, _nested(depth, kind)))
        for depth in (1_000, 100_000)
        for kind in ("list", "object")
    ]
    header = raw[8 : 8 + n]
    out += [
        ("not utf-8", _with_header(raw, header.replace(b'"', b'"\xff', 1))),
        ("not utf-8", _with_header(raw, header.replace(b"weight", b"w\xc3\x28ght", 1))),
        ("not utf-8", _with_header(raw, b"\xfe\xff" + header[2:])),
    ]
    out += [
        ("metadata", _with_header(raw, {**_split(raw)[1], "__metadata__": metadata}))
        for metadata in ([1], {"format": 1}, "pt")
    ]
    return out


def index_mutants(rng, index: dict, shards: list[str]) -> list[tuple[str, bytes]]:
    raw = json.dumps(index).encode()
    wm = index["weight_map"]
    keys = sorted(wm)

    def edit(change) -> bytes:
        new = json.loads(raw)
        change(new)
        return json.dumps(new).encode()

    def moved(new):
        key = keys[int(rng.integers(len(keys)))]
        new["weight_map"][key] = next(s for s in shards if s != wm[key])

    out = [("flip", _flip(rng, raw, 0, len(raw))) for _ in range(50)]
    out += [("truncated", raw[: int(rng.integers(0, len(raw)))]) for _ in range(20)]
    out += [("moved key", edit(moved)) for _ in range(5)]
    out += [
        ("structure", edit(lambda new: new.update(weight_map=list(wm.values())))),
        ("structure", edit(lambda new: new.update(weight_map=None))),
        ("structure", edit(lambda new: new.pop("weight_map"))),
        ("structure", edit(lambda new: new["weight_map"].update({keys[0]: 7}))),
        ("structure", edit(lambda new: new["weight_map"].update({keys[0]: "../" + shards[0]}))),
        ("structure", edit(lambda new: new["weight_map"].update({keys[0]: "/etc/passwd"}))),
        ("structure", edit(lambda new: new["weight_map"].update({keys[0]: "missing.st"}))),
        ("structure", edit(lambda new: new["weight_map"].pop(keys[0]))),
        ("structure", edit(lambda new: new["weight_map"].update({"extra.weight": shards[0]}))),
        ("structure", b"[]"),
        ("deep", _nested(100_000, "list")),
        ("deep", b'{"weight_map":' + _nested(100_000, "object") + b"}"),
        ("not utf-8", raw.replace(b"weight_map", b"weight_\xffmap")),
        ("not utf-8", b"\xff\xfe" + raw),
    ]
    return out


def pt_mutants(rng, raw: bytes) -> list[tuple[str, bytes]]:
    out = [("truncated", raw[: int(cut)]) for cut in rng.choice(len(raw), 60, replace=False)]
    out += [("flip", _flip(rng, raw, 0, len(raw))) for _ in range(120)]
    return out


def _tally(outcomes: list[tuple[str, str]]) -> Counter:
    tally = Counter(outcomes)
    print(dict(sorted(tally.items())))  # shown with -s: the mutants of each kind
    return tally


# --- the categories ---------------------------------------------------------------------------


def test_safetensors_headers(originals, tmp_path):
    sd, leaves = originals
    original = tmp_path / "original.safetensors"
    safetensors.numpy.save_file(sd, original, metadata=METADATA)
    raw = original.read_bytes()
    assert outcome(open_safetensors, original, original.name, leaves) == "read"
    mutants = safetensors_mutants(np.random.default_rng(SEED), raw)
    path = tmp_path / "m.safetensors"
    results = []
    for kind, data in mutants:
        path.write_bytes(data)
        results.append((kind, outcome(open_safetensors, path, str(path), leaves)))
    tally = _tally(results)
    assert len(mutants) == 212
    # Every kind but header flips (which may hit the metadata) and lies (one may restate the
    # truth) is always refused.
    assert all(r == "refused" for k, r in results if k not in ("header flip", "lie"))
    assert tally["header flip", "read"] > 0 and tally["header flip", "refused"] > 40
    assert tally["lie", "refused"] > 50


def test_sharded_indexes(originals, tmp_path):
    sd, leaves = originals
    keys = sorted(sd)
    shards = [f"diffusion_pytorch_model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    weight_map = {}
    for i, name in enumerate(shards):
        part = keys[i::3]
        safetensors.numpy.save_file({k: sd[k] for k in part}, tmp_path / name)
        weight_map.update(dict.fromkeys(part, name))
    index = {"metadata": METADATA, "weight_map": weight_map}
    path = tmp_path / INDEX
    path.write_text(json.dumps(index))
    assert outcome(open_safetensors, path, INDEX, leaves) == "read"
    mutants = index_mutants(np.random.default_rng(SEED), index, shards)
    results = []
    for kind, data in mutants:
        path.write_bytes(data)
        results.append((kind, outcome(open_safetensors, path, str(path), leaves)))
    tally = _tally(results)
    assert len(mutants) == 89
    assert all(r == "refused" for k, r in results if k != "flip")
    assert tally["flip", "read"] > 0 and tally["flip", "refused"] > 20


def test_pt_files(originals, tmp_path):
    sd, leaves = originals
    original = tmp_path / "original.pt"
    torch.save({"module": {k: torch.from_numpy(v) for k, v in sd.items()}}, original)
    assert outcome(load_pt, original, original.name, leaves) == "read"
    raw = original.read_bytes()
    mutants = pt_mutants(np.random.default_rng(SEED), raw)
    path = tmp_path / "m.pt"
    results = []
    for kind, data in mutants:
        path.write_bytes(data)
        results.append((kind, outcome(load_pt, path, str(path), leaves)))
    tally = _tally(results)
    assert len(mutants) == 180
    assert tally["truncated", "refused"] == 60
    # The tensor data is most of the file: most flips hit it, and the CRC-32s refuse them.
    assert tally["flip", "refused"] > 60 and tally["flip", "read"] > 0


# --- converted config.json: every field of every component's config, every JSON type ---------

CONFIGS = {
    FluxConfig: FluxConfig.tiny(),
    T5Config: T5Config(vocab_size=22, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4),
    CLIPTextConfig: CLIPTextConfig(
        vocab_size=99,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
    ),  # fmt: skip
    AutoencoderConfig: AutoencoderConfig(block_out_channels=(32, 64), norm_num_groups=8),
}
# every field takes each of these in turn (or is removed)
WRONG = [2.0, "3", True, None, [1], {"a": 1}, math.nan, math.inf, -1.5, 10**30]


def _kind(value) -> str:
    """The type a JSON value has, as the config classes' fields name them."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float" if math.isfinite(value) else "nonfinite"
    return {str: "str", list: "tuple", dict: "object"}[type(value)]


def _allowed(field: dataclasses.Field) -> set[str]:
    """JSON kinds a field accepts, from its annotation string (independent of folders.py)."""
    spelled = str(field.type)
    if spelled.startswith("tuple"):
        return {"tuple"}
    kinds = {k for k in ("int", "float", "bool", "str") if k in spelled}
    if "float" in kinds:
        kinds.add("int")  # JSON writes 1000.0 as 1000 when a person edits it
    if "None" in spelled:
        kinds.add("none")
    return kinds


def config_mutants():
    for cls, cfg in CONFIGS.items():
        good = json.loads(json.dumps(dataclasses.asdict(cfg)))
        for field in dataclasses.fields(cls):
            yield cls, good, field.name, "missing", None
            for value in WRONG:
                yield cls, good, field.name, "value", value
        yield cls, good, "unknown_field", "value", 1


def test_converted_configs(tmp_path):
    """Each mutant of a converted config.json is refused, naming the file and the field, or gives
    the config of exactly the values written; time_scale also refuses 0 and negatives. A field
    added since version 1 (``ADDED_FIELDS``) may be missing: it reads as folders written before
    it meant; FluxConfig's scan_layers=None resolves by depth."""
    path = tmp_path / "config.json"
    results = []
    for cls, good, name, how, value in config_mutants():
        fields = dict(good)
        if how == "missing":
            del fields[name]
        else:
            fields[name] = value
        path.write_text(json.dumps(fields))
        text = json.loads(path.read_text())  # NaN and Infinity survive json as Python reads it
        field = next((f for f in dataclasses.fields(cls) if f.name == name), None)
        fits = how == "value" and field is not None and _kind(value) in _allowed(field)
        added = getattr(cls, "ADDED_FIELDS", {})
        fits |= how == "missing" and name in added
        try:
            cfg = config_from_json(cls, text, tmp_path)
        except ValueError as err:
            message = str(err)
            assert message.startswith(f"{path}: bad {cls.__name__}") and "\n" not in message
            assert name in message, (name, message)
            results.append((cls.__name__, "fits" if fits else "wrong type", "refused"))
            continue
        assert fits, (cls.__name__, name, value)
        expect = {k: tuple(v) if isinstance(v, list) else v for k, v in {**added, **fields}.items()}
        if cls is FluxConfig and expect["scan_layers"] is None:
            expect["scan_layers"] = cfg.num_double + cfg.num_single >= SCAN_FROM_BLOCKS
        assert {k: getattr(cfg, k) for k in expect} == expect
        results.append((cls.__name__, "fits", "read"))
    tally = _tally(results)
    assert sum(tally.values()) == (1 + len(WRONG)) * (19 + 9 + 9 + 11) + 4
    assert all(kind == "fits" for (_, kind, outcome) in results if outcome == "read")
    assert tally["FluxConfig", "fits", "read"] > 0
    # time_scale's own check: the right type, but not a positive number
    for bad in (0, 0.0, -1000.0):
        with pytest.raises(ValueError, match=rf"{path}: bad FluxConfig \(time_scale={bad}"):
            config_from_json(FluxConfig, {**good_flux(), "time_scale": bad}, tmp_path)


def good_flux() -> dict:
    return json.loads(json.dumps(dataclasses.asdict(FluxConfig.tiny())))
