"""Reasoning models' thinking block, split from the answer (what vLLM serves with ``--reasoning-parser
deepseek_r1`` / ``qwen3`` / ``mistral``).

Two markings, each a :class:`ReasoningParser` (its markers are a property of the parser, not of this module):

- ``<think>`` ... ``</think>``: Qwen3, DeepSeek-R1 (and its distills), QwQ, Magistral-Small-2506 (plain text there);
- ``[THINK]`` ... ``[/THINK]``: Magistral-Small-2507 / 2509 and the Ministral 3 reasoning models (special tokens of
  the newer tekken tokenizers). Their chat templates write ``[THINK]`` into the prompt only inside a system
  message (the default system prompt describes the format; a system message's ``thinking`` chunk), and the
  generation prompt ends at ``[/INST]``: the model opens the block itself, as vLLM's mistral parser expects.

The reasoning model writes its reasoning first, inside the block, then the answer. The server returns the
reasoning as ``message.reasoning_content`` (streamed as ``delta.reasoning_content``; a ``reasoning`` output item on
``/v1/responses``) and only the rest as ``content``, so a client that shows ``content`` shows the answer, and a
tool call written after the reasoning is parsed from the rest (``tool_calls.py``).

Each model has its parser: the base's, and an adapter folder's own template its own (``model_text.py``; ``auto``
reads each template).

Where the answer starts is read from the prompt, which is what the model continues (:meth:`ReasoningParser.start`):

- the prompt ends by opening the block (DeepSeek-R1's and QwQ's generation prompt ``<think>\\n``): the answer
  starts inside the block, with no opening marker of its own (one it writes anyway is dropped, as vLLM drops it);
- the prompt ends with a closed block (Qwen3 with ``{"enable_thinking": false}`` writes ``<think>\\n\\n</think>\\n\\n``
  into it): there is no reasoning, all is content;
- otherwise (Qwen3's thinking mode, Magistral): a block is reasoning only where the answer begins with the opening
  marker (after whitespace); an answer that begins otherwise is all content.

An answer that ends inside the block (``max_tokens`` reached while thinking) is all reasoning, its content None,
as vLLM answers. The reasoning is returned without the whitespace around it and the content without the
whitespace the template puts after the closing marker (the Qwen3 template strips both when it renders the turn
again).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from lorakit.serve.text import held_prefix


@dataclass(frozen=True)
class ReasoningParser:
    """One marking of the reasoning block: ``open`` and ``close`` are its markers as the answer's text holds them
    (a special token is kept in the text for them: :meth:`tokens`)."""

    name: str
    open: str
    close: str

    def template_uses(self, tokenizer: Any) -> bool:
        """Whether the tokenizer's chat template writes the opening marker (with or without tools): what
        ``--reasoning-parser auto`` chooses the parser by."""
        from lorakit.serve.tool_calls import template_text

        return self.open in template_text(tokenizer, None) or self.open in template_text(tokenizer, [{}])

    def tokens(self, tokenizer: Any) -> frozenset[int]:
        """The markers' tokens that the tokenizer marks special: decoding skips special tokens, so they are kept in
        the answer's text for the parser to see (Qwen3's and R1's ``<think>`` are plain added tokens, which decoding
        keeps; tekken's ``[THINK]`` / ``[/THINK]`` are special)."""
        from lorakit.serve.text import special_ids

        special = special_ids(tokenizer)
        vocab = tokenizer.get_vocab()
        return frozenset(vocab[t] for t in (self.open, self.close) if t in vocab and vocab[t] in special)

    def start(self, prompt_tail: str) -> "AnswerStart":
        """Where an answer to a prompt ending in ``prompt_tail`` (its last few tokens as text) starts."""
        return AnswerStart(prompt_state(prompt_tail, self), self)


THINK = ReasoningParser("think", "<think>", "</think>")
MISTRAL = ReasoningParser("mistral", "[THINK]", "[/THINK]")
NAMED = {"deepseek_r1": THINK, "qwen3": THINK, "mistral": MISTRAL}  # vLLM's names; one <think> parser reads both
PARSERS = ("auto", "none", *NAMED)  # --reasoning-parser's choices


