"""peft's trainable tokens as the load writes them: the trained rows of a weight, not a whole weight.

A file with ``trainable_token_indices`` holds ``token_adapter.trainable_tokens_delta (k, dim)``: the new values of
rows ``indices`` of an embedding ``(vocab, dim)`` (and of the output head tied to it). lorakit loads each such module
as a ``modules_to_save`` copy, made from the base module when the adapter is injected; the load then writes these
rows into it. Building the whole trained weight first (and moving it to the copy's device) held one more
``(vocab, dim)`` weight at the load's peak, for a change of ``k`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
