"""SIGTERM handled as Ctrl-C, for the commands that write files (train, merge, combine, quantize), and how the CLI
tells the two apart afterwards (exit status 130 for Ctrl-C, 143 for SIGTERM, as ``lorakit serve`` ends)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as Ctrl-C's KeyboardInterrupt is, so every ``except KeyboardInterrupt`` / ``except
    BaseException`` cleanup runs the same; the CLI ends with status 143 (128 + 15) instead of 130."""


def interrupt_for(signum: int, message: str | None = None) -> KeyboardInterrupt:
    """The exception a signal raises: :class:`Terminated` for SIGTERM, KeyboardInterrupt for the rest (SIGINT)."""
    name = signal.Signals(signum).name
    kind = Terminated if signum == signal.SIGTERM else KeyboardInterrupt
    return kind(message or f"signal {name}")


def signal_words(signum: int | None) -> str:
    """How a stop's signal is named to a user: "Ctrl-C" for SIGINT, else the signal's name (SIGTERM)."""
    if signum is None or signum == signal.SIGINT:
        return "Ctrl-C"
    return signal.Signals(signum).name


def by_sigterm(error: BaseException) -> bool:
    """Whether ``error`` (a KeyboardInterrupt) stands for a SIGTERM: a :class:`Terminated`, or an exception that
    carries ``signum`` (lorakit.train.stopping's)."""
    return isinstance(error, Terminated) or getattr(error, "signum", None) == signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM (a scheduler's preemption or time limit, ``timeout``, ``kill PID``) stops the command as Ctrl-C
    does: a file or folder being written is removed whole (each writer's ``except BaseException``), and a training
    run saves a checkpoint where it stopped and names the command that resumes it. Python's default for SIGTERM is to
    die on the spot, leaving hidden half-written folders (a merge's ``.OUT.*.tmp``: the whole model's size) and not a
    word. Raises :class:`Terminated` (a KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def interrupt(signum, frame):
        raise interrupt_for(signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
