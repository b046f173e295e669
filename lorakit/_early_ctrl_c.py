"""A Ctrl-C while the ``lorakit`` command imports this package ends with one line and status 130, not a traceback.

``python -m lorakit`` and pip's ``lorakit`` script both import ``lorakit/__init__.py`` before any code of the command
runs (``__main__``'s own guard and ``cli.main``'s handler come after it). On a loaded machine that import took past
0.1 s, and a Ctrl-C there printed a KeyboardInterrupt traceback from inside it (seen in CI). The package installs
this handler as its first statement when it is imported by the command, and gives Python's back at its end, so that
``cli.main`` finds the default handler it replaces with its own; a program that merely imports lorakit is left alone.
"""

import _signal  # the builtin: ``signal`` imports enum, and every millisecond here is a millisecond uncovered
import os
import sys


def _interrupted(signum, frame):  # noqa: ARG001 (a signal handler's signature)
    if os.environ.get("WORLD_SIZE", "1") in ("", "0", "1") or os.environ.get("RANK", "0") in ("", "0"):
        sys.stderr.write("lorakit: interrupted\n")  # torchrun passes Ctrl-C to every process: one says it
    raise SystemExit(130)


def _is_the_command() -> bool:
    """Imported by ``python -m lorakit`` (argv[0] is "-m" while runpy finds the module) or by the console script."""
    first = sys.argv[0] if sys.argv else ""
    return first == "-m" or first.replace("\\", "/").rsplit("/", 1)[-1] in ("lorakit", "lorakit.exe", "lorakit-script.py")


def install() -> None:
    """The quiet handler, where the command is starting and Ctrl-C still has Python's own handler (not where SIGINT is
    ignored, a background job, nor off the main thread)."""
    try:
        if _is_the_command() and _signal.getsignal(_signal.SIGINT) is _signal.default_int_handler:
            _signal.signal(_signal.SIGINT, _interrupted)
    except ValueError:  # not the main thread
        pass


def release() -> None:
    """Python's handler back, if this one is still installed (``cli.main`` then installs its own)."""
    try:
        if _signal.getsignal(_signal.SIGINT) is _interrupted:
            _signal.signal(_signal.SIGINT, _signal.default_int_handler)
    except ValueError:
        pass
