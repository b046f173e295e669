"""Structured outputs: constrained decoding of a request's answer to a JSON schema (or any JSON object).

OpenAI's ``response_format`` (chat completions) and ``text.format`` (responses) of type ``json_schema`` or
``json_object`` become a grammar compiled by llguidance (the library behind vLLM's "guidance" backend; an optional
dependency, imported here only). Each engine row with a format owns a :class:`Constraint` (one ``LLMatcher``):

- before its next token is drawn, the row's logits ``(V,)`` outside the grammar's allowed tokens are set to -inf
  (:meth:`Constraint.mask`), so greedy and sampled decoding (temperature, top-p, top-k) pick only tokens that keep
  the text a prefix of a valid answer;
- the drawn token is then fed to the matcher (:meth:`Constraint.consume`); once the answer is complete the grammar
  allows nothing but an end token (:attr:`Constraint.done`) and the row ends with finish reason ``"stop"``.

An answer cut by ``max_tokens`` (finish reason ``"length"``) is a prefix of a valid answer, not a whole one.
With a reasoning parser on, the constraint waits (``active`` False) until the reasoning block closes, as vLLM does:
the reasoning is free text, the content follows the format.

Rows without a format hold no constraint and cost the engine nothing.
"""

from __future__ import annotations

import contextlib
import json
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


_TOKENIZERS: dict[tuple, Any] = {}
_TOKENIZERS_LOCK = threading.Lock()


def _ll_tokenizer(tokenizer, vocab: int, end_ids: tuple[int, ...]):
    """llguidance's view of ``tokenizer`` over ``vocab`` logit columns, with ``end_ids`` as its end tokens.
    Built once per (tokenizer, vocab, end tokens): ~1 s for a 150k vocabulary."""
    llguidance = _llguidance()
    key = (id(tokenizer), vocab, end_ids)
    with _TOKENIZERS_LOCK:
        cached = _TOKENIZERS.get(key)
        if cached is None or cached[0] is not tokenizer:
            try:
                built = llguidance.hf.from_tokenizer(tokenizer, n_vocab=max(vocab, len(tokenizer)), eos_token=list(end_ids))
            except Exception as error:  # a slow (Python) tokenizer, or a vocabulary llguidance cannot read
                raise FormatError(f"structured outputs are not available with this tokenizer "
                                  f"({type(tokenizer).__name__}): {_one_line(error)}") from None
            cached = _TOKENIZERS[key] = (tokenizer, built)
    return cached[1]


def _one_line(error: Any, limit: int = 300) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class Grammar:
    """A compiled, validated format: the llguidance grammar text and the tokenizer it runs over. ``name``: what
    the request called it (the json_schema's name), for messages."""

    text: str
    ll_tokenizer: Any
    vocab: int
    name: str

    def constraint(self) -> "Constraint":
        """A fresh matcher for one engine row (each choice of ``n`` needs its own)."""
        llguidance = _llguidance()
        matcher = llguidance.LLMatcher(self.ll_tokenizer, self.text, log_level=0)
        if matcher.is_error():
            raise FormatError(f"{self.name}: {_one_line(matcher.get_error())}")
        return Constraint(matcher, self.ll_tokenizer.vocab_size)


def compile_format(tokenizer, vocab: int, end_ids: tuple[int, ...], schema: dict, name: str = "json_schema",
                   lock: threading.Lock | None = None) -> Grammar:
    """Compile JSON ``schema`` (``{"type": "object"}`` for json_object) into a :class:`Grammar` whose answers end
    with one of ``end_ids``; ``vocab``: the model's logit columns; ``lock``: held while llguidance reads the
    tokenizer (the server's tokenizer lock). Raises :class:`FormatError` (one line) for a schema llguidance cannot
    build (an unknown type, a regex with look-around, a $ref it cannot resolve, ...)."""
    llguidance = _llguidance()
    with lock or contextlib.nullcontext():
        ll_tokenizer = _ll_tokenizer(tokenizer, vocab, tuple(end_ids))
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        problem = llguidance.LLMatcher.validate_grammar(text, ll_tokenizer)
    except (ValueError, TypeError) as error:
        problem = str(error)
    if problem:
        raise FormatError(f"{name}: the schema cannot be used: {_one_line(problem)}")
    return Grammar(text, ll_tokenizer, vocab, name)


class Constraint:
    """One row's matcher. ``active`` False: not applied yet (a reasoning block still open); ``done``: the answer
    is complete (only an end token may follow)."""

    def __init__(self, matcher, vocab: int, active: bool = True):
        """``vocab``: the matcher's tokenizer's size (its bitmask covers that many tokens)."""
        self.matcher = matcher
        self.vocab = vocab
        self.active = active
        words = (max(vocab, 1) + 31) // 32
        self._bits = torch.zeros(words, dtype=torch.int32)  # llguidance writes the allowed-token bitmask here
        self._shifts = torch.arange(8, dtype=torch.uint8)

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return _one_line(self.matcher.get_error()) if self.matcher.is_error() else None

    def allowed(self) -> torch.Tensor:
        """Which of the ``V`` tokens the grammar allows next: bool ``(V,)`` on the CPU."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.data_ptr(), self._bits.numel() * 4)
        as_bytes = self._bits.view(torch.uint8)  # little-endian words: bit j of byte i is token 8 i + j
        bits = (as_bytes.unsqueeze(1) >> self._shifts) & 1
        return bits.reshape(-1)[:self.vocab].bool()

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits (V,)`` with every token the grammar does not allow next set to -inf (a new tensor)."""
        allowed = self.allowed()
        if logits.shape[-1] > allowed.shape[0]:  # columns past the tokenizer's vocabulary are never allowed
            allowed = torch.cat([allowed, allowed.new_zeros(logits.shape[-1] - allowed.shape[0])])
        allowed = allowed[:logits.shape[-1]].to(logits.device, non_blocking=True)
        return logits.masked_fill(~allowed, float("-inf"))

    def consume(self, token: int) -> bool:
        """Feed the drawn token; False when the matcher refuses it (it then holds the error)."""
        return bool(self.matcher.consume_token(token))


def schema_of(kind: str, schema: dict | None) -> dict:
    """The JSON schema of a format: ``json_object`` is any JSON object; ``json_schema`` without a schema is any
    JSON value (OpenAI requires one; an empty schema means anything)."""
    if kind == "json_object":
        return {"type": "object"}
    return schema if schema is not None else {}


def check_schema_size(schema: dict, limit: int = 256 * 1024) -> None:
    """A schema's JSON text above ``limit`` characters is refused before it is compiled."""
    if len(json.dumps(schema)) > limit:
        raise FormatError(f"the schema is over {limit // 1024} KiB of JSON; send a smaller one")
