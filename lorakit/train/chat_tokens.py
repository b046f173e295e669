"""Token ids of the examples a chat trains as one per assistant turn, tokenizing the text they share once.

A chat whose template rewrites earlier turns (:mod:`lorakit.train.chat_turns`) trains as one example per assistant
turn, each the chat up to that turn: turn t's example shares all but its end with turn t - 1's. Tokenizing each
alone was O(n^2) in the chat's messages (a 1,001-message Qwen3 chat: 500 examples, 6.2 million tokens, ~45 of the
51 s it took with its renders made linear). Here each example reuses the tokens of the one before up to the last
special token (``<|im_start|>``, ``[INST]``...) that lies within the text the two share, and tokenizes the rest.

Why that is the same as tokenizing the example alone: a fast (``tokenizers``) tokenizer first splits the text at its
added tokens and then tokenizes each piece by itself, so the tokens before a special token do not depend on what
follows it. That is checked, not assumed: the rest must start with that special token spanning the same characters,
the offsets must stay in order, and :data:`SPOTS` examples spread over the chat (the last among them; the first is
tokenized alone anyway) are tokenized alone too and must give the same ids; otherwise None (each example is then
tokenized alone).
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from lorakit.train.chat_rewrites import common_prefix_length

MIN_EXAMPLES = 4  # fewer examples: each tokenized alone (little is shared)
SPOTS = 3  # examples also tokenized alone, to check the shared tokens

Span = tuple[int, int]


def token_ranges(starts: list[int], ends: list[int], spans: Sequence[Span], count: int) -> list[Span]:
    """Per character span ``[start, end)``, the ``[a, b)`` range of the tokens overlapping it, found by bisection of
    offsets in text order (``(count, count)`` when none does): those ending after its start and starting before its
    end."""
    ranges = []
    for start, end in spans:
        first, stop = bisect.bisect_right(ends, start), bisect.bisect_left(starts, end)
        ranges.append((first, stop) if first < stop else (count, count))
    return ranges


def shared_tokens(examples: Sequence[tuple[str, Sequence[Span]]], tokenizer: Any
                  ) -> list[tuple[list[int], list[Span]]] | None:
    """``(ids, token ranges of the spans)`` of each example ``(text, character spans)``, as ``_tokenize_with_spans``
    gives them for a fast tokenizer, for examples that each share most of the one before; None when there are few
    examples or a check fails (see the module docstring)."""
    if len(examples) < MIN_EXAMPLES:
        return None
    specials = _special_ids(tokenizer)
    spots = {len(examples) * s // SPOTS for s in range(1, SPOTS)} | {len(examples) - 1}
    out = []
    before = ""
    ids: list[int] = []
    starts: list[int] = []
    ends: list[int] = []
    cuts: list[int] = []  # indices of the special tokens in ids, ascending
    cut_ends: list[int] = []  # where each ends in the text (ascending too)
    for t, (text, spans) in enumerate(examples):
        c = bisect.bisect_right(cut_ends, common_prefix_length(before, text)) - 1 if t else -1
        k, at = (cuts[c], starts[cuts[c]]) if c >= 0 else (0, 0)  # reuse ids[:k], tokenize text[at:]
        tail_ids, tail_starts, tail_ends = _encode(text[at:], tokenizer, at)
        if c >= 0 and (not tail_ids or tail_ids[0] != ids[k] or (tail_starts[0], tail_ends[0]) != (at, ends[k])):
            return None
        if any(b < a for a, b in zip(tail_starts, tail_starts[1:])) or \
                any(b < a for a, b in zip(tail_ends, tail_ends[1:])):
            return None  # offsets out of order (no tokenizer we met): _tokenize_with_spans scans them, per example
        ids = ids[:k]  # a list of its own per example (they are returned); the offsets and cuts are edited in place
        ids += tail_ids  # (copying them too took most of the time: 25 million tokens for a 2,001-message chat)
        for kept, tail in ((starts, tail_starts), (ends, tail_ends)):
            del kept[k:]
            kept += tail
        del cuts[max(c, 0):], cut_ends[max(c, 0):]
        for m, token in enumerate(tail_ids, k):
            if token in specials:
                cuts.append(m)
                cut_ends.append(ends[m])
        if t in spots and tokenizer(text, add_special_tokens=False)["input_ids"] != ids:  # (ids alone: offsets took
            return None  # 2/3 of the time, and are those of the same tokens of the same characters)
        out.append((ids, token_ranges(starts, ends, spans, len(ids))))
        before = text
    return out


def _special_ids(tokenizer: Any) -> set[int]:
    """The ids of the tokenizer's special tokens: its named ones and every added token marked special (Qwen's
    ``<|im_start|>``, Mistral's ``[INST]`` are not among ``all_special_ids`` unless the config lists them)."""
    ids = set(getattr(tokenizer, "all_special_ids", ()) or ())
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    return ids | {i for i, token in added.items() if getattr(token, "special", False)}


def _encode(text: str, tokenizer: Any, shift: int) -> tuple[list[int], list[int], list[int]]:
    """``text``'s ids and the start and end offsets of its tokens, as _tokenize_with_spans tokenizes it, the offsets
    moved by ``shift`` characters."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    return list(enc["input_ids"]), [s + shift for s, _ in offsets], [e + shift for _, e in offsets]
