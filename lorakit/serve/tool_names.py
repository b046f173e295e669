"""OpenAI's ``allowed_tools`` tool_choice: the answer may call only some of the request's tools, while all of them
stay in the prompt (so a client that narrows the choice turn by turn keeps its prompt, and its cache, unchanged).

The call's function name is restricted as the model writes it (:class:`NameGate`, an engine row's steering:
``engine.Request.steer``): once the answer reaches the point where the template's call format writes the name
(``<tool_call>`` then ``{"name": "`` for hermes, the answer's start ``{"name": "`` for Llama 3.1's JSON,
``[TOOL_CALLS] [{"name": "`` for Mistral v0.3, ``[TOOL_CALLS]`` for newer Mistral tokenizers), only tokens that
keep the text on the way to an allowed name followed by its end (``"``, or ``[ARGS]`` / ``[CALL_ID]``) may be
drawn; a token that completes the name and goes on (``",``) is one of them. A token that finishes the head and
goes on into the name (SentencePiece tokens such as `` "get_weather",``) is refused unless that name is allowed.
The rest of the answer is the model's.
With allowed_tools "required" the prompt ends with the call's start (``tool_calls.forced_prefix``), so the name is
restricted from the first token.

What the gate does not see is checked after: calls are read (``tool_calls.parse_calls``) with the allowed names
only, so a call written another way (a name after the arguments, a second Mistral v0.3 call in its list) that names
another tool is not returned as a call, and its text stays content; under "required" it is the error of a forced
call the model did not write. Calls inside the reasoning block are never restricted (the gate looks at the content
only: ``reasoning.content_start``).

Tokens are matched by their text, read once per tokenizer (:class:`TokenTexts`).
"""

from __future__ import annotations

import bisect
import collections
import re
import threading
from typing import Any

from lorakit.serve.reasoning import AnswerStart, content_start
from lorakit.serve.tool_calls import ARGS_MARK, CALL_ID_MARK

_NAME_KEY = r'\{\s*"name"\s*:\s*"'
# where a call's name begins, per call format, in the content (a match ends where the name begins); Llama 3.1's
# calls are the whole content, joined by ";"
HEADS = {
    "hermes": re.compile(r"<tool_call>\s*" + _NAME_KEY),
    "llama3_json": re.compile(r"(?:\A|;)\s*" + _NAME_KEY),
    "mistral": re.compile(r"\[TOOL_CALLS\]\s*\[\s*" + _NAME_KEY),
    "mistral_args": re.compile(r"\[TOOL_CALLS\]"),
    "mistral_call_id": re.compile(r"\[TOOL_CALLS\]"),
}
# each head as the template writes it, (its marker, the rest up to the name): a SentencePiece token (Mistral v0.3)
# may finish the head and go on into the name (' "get_time",'); where the content ends with the marker and part of
# the rest, such tokens are held to the allowed names too. Llama 3.1's head has no marker: its calls are the whole
# content, so only the content's start is such a place
WRITTEN_HEADS = {"hermes": ("<tool_call>", '\n{"name": "'), "llama3_json": ("", '{"name": "'),
                 "mistral": ("[TOOL_CALLS]", ' [{"name": "'), "mistral_args": ("[TOOL_CALLS]", ""),
                 "mistral_call_id": ("[TOOL_CALLS]", "")}
# what ends a name, per format
NAME_ENDS = {"hermes": ('"',), "llama3_json": ('"',), "mistral": ('"',), "mistral_args": (ARGS_MARK, CALL_ID_MARK),
             "mistral_call_id": (CALL_ID_MARK, ARGS_MARK)}
WINDOW = 96  # characters before the newest token where a head is looked for (a head is some 20)
SLICE = 16384  # tokens decoded per hold of the tokenizer's lock while a vocabulary is read


class TokenTexts:
    """Each token's text as it reads after another token (``decode([anchor, t])`` less the anchor's: a
    SentencePiece token's leading space is kept, which decoding it alone drops), special tokens included.
    ``prefixes(s)``: the tokens whose text is a non-empty prefix of ``s``; ``starting(s)``: those whose text begins
    with ``s``."""

    def __init__(self, tokenizer: Any, size: int, lock: threading.Lock | None = None):
        """``size``: the ids to read (the model's rows the tokenizer knows); ``lock``: held while the tokenizer
        runs, a slice of the vocabulary at a time, so other requests' text goes on between slices."""
        lock = lock or threading.Lock()
        with lock:
            anchor = tokenizer("a", add_special_tokens=False)["input_ids"][-1:]
        backend = getattr(tokenizer, "backend_tokenizer", None)

        def decode(pairs: list[list[int]]) -> list[str]:
            with lock:
                if backend is not None:  # the Rust tokenizer decodes a batch in parallel: ~1 s for 150k tokens
                    return backend.decode_batch(pairs, skip_special_tokens=False)
                return [tokenizer.decode(pair, skip_special_tokens=False, clean_up_tokenization_spaces=False)
                        for pair in pairs]

        lead = decode([anchor])[0] if anchor else ""
        both = [text for start in range(0, size, SLICE)
                for text in decode([anchor + [token] for token in range(start, min(size, start + SLICE))])]
        self.texts = [text[len(lead):] if text.startswith(lead) else text for text in both]
        self.by_text: dict[str, list[int]] = collections.defaultdict(list)
        for token, text in enumerate(self.texts):
            if text:
                self.by_text[text].append(token)
        self.sorted = sorted(self.by_text)

    def prefixes(self, s: str) -> list[int]:
        return [token for k in range(1, len(s) + 1) for token in self.by_text.get(s[:k], ())]

    def starting(self, s: str) -> list[int]:
        at = bisect.bisect_left(self.sorted, s)
        out = []
        while at < len(self.sorted) and self.sorted[at].startswith(s):
            out += self.by_text[self.sorted[at]]
            at += 1
        return out


