"""Many hosts, one program: JAX's distributed runtime, who speaks, and a local stand-in for a pod.

Every process of a multi-host job (a TPU pod slice, SLURM tasks, GKE pods) runs the same
command. Before anything touches a device, :func:`initialize` joins them through
``jax.distributed``: auto-detected on Cloud TPU, GKE, SLURM and Open MPI, or from an explicit
coordinator address, process count and process id for clusters JAX does not detect. Afterwards
``jax.devices()`` lists every device of the job and ``jax.local_devices()`` this host's.

:func:`launch_local` runs a command as N processes on this machine, each with its own fake CPU
devices, joined either through a simulated SLURM allocation (the environment ``srun`` gives each
task) or an explicit coordinator: how the test suite and ``benchmarks/multihost.py`` run the real
multi-host paths without a pod (``python -m distill_jax.distributed --help``).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300


class DistributedError(RuntimeError):
    """The processes of a job could not join (or a backend started before they did)."""


def _state():
    from jax._src import distributed  # the only record of the coordinator JAX was given

    return distributed.global_state


def process() -> tuple[int, int]:
    """``(index, count)`` of this process without starting a backend (``(0, 1)`` before
    :func:`initialize`)."""
    state = _state()
    if state.client is None:
        return 0, 1
    return int(state.process_id), int(state.num_processes)


def detected_cluster() -> str | None:
    """The name of the cluster JAX would join without arguments (``"slurm"``, ``"gcetpu"``,
    ``"gketpu"``, ``"ompi"``, ``"k8s"``...), by JAX's own detection, or None."""
    try:
        from jax._src import clusters  # JAX's detectors; importing registers them
    except ImportError:  # a future JAX without them: let jax.distributed.initialize decide
        return "auto"
    for env in clusters.ClusterEnv._cluster_types:
        if not env.opt_in_only_method and env.is_env_present():
            return env.name or env.__name__
    return None


