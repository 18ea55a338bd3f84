"""Hub ids as conversion sources, offline, from a cache laid out as huggingface_hub lays it out.

``models--org--name/{refs/<revision>, snapshots/<commit>/<path> -> ../../blobs/<hash>, blobs/}``
under a temporary ``HF_HUB_CACHE``, with ``HF_HUB_OFFLINE=1`` (tests/conftest.py): nothing goes to
the network. A tiny diffusers FLUX pipeline written by diffusers is converted from its id and
from its path, and the two conversions must agree parameter for parameter (and it samples).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import constants
from test_flux import torch_flux
from test_text_encoding import tiny_flux_pipeline

from distill_jax import cli, hub
from distill_jax.convert import convert, export
from distill_jax.folders import load_flux, load_pipeline
from distill_jax.models.flux import FluxConfig
from distill_jax.pipeline.generate import generate
from distill_jax.port.formats import source_files

REPO = "tiny-org/flux-tiny"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
LICENSE = {"license": "other", "license_name": "flux-1-dev-non-commercial-license"}
DECOY = "flux1-tiny.safetensors"  # a BFL single file beside the pipeline: never needed


def hub_cache(
    cache: Path, repo_id: str, files: Path, *, revisions=("main",), commit=COMMIT
) -> Path:
    """Lays the files under ``files`` out in ``cache`` as huggingface_hub's cache does, each of
    ``revisions`` (branches, tags) naming ``commit``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    for f in sorted(p for p in files.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / f.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for revision in revisions:
        (repo / "refs" / revision).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory):
    """(the pipeline folder, a Hub cache holding it as REPO at ``main`` and ``v1``)."""
    root = tmp_path_factory.mktemp("hub")
    pipe = tiny_flux_pipeline(root / "build")
    with torch.no_grad():
        for p in pipe.transformer.parameters():
            p.normal_(0.0, 0.2)
    src = root / "flux"
    pipe.save_pretrained(src)
    card = "---\n" + yaml.safe_dump({**LICENSE, "tags": ["flux"]}) + "---\n\n# A tiny FLUX\n"
    (src / "README.md").write_text(card)
    (src / DECOY).write_bytes(b"\0" * 64)
    hub_cache(root / "cache", REPO, src, revisions=("main", "v1"))
    return src, root / "cache"


@pytest.fixture
def cache(hub_repo, monkeypatch):
    """HF_HUB_CACHE for this test (huggingface_hub reads it at import, so its constant)."""
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_repo[1]))
    assert constants.HF_HUB_OFFLINE
    return hub_repo[1]


def same_conversion(a: Path, b: Path) -> None:
    """Two converted folders hold the same components, structures and parameters (the recorded
    checksums cover every bit of every parameter)."""
    index_a, index_b = (json.loads((p / "distill_jax.json").read_text()) for p in (a, b))
    assert index_a["components"] == index_b["components"]
    for c in index_a["components"]:
        meta_a, meta_b = (json.loads((p / c / "config.json").read_text()) for p in (a, b))
        assert meta_a["config"] == meta_b["config"] and meta_a["dtype"] == meta_b["dtype"]
        assert meta_a["checksums"] == meta_b["checksums"], c
        hashes = [sorted(m["source"]["sha256"].values()) for m in (meta_a, meta_b)]
        assert hashes[0] == hashes[1], c  # the same source files


def test_convert_from_hub_id_equals_convert_from_path(hub_repo, cache, tmp_path, monkeypatch):
    src, _ = hub_repo
    asked = []
    real = huggingface_hub.snapshot_download

    def spy(repo_id, **kw):
        asked.append(kw)
        return real(repo_id, **kw)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", spy)
    by_id = convert(REPO, tmp_path / "by_id", dtype="float32", progress=False, token="hf_x")
    by_path = convert(src, tmp_path / "by_path", dtype="float32", progress=False)
    same_conversion(by_id, by_path)
    for folder in ("tokenizer", "tokenizer_2", "scheduler"):
        assert sorted(p.name for p in (by_id / folder).iterdir()) == sorted(
            p.name for p in (src / folder).iterdir()
        )
    index = json.loads((by_id / "distill_jax.json").read_text())
    assert index["source"]["hub"] == dict(repo_id=REPO, revision=None, commit=COMMIT, path="")
    assert index["source"]["card"] == LICENSE
    meta = json.loads((by_id / "transformer" / "config.json").read_text())
    assert meta["source"]["hub"]["commit"] == COMMIT and meta["source"]["card"] == LICENSE
    # Only what the components need was asked for: each file convert read, never the decoy.
    patterns = [p for kw in asked for p in kw["allow_patterns"]]
    assert all(kw["token"] == "hf_x" for kw in asked) and len(asked) == 2
    files = [str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()]
    matched = {f for f in files if any(fnmatch.fnmatch(f, p) for p in patterns)}
    assert DECOY not in matched and "README.md" in matched
    assert set(files) - matched == {DECOY}
    # and it samples, offline
    images = generate(load_pipeline(by_id), ["a red cube"], height=32, width=32, steps=2)
    assert images.shape == (1, 32, 32, 3) and images.std() > 0


def test_only_the_wanted_components_are_fetched(hub_repo):
    src, _ = hub_repo
    wanted = source_files(src, ["transformer"])
    assert "transformer/config.json" in wanted and "tokenizer/*" in wanted
    assert not any(p.startswith(("vae", "text_encoder")) for p in wanted)
    assert not any(fnmatch.fnmatch(DECOY, p) for p in wanted)


