"""Structured outputs: constrained decoding of a request's answer to a JSON schema (or any JSON object).

OpenAI's ``response_format`` (chat completions) and ``text.format`` (responses) of type ``json_schema`` or
``json_object``, and vLLM's ``structured_outputs`` (json, regex, choice, Lark grammar), become a grammar compiled by
llguidance (the library behind vLLM's "guidance" backend; an optional dependency, imported here only). Each engine
row with a format owns a :class:`Constraint` (one ``LLMatcher``):

- before its next token is drawn, the row's logits ``(V,)`` outside the grammar's allowed tokens are set to -inf
  (:meth:`Constraint.mask`), so greedy and sampled decoding (temperature, top-p, top-k) pick only tokens that keep
  the text a prefix of a valid answer;
- the drawn token is then fed to the matcher (:meth:`Constraint.consume`); once the answer is complete the grammar
  allows nothing but an end token (:attr:`Constraint.done`) and the row ends with finish reason ``"stop"``.

An answer cut by ``max_tokens`` (finish reason ``"length"``) is a prefix of a valid answer, not a whole one; so is
one cut by a request's ``stop`` string, which still applies. ``logprobs`` are the model's, before the mask (vLLM's
default). The JSON is compact (no whitespace between tokens) unless the schema's ``x-guidance`` options say
otherwise. With a reasoning parser on, the reasoning is free text and the content follows the format, wherever the
block stands (:class:`Constraint`'s phases): opened by the prompt (DeepSeek-R1), the constraint waits until the
block closes; closed in the prompt (Qwen3 with thinking off), it applies at once; left to the model (Qwen3's
thinking mode), the first token is the opening marker or the format's first, so an answer that skips the block is
formatted from its first token. A block that never closes before ``max_tokens`` leaves the answer all reasoning,
no content, finish reason ``"length"`` (as vLLM answers).
With tool calls to parse the format is refused (the server's choice: the answer is a call or formatted content;
``tool_choice`` "none" keeps the tools in the prompt and the format applies).

Rows without a format hold no constraint and cost the engine nothing.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import re
import threading
from dataclasses import dataclass
from typing import Any

import torch

INSTALL = "structured outputs (response_format json_schema / json_object) need the llguidance package: " \
          "pip install llguidance (or pip install 'lorakit[serve]')"

# the JSON a grammar writes: no free whitespace between tokens (a model may otherwise write spaces and newlines
# until max_tokens, each of them valid JSON); a schema's own "x-guidance" options override it
JSON_OPTIONS = {"whitespace_flexible": False}


class FormatError(ValueError):
    """A format llguidance cannot build (its message is one line, for a 400, which the server prefixes with the
    request field), or the package missing."""


def _llguidance():
    try:
        import llguidance
        import llguidance.hf
    except ImportError:
        raise FormatError(INSTALL) from None
    return llguidance


# llguidance's views of tokenizers, least recently used first: the base's and adapters' own (model_text.py), each
# held with its tokenizer, so a reloaded or evicted adapter's tokenizer is let go once TOKENIZER_CACHE others follow
_TOKENIZERS: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_TOKENIZERS_LOCK = threading.Lock()
TOKENIZER_CACHE = 8


def _ll_tokenizer(tokenizer, vocab: int, end_ids: tuple[int, ...]):
    """llguidance's view of ``tokenizer`` over ``vocab`` logit columns, with ``end_ids`` as its end tokens.
    Built once per (tokenizer, vocab, end tokens): ~1 s for a 150k vocabulary."""
    llguidance = _llguidance()
    key = (id(tokenizer), vocab, end_ids)
    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.get(key)
        if cached is not None and cached[0] is tokenizer:
            _TOKENIZERS.move_to_end(key)
        else:
            try:
                built = llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(vocab, len(tokenizer)), eos_token=list(end_ids))
            except Exception as error:  # a slow (Python) tokenizer, or a vocabulary llguidance cannot read
                raise FormatError(f"structured outputs are not available with this tokenizer "
                                  f"({type(tokenizer).__name__}): {_one_line(error)}") from None
            cached = _TOKENIZERS[key] = (tokenizer, built)
            while len(_TOKENIZERS) > TOKENIZER_CACHE:
                _TOKENIZERS.popitem(last=False)
    return cached[1]


def _one_line(error: Any, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Grammar:
    """A compiled format: a fresh llguidance matcher (``start``, never fed a token) over the tokenizer it runs
    over. ``name``: what the request called it (the json_schema's name), for messages."""

    start: Any
    vocab: int
    name: str

    def constraint(self, active: bool = True, opening: tuple[int, ...] = ()) -> "Constraint":
        """A matcher for one engine row (each choice of ``n`` needs its own): a copy of ``start``, far cheaper
        than compiling the schema again. ``active``, ``opening``: where a reasoning block leaves it
        (:class:`Constraint`)."""
        return Constraint(self.start.deep_copy(), self.vocab, active, opening)


# compiled grammars by (tokenizer, grammar text): agents send the same schema with every request, and compiling
# a large one takes 10-100 ms; a copy of the compiled matcher takes microseconds
_GRAMMARS: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_GRAMMARS_LOCK = threading.Lock()
GRAMMAR_CACHE = 64


KINDS = ("json_schema", "json_object", "regex", "choice", "grammar")


def _grammar_text(llguidance, kind: str, value: Any, whitespace: str | None = None) -> str:
    """llguidance's grammar for a format: a JSON schema (``json_object``: any object; ``whitespace``: a regex of
    the whitespace allowed between its tokens, None: none), a regex the whole answer matches, one of a list of
    strings (``choice``), or a Lark grammar (``grammar``, vLLM's guidance backend's)."""
    if kind in ("json_schema", "json_object"):
        options = JSON_OPTIONS if whitespace is None else {**JSON_OPTIONS, "whitespace_pattern": whitespace}
        return llguidance.LLMatcher.grammar_from_json_schema(schema_of(kind, value), defaults=options)
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(value)
    if kind == "choice":  # Lark string literals take JSON's escapes. One terminal (a lexer token, upper case), not
        # a rule of alternatives: the parser holds a rule's live alternatives as items, at most 2000 in a row, so
        # over 2000 choices sharing a prefix failed once the answer had written it
        return llguidance.LLMatcher.grammar_from_lark("start: CHOICE\nCHOICE: " + " | ".join(json.dumps(c) for c in value))
    if kind == "grammar":
        return llguidance.LLMatcher.grammar_from_lark(value)
    raise FormatError(f"unknown format kind {kind!r}; one of {', '.join(KINDS)}")


def compile_format(tokenizer, vocab: int, end_ids: tuple[int, ...], value: Any, name: str = "json_schema",
                   lock: threading.Lock | None = None, kind: str = "json_schema",
                   whitespace: str | None = None) -> Grammar:
    """Compile a format into a :class:`Grammar` whose answers end with one of ``end_ids``: ``kind`` json_schema
    (``value`` the schema), json_object, regex (a pattern), choice (a list of strings) or grammar (Lark text);
    ``whitespace``: a JSON format's whitespace between tokens as a regex (vLLM's whitespace_pattern; None: none).
    ``vocab``: the model's logit columns; ``lock``: held while llguidance reads the tokenizer (the server's
    tokenizer lock). Raises :class:`FormatError` (one line) for what llguidance cannot build (an unknown type, a
    regex with look-around, a $ref it cannot resolve, a grammar rule never defined, ...)."""
    llguidance = _llguidance()
    check_schema_size(value)
    with lock or contextlib.nullcontext():
        ll_tokenizer = _ll_tokenizer(tokenizer, vocab, tuple(end_ids))
    what = "the schema" if kind.startswith("json") else f"the {kind}"
    try:
        text = _grammar_text(llguidance, kind, value, whitespace)
    except (ValueError, TypeError) as error:
        raise FormatError(f"{name}: {what} cannot be used: {_one_line(error)}") from None
    key = (id(ll_tokenizer), text)
    with _GRAMMARS_LOCK:
        held = _GRAMMARS.get(key)
        # the view itself is held with its grammars: one let go (TOKENIZER_CACHE) may leave its id to another
        start = held[1] if held is not None and held[0] is ll_tokenizer else None
        if start is not None:
            _GRAMMARS.move_to_end(key)
    if start is None:  # compiled outside the lock (llguidance drops the GIL): other requests' schemas wait not
        start = llguidance.LLMatcher(ll_tokenizer, text, log_level=0)
        if start.is_error():  # an unknown type, a regex with look-around, a $ref that points nowhere, ...
            raise FormatError(f"{name}: {what} cannot be used: {_one_line(start.get_error())}")
        with _GRAMMARS_LOCK:
            _GRAMMARS[key] = (ll_tokenizer, start)
            while len(_GRAMMARS) > GRAMMAR_CACHE:
                _GRAMMARS.popitem(last=False)
    return Grammar(start, ll_tokenizer.vocab_size, name)


class Constraint:
    """One row's matcher, in one of four phases (:attr:`phase`):

    - ``"on"``: the grammar applies (no reasoning block, or it has closed);
    - ``"wait"``: a reasoning block is open (the prompt opened it, or the answer did): its text is free; the server
      calls :meth:`begin` once the block's closing marker is in the answer;
    - ``"choose"``: a thinking model's first token, which may open the block or start the answer (Qwen3's thinking
      mode): the grammar's tokens or the opening marker's first token are allowed. The marker -> ``"marker"`` /
      ``"wait"``; anything else starts the answer, which the grammar then holds from that token on (an answer
      that never opens the block is formatted all the same);
    - ``"marker"``: the opening marker's later tokens (a marker of several tokens), each forced in turn.

    ``done``: the answer is complete (only an end token may follow); ``blocked``: at the last :func:`mask_rows` the
    grammar allowed no token (the matcher is in error: :attr:`error`)."""

    def __init__(self, matcher, vocab: int, active: bool = True, opening: tuple[int, ...] = ()):
        """``vocab``: the matcher's tokenizer's size (its bitmask covers that many tokens). ``active`` False: wait
        for :meth:`begin`; ``opening``: the reasoning block's opening marker as token ids, when the answer may
        begin with it (phase ``"choose"``)."""
        self.matcher = matcher
        self.vocab = vocab
        self.opening = tuple(opening)
        self.phase = ("choose" if self.opening else "on") if active else "wait"
        self.marked = 0  # tokens of the opening marker drawn so far
        self.blocked = False

    @property
    def active(self) -> bool:
        """Whether this row's next token is masked (every phase but ``"wait"``)."""
        return self.phase != "wait"

    @property
    def waiting(self) -> bool:
        return self.phase == "wait"

    def begin(self) -> None:
        """The reasoning block has closed: the grammar applies from the next token."""
        self.phase = "on"

    @property
    def done(self) -> bool:
        return self.phase == "on" and self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        # llguidance appends its parser state (tokens, rows, timings) after "<state>": not for the client
        if not self.matcher.is_error():
            return None
        error = _one_line(self.matcher.get_error().split("<state>")[0])
        if error.startswith("NoExtensionBias"):  # llguidance's name for "no token can extend the answer"
            return "the format allows no further text here (a schema that refers only to itself?)"
        added = re.search(r"token \"\ufffd\[(\d+)\]\" doesn't satisfy the grammar", error)
        if added:  # llguidance's known gap: text the format forces that the tokenizer writes as one added token
            return (f"the format's text holds the text of token {added.group(1)}, a token added to this tokenizer "
                    "(such as '<tool_call>'), which the grammar engine (llguidance) cannot match inside a format; "
                    "leave that text out of the format")
        return error

    def mask(self, logits: torch.Tensor) -> torch.Tensor | None:
        """``logits (V,)`` with every token the grammar does not allow next set to -inf (a new tensor); None when
        it allows no token at all (:attr:`blocked`). One row of :func:`mask_rows`."""
        masked = mask_rows([self], logits.unsqueeze(0))[0]
        return None if self.blocked else masked

    def consume(self, token: int) -> bool:
        """Feed the drawn token to the matcher; False when it refuses it (it then holds the error)."""
        return bool(self.matcher.consume_token(token))

    def take(self, token: int) -> bool:
        """The row drew ``token`` (masked by this constraint, not an end token): advance the phase, feeding the
        matcher where the grammar holds. False when the matcher refuses it."""
        if self.phase == "choose":
            if token == self.opening[0]:  # the block opens: its text is free until it closes
                self.phase, self.marked = ("marker" if len(self.opening) > 1 else "wait"), 1
                return True
            self.phase = "on"  # the answer starts without a block: this token is the format's first
        elif self.phase == "marker":
            self.marked += 1
            if self.marked == len(self.opening):
                self.phase = "wait"
            return True
        return self.consume(token) if self.phase == "on" else True

    def _marker_token(self) -> int | None:
        """The opening marker's next token where the phase allows it (``"choose"``: its first, beside the
        grammar's; ``"marker"``: the only one allowed), else None."""
        return self.opening[self.marked] if self.phase in ("choose", "marker") else None


_EXECUTOR: list = []  # llguidance's thread pool, made on first use


def mask_rows(constraints: list[Constraint], logits: torch.Tensor) -> torch.Tensor:
    """``logits (n, V)``, row i for ``constraints[i]`` -> a new (n, V) tensor with every token row i's constraint
    does not allow next at -inf; columns past the tokenizer's vocabulary are never allowed. The n bitmasks (32 tokens
    per int32 word) are computed by llguidance's threads in parallel into one CPU buffer (a row choosing between a
    reasoning block and the answer gets the marker's first token added; a row inside the marker only its next
    token), copied to the logits' device once and unpacked there in one pass: a decode step with many formatted
    rows costs a few operations, not a few per row. Each constraint's ``blocked`` is set (it allowed nothing)."""
    llguidance = _llguidance()
    if not _EXECUTOR:
        _EXECUTOR.append(llguidance.LLExecutor())
    n, width = logits.shape
    words = (max(max(c.vocab for c in constraints), 1) + 31) // 32
    bits = torch.zeros(n, words, dtype=torch.int32)
    matched = [(c.matcher, i) for i, c in enumerate(constraints) if c.phase != "marker"]
    if matched:
        _EXECUTOR[0].unsafe_compute_mask_ptr(matched, bits.data_ptr(), words * 4, n)
    as_bytes = bits.view(torch.uint8)  # little-endian words: bit j of byte i is token 8 i + j
    for i, constraint in enumerate(constraints):
        marker = constraint._marker_token()
        if marker is not None and marker < words * 32:
            as_bytes[i, marker >> 3] |= 1 << (marker & 7)
    for constraint, any_allowed in zip(constraints, bits.any(dim=1).tolist()):
        # a matcher that fails while computing its mask (a schema that refers only to itself: no text can follow)
        # allows the end token alone, which would end the answer as if it were complete
        constraint.blocked = not any_allowed or (constraint.phase != "marker" and constraint.matcher.is_error())
    shifts = torch.arange(8, dtype=torch.uint8, device=logits.device)
    # unpacked from bytes, not int32 words: 4x less to shift
    allowed = ((as_bytes.to(logits.device).unsqueeze(-1) >> shifts) & 1).reshape(n, words * 32).bool()
    if allowed.shape[1] < width:
        allowed = torch.cat([allowed, allowed.new_zeros(n, width - allowed.shape[1])], dim=1)
    return logits.masked_fill(~allowed[:, :width], float("-inf"))


def schema_of(kind: str, schema: dict | None) -> dict:
    """The JSON schema of a format: ``json_object`` is any JSON object; ``json_schema`` without a schema is any
    JSON value (OpenAI requires one; an empty schema means anything). Formats llguidance does not know are left
    out (:func:`known_formats_only`)."""
    if kind == "json_object":
        return {"type": "object"}
    return known_formats_only(schema) if schema is not None else {}


# keywords whose values are JSON data, not schemas: a "format" inside them is data, kept as sent
_DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})


