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

import logging
import signal
import threading
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpoints:
    """A thin layer over ``ocp.CheckpointManager`` with the items above."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(workdir).absolute() / "checkpoints"
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True
        )
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=("state", "ema", "config", "data"), options=options
        )

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
        saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if saved:
            log.info("checkpoint: saving step %d to %s", step, self.directory)
        return saved

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def restore_latest(self, abstract_state: Any, *, abstract_ema: Any = None):
        """``(step, state, ema, data)`` of the newest readable step, or None without one.

        ``abstract_state`` (``jax.ShapeDtypeStruct`` leaves with shardings) makes arrays come back
        straight into their shardings.
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
                (self.directory / str(step)).rename(aside)
                self.manager.reload()
                continue
            log.info("checkpoint: restored step %d from %s", step, self.directory)
            return step, out["state"], out.get("ema"), out["data"]
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class Preemption:
    """Turns SIGTERM (a preemption notice) into a flag the training loop polls.

    Use as a context manager; the previous handler is restored on exit. Only the main thread can
    install signal handlers; elsewhere the flag simply never fires.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self.signals = signals
        self.requested = False
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):  # noqa: ARG002
        log.warning("received signal %d: saving a checkpoint and stopping", signum)
        self.requested = True

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