@pytest.mark.parametrize(
    "argv",
    [
        [f"{REPO}@v1/transformer"],
        [REPO, "--revision", "v1", "--subfolder", "transformer"],
        [f"hf://{REPO}/transformer/diffusion_pytorch_model.safetensors"],
    ],
    ids=["id@revision/path", "flags", "single-file"],
)
def test_revision_and_subfolder(hub_repo, cache, tmp_path, argv):
    src, _ = hub_repo
    out = tmp_path / "out"
    single = argv[0].endswith(".safetensors")
    if single:  # the tiny structure cannot be inferred from its shapes
        argv = [*argv, "--config", str(src / "transformer" / "config.json")]
    assert cli.main(["convert", *argv, str(out), "--no-progress", "--dtype", "float32"]) == 0
    ref = convert(src / "transformer", tmp_path / "ref", dtype="float32", progress=False)
    same_conversion(out, ref)
    hub_meta = json.loads((out / "distill_jax.json").read_text())["source"]["hub"]
    assert hub_meta["commit"] == COMMIT and hub_meta["path"].startswith("transformer")
    assert hub_meta["revision"] == (None if single else "v1")


def test_exported_card_names_the_hub_model_and_its_licence(cache, tmp_path):
    """A model converted from a Hub id keeps its id and licence through export's card."""
    path = convert(f"{REPO}/transformer", tmp_path / "jax", dtype="float32", progress=False)
    out = export(path, tmp_path / "hf", progress=False)
    text = (out / "README.md").read_text()
    meta = yaml.safe_load(text.split("---")[1])
    assert meta["base_model"] == REPO and meta["license"] == "other"
    assert meta["license_name"] == LICENSE["license_name"] and meta["library_name"] == "diffusers"
    assert COMMIT in text


def test_a_local_path_wins_over_an_id(cache, tmp_path, monkeypatch):
    """``tiny-org/flux-tiny`` as a folder in the working directory is that folder, not the
    Hub model of that name."""
    monkeypatch.chdir(tmp_path)
    torch_flux(FluxConfig.tiny().replace(num_single=2)).save_pretrained(Path(REPO))
    out = convert(REPO, tmp_path / "out", progress=False)
    index = json.loads((out / "distill_jax.json").read_text())
    assert "hub" not in index["source"]
    assert index["source"]["path"] == str((tmp_path / REPO).resolve())
    assert load_flux(out).cfg.num_single == 2  # the Hub one has 1


def test_offline_and_not_cached_says_where_the_cache_is(cache, tmp_path, capsys):
    argv = ["convert", "tiny-org/not-cached", str(tmp_path / "out"), "--no-progress"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    assert "not in the Hub cache at " + str(cache) in err and "HF_HUB_OFFLINE" in err
    assert not (tmp_path / "out").exists()


def _http_error(cls, status: int):
    import httpx2

    request = httpx2.Request("GET", f"https://huggingface.co/api/models/{REPO}")
    return cls("denied", response=httpx2.Response(status, request=request))


@pytest.mark.parametrize(
    "error,message",
    [
        ("GatedRepoError", f"{REPO} is gated: accept its conditions at https://huggingface.co/"),
        ("RepositoryNotFoundError", "no such local path, and no Hub model"),
        ("HfHubHTTPError", "not authorised (401)"),
        ("RevisionNotFoundError", f"{REPO} has no revision"),
    ],
)
def test_hub_refusals_say_how_to_fix_them(error, message, tmp_path, monkeypatch, capsys):
    from huggingface_hub import errors

    def refuse(*args, **kwargs):
        raise _http_error(getattr(errors, error), 401)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    assert cli.main(["convert", REPO, str(tmp_path / "out"), "--no-progress"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    if error not in ("RevisionNotFoundError",):
        assert "`hf auth login`" in err and "HF_TOKEN" in err


@pytest.mark.parametrize(
    "text,expected",
    [
        ("org/name", hub.HubId("org/name")),
        ("org/name@v1.0", hub.HubId("org/name", "v1.0")),
        ("org/name@refs%2Fpr%2F3/transformer", hub.HubId("org/name", "refs/pr/3", "transformer")),
        ("hf://org/name/a/b.pt", hub.HubId("org/name", None, "a/b.pt")),
        ("name", None),
        ("/abs/path", None),
        ("./rel/path", None),
        ("out/model.safetensors", None),  # a mistyped file, not a repository
        ("org/name/../x", None),
        ("org/na--me", None),
    ],
)
def test_parse_hub_id(text, expected):
    assert hub.parse_hub_id(text) == expected
    if expected is not None:
        assert hub.parse_hub_id(str(expected)) == expected


def test_the_command_honours_hf_home(hub_repo, tmp_path):
    """A fresh process: HF_HOME (with HF_HUB_CACHE unset) places the cache, HF_HUB_OFFLINE=1."""
    home, name = tmp_path / "hf", f"models--{REPO.replace('/', '--')}"
    shutil.copytree(hub_repo[1] / name, home / "hub" / name, symlinks=True)
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")
    }
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    argv = [sys.executable, "-m", "distill_jax.cli", "convert", f"{REPO}/transformer"]
    proc = subprocess.run(
        [*argv, str(tmp_path / "out"), "--no-progress"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    index = json.loads((tmp_path / "out" / "distill_jax.json").read_text())
    assert index["source"]["path"].startswith(str(home.resolve()))
    assert index["source"]["hub"]["commit"] == COMMIT
