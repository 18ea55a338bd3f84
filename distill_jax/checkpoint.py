"""Orbax checkpoints of training runs: named items, async saves, preemption, exact resume.

A run's ``workdir/checkpoints/<step>/`` holds the items

- ``state``: student parameters, optimizer state, step and skip counters (sharded arrays);
- ``ema``: the EMA of the student parameters, when enabled;
- ``config``: the run's config as JSON;
- ``data``: the input iterator's position (JSON), so that resume sees the same batches.

The teacher is never saved here: it is frozen and lives in its own converted folder.
Orbax writes each step into a temporary folder and renames it when complete, so a crash mid-save
never leaves a step that looks finished; :meth:`Checkpoints.restore_latest` also falls back to the
previous step if the newest one cannot be read.
"""

from __future__ import annotations

import contextlib
import logging
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp
from flax.traverse_util import flatten_dict

from distill_jax import distributed

log = logging.getLogger(__name__)


class CheckpointError(OSError):
    """Writing a checkpoint failed (disk full, permissions, a lost file system)."""


class Checkpoints:
    """A thin layer over ``ocp.CheckpointManager`` with the items above."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        """``keep``: the newest steps to keep; 0 keeps every step."""
        if keep < 0:
            raise ValueError(f"keep={keep}: the number of steps to keep, or 0 for all of them")
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep or None, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "ema", "config", "data"), options=options
        )
        self._closed = False
        self._in_flight: int | None = None  # the step of a save started and not yet waited for

    def save(
        self,
        step: int,
        state: Any,
        *,
        ema: Any = None,
        config: dict,
        data: dict,
        force: bool = False,
    ) -> bool:
        """Saves ``step`` unless it is already saved (a preemption right after a periodic
        save, say). Returns whether a save was started."""
        if step in self.manager.all_steps():
            return False
        items = dict(
            state=ocp.args.StandardSave(state),
            config=ocp.args.JsonSave(config),
            data=ocp.args.JsonSave(data),
        )
        if ema is not None:
            items["ema"] = ocp.args.StandardSave(ema)
        self.wait()  # Orbax waits for the previous save anyway; this names it if it failed
        with self._writing(step):
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            self._in_flight = step
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def _saved_config(self, step: int) -> dict | None:
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
            return dict(out["config"])
        except Exception:  # noqa: BLE001 (an unreadable config is a damaged step)
            return None

    def restore_latest(
        self, abstract_state: Any, *, abstract_ema: Any = None, config: dict | None = None
    ):
        """``(step, state, ema, data)`` of the newest readable step, or None without one.

        ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves with shardings) makes arrays come back
        straight into their shardings. A step that cannot be restored is moved aside as damaged
        (``<step>.unreadable``) and the previous one tried, unless its saved config differs from
        ``config`` (the run's, as JSON) in a field that shapes the state: then the workdir holds
        another run, and a ``ValueError`` names the differing fields, renaming nothing.
        """
        for step in reversed(self.steps()):
            items = dict(
                state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
            )
            if abstract_ema is not None:
                items["ema"] = ocp.args.StandardRestore(abstract_ema)
            try:
                out = self.manager.restore(step, args=ocp.args.Composite(**items))
            except Exception as err:  # noqa: BLE001 (a damaged step must not end the run)
                saved = self._saved_config(step) if config is not None else None
                differ = config_differences(saved, config) if saved is not None else []
                if differ:
                    raise ValueError(
                        f"{self.directory} holds step {step} of another run, which this config "
                        "cannot resume (its state has another structure): "
                        + "; ".join(differ)
                        + ". Use another --workdir, or the config the checkpoints were made with"
                    ) from err
                aside = self.directory / f"{step}.unreadable"
                log.warning(
                    "checkpoint: step %d in %s is unreadable (%s: %s); moved to %s, "
                    "trying an earlier step",
                    step,
                    self.directory,
                    type(err).__name__,
                    err,
                    aside.name,
                )
                if distributed.is_primary():  # one host moves it; the others wait
                    (self.directory / str(step)).rename(aside)
                distributed.sync(f"checkpoint-unreadable-{step}")
                self.manager.reload()
                continue
            log.info("checkpoint: restored step %d from %s", step, self.directory)
            return step, out["state"], out.get("ema"), out["data"]
        return None

    def wait(self) -> None:
        with self._writing():
            self.manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        """Waits for a save in flight (raising its error) and releases the manager; idempotent."""
        if self._closed:
            return
        self._closed = True
        with self._writing():
            self.manager.wait_until_finished()
        self.manager.close()

    @contextlib.contextmanager
    def _writing(self, step: int | None = None) -> Iterator[None]:
        """Names the step whose save failed (the one in flight, else ``step``): Orbax's error
        names only a tensor in a temporary folder."""
        try:
            yield
        except Exception as err:
            failed = self._in_flight if self._in_flight is not None else step
            text = re.sub(r" \[tensorstore_spec='.*?'\]", "", str(err))  # kilobytes of JSON
            raise CheckpointError(
                f"checkpoint: saving step {failed} to {self.directory} failed "
                f"({type(err).__name__}: {text}); the steps saved before it are intact"
            ) from err

    def close_after_error(self) -> None:
        """:meth:`close` while another error ends the run: a save in flight is finished (it may
        be the newest good step), and a failure of its own is logged, not raised over that
        error."""
        try:
            self.close()
        except Exception as err:  # noqa: BLE001 (the run's own error is the one to report)
            log.error("checkpoint: the save in flight failed too (%s: %s)", type(err).__name__, err)


# Config fields that cannot change the structure of a run's state: a resume may change these.
RUN_ONLY = (
    "total_steps",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "async_checkpoints",
    "max_consecutive_nonfinite",
    "multihost",
    "peak_tflops_per_device",
    "seed",
    "teacher.init_checkpoint",  # read when a run starts, never on resume
    "data.",
    "loss.",
    "mesh.",
    "optim.lr",
    "optim.warmup_steps",
    "optim.schedule",
    "optim.b1",
    "optim.b2",
    "optim.eps",
    "optim.weight_decay",
)


def config_differences(saved: dict, current: dict) -> list[str]:
    """``"field: saved -> now"`` for every field outside :data:`RUN_ONLY` that differs."""

    a, b = flatten_dict(saved, sep="."), flatten_dict(current, sep=".")
    return [
        f"{k}: {a.get(k, '(absent)')!r} -> {b.get(k, '(absent)')!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
        and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RUN_ONLY)
    ]


class Preemption:
    """A preemption notice (SIGTERM), or Ctrl-C, as a step at which every host stops together.

    Use as a context manager and ask :meth:`reached` once per step, on every host, with the same
    steps. In a multi-host job JAX's preemption service owns SIGTERM: a notice to any host is
    propagated to all, and they agree on one step to checkpoint at, so the saved step is the same
    everywhere. In a single process the handlers set a flag instead (restored on exit; only the
    main thread can install them, elsewhere the flag never fires), and Ctrl-C (SIGINT) stops the
    same way; a second Ctrl-C stops at once (``KeyboardInterrupt``). :attr:`signum` is the signal
    that stopped the run, for the exit status.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGINT)):
        self.signals = signals
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._service = False

    def _handle(self, signum, frame):  # noqa: ARG002
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        name = signal.Signals(signum).name
        again = " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else ""
        log.warning("received %s: saving a checkpoint and stopping%s", name, again)
        self.requested, self.signum = True, signum

    def reached(self, step: int) -> bool:
        """Whether to checkpoint and stop after ``step`` (the same answer on every host)."""
        if self._service and not self.requested:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                log.warning("preemption: all hosts stop after step %d", step)
                self.requested, self.signum = True, signal.SIGTERM
        return self.requested

    def __enter__(self) -> Preemption:
        self._service = distributed.has_preemption_service()
        if distributed.process()[1] > 1:
            if not self._service:
                log.warning(
                    "JAX's preemption service is off (jax_enable_preemption_service): a SIGTERM "
                    "stops only the host that receives it"
                )
            return self  # one host cannot stop alone: the service (or nothing) decides
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
