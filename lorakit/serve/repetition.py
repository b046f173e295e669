"""vLLM's ``repetition_detection``: end an answer once its last tokens are one n-gram repeated.

An answer stuck in a loop ("abcabcabc...", an emoji again and again) would run to max_tokens; with
``{"max_pattern_size": M, "min_pattern_size": m, "min_count": c}`` it ends (finish reason "stop") as soon as its
last ``s * c`` tokens are a pattern of ``s`` tokens said ``c`` times, for some ``s`` in ``[max(m, 1), M]``.

The answer's last ``s * c`` tokens are such a repetition exactly when each of its last ``s * (c - 1)`` tokens
equals the token ``s`` places before it. So each pattern size keeps a run length (how many tokens in a row have
matched the one ``s`` back), and a new token only touches the sizes at which it matches: the distances back to
its own earlier places within the last M tokens. A size it does not match had its run broken, which is read
lazily (a run counts only if it was extended at the token before). The check runs on the engine thread for every
token of the answer, so this keeps it to a few dict operations per token for text, not M.
"""

from __future__ import annotations


class RepetitionWatch:
    """One answer's check: :meth:`add` each new token; True once the answer ends in a repetition."""

    def __init__(self, max_size: int, min_size: int, count: int):
        self.most, self.least, self.count = max_size, max(min_size, 1), count
        self.position = -1  # the last token's place in the answer
        self.places: dict[int, list[int]] = {}  # token -> its places among the last max_size + 1 tokens
        # size -> (its run length, the place that extended it last): at most max_size entries
        self.runs: dict[int, tuple[int, int]] = {}

    def add(self, token: int) -> bool:
        self.position += 1
        here, found = self.position, False
        places = self.places.setdefault(token, [])
        while places and here - places[0] > self.most:  # too far back to start a pattern
            places.pop(0)
        for earlier in places:
            size = here - earlier
            if size < self.least:
                continue
            run, last = self.runs.get(size, (0, -2))
            run = run + 1 if last == here - 1 else 1
            self.runs[size] = (run, here)
            found = found or run >= size * (self.count - 1)
        places.append(here)
        return found
