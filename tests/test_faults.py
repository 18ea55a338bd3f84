"""Faults a training run meets outside the code: a full disk and Ctrl-C, through the real command
in a child process (the noise they used to make came from Orbax's threads at exit, which only a
process of its own shows)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax

REPO = Path(__file__).resolve().parents[1]
CONFIG = ["--config", "configs/flow_matching.py:runlocal"]


def _env() -> dict[str, str]:
    return {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
        "JAX_COMPILATION_CACHE_DIR": jax.config.jax_compilation_cache_dir,  # the session's
    }


def _train(workdir: Path, *overrides: str, max_file_kb: int = 0, **popen) -> subprocess.Popen:
    """The train command; with ``max_file_kb`` no file it writes can grow past that (the shell's
    ``ulimit -f``: a write beyond fails with EFBIG, as one on a full disk with ENOSPC)."""
    command = [sys.executable, "-m", "distill_jax.cli", "train", *CONFIG, "--workdir", str(workdir)]
    if max_file_kb:
        command = ["bash", "-c", f'ulimit -f {max_file_kb} && exec "$@"', "bash", *command]
    return subprocess.Popen([*command, *overrides], cwd=REPO, env=_env(), text=True, **popen)


def _errors(stderr: str) -> list[str]:
    """The command's error lines and every log record at ERROR."""
    lines = stderr.splitlines()
    return [line for line in lines if line.startswith("distill-jax") or " ERROR " in line]


def test_ctrl_c_then_a_full_disk(tmp_path):
    """Two faults, one test: each process costs a JAX start and a compile (the first fills the
    compilation cache, which the second, unable to write files, could not).

    Ctrl-C (SIGINT) in the middle of a run: one warning, a checkpoint of the step reached,
    status 130 and no traceback; the step it names is the one on disk.

    A full disk: every file capped at 100 KiB (the write fails with an OSError, as on a full
    disk), so the first checkpoint cannot be written. The run ends with status 1 and one line
    naming the step and the OS error, with no traceback, and the half-written step is never
    taken for a checkpoint.
    """
    log = tmp_path / "stderr.txt"
    long = ["--config.total_steps=1000000", "--config.checkpoint_every=1000000"]
    with log.open("w") as out:
        proc = _train(tmp_path / "cut", *long, "--config.log_every=1000", stderr=out)
        deadline = time.monotonic() + 300
        while "step compiled" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=120) == 130, log.read_text()
    err = log.read_text()
    assert "Traceback" not in err and err.count("received SIGINT") == 1, err
    [stop] = [line for line in err.splitlines() if "stopped by SIGINT after saving step" in line]
    step = int(stop.split("saving step ")[1].split(";")[0])
    saved = [int(p.name) for p in (tmp_path / "cut" / "checkpoints").iterdir() if p.name.isdigit()]
    assert saved == [step] and step > 0

    steps = ["--config.total_steps=4", "--config.checkpoint_every=2", "--config.log_every=2"]
    full = tmp_path / "full"
    proc = _train(full, *steps, stderr=subprocess.PIPE, max_file_kb=100)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "never retrieved" not in err, err
    [line] = _errors(err)
    assert line.startswith("distill-jax train: error: checkpoint: saving step 2 to "), line
    assert "File too large" in line and "tensorstore_spec" not in line
    assert line.endswith("--verbose shows them)")  # Orbax's own reports, held back
    assert [p.name for p in (full / "checkpoints").iterdir() if p.name.isdigit()] == []
