"""The accelerator install extras (setup.py) and the Makefile's ACCEL switch, checked offline.

The extras are read from the installed distill-jax metadata and compared with what the installed jax
really declares, so a jax bump that renames an extra or moves jaxlib fails here, not on a TPU VM.
The Makefile is checked with dry runs (`make -n`) into a scratch VENV: nothing is installed.
"""

import ast
import importlib.metadata as md
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parents[1]

# Our extra -> jax's extra it must name.
ACCELERATOR_EXTRAS = {"tpu": "tpu", "cuda": "cuda12"}


def _requirements(dist: str) -> list[Requirement]:
    return [Requirement(r) for r in md.requires(dist) or []]


def _runtime_pin(name: str) -> str:
    """The version distill-jax's install_requires pins `name` to (`==V`)."""
    [req] = [r for r in _requirements("distill-jax") if r.name == name and r.marker is None]
    [spec] = list(req.specifier)
    assert spec.operator == "==", f"{name} is not pinned: {req}"
    return spec.version


def _extra_requirements(dist: str, extra: str) -> list[Requirement]:
    """The requirements `dist` adds for `extra` (marker true with the extra, false without it)."""
    return [
        r
        for r in _requirements(dist)
        if r.marker is not None
        and r.marker.evaluate({"extra": extra})
        and not r.marker.evaluate({"extra": ""})
    ]


def _pinned_version(spec: SpecifierSet) -> str | None:
    """The one version `spec` admits when written as a pin (`==V` or `>=V,<=V`), else None."""
    ops = {s.operator for s in spec}
    versions = {s.version for s in spec}
    if len(versions) != 1 or not ops <= {"==", "===", ">=", "<="} or "*" in next(iter(versions)):
        return None
    if "==" in ops or "===" in ops or {">=", "<="} <= ops:
        return versions.pop()
    return None


def test_installed_metadata_is_current():
    """The installed (editable) metadata is what setup.py says; else `make venv` to refresh it."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    [jax_version] = [
        node.value.value
        for node in tree.body
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == "JAX_VERSION" for t in node.targets)
    ]
    assert _runtime_pin("jax") == jax_version, "stale distill-jax metadata: run `make venv`"
    assert md.version("jax") == jax_version, "the installed jax is not the pinned one"


def test_cpu_extra_exists_and_adds_nothing():
    assert "cpu" in md.metadata("distill-jax").get_all("Provides-Extra")
    assert _extra_requirements("distill-jax", "cpu") == []


@pytest.mark.parametrize("extra,jax_extra", sorted(ACCELERATOR_EXTRAS.items()))
def test_extra_names_jax_extra_at_the_pinned_version(extra, jax_extra):
    assert extra in md.metadata("distill-jax").get_all("Provides-Extra")
    [req] = _extra_requirements("distill-jax", extra)
    assert req.name == "jax"
    assert req.extras == {jax_extra}
    assert str(req.specifier) == f"=={_runtime_pin('jax')}"


@pytest.mark.parametrize("extra,jax_extra", sorted(ACCELERATOR_EXTRAS.items()))
def test_jax_declares_the_extra_and_pins_our_jaxlib(extra, jax_extra):
    assert jax_extra in md.metadata("jax").get_all("Provides-Extra")
    jaxlib = _runtime_pin("jaxlib")
    reqs = _extra_requirements("jax", jax_extra)
    jaxlib_reqs = [r for r in reqs if r.name == "jaxlib"]
    assert jaxlib_reqs, f"jax[{jax_extra}] requires no jaxlib: {reqs}"
    for r in jaxlib_reqs:
        assert _pinned_version(r.specifier) == jaxlib, f"jax[{jax_extra}]: {r} vs jaxlib=={jaxlib}"
    # jax's PJRT plugins (jax-cuda12-plugin, ...) release with jaxlib, at the same version.
    for r in reqs:
        if r.name.startswith("jax-"):
            assert _pinned_version(r.specifier) == jaxlib, f"jax[{jax_extra}]: {r}"


# --- Makefile -----------------------------------------------------------------------------------

needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="no make")


def _make_n(venv: Path, *args: str) -> subprocess.CompletedProcess:
    # Nothing inherited from a calling make (`make test ACCEL=...`) or the shell may set ACCEL.
    drop = {"ACCEL", "VENV", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return subprocess.run(
        ["make", "-n", "venv", f"VENV={venv}", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _pip_lines(stdout: str) -> list[str]:
    return [line for line in stdout.splitlines() if " -m pip install " in line]


@needs_make
@pytest.mark.parametrize("accel", ["cpu", "tpu", "cuda"])
def test_make_venv_accel_installs_the_matching_extra(accel, tmp_path):
    venv = tmp_path / "venv"
    proc = _make_n(venv, f"ACCEL={accel}")
    assert proc.returncode == 0, proc.stderr
    pip = [line for line in _pip_lines(proc.stdout) if "--upgrade pip" not in line]
    [torch] = [r for r in _extra_requirements("distill-jax", "test") if r.name == "torch"]
    extra = "test" if accel == "cpu" else accel
    assert extra in md.metadata("distill-jax").get_all("Provides-Extra")
    if accel == "cpu":  # today's behaviour: the pinned CPU torch first, then the test extra
        assert len(pip) == 2, proc.stdout
        assert f'"torch{torch.specifier}"' in pip[0]
        assert f'-e ".[{extra}]"' in pip[1]
    else:  # the trainer only: no torch, no test extra
        assert len(pip) == 1, proc.stdout
        assert f'-e ".[{extra}]"' in pip[0]
        assert "torch" not in proc.stdout
    assert all(str(venv / "bin" / "python") in line for line in pip)
    assert proc.stdout.rstrip().endswith(f"touch {venv}/.installed-{accel}")


@needs_make
def test_make_venv_stamp_depends_on_accel(tmp_path):
    """A current stamp makes `make venv` a no-op for that ACCEL only; switching reinstalls."""
    venv = tmp_path / "venv"
    venv.mkdir()
    stamp = venv / ".installed-cpu"
    stamp.touch()
    later = max(time.time(), (ROOT / "setup.py").stat().st_mtime) + 60
    os.utime(stamp, (later, later))
    same = _make_n(venv, "ACCEL=cpu")
    assert same.returncode == 0 and _pip_lines(same.stdout) == [], same.stdout
    switched = _make_n(venv, "ACCEL=tpu")
    assert switched.returncode == 0 and any('".[tpu]"' in ln for ln in _pip_lines(switched.stdout))
    default = _make_n(venv)  # ACCEL defaults to cpu
    assert default.returncode == 0 and _pip_lines(default.stdout) == [], default.stdout


@needs_make
def test_make_venv_rejects_unknown_accel(tmp_path):
    proc = _make_n(tmp_path / "venv", "ACCEL=rocm")
    assert proc.returncode != 0
    assert "rocm" in proc.stderr
    for accel in ("cpu", "tpu", "cuda"):
        assert accel in proc.stderr
    assert _pip_lines(proc.stdout) == []