class AnswerStart(NamedTuple):
    """Where an answer starts with respect to the block ("inside", "closed" or "start": :func:`prompt_state`), and
    the parser whose markers it has."""

    where: str
    parser: ReasoningParser


def select_parser(tokenizer: Any, choice: str) -> ReasoningParser | None:
    """``--reasoning-parser``'s value -> the parser answers are split with (None: not split). "auto": the parser
    whose opening marker the chat template writes (``[THINK]`` before ``<think>``: a Mistral template that also
    mentions ``<think>`` in text is still Mistral's), none when it writes neither; "none": never; a vLLM parser
    name: that one, whatever the template."""
    if choice not in PARSERS:
        from lorakit.errors import LorakitError

        raise LorakitError(f"--reasoning-parser {choice!r} is not one of {', '.join(PARSERS)}")
    if choice == "auto":
        return next((p for p in (MISTRAL, THINK) if p.template_uses(tokenizer)), None)
    return NAMED.get(choice)


def prompt_state(prompt_tail: str, parser: ReasoningParser = THINK) -> str:
    """Where an answer to a prompt ending in ``prompt_tail`` (its last few tokens as text) starts: "inside" an
    open block, "closed" (the prompt holds the whole block: no reasoning follows), or "start"."""
    tail = prompt_tail.rstrip()
    if tail.endswith(parser.open):
        return "inside"
    if tail.endswith(parser.close):
        return "closed"
    return "start"


class ReasoningStream:
    """One answer's text, fed piece by piece (each engine event's newly final text), split into reasoning and
    content as it comes.

    :meth:`feed` returns the ``(reasoning, content)`` text that is final now; a tail that may still grow into the
    closing marker (or, at the start, into the opening one) and whitespace that may end the reasoning are held
    until the next piece shows what they are, so markers split over pieces never leak. Fed whole and finished, it
    gives the non-streamed split; the streamed pieces always add up to it.
    """

    def __init__(self, state: AnswerStart | str = "start"):
        """``state``: :meth:`ReasoningParser.start` of the prompt; a bare "inside", "closed" or "start"
        (:func:`prompt_state`) means the ``<think>`` parser's."""
        where, parser = (state, THINK) if isinstance(state, str) else state
        self.open, self.close = parser.open, parser.close
        state = where
        self.text = ""
        self.phase = {"inside": "start", "closed": "content", "start": "start"}[state]
        self.inside = self.had_block = state == "inside"
        self.reasoning_sent = self.content_sent = 0  # indices into text up to which each was returned
        self.reasoning_started = self.content_started = False
        self.searched = 0  # where the search for the closing marker resumes
        self.reasoning, self.content = "", ""
        self.feeds = 0
        self.reasoning_feeds = 0  # pieces (engine tokens) up to the one that closed the block: reasoning tokens

    @classmethod
    def of(cls, pieces: list[str], state: AnswerStart | str) -> "ReasoningStream":
        """The split of a whole answer collected as engine pieces (one per token, then the final text)."""
        stream = cls(state)
        for piece in pieces[:-1]:
            stream.feed(piece)
        stream.finish(pieces[-1] if pieces else "")
        return stream

    @property
    def reasoning_tokens(self) -> int:
        """Tokens of the answer up to the end of its reasoning (the closing marker included); 0 without a
        block."""
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
            if stripped.startswith(self.open):
                self.phase, self.had_block = "reasoning", True
                self.reasoning_sent = self.searched = len(text) - len(stripped) + len(self.open)
            elif self.open.startswith(stripped) and not final:  # "" or "<thi": not known yet
                return "", ""
            elif self.inside:  # the prompt opened the block: this is its text
                self.phase = "reasoning"
            else:
                self.phase = "content"
        if self.phase == "reasoning":
            close = text.find(self.close, self.searched)
            if close >= 0:
                end, self.phase = close, "content"
                self.content_sent = close + len(self.close)
                self.reasoning_feeds = self.feeds
            else:
                self.searched = max(self.searched, len(text) - len(self.close) + 1)
                end = len(text) if final else len(text) - held_prefix(text, self.close)
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
        if not self.reasoning_started:  # whitespace after the opening marker is not reasoning
            while start < end and text[start].isspace():
                start += 1
            self.reasoning_sent = start
        while end > start and text[end - 1].isspace():  # nor is whitespace before the closing one (held until known)
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
        if not self.content_started:  # whitespace after the block (or before the answer) is not content
            while start < len(text) and text[start].isspace():
                start += 1
            self.content_sent = start
            if start == len(text):
                return ""
            self.content_started = True
        out, self.content_sent = text[start:], len(text)
        self.content += out
        return out