_TABLES: "collections.OrderedDict[int, tuple[Any, TokenTexts]]" = collections.OrderedDict()
_TABLES_LOCK = threading.Lock()
TABLE_CACHE = 4  # tokenizers (the base's, adapters' own) whose tables are kept


def token_texts(tokenizer: Any, size: int, lock: threading.Lock | None = None) -> TokenTexts:
    """The :class:`TokenTexts` of ``tokenizer`` over ids below ``size``, built once (``lock``: held while the
    tokenizer runs) and kept with the tokenizer, so an id reused by another tokenizer never finds it."""
    key = id(tokenizer)
    with _TABLES_LOCK:
        held = _TABLES.get(key)
        if held is not None and held[0] is tokenizer and len(held[1].texts) == size:
            _TABLES.move_to_end(key)
            return held[1]
    table = TokenTexts(tokenizer, size, lock)
    with _TABLES_LOCK:
        _TABLES[key] = (tokenizer, table)
        while len(_TABLES) > TABLE_CACHE:
            _TABLES.popitem(last=False)
    return table


class NameGate:
    """One answer's restriction of its calls' function names to ``names`` (see the module docstring): an engine
    row's steering, :meth:`allowed` and :meth:`refused` before each token, :meth:`take` after it.

    ``fmt``: the template's call format (``tool_calls.call_format``); ``forced``: the prompt ends with a call's
    start (allowed_tools "required"), so the answer begins with the name; ``start``: where the answer began against
    the reasoning block (calls are restricted in the content only)."""

    def __init__(self, table: TokenTexts, fmt: str, names: list[str], forced: bool = False,
                 start: AnswerStart | None = None):
        self.table, self.start = table, start
        self.heads, self.written_head = HEADS[fmt], WRITTEN_HEADS[fmt]
        self.names = [name + end for name in names for end in NAME_ENDS[fmt]]  # what the gate lets through
        self.text = ""  # the content so far (the reasoning before it is dropped once it ends)
        self.in_content = forced
        self.opened: int | None = 0 if forced else None  # where the name being written begins (None: no gate)
        self.scanned = 0  # heads are looked for from here on
        self.cached: tuple[str, tuple[int, ...] | None] | None = None  # allowed(), by the name written so far
        self.refusing: tuple[str, tuple[int, ...]] | None = None  # refused(), by the content's last characters

    def allowed(self) -> tuple[int, ...] | None:
        """The tokens that keep the name being written on the way to an allowed one (None: no name is being
        written, or no token can continue it)."""
        if self.opened is None:
            return None
        written = self.text[self.opened:]
        if self.cached is None or self.cached[0] != written:
            ids: set[int] = set()
            for name in self.names:
                if name.startswith(written):
                    rest = name[len(written):]
                    ids.update(self.table.prefixes(rest))
                    ids.update(self.table.starting(rest))
            self.cached = (written, tuple(sorted(ids)) or None)
        return self.cached[1]

    def refused(self) -> tuple[int, ...]:
        """Where the content ends with part of a call's head (as the template writes it), the tokens that would
        finish the head and go on with text on the way to no allowed name; () elsewhere."""
        if self.opened is not None or not self.in_content:
            return ()
        marker, rest = self.written_head
        tail = self.text[-(len(marker) + len(rest)):]
        if self.refusing is not None and self.refusing[0] == tail:
            return self.refusing[1]
        finishes = [rest[j:] for j in range(len(rest))  # the content ends with the marker and rest[:j]
                    if (marker and self.text.endswith(marker + rest[:j])) or
                    (not marker and self.scanned == 0 and self.text.lstrip() == rest[:j])]
        refused = tuple(sorted({token for finish in finishes for token in self.table.starting(finish)
                                if not self._on_the_way(self.table.texts[token][len(finish):])}))
        self.refusing = (tail, refused)
        return refused

    def _on_the_way(self, written: str) -> bool:
        """Whether a name that begins with ``written`` can still become an allowed one with its end ("": yes)."""
        return any(name.startswith(written) or written.startswith(name) for name in self.names)

    def take(self, token: int) -> None:
        piece = self.table.texts[token] if token < len(self.table.texts) else ""
        self.text += piece
        if not self.in_content:
            start = content_start(self.text, self.start)
            if start is None:
                return
            self.text, self.in_content = self.text[start:], True
        if self.opened is None:
            head = self.heads.search(self.text, max(self.scanned, len(self.text) - len(piece) - WINDOW))
            if head is None:
                return
            self.opened = self.scanned = head.end()
        written = self.text[self.opened:]
        done = next((name for name in self.names if written.startswith(name)), None)
        if done is not None:  # the name and its end are written: the rest of the call is the model's
            self.opened, self.scanned = None, self.opened + len(done)
        elif not any(name.startswith(written) for name in self.names):
            self.opened, self.scanned = None, len(self.text)  # written before the gate could act (read after)
