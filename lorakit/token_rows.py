"""peft's trainable tokens as the load writes them: the trained rows of a weight, not a whole weight.

A file with ``trainable_token_indices`` holds ``token_adapter.trainable_tokens_delta (k, dim)``: the new values of
rows ``indices`` of an embedding ``(vocab, dim)`` (and of the output head tied to it). lorakit loads each such module
as a ``modules_to_save`` copy, made from the base module when the adapter is injected; the load then writes these
rows into it. Building the whole trained weight first (and moving it to the copy's device) held one more
``(vocab, dim)`` weight at the load's peak, for a change of ``k`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from lorakit.config import shown
from lorakit.errors import LorakitError

# the key suffix of the rows in a LoRA file with trainable_token_indices (peft's TrainableTokens method saves the
# same rows as ``<path>.trainable_tokens_delta``: ``lorakit.trainable_tokens`` renames them to this)
TOKEN_DELTA = ".token_adapter.trainable_tokens_delta"


@dataclass(frozen=True)
class TokenRows:
    """Rows ``indices (k,)`` of a weight of ``shape (vocab, dim)`` set to ``rows (k, dim)``."""

    indices: torch.Tensor
    rows: torch.Tensor
    shape: tuple[int, int]  # the whole weight's (what the load's shape check compares with the module's)

    def write(self, weight: torch.Tensor) -> None:
        """Set the rows in ``weight`` (a copy of the base weight), in its dtype and on its device; the other rows,
        the base's, are left as they are. Call it under ``torch.no_grad()`` for a parameter."""
        weight[self.indices.to(weight.device)] = self.rows.to(device=weight.device, dtype=weight.dtype)


def check_indices(tokens: Any, where: str, field: str, maps: bool = True) -> None:
    """Refuse a config's token ids (``field``: a list of ids, or with ``maps`` a map from embedding names to such
    lists) that are not distinct non-negative integers, in one line starting with ``where``."""
    twice = _listed_twice(list(tokens.values()) if isinstance(tokens, dict) else [tokens])
    if twice is not None:  # peft makes it, and index_copy writes one of the rows: which one, torch leaves open
        raise LorakitError(f"{where}: {field} lists token id {twice} more than once; peft writes each entry's trained "
                           "row into that one row, and which write wins is undefined (torch's index_copy), so the "
                           "adapter has no one value there: train it again with each id listed once")
    if not (_is_index_list(tokens) or (maps and isinstance(tokens, dict) and tokens and all(
            isinstance(k, str) and k and _is_index_list(v) for k, v in tokens.items()))):
        raise LorakitError(f"{where}: {field} must be a list of token ids"
                           f"{' or a map from embedding names to such lists' if maps else ''}, got {shown(tokens)}")


def _is_index_list(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value) and len(set(value)) == len(value)


def _listed_twice(lists: list[Any]) -> int | None:
    """The first token id that one of ``lists`` names twice (a set per list: a file may list thousands), else None."""
    for ids in lists:
        seen: set[int] = set()
        for i in ids if isinstance(ids, list) else ():
            if isinstance(i, int) and not isinstance(i, bool):
                if i in seen:
                    return i
                seen.add(i)
    return None