def initialize(
    *,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int = DEFAULT_TIMEOUT_S,
) -> None:
    """Joins this process to the job's others through ``jax.distributed.initialize``.

    With no arguments the cluster is auto-detected (Cloud TPU, GKE, SLURM, Open MPI); give all of
    ``coordinator_address`` (``host:port`` of process 0), ``num_processes`` and ``process_id``
    elsewhere. A second call is a no-op. Raises :class:`DistributedError` when a device backend
    has already started (the runtime must come first), when no cluster is detected and no
    coordinator is given, or when joining fails. When the peers do not all arrive within
    ``timeout_s`` seconds the process prints an error naming the coordinator address and exits
    with status 1 (JAX's runtime would abort it).
    """
    import jax
    from jax._src import xla_bridge

    if jax.distributed.is_initialized():
        return
    explicit = (coordinator_address, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise DistributedError(
            "an explicit cluster needs all of --coordinator-address, --num-processes and "
            f"--process-id (got {coordinator_address!r}, {num_processes!r}, {process_id!r})"
        )
    if xla_bridge.backends_are_initialized():
        raise DistributedError(
            "the JAX backend started before jax.distributed.initialize(); join the processes "
            "first (distill_jax.distributed.initialize() before any jax.devices() or array)"
        )
    cluster = "explicit coordinator" if coordinator_address else detected_cluster()
    if cluster is None and "JAX_COORDINATOR_ADDRESS" not in os.environ:
        raise DistributedError(
            "multi-host run requested but no cluster was detected (JAX finds no Cloud TPU, GKE, "
            "SLURM or Open MPI environment here); pass --coordinator-address HOST:PORT "
            "--num-processes N --process-id I"
        )

    def failure(reason: str) -> str:
        state = _state()
        address = coordinator_address or getattr(state, "coordinator_address", None)
        pid = process_id if process_id is not None else getattr(state, "process_id", "?")
        return (
            f"process {pid} could not join the job through the coordinator at "
            f"{address or 'an undetected address'} ({cluster}) within {timeout_s} s: {reason}. "
            "Are all processes started, is process 0 reachable on that address, and is the "
            "port free?"
        )

    # JAX's runtime aborts the whole process (a C++ fatal error) when its peers do not arrive in
    # time; a watchdog ends it first, with a message and exit status 1.
    def give_up() -> None:
        print(f"distill-jax: error: {failure('its peers did not all arrive')}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)

    watchdog = threading.Timer(timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address,
            num_processes=num_processes,
            process_id=process_id,
            initialization_timeout=int(timeout_s) + 60,  # the watchdog speaks first
        )
    except Exception as err:  # noqa: BLE001 (JAX raises several types; all mean "could not join")
        raise DistributedError(
            failure(f"{type(err).__name__}: {str(err).splitlines()[0]}")
        ) from err
    finally:
        watchdog.cancel()
    index, count = process()
    log.info(
        "joined the job as process %d of %d (%s, coordinator %s)",
        index,
        count,
        cluster or "JAX_COORDINATOR_ADDRESS",
        _state().coordinator_address,
    )


def has_preemption_service() -> bool:
    """Whether JAX's preemption service runs (a joined job with jax_enable_preemption_service):
    it then owns SIGTERM and agrees on a stopping step across hosts."""
    return _state().preemption_sync_manager is not None


def is_primary() -> bool:
    """Whether this is process 0, which alone prints summaries, bars and TensorBoard events."""
    return process()[0] == 0


class _ProcessFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        index, count = process()
        record.process_tag = f"p{index}/{count}"
        return True


def configure_logging(verbose: bool = False) -> None:
    """Logs to stderr with the speaking process in every line (``p1/4``); process 0 logs at INFO,
    the others WARNING and above only (DEBUG everywhere with ``verbose``). Call again after
    :func:`initialize` so that the level follows the process index."""
    root = logging.getLogger()
    # As logging.basicConfig: a handler only where nobody (an application, pytest) set one up.
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.addFilter(_ProcessFilter())
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(process_tag)s %(levelname)s %(name)s: %(message)s")
        )
        root.addHandler(handler)
    if verbose:
        root.setLevel(logging.DEBUG)
    else:
        root.setLevel(logging.INFO if is_primary() else logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax reports every read at INFO
    # "Task exception was never retrieved", one per Orbax write that failed and was reported
    # (some at exit): noise unless debugging.
    logging.getLogger("asyncio").setLevel(logging.DEBUG if verbose else logging.CRITICAL)
    # "Unable to initialize backend 'tpu'" on every machine without one.
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)


def host_values(tree: Any) -> Any:
    """NumPy copies of a tree of arrays on every process, also of arrays sharded across hosts
    (gathered with ``process_allgather``; every process must call this)."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(jax.device_get(x))

    return jax.tree.map(one, tree)


def my_share(n: int) -> list[int]:
    """The items ``0..n-1`` this process handles: ``index, index + count, ...`` (all of them in a
    single process). Every item belongs to exactly one process."""
    index, count = process()
    return list(range(index, n, count))


def shared_token() -> str:
    """Eight random hex digits, the same on every process (process 0's): a name that every
    process of a collective write agrees on."""
    import uuid

    import numpy as np

    token = np.asarray([uuid.uuid4().int % 2**31], np.int32)
    if process()[1] > 1:
        from jax.experimental import multihost_utils

        token = np.asarray(multihost_utils.broadcast_one_to_all(token))
    return f"{int(token[0]):08x}"


def sync(name: str) -> None:
    """A barrier of every process (no-op in a single process)."""
    if process()[1] > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


# --- a local stand-in for a pod -----------------------------------------------------------------


def free_port(low: int | None = None, high: int | None = None) -> int:
    """A TCP port nobody listens on right now: any the system offers, or one in ``[low, high)``."""
    import random

    for _ in range(200):
        port = 0 if low is None else random.randrange(low, high)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise DistributedError(f"no free port in [{low}, {high})")


def local_environments(
    processes: int, devices_per_process: int, *, how: str = "explicit"
) -> list[dict[str, str]]:
    """The environment of each of ``processes`` local JAX processes, each with
    ``devices_per_process`` fake CPU devices.

    ``how="slurm"`` sets what ``srun`` gives each task (``SLURM_JOB_ID``, ``SLURM_NTASKS``,
    ``SLURM_PROCID``, ``SLURM_LOCALID``, ``SLURM_STEP_NODELIST=localhost``), so JAX auto-detects
    the job; its coordinator port is derived from the job id, which is chosen to give a free
    port. ``how="explicit"`` sets ``DISTILL_JAX_COORDINATOR``, ``DISTILL_JAX_NUM_PROCESSES`` and
    ``DISTILL_JAX_PROCESS_ID``, which the ``distill-jax`` verbs read as their
    ``--coordinator-address/--num-processes/--process-id`` defaults.
    """
    if how not in ("slurm", "explicit"):
        raise ValueError(f"how={how!r}: 'slurm' or 'explicit'")
    base = {
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": " ".join(
            f
            for f in os.environ.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")
        )
        + f" --xla_force_host_platform_device_count={devices_per_process}",
    }
    envs = []
    if how == "slurm":
        # JAX's SLURM detection puts the coordinator on port 61440 + job_id % 4096.
        port = free_port(61440, 65536)
        job_id = str(4096 * 7 + port - 61440)
        for i in range(processes):
            envs.append(
                base
                | {
                    "SLURM_JOB_ID": job_id,
                    "SLURM_NTASKS": str(processes),
                    "SLURM_PROCID": str(i),
                    "SLURM_LOCALID": str(i),
                    "SLURM_STEP_NODELIST": "localhost",
                    "SLURM_NODELIST": "localhost",
                    "SLURM_STEP_NUM_NODES": "1",
                }
            )
    else:
        port = free_port()
        for i in range(processes):
            envs.append(
                base
                | {
                    "DISTILL_JAX_COORDINATOR": f"localhost:{port}",
                    "DISTILL_JAX_NUM_PROCESSES": str(processes),
                    "DISTILL_JAX_PROCESS_ID": str(i),
                }
            )
    return envs


def launch_local(
    command: Sequence[str],
    processes: int,
    devices_per_process: int,
    *,
    how: str = "explicit",
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
    log_dir: str | None = None,
) -> list[int]:
    """Runs ``command`` as ``processes`` local JAX processes (see :func:`local_environments`) and
    returns their exit codes. SIGTERM and SIGINT are passed on to every process, as a scheduler
    preempting the job would; if one process fails the others are stopped. With ``log_dir`` each
    process's output goes to ``log_dir/process_<i>.log``."""
    envs = local_environments(processes, devices_per_process, how=how)
    children: list[subprocess.Popen] = []
    files = []
    for i, extra in enumerate(envs):
        out = None
        if log_dir:
            os.makedirs(log_dir, exist_ok=True)
            out = open(os.path.join(log_dir, f"process_{i}.log"), "w")  # noqa: SIM115
            files.append(out)
        children.append(
            subprocess.Popen(
                list(command),
                env={**os.environ, **(env or {}), **extra},
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
        )

    forwarded = []

    def forward(signum, frame):  # noqa: ARG001
        forwarded.append(signum)
        for c in children:
            if c.poll() is None:
                c.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while any(c.poll() is None for c in children):
            # After a forwarded signal every process stops by itself (a checkpoint, then 128+N).
            failed = [c for c in children if c.returncode not in (None, 0) and not forwarded]
            late = deadline is not None and time.monotonic() > deadline
            if failed or late:
                time.sleep(5 if failed and not late else 0)  # let the others report the failure
                for c in children:
                    if c.poll() is None:
                        c.kill()
                break
            time.sleep(0.1)
        codes = [c.wait() for c in children]
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for f in files:
            f.close()
    return codes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distill_jax.distributed",
        description="Runs COMMAND as N JAX processes on this machine, each with its own fake CPU "
        "devices, joined by jax.distributed: a local stand-in for a pod or a SLURM job. Example: "
        "python -m distill_jax.distributed -n 2 --devices 2 --slurm -- distill-jax train "
        "--config configs/scm.py:runlocal --workdir runs/mh --multihost",
    )
    parser.add_argument("-n", "--processes", type=int, default=2, help="processes (default 2)")
    parser.add_argument(
        "--devices", type=int, default=2, help="fake CPU devices per process (default 2)"
    )
    parser.add_argument(
        "--slurm",
        action="store_true",
        help="simulate a SLURM allocation (JAX auto-detects it); default: an explicit "
        "coordinator on a free port, passed to the distill-jax verbs",
    )
    parser.add_argument(
        "--log-dir", default=None, help="write process i's output to LOG_DIR/process_<i>.log"
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command after --")
    codes = launch_local(
        command,
        args.processes,
        args.devices,
        how="slurm" if args.slurm else "explicit",
        log_dir=args.log_dir,
    )
    print(f"exit codes: {codes}", file=sys.stderr)
    return max(codes, key=abs) if any(codes) else 0


if __name__ == "__main__":
    sys.exit(main())
