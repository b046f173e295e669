"""How a training run stops when asked to: Ctrl-C (SIGINT) or SIGTERM (a scheduler's preemption or time limit,
``timeout``, ``kill PID``, ``docker stop``).

The first signal ends :func:`lorakit.train.loop.train` at a step boundary with a checkpoint written there, in the
periodic checkpoints' format (atomic, ``latest`` moved to it), so ``--resume`` continues as if never stopped; then
:class:`TrainingInterrupted` (a KeyboardInterrupt) names it. How each kind of run gets to the boundary:

- one process: at once. A step cut in its forward or backward is abandoned: the weights and the optimizer are still
  those of the last finished step, and the data position and random states are put back to where that step started
  (the loop keeps both, a few KB, at each step's start). What must not be cut in two finishes first and the run
  stops right after (:meth:`StopRequest.uncut`): the optimizer update with its counters and metrics line, and a
  checkpoint being written. A validation cut midway is run again on resume (``pending_validation`` in the
  checkpoint), so the resumed run's validation losses, best adapter and early stopping are the uninterrupted run's.
- several processes (torchrun): a signal only marks the request (the step it came in is finished); the loop adds
  it to the next step's first all-reduce, so every process stops at the same step, before computing the next one,
  whichever process got the signal.
  Rank 0 writes the checkpoint (the others take part in its gathers) and every process waits for the write to end
  before any exits: torchrun ends the others the moment one exits.
- a second signal while stopping or saving stops at once: the checkpoint being written is removed whole (it is
  written in a hidden temporary folder and renamed into place last), and the earlier checkpoints and ``latest``
  stay as they were. Under torchrun a second signal of the same kind within :data:`DUPLICATE_S` of the first counts
  as the same one: a scheduler (Slurm's scancel or preemption) signals every process of the job, and torchrun then
  passes the one it got on to each worker. (Ctrl-C at the terminal reaches torchrun alone, its workers run in their
  own sessions, and torchrun passes it on: one SIGINT each. torchrun kills them 30 s later: the save must end by
  then, which a LoRA checkpoint does.)
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from lorakit._signals import interrupt_for, signal_words

DUPLICATE_S = 2.0


class TrainingInterrupted(KeyboardInterrupt):
    """What :func:`lorakit.train.loop.train` raises when a signal stopped it (a KeyboardInterrupt, so code that
    catches Ctrl-C still does).

    Attributes:
        step: optimizer steps done, where the run stopped. total_steps: steps planned.
        checkpoint: the checkpoint of that step (written at the stop, or earlier: a periodic one, the one a resume
            started from); None without a run folder, or at step 0 (nothing trained).
        signum: the signal (``signal.SIGINT`` for Ctrl-C, ``signal.SIGTERM``).
        processes: how many processes stopped together (1 without torchrun).
        everywhere: every process got a signal (Ctrl-C at the terminal, torchrun stopped), so none needs to wait
            for rank 0 to say it.
    """

    def __init__(self, step: int, total_steps: int, checkpoint: Path | None, signum: int, processes: int = 1,
                 everywhere: bool = True) -> None:
        self.step, self.total_steps, self.checkpoint, self.signum = step, total_steps, checkpoint, signum
        self.processes, self.everywhere = processes, everywhere
        where = (f"; saved checkpoint {checkpoint} (continue with train(..., resume={str(checkpoint.parent.parent)!r}))"
                 if checkpoint is not None else "; nothing saved" + (" (no step done yet)" if step == 0 else
                                                                     " (no run folder: out=None)"))
        super().__init__(f"training stopped by {signal_words(signum)} at step {step} of {total_steps}{where}")


class AgreedStop(KeyboardInterrupt):
    """Raised by every process at the step where the processes agreed to stop: ``processes`` of them had a signal,
    ``signum`` SIGTERM when one of those was a SIGTERM, else SIGINT."""

    def __init__(self, processes: int, signum: int) -> None:
        super().__init__(f"a stop signal on {processes} process{'es' * (processes != 1)}")
        self.processes, self.signum = processes, signum


class StopRequest:
    """Inside (a ``with`` block, on the main thread): SIGINT and SIGTERM ask the run to stop at a step boundary.

    ``together`` (several processes): a signal only sets :attr:`signum`, read by the loop at the next step (with
    ``announce``, one line on stderr says so at once); else the first signal raises at once (KeyboardInterrupt, or
    :class:`lorakit._signals.Terminated` for SIGTERM) unless an :meth:`uncut` section runs, which raises it as it
    ends. Any later signal raises at once. A SIGINT that is ignored when the block starts (a background job) stays
    ignored; the previous handlers come back on exit.
    """

    def __init__(self, together: bool = False, announce: bool = False) -> None:
        self.together, self.announce = together, announce
        self.signum: int | None = None  # the first signal
        self.signals = 0  # signals taken (a duplicate is not counted): a stop that meets a second one is abandoned
        self.acted = False  # the stop is under way (raised, or agreed by every process): the next signal aborts it
        self._first_at = 0.0
        self._uncut = 0
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first_at, self.signals = signum, now, 1
            if self.together and self.announce:
                # a step can take minutes: without a word, a user pressed Ctrl-C again, which stops without saving.
                # os.write, not print: a handler that prints while the interrupted code prints fails (reentrant call)
                name = signal_words(signum)
                os.write(2, f"\n{name}: every process stops at the end of this step and saves a checkpoint there "
                            f"({name} again stops at once, without saving)\n".encode())
            if self.together or self._uncut:
                return
            self.acted = True
            raise interrupt_for(signum)
        if self.together and signum == self.signum and now - self._first_at < DUPLICATE_S:
            return  # torchrun passing on the Ctrl-C the terminal already sent this process
        self.signals += 1
        self.acted = True
        raise interrupt_for(signum)

    @contextlib.contextmanager
    def uncut(self) -> Iterator[None]:
        """Inside, a first signal waits for the end (raised there); a second one still raises at once."""
        self._uncut += 1
        try:
            yield
        finally:
            self._uncut -= 1
        if not self._uncut and self.signum is not None and not self.acted and not self.together:
            self.acted = True
            raise interrupt_for(self.signum)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                if signal.getsignal(signum) in (signal.SIG_IGN, None):
                    continue  # SIGINT of a background job (nohup, `cmd &`) is ignored: it must stay so (None: a
                    # handler set outside Python, which could not be put back)
                self._previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}
