"""Progress on stderr for work a user waits on: a redrawn tqdm bar on a terminal, a plain line now and then in a
log file (nohup, CI, SLURM: a bar's carriage-return redraws read there as one endless line), or nothing.

Every display here has the same three calls, so the work that counts does not care which one it got::

    shown = counter(total, "merging", mode, unit="tensor")   # mode: True (bar), "lines" or False (nothing)
    shown.update(1)                                           # one unit of work done
    shown.set_postfix_str("3/8 records done")                 # a note shown beside the count (optional)
    shown.close()

A plain line reads ``merging: 40/400 tensors, 0:01:20 elapsed, 0:12:00 left``. :func:`slow_work` counts library work
(loading, quantizing, merging, combining, exporting) that no --progress flag reaches. No import of torch,
transformers or lorakit.train: the core (quant/), the model loaders, merge and export use it too.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable, Iterator, TypeVar

from lorakit._rank import speaks

T = TypeVar("T")


def clock(seconds: float) -> str:
    """``H:MM:SS`` for a duration in seconds (rounded to the second)."""
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def show_bar(setting: bool | None, stream: Any = None) -> bool:
    """Whether to redraw a tqdm bar: ``setting`` when given (--progress / --no-progress), else only when ``stream``
    (default stderr) is a terminal or a Jupyter kernel's stream (tqdm.auto draws a widget there). A log file, nohup,
    CI or a batch job gets False: a bar's carriage-return redraws would fill the file as one endless line; so does a
    terminal 0 columns wide (tqdm draws nothing there: the plain lines are shown instead)."""
    if setting is not None:
        return bool(setting)
    stream = sys.stderr if stream is None else stream
    if type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # a replaced stream without isatty, or a closed one
        return False
    try:  # `script` or `docker -t` in CI: a terminal 0 columns wide, where tqdm draws nothing at all
        return os.get_terminal_size(stream.fileno()).columns > 0
    except (AttributeError, ValueError, OSError):  # no file descriptor, or no size to ask: the terminal decides
        return True


def stderr_mode(setting: bool | None = None) -> bool | str:
    """The mode :func:`counter` takes for this process's stderr: True (a bar) on a terminal or with ``setting``
    True (--progress), else ``"lines"``."""
    return True if show_bar(setting) else "lines"


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("ch", "sh", "s")) else "s")  # batches, records, tensors


def _scale(total: float, unit: str) -> tuple[float, str]:
    """(divisor, unit name) of a count in a line: bytes in MB below a GB, else GB; other units as they are."""
    if unit == "B":
        return (1e6, "MB") if total < 1e9 else (1e9, "GB")
    return 1.0, _plural(unit)


def _amount(n: float, divisor: float) -> str:
    return str(int(n)) if divisor == 1.0 else f"{n / divisor:.1f}"


class Silent:
    """No display: what ``counter`` gives when progress is off."""

    n = 0

    def update(self, n: float = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


class Lines(Silent):
    """A plain line on stderr after the first unit of work and the last one, every tenth of ``total`` and at least
    every ``every_s`` seconds (about a dozen lines in all, however long the work): ``what: n/total units[, note],
    H:MM:SS elapsed, H:MM:SS left``. With ``delay_s``, no line until that long has passed (work that ends sooner says
    nothing); the first then comes with the next update. Bytes (``unit="B"``) count in MB, or GB from 1 GB."""

    def __init__(self, total: float, what: str, unit: str = "batch", every_s: float = 60.0, delay_s: float = 0.0) -> None:
        self.total, self.what, self.unit, self.every_s, self.delay_s = total, what, unit, every_s, delay_s
        self.n, self.last, self.shown, self.note = 0, 0, False, ""
        self.started = self.last_time = time.perf_counter()

    def set_postfix_str(self, text: str = "", refresh: bool = True) -> None:
        self.note = text

    def update(self, n: float = 1) -> None:
        if not n:  # nothing done (a refresh of the note): the next line shows it
            return
        self.n += n
        now = time.perf_counter()
        if now - self.started < self.delay_s:
            return
        if (not self.shown or self.n >= self.total or self.n - self.last >= max(1, self.total // 10)
                or now - self.last_time >= self.every_s):
            elapsed = now - self.started
            left = elapsed / self.n * max(self.total - self.n, 0) if self.n else 0.0
            divisor, units = _scale(self.total, self.unit)
            note = f", {self.note}" if self.note else ""
            print(f"{self.what}: {_amount(self.n, divisor)}/{_amount(self.total, divisor)} {units}{note}, "
                  f"{clock(elapsed)} elapsed, {clock(left)} left", file=sys.stderr, flush=True)
            self.last, self.last_time, self.shown = self.n, now, True


def counter(total: float, what: str, mode: bool | str, unit: str = "batch", delay_s: float = 0.0):
    """A display of ``total`` units of work on stderr: a tqdm bar (``mode`` True), plain :class:`Lines`
    (``"lines"``) or nothing (False). ``delay_s``: show nothing until that long has passed."""
    if mode == "lines":
        return Lines(total, what, unit=unit, delay_s=delay_s)
    if not mode:
        return Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=what, unit=unit, unit_scale=unit == "B", leave=False, dynamic_ncols=True,
                delay=delay_s, file=sys.stderr)


# library work (loading and quantizing a model, merging, combining, writing GGUF) shows progress only once it has
# taken this long: a small model is done before a bar would help, and what its callers print stays as it was
SLOW_WORK_S = 3.0


def library_progress_off() -> bool:
    """Whether ``LORAKIT_PROGRESS`` is 0 / off / false / no: a program that calls lorakit's functions and keeps its
    own stderr clean turns :func:`slow_work`'s displays off (the CLI's --progress flags are not affected)."""
    return os.environ.get("LORAKIT_PROGRESS", "").strip().lower() in ("0", "off", "false", "no")


def slow_work(items: Iterable[T], what: str, unit: str, total: int | None = None) -> Iterator[T]:
    """``items``, counted on stderr as each one is done, for library work a user waits on that no --progress flag
    reaches: a bar on a terminal, plain lines in a log, only after :data:`SLOW_WORK_S`; nothing on a torchrun
    process other than rank 0 (each one loads the model: one display, not one per GPU), nor with
    ``LORAKIT_PROGRESS=0``. ``total``: when ``items`` has no length."""
    total = len(items) if total is None else total  # type: ignore[arg-type]
    mode = stderr_mode() if speaks() and not library_progress_off() else False
    shown = counter(total, what, mode, unit=unit, delay_s=SLOW_WORK_S)
    try:
        for item in items:
            yield item
            shown.update(1)
    finally:  # the end, or an error in the work (the bar goes with it)
        shown.close()