def split_reasoning(text: str, state: AnswerStart | str = "start") -> tuple[str | None, str | None]:
    """A whole answer -> ``(reasoning or None, content)`` (content None: it never left the block)."""
    stream = ReasoningStream(state)
    stream.feed(text)
    stream.finish()
    return stream.result()


def content_start(text: str, start: AnswerStart | None) -> int | None:
    """Where the content (what follows the reasoning block) begins in an answer's ``text`` so far, or None while
    it is still reasoning or not yet known (a start that may grow into the opening marker); ``start``: where the
    answer began against the block (None, or "closed": all is content). As :class:`ReasoningStream` splits it."""
    if start is None or start.where == "closed":
        return 0
    parser = start.parser
    if start.where == "start":
        stripped = text.lstrip()
        if not stripped.startswith(parser.open):
            return None if parser.open.startswith(stripped) else 0
        close = text.find(parser.close, len(text) - len(stripped) + len(parser.open))
    else:
        close = text.find(parser.close)
    return None if close < 0 else close + len(parser.close)


class ThinkBudget:
    """vLLM's ``thinking_token_budget`` for one answer: once the reasoning block holds ``budget`` tokens, the
    block's closing marker is forced, token by token, so the model goes on to the answer. An engine row's steering
    (``engine.Request.steer``): :meth:`allowed` (and :meth:`refused`: none) before each token, :meth:`take` after it.

    Counted as vLLM counts: the tokens after the opening marker (those of the prompt too, where the prompt opened
    the block: ``prompt_tokens``), the model's own closing marker ending the count. The block is the one
    :class:`ReasoningStream` reads: opened by the prompt (``where`` "inside"), or by the answer's first text
    (``where`` "start"; an answer that begins otherwise has no block and is never cut). Budget 0: the marker comes
    first.

    ``parser``: the block's markers; ``close_ids``: the closing one as the tokenizer encodes it (what is forced);
    ``decode``: token ids -> text, for the answer's first tokens (whether they open the block) and the block's last
    few (whether the model closed it: a marker split into tokens another way than alone is seen all the same)."""

    def __init__(self, budget: int, where: str, parser: ReasoningParser, close_ids: tuple[int, ...], decode,
                 prompt_tokens: int = 0):
        self.budget, self.parser, self.close_ids, self.decode = budget, parser, tuple(close_ids), decode
        self.head: list[int] = []  # the answer's tokens while it is not known whether they open the block
        self.recent: list[int] = []  # the block's last tokens
        self.count = prompt_tokens
        self.forced = 0  # closing-marker tokens forced so far
        self.phase = {"inside": "inside", "start": "head"}.get(where, "off")
        if self.phase == "inside":
            self._check()

    def allowed(self) -> tuple[int, ...] | None:
        """The one token the row must draw next (the closing marker's next), or None: any."""
        return (self.close_ids[self.forced],) if self.phase == "forcing" else None

    def refused(self) -> tuple[int, ...]:
        return ()

    def take(self, token: int) -> None:
        if self.phase == "head":
            self.head.append(token)
            stripped = self.decode(self.head).lstrip()
            if stripped.startswith(self.parser.open):  # the block opens: its tokens are counted from the next
                self.phase, self.count = "inside", 0
                self._check()
            elif not self.parser.open.startswith(stripped):
                self.phase = "off"  # the answer begins without a block: nothing to cap
        elif self.phase == "inside":
            self.recent = (self.recent + [token])[-(len(self.close_ids) + 4):]
            if self.parser.close in self.decode(self.recent):  # the model closed the block itself
                self.phase = "off"
                return
            self.count += 1
            self._check()
        elif self.phase == "forcing":
            self.forced += 1
            if self.forced == len(self.close_ids):
                self.phase = "off"

    def _check(self) -> None:
        if self.count >= self.budget:
            self.phase = "forcing"
