"""argparse actions that refuse a single-value option given twice with different values.

argparse's default ``store`` keeps the last value without a word, so ``lorakit train --lr 1e-4 --lr 3e-4`` (two
command lines pasted together, a script that adds a flag its caller also gave) trained at 3e-4. These actions note
each value in the parser's ``given`` (reset per parse by ``lorakit.cli._OneLineParser``) and end a second, different
one with a one-line ``parser.error``. The same value twice is harmless and passes, as does ``--overwrite`` twice;
options meant to repeat (``action="append"`` / ``"extend"``: ``--data``, combine's ``--adapter``) are untouched.
"""

from __future__ import annotations

import argparse


def _shown(typed: list[str], option: str) -> str:
    """What the user typed as one value, quoted as Python quotes it (``'a b'``); ``--resume`` with no value is
    ``'--resume' alone``."""
    return " ".join(repr(s) for s in typed) if typed else f"{option} alone"


def note(parser: argparse.ArgumentParser, action: argparse.Action, value, option: str | None, shown: str,
         twice: str) -> None:
    """Record ``value`` (shown to the user as ``shown``) for ``action``; a different value noted before ends the parse
    with ``twice`` formatted with the earlier and this option and shown value. Positionals and parsers that keep no
    ``given`` (a plain ``ArgumentParser`` in a test) are not checked."""
    given = getattr(parser, "given", None)
    if given is None or not action.option_strings or option is None:
        return
    before = given.get(action.dest)
    if before is not None and before[0] != value:
        parser.error(twice.format(first=before[1], first_shown=before[2], second=option, second_shown=shown))
    given[action.dest] = (value, option, shown)


class StoreOnce(argparse._StoreAction):
    """``store`` (argparse's default action) that refuses a second, different value."""

    def __call__(self, parser, namespace, values, option_string=None):
        typed = getattr(parser, "typed", [])  # the strings argparse converted to ``values`` (set by _get_values)
        note(parser, self, values, option_string, _shown(typed, option_string),
             "{first} was given twice ({first_shown} and {second_shown}); give it once")
        super().__call__(parser, namespace, values, option_string)


class BooleanOnce(argparse.BooleanOptionalAction):
    """``--x`` / ``--no-x`` that refuses both in one command line (the last one won): ``--x --x`` stays harmless."""

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.option_strings:
            note(parser, self, not option_string.startswith("--no-"), option_string, option_string,
                 "{first} and {second} were both given; give one")
        super().__call__(parser, namespace, values, option_string)
