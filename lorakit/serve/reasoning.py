"""Reasoning models' ``<think>...</think>`` block, split from the answer (what vLLM serves with
``--reasoning-parser deepseek_r1`` / ``qwen3``).

Qwen3, DeepSeek-R1 (and its distills) and QwQ write their reasoning first, inside ``<think>`` ... ``</think>``,
then the answer. The server returns the reasoning as ``message.reasoning_content`` (streamed as
``delta.reasoning_content``; a ``reasoning`` output item on ``/v1/responses``) and only the rest as ``content``, so
a client that shows ``content`` shows the answer, and a tool call written after the reasoning is parsed from the
rest (``tool_calls.py``).

Where the answer starts is read from the prompt, which is what the model continues:

- the prompt ends by opening ``<think>`` (DeepSeek-R1's and QwQ's generation prompt ``<think>\\n``): the answer
  starts inside the block, with no opening tag of its own (one it writes anyway is dropped, as vLLM drops it);
- the prompt ends with a closed block (Qwen3 with ``{"enable_thinking": false}`` writes ``<think>\\n\\n</think>\\n\\n``
  into it): there is no reasoning, all is content;
- otherwise (Qwen3's thinking mode): a block is reasoning only where the answer begins with ``<think>`` (after
  whitespace); an answer that begins otherwise is all content.

An answer that ends inside the block (``max_tokens`` reached while thinking) is all reasoning, its content None,
as vLLM answers. The reasoning is returned without the whitespace around it and the content without the
whitespace the template puts after ``</think>`` (the Qwen3 template strips both when it renders the turn again).
"""

from __future__ import annotations

from typing import Any

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
PARSERS = ("auto", "none", "deepseek_r1", "qwen3")  # --reasoning-parser; the named ones are vLLM's, one parser here


def template_thinks(tokenizer: Any) -> bool:
    """Whether the tokenizer's chat template writes ``<think>`` blocks (Qwen3, DeepSeek-R1, QwQ): what
    ``--reasoning-parser auto`` turns the parser on for."""
    from lorakit.serve.tool_calls import template_text

    return THINK_OPEN in template_text(tokenizer, None) or THINK_OPEN in template_text(tokenizer, [{}])


def parser_enabled(tokenizer: Any, choice: str) -> bool:
    """``--reasoning-parser``'s value -> whether answers are split: "auto" where the template thinks, "none"
    never, a vLLM parser name (deepseek_r1, qwen3) always."""
    if choice not in PARSERS:
        from lorakit.errors import LorakitError

        raise LorakitError(f"--reasoning-parser {choice!r} is not one of {', '.join(PARSERS)}")
    return template_thinks(tokenizer) if choice == "auto" else choice != "none"


def prompt_state(prompt_tail: str) -> str:
    """Where an answer to a prompt ending in ``prompt_tail`` (its last few tokens as text) starts: "inside" an
    open ``<think>`` block, "closed" (the prompt holds the whole block: no reasoning follows), or "start"."""
    tail = prompt_tail.rstrip()
    if tail.endswith(THINK_OPEN):
        return "inside"
    if tail.endswith(THINK_CLOSE):
        return "closed"
    return "start"


def think_tokens(tokenizer: Any) -> frozenset[int]:
    """The ``<think>`` / ``</think>`` tokens a tokenizer marks special: decoding skips special tokens, so they are
    kept in the answer's text for the parser to see (Qwen3's and R1's are plain added tokens, which it keeps)."""
    from lorakit.serve.text import special_ids

    special = special_ids(tokenizer)
    vocab = tokenizer.get_vocab()
    return frozenset(vocab[t] for t in (THINK_OPEN, THINK_CLOSE) if t in vocab and vocab[t] in special)


