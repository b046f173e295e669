"""Token ids -> text while generating: incremental detokenization and OpenAI ``stop`` strings.

Text is emitted only when it is final: a trailing incomplete UTF-8 character (decoded as U+FFFD) is held back
until its next byte arrives, and so is any tail that could still grow into a stop string, so a streamed answer
never shows part of a stop string. Stop tokens (end of turn) are never part of the text.

``settled`` says how many of the tokens have text in the answer so far: their logprobs can be sent. The tokens
of a stop string (and any after it) never have: the answer's logprobs end where its text does.
"""

from __future__ import annotations

import bisect
import functools
import re
import threading


class TextAssembler:
    """Collects a request's tokens; ``add`` returns the newly final text, ``finish`` whatever remains."""

    def __init__(self, tokenizer, stops: list[str], stop_token_ids: tuple[int, ...], lock: threading.Lock | None = None,
                 keep: frozenset[int] = frozenset(), include_stop: bool = False, skip_special: bool = True,
                 spaces: bool = True, min_tokens: int = 0):
        """``keep``: special tokens whose text stays in the answer (a template's ``<tool_call>`` where the
        tokenizer marks it special, as Hermes models do: the tool-call parser must see it). vLLM's text options:
        ``include_stop`` (a matched stop string stays at the end of the text), ``skip_special`` (False: every
        special token's text stays), ``spaces`` (its spaces_between_special_tokens, given to decode), and
        ``min_tokens`` (a stop string must end after the text of that many tokens)."""
        self.tokenizer = tokenizer
        self.stops = list(stops or [])
        self.stop_token_ids = set(stop_token_ids)
        self.lock = lock or threading.Lock()
        self.keep = keep
        self.include_stop, self.skip_special, self.min_tokens = include_stop, skip_special, min_tokens
        self.decode_options = {} if spaces else {"spaces_between_special_tokens": False}
        self.guard = 0  # where the text of the first min_tokens tokens ends: no stop string ends before it
        self.skipped = special_ids(tokenizer) - keep if keep else frozenset()
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False
        # per token given to add (end-of-turn ones too): where its text begins in self.text. Nondecreasing; a token
        # that completes a character split over tokens begins where that character does (U+FFFD tail dropped)
        self.starts: list[int] = []

    def _decode(self) -> str:
        with self.lock:
            if not self.skip_special:
                return self.tokenizer.decode(self.ids, skip_special_tokens=False, **self.decode_options)
            if self.keep:  # the other special tokens removed by hand, these decoded as their text
                return self.tokenizer.decode([i for i in self.ids if i not in self.skipped], skip_special_tokens=False,
                                             **self.decode_options)
            return self.tokenizer.decode(self.ids, skip_special_tokens=True, **self.decode_options)

    def add(self, token: int) -> str:
        if self.stopped:
            return ""
        self.starts.append(len(self.text.rstrip("\ufffd")))
        if token in self.stop_token_ids:
            return ""
        self.ids.append(token)
        self.text = self._decode()
        if self.stops:
            # looked for before a trailing partial character is held: a token that completes a stop string and
            # starts a character (byte-level BPE's "c" + a lead byte) must stop the answer now, not when the
            # character is whole, which never comes if the answer ends there (max_tokens)
            complete = self.text.rstrip("\ufffd")
            window = max(0, self.emitted - max(len(s) for s in self.stops))
            if len(self.starts) <= self.min_tokens:
                self.guard = len(complete)
            hits = [(i, len(s)) for i, s in ((complete.find(s, max(window, self.guard - len(s) + 1)), s)
                                             for s in self.stops) if i >= 0]
            if hits and len(self.starts) > self.min_tokens:
                self.stopped = True
                first, size = min(hits)
                self.text = self.text[:first + (size if self.include_stop else 0)]
                return self._emit(len(self.text))
        if self.text.endswith("\ufffd"):
            return ""
        if self.stops:
            return self._emit(len(self.text) - max(held_prefix(self.text, stop) for stop in self.stops))
        return self._emit(len(self.text))

    def finish(self) -> str:
        return self._emit(len(self.text))

    def settled(self, final: bool = False) -> int:
        """How many tokens (of those given to ``add``, in order) begin inside the text emitted so far; ``final``
        (after ``finish``): every token, but for a stop string's tokens and any after them (the text ends before
        them, and so do the logprobs: OpenAI's ``bytes`` of the tokens rebuild the text, ``text_offset`` stays in
        it)."""
        if final and not self.stopped:
            return len(self.starts)
        return bisect.bisect_left(self.starts, len(self.text) if final else self.emitted)

    def _emit(self, end: int) -> str:
        end = max(end, self.emitted)
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta


def held_prefix(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker`` (0: none): what a stream holds
    back, as the next tokens may complete the marker (a stop string, a reasoning block's end, a tool call's start)."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def special_ids(tokenizer) -> frozenset[int]:
    """The ids ``decode(..., skip_special_tokens=True)`` drops: the named special tokens and added tokens marked
    special."""
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return frozenset(tokenizer.all_special_ids) | frozenset(int(i) for i, t in added.items()
                                                              if getattr(t, "special", False))


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte fallback tokens


@functools.lru_cache(maxsize=1)
def _byte_level_table() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the character a token string uses for each byte -> the byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[chr(byte)] = byte
        else:
            table[chr(256 + extra)] = byte
            extra += 1
    return table


def token_bytes(tokenizer, token_id: int) -> bytes:
    """The raw bytes of one token: what OpenAI's logprobs ``bytes`` field holds.

    Decoding a single token loses its bytes when it holds part of a UTF-8 character (it decodes to U+FFFD), so
    a client that joins the ``bytes`` of every token to rebuild the text needs the token's own bytes: byte-level
    BPE (GPT-2, Llama 3, Qwen, SmolLM) spells each byte as one character of a fixed alphabet, SentencePiece
    spells a lone byte ``<0xE2>`` and a space ``▁``. Special tokens are their text.
    """
    token_id = int(token_id)
    piece = tokenizer.convert_ids_to_tokens(token_id)
    if not isinstance(piece, str):
        return tokenizer.decode([token_id]).encode("utf-8")
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    if token_id in (getattr(tokenizer, "added_tokens_decoder", None) or {}):
        return tokenizer.decode([token_id]).encode("utf-8")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and type(backend.decoder).__name__ == "ByteLevel":
        table = _byte_level_table()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    if "\u2581" in piece:
        return piece.replace("\u2581", " ").encode("utf-8")
    return tokenizer.decode([token_id]).encode("utf-8")
