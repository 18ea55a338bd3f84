"""What a person at the terminal sees of a failure: one line, and the rest under ``--verbose``.

:func:`quiet_libraries` keeps other libraries to one line per message while a verb runs (Orbax's
threads print a hundred tracebacks for one failed write), and :func:`error_line` is the line a
verb ends with.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
from collections.abc import Iterator

from distill_jax.distributed import DistributedError


class Quiet(logging.Filter):
    """Without ``--verbose``, other libraries' records are one line each, said once, with no
    traceback, and their errors are held back: a failing verb ends in one line of its own (a
    failed Orbax checkpoint write otherwise prints a hundred tracebacks from its threads), and
    a verb that succeeds prints them at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()
        self.held: list[logging.LogRecord] = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("distill_jax") or getattr(record, "released", False):
            return True
        message = record.getMessage()
        line = message.splitlines()[0] if message else ""
        if (record.name, line) in self.seen:
            return False
        self.seen.add((record.name, line))
        record.msg, record.args = line, None
        record.exc_info = record.exc_text = record.stack_info = None
        if record.levelno >= logging.ERROR:
            record.released = False
            self.held.append(record)
            return False
        return True

    def release(self) -> None:
        for record in self.held:
            record.released = True
            logging.getLogger(record.name).handle(record)
        self.held.clear()


@contextlib.contextmanager
def quiet_libraries(verbose: bool) -> Iterator[Quiet | None]:
    """:class:`Quiet` on the root handlers while a verb runs, with Python warnings, errors of
    background threads and "unraisable" ones (C++ callbacks at shutdown) logged through it."""
    if verbose:
        yield None
        return
    quiet, handlers = Quiet(), list(logging.getLogger().handlers)
    hooks = threading.excepthook, sys.unraisablehook

    def one_line(kind: str, err: BaseException | None) -> None:
        logging.getLogger(kind).error("%s: %s", type(err).__name__, err)  # through `quiet`

    def thread_error(info: threading.ExceptHookArgs) -> None:
        one_line(f"thread {info.thread.name if info.thread else '?'}", info.exc_value)

    threading.excepthook = thread_error
    sys.unraisablehook = lambda u: one_line("unraisable", u.exc_value)
    logging.captureWarnings(True)  # Python warnings too: one line, once
    for h in handlers:
        h.addFilter(quiet)
    try:
        yield quiet
    finally:
        for h in handlers:
            h.removeFilter(quiet)
        logging.captureWarnings(False)
        threading.excepthook, sys.unraisablehook = hooks


def error_line(err: BaseException) -> str:
    """The one line for an error: our refusals (bad input, a job that could not form) say what
    is wrong; anything else is named by its type (the traceback is under --verbose)."""
    text = str(err) or type(err).__name__
    if isinstance(err, ValueError | OSError | ImportError | DistributedError):
        return text
    return f"{type(err).__name__}: {text} (--verbose shows where)"
