"""Token ids -> text while generating: incremental detokenization and OpenAI ``stop`` strings.

Text is emitted only when it is final: a trailing incomplete UTF-8 character (decoded as U+FFFD) is held back
until its next byte arrives, and so is any tail that could still grow into a stop string, so a streamed answer
never shows part of a stop string. Stop tokens (end of turn) are never part of the text.
"""

from __future__ import annotations

import threading


class TextAssembler:
    """Collects a request's tokens; ``add`` returns the newly final text, ``finish`` whatever remains."""

    def __init__(self, tokenizer, stops: list[str], stop_token_ids: tuple[int, ...], lock: threading.Lock | None = None):
        self.tokenizer = tokenizer
        self.stops = list(stops or [])
        self.stop_token_ids = set(stop_token_ids)
        self.lock = lock or threading.Lock()
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def _decode(self) -> str:
        with self.lock:
            return self.tokenizer.decode(self.ids, skip_special_tokens=True)

    def add(self, token: int) -> str:
        if self.stopped or token in self.stop_token_ids:
            return ""
        self.ids.append(token)
        self.text = self._decode()
        if self.text.endswith("\ufffd"):
            return ""
        if self.stops:
            window = max(0, self.emitted - max(len(s) for s in self.stops))
            hits = [i for i in (self.text.find(s, window) for s in self.stops) if i >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[:min(hits)]
                return self._emit(len(self.text))
            return self._emit(len(self.text) - self._held_back())
        return self._emit(len(self.text))

    def finish(self) -> str:
        return self._emit(len(self.text))

    def _held_back(self) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        longest = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.text)), longest, -1):
                if self.text.endswith(stop[:size]):
                    longest = size
                    break
        return longest

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
