"""SIGTERM handled as Ctrl-C, for the commands that write files (train, merge, combine, quantize)."""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside, SIGTERM (a scheduler's preemption or time limit, ``timeout``, ``kill PID``) stops the command as Ctrl-C
    does: a file or folder being written is removed whole (each writer's ``except BaseException``), and a training
    run names its last checkpoint with the command that resumes it. Python's default for SIGTERM is to die on the
    spot, leaving hidden half-written folders (a merge's ``.OUT.*.tmp``: the whole model's size) and not a word."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
