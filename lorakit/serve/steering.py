"""An engine row's steering (``engine.Request.steer``): what restricts the next token as the answer goes, outside
its format's grammar (``structured.Constraint``): ``thinking_token_budget``'s forced end of the reasoning block
(``reasoning.ThinkBudget``) and allowed_tools' function names (``tool_names.NameGate``).

A steer has three methods, all called on the engine thread: ``allowed() -> tuple[int, ...] | None``, the tokens
the row may draw next (None: any), and ``refused() -> tuple[int, ...]``, tokens it may not draw (a few, where
listing those allowed would name most of the vocabulary), both asked before each token is chosen; and
``take(token)``, told each token the row drew (the forced ones too). Rows without a steer cost the engine nothing.
"""

from __future__ import annotations


class Steers:
    """Several steers of one row as one: the first that restricts the next token decides (a reasoning budget
    forces its marker inside the block, a name gate restricts names in the content after it: never both at once);
    every one is told each token."""

    def __init__(self, steers: list):
        self.steers = steers

    def allowed(self) -> tuple[int, ...] | None:
        for steer in self.steers:
            ids = steer.allowed()
            if ids is not None:
                return ids
        return None

    def refused(self) -> tuple[int, ...]:
        return tuple(token for steer in self.steers for token in steer.refused())

    def take(self, token: int) -> None:
        for steer in self.steers:
            steer.take(token)


def combined(*steers):
    """One row's steer from those given (None left out): None when there is none, the steer itself when one."""
    given = [steer for steer in steers if steer is not None]
    return None if not given else given[0] if len(given) == 1 else Steers(given)