def known_formats_only(schema: Any) -> Any:
    """``schema`` without the ``format`` annotations llguidance does not know: JSON Schema reads a format as an
    annotation, and a validator ignores one it does not know. llguidance refuses it ("Unknown format"), so a
    Pydantic model with a ``bytes`` (``binary``), ``Path`` (``path``), ``SecretStr`` (``password``) or ``Json``
    field was a 400 (and a tool's parameters lost their grammar), where vLLM serves it. The formats llguidance
    knows (date-time, date, time, duration, email, hostname, ipv4, ipv6, uri, uuid) still hold the answer."""
    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(item) for item in node]
        if not isinstance(node, dict):
            return node
        return {key: value if key in _DATA_KEYWORDS else walk(value) for key, value in node.items()
                if not (key == "format" and isinstance(value, str) and not _known_format(value))}

    try:
        return walk(schema)
    except RecursionError:  # nested past Python's stack: llguidance says so itself, for the schema as sent
        return schema


@functools.lru_cache(maxsize=256)
def _known_format(name: str) -> bool:
    """Whether llguidance's JSON schemas know string format ``name`` (one compile of a one-line schema, ~0.1 ms)."""
    if len(name) > 64:
        return False
    matcher = _llguidance().LLMatcher
    return not matcher.validate_grammar_with_warnings(
        matcher.grammar_from_json_schema({"type": "string", "format": name}))[0]


def check_schema_size(value: Any, limit: int = 256 * 1024) -> None:
    """A format (schema, pattern, choices, grammar) above ``limit`` characters of JSON is refused before it is
    compiled, and so is one holding NaN or Infinity: Python's JSON reader takes them from a request body, and
    llguidance would read each as null (``{"const": Infinity}`` made every answer ``null``)."""
    try:
        text = json.dumps(value, allow_nan=False)
    except ValueError:
        raise FormatError("the format holds NaN or Infinity, which are no JSON numbers; send finite numbers") from None
    if len(text) > limit:
        raise FormatError(f"the format is over {limit // 1024} KiB of JSON; send a smaller one")