class ReasoningStream:
    """One answer's text, fed piece by piece (each engine event's newly final text), split into reasoning and
    content as it comes.

    :meth:`feed` returns the ``(reasoning, content)`` text that is final now; a tail that may still grow into
    ``</think>`` (or, at the start, into ``<think>``) and whitespace that may end the reasoning are held until the
    next piece shows what they are, so tags split over pieces never leak. Fed whole and finished, it gives the
    non-streamed split; the streamed pieces always add up to it.
    """

    def __init__(self, state: str = "start"):
        """``state``: :func:`prompt_state` of the prompt ("inside", "closed" or "start")."""
        self.text = ""
        self.phase = {"inside": "start", "closed": "content", "start": "start"}[state]
        self.inside = self.had_block = state == "inside"
        self.reasoning_sent = self.content_sent = 0  # indices into text up to which each was returned
        self.reasoning_started = self.content_started = False
        self.searched = 0  # where the search for </think> resumes
        self.reasoning, self.content = "", ""
        self.feeds = 0
        self.reasoning_feeds = 0  # pieces (engine tokens) up to the one that closed the block: reasoning tokens

    @classmethod
    def of(cls, pieces: list[str], state: str) -> "ReasoningStream":
        """The split of a whole answer collected as engine pieces (one per token, then the final text)."""
        stream = cls(state)
        for piece in pieces[:-1]:
            stream.feed(piece)
        stream.finish(pieces[-1] if pieces else "")
        return stream

    @property
    def reasoning_tokens(self) -> int:
        """Tokens of the answer up to the end of its reasoning (``</think>`` included); 0 without a block."""
        return self.reasoning_feeds if self.had_block else 0

    @property
    def finished_thinking(self) -> bool:
        """Whether the answer has left the reasoning (or never had any)."""
        return self.phase == "content"

    def feed(self, piece: str) -> tuple[str, str]:
        self.feeds += 1
        self.text += piece
        return self._advance(final=False)

    def finish(self, last: str = "") -> tuple[str, str]:
        """The rest once the answer has ended, ``last`` being its final text (not a token of its own)."""
        self.text += last
        return self._advance(final=True)

    def result(self) -> tuple[str | None, str | None]:
        """``(reasoning or None, content)`` of the finished answer; content None when it never left the block."""
        return self.reasoning or None, (self.content if self.phase == "content" else None)

    # -- the state machine -----------------------------------------------------------------------------------------
    def _advance(self, final: bool) -> tuple[str, str]:
        text = self.text
        reasoning = content = ""
        if self.phase == "start":
            stripped = text.lstrip()
            if stripped.startswith(THINK_OPEN):
                self.phase, self.had_block = "reasoning", True
                self.reasoning_sent = self.searched = len(text) - len(stripped) + len(THINK_OPEN)
            elif THINK_OPEN.startswith(stripped) and not final:  # "" or "<thi": not known yet
                return "", ""
            elif self.inside:  # the prompt opened the block: this is its text
                self.phase = "reasoning"
            else:
                self.phase = "content"
        if self.phase == "reasoning":
            close = text.find(THINK_CLOSE, self.searched)
            if close >= 0:
                end, self.phase = close, "content"
                self.content_sent = close + len(THINK_CLOSE)
                self.reasoning_feeds = self.feeds
            else:
                self.searched = max(self.searched, len(text) - len(THINK_CLOSE) + 1)
                end = len(text) if final else len(text) - _partial(text, THINK_CLOSE)
            reasoning = self._take_reasoning(end)
            if self.phase == "reasoning":
                if final:
                    self.reasoning_feeds = self.feeds
                return reasoning, ""
        content = self._take_content()
        return reasoning, content

    def _take_reasoning(self, end: int) -> str:
        text = self.text
        start = self.reasoning_sent
        if not self.reasoning_started:  # whitespace after <think> is not reasoning
            while start < end and text[start].isspace():
                start += 1
            self.reasoning_sent = start
        while end > start and text[end - 1].isspace():  # nor is whitespace before </think> (held until known)
            end -= 1
        if end <= start:
            return ""
        self.reasoning_started = True
        out, self.reasoning_sent = text[start:end], end
        self.reasoning += out
        return out

    def _take_content(self) -> str:
        text = self.text
        start = self.content_sent
        if not self.content_started:  # whitespace after </think> (or before the answer) is not content
            while start < len(text) and text[start].isspace():
                start += 1
            self.content_sent = start
            if start == len(text):
                return ""
            self.content_started = True
        out, self.content_sent = text[start:], len(text)
        self.content += out
        return out


def _partial(text: str, marker: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return size
    return 0


def split_reasoning(text: str, state: str = "start") -> tuple[str | None, str | None]:
    """A whole answer -> ``(reasoning or None, content)`` (content None: it never left the block)."""
    stream = ReasoningStream(state)
    stream.feed(text)
    stream.finish()
    return stream.result()
