"""vLLM's ``repetition_detection``: end an answer once its last tokens are one n-gram repeated.

An answer stuck in a loop ("abcabcabc...", an emoji again and again) would run to max_tokens; with
``{"max_pattern_size": M, "min_pattern_size": m, "min_count": c}`` it ends (finish reason "stop") as soon as its
last ``s * c`` tokens are a pattern of ``s`` tokens said ``c`` times, for some ``s`` in ``[max(m, 1), M]``.

The answer's last ``s * c`` tokens are such a repetition exactly when each of its last ``s * (c - 1)`` tokens
equals the token ``s`` places before it, so one run length per pattern size, updated per token, answers it:
O(M) work per token, whatever ``c``.
"""

from __future__ import annotations


class RepetitionWatch:
    """One answer's check: :meth:`add` each new token; True once the answer ends in a repetition."""

    def __init__(self, max_size: int, min_size: int, count: int):
        self.sizes = range(max(min_size, 1), max_size + 1)
        self.count = count
        self.tokens: list[int] = []
        self.runs = [0] * (max_size + 1)  # runs[s]: how many last tokens equal the token s places before them

    def add(self, token: int) -> bool:
        tokens = self.tokens
        tokens.append(token)
        found = False
        for size in self.sizes:
            if len(tokens) > size and tokens[-1] == tokens[-1 - size]:
                self.runs[size] += 1
                found = found or self.runs[size] >= size * (self.count - 1)
            else:
                self.runs[size] = 0
        if len(tokens) > 4 * self.sizes.stop:  # only the last max_size tokens are ever looked back to
            del tokens[:-self.sizes.stop]
        return found
