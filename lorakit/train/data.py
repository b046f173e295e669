"""Training data: records tokenized with label masks into datasets, with splits and a summary of what was dropped.

Packing, padding into batches and the resumable order are ``batches.py``'s (re-exported here). The pipeline, each
step a function the training loop can call on its own::

    records = read_many(paths)                              # sources.py: validated Records (formats.py)
    train, val = split_records(records, 0.1, seed=0)        # or a separate validation file
    ds = build_dataset(train, tokenizer, max_length=96)     # tokenize_example on each, summary of drops
    ds = build_dataset(..., pack=True)                      # optional: several examples per row
    batches = BatchIterator(ds, batch_size=8, collate_fn=Collator(pad_id), seed=0)
    state = batches.state_dict(); batches.load_state_dict(state)   # exact resume

Label rules (``labels`` are aligned with ``input_ids``; the model shifts them by one, as transformers does):

- Only targets are supervised: the completion, the assistant turns, or all of a ``text`` record. Prompts,
  system and user turns and template filler are ``IGNORE_INDEX`` (-100).
- Each supervised turn ends with the end-of-turn token (default: the tokenizer's eos token, ``<|im_end|>`` for
  SmolLM2), and that token is supervised, so the model learns to stop. Template tokens after it (ChatML's
  trailing newline) are not targets. If a template or a completion does not emit it, it is appended (not after a
  call turn the template ends with ``<|eom_id|>`` or ``<|call|>``: :data:`TOOL_CALL_ENDS`).
- Position 0 is never a target (nothing precedes it); in packed rows each example's first position is not a
  target either, so no loss term crosses from one example into the next.
- BOS appears at most once: the text is tokenized without special tokens, and BOS is prepended only when the
  tokenizer adds one by default and the rendered text does not already start with it.
- A chat whose template rewrites earlier turns (Qwen3 keeps ``<think>`` reasoning only after the last user
  query) trains as one example per assistant turn, each as the template writes it at inference
  (``chat_turns.py``); templates that render a prefix of the chat as a prefix of it give one example per chat.
- OpenAI tool use (``tools``, ``tool_calls``, ``tool`` turns): an assistant's calls are targets as its template
  writes them; tool results are context. Templates read calls in different conventions (arguments as a dict or as
  JSON text, null content, 9-character ids for Mistral): ``chat_turns.tool_call_variants`` tries each, and a
  record whose calls, arguments, text beside the calls or tool schemas the template would drop is refused.
- Padding is told apart by ``attention_mask`` (or the packed 4D mask), never by token id: SmolLM2's pad token
  is its end-of-turn token, which is also a supervised label at the end of every answer.

Packing: transformers 5.x (Llama, sdpa or eager, on CPU) only isolates examples by ``position_ids`` when no
attention mask is passed AND no KV cache is created, i.e. only with ``use_cache=False``; with the default
``use_cache`` (True in the config, also in ``.train()`` mode) attention silently crosses examples. A 4D mask is
used as given by every backend, so packed batches carry an explicit block-diagonal causal 4D mask (additive
float, which sdpa and eager read the same way; a bool mask is read wrongly by eager) plus ``position_ids`` that
restart at 0 for each example. ``tests/test_train_data.py`` checks the logits of a packed row against each
example run alone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import random
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence, Sized
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lorakit.chat_template import markup_not_in_vocabulary, template_end_of_turn
from lorakit.errors import LorakitError
from lorakit.train.batches import (IGNORE_INDEX, BatchIterator, Collator, block_causal_mask, epoch_permutation,
                                   eval_batches, pack_examples)
from lorakit.train.chat_tokens import shared_tokens, token_ranges
from lorakit.train.chat_turns import (check_arguments, content_reasoning, missing_call_error, openai_tools,
                                      tool_chat_examples)
from lorakit.train.formats import (REASONING_KEYS, Record, frame_of_template, turn_named_as_given, turns_as_given,
                                   validate_record)
from lorakit.train.special_text import special_token_texts, spelled_special_token
from lorakit.train.sources import read_many

__all__ = [  # the last six live in batches.py
    "IGNORE_INDEX", "OVERFLOW_CHOICES", "TOOL_CALL_ENDS", "TokenizerInfo", "tokenizer_info", "for_tokenizer",
    "render", "render_examples", "tokenize_example", "tokenize_examples", "generation_prompt", "reference_text",
    "DataSummary", "SupervisedDataset", "build_dataset", "split_records", "DataBundle", "build_datasets",
    "pad_id_for", "pack_examples", "block_causal_mask", "Collator", "epoch_permutation", "BatchIterator",
    "eval_batches",
]

OVERFLOW_CHOICES = ("drop", "truncate", "error", "split")  # split: text records in windows, others dropped
# tokenizing shows progress only after this many seconds: a set that takes less is done before a bar would help, and
# its line (or bar) would only add noise before the summary line
PROGRESS_DELAY_S = 1.5
# tokens with which a template ends an assistant turn that calls a tool, instead of its end of turn: Llama 3.x's
# <|eom_id|> (with builtin_tools, the model stops there for the ipython result), gpt-oss's <|call|>. Both are in
# those models' generation eos lists; appending the end-of-turn token after them would put a token into the chat
# that the template never writes
TOOL_CALL_ENDS = ("<|eom_id|>", "<|call|>")


# ----------------------------------------------------------------------------------------------------------------
# Tokenizer facts
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizerInfo:
    """The few facts about a tokenizer that label masking needs, computed once per dataset.

    Attributes:
        bos_id: the BOS token id, or None.
        adds_bos: whether ``tokenizer(text)`` puts BOS in front by default (then we must add it ourselves,
            since we tokenize with ``add_special_tokens=False``).
        eot_id: the end-of-turn token id that ends every supervised turn.
        eot_token: its text.
        pad_id: the id used to pad ``input_ids`` (its value never matters: padding is masked).
        has_offsets: whether the tokenizer can return character offsets (fast tokenizers).
        chat_eot_id: the token the chat template ends an assistant turn with, which ends supervised chat turns.
            It differs from the eos token in base tokenizers that carry an instruct template (Qwen2.5 base: eos
            ``<|endoftext|>``, turns end with ``<|im_end|>``; Gemma: ``<eos>`` vs ``<end_of_turn>``): appending
            eos there would put a token inside every multi-turn chat that the template never writes. Equal to
            ``eot_id`` without a template, or when ``eot_token`` was given.
        call_end_ids: the tokens (of :data:`TOOL_CALL_ENDS`) this tokenizer has that end an assistant turn which
            hands over to a tool: such a turn is ended, and nothing is appended after it.
    """

    bos_id: int | None
    adds_bos: bool
    eot_id: int
    eot_token: str
    pad_id: int
    has_offsets: bool
    chat_eot_id: int | None = None
    call_end_ids: frozenset = frozenset()


def tokenizer_info(tokenizer: Any, eot_token: str | None = None) -> TokenizerInfo:
    """Inspect ``tokenizer`` once. ``eot_token`` overrides the end-of-turn token (default: its eos token for
    text and prompt/completion records, the chat template's own end of turn for chats)."""
    explicit = eot_token is not None
    eot_token = eot_token if explicit else getattr(tokenizer, "eos_token", None)
    if not eot_token:
        raise LorakitError("the tokenizer has no eos token to end examples with; set \"eos_token\" in the model's "
                           "tokenizer_config.json (e.g. \"</s>\"), or from Python pass eot_token='...'")
    eot_ids = tokenizer(eot_token, add_special_tokens=False)["input_ids"]
    if len(eot_ids) != 1:
        raise LorakitError(f"end-of-turn token {eot_token!r} is {len(eot_ids)} tokens for this tokenizer, not one; make it "
                           "a special token of the tokenizer (tokenizer_config.json) or give another")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    probe = tokenizer("a")["input_ids"]
    adds_bos = bos_id is not None and len(probe) > 0 and probe[0] == bos_id
    pad_id = getattr(tokenizer, "pad_token_id", None)
    try:
        tokenizer("a", add_special_tokens=False, return_offsets_mapping=True)
        has_offsets = True
    except (NotImplementedError, ValueError, TypeError):
        has_offsets = False
    chat_eot = eot_ids[0] if explicit else (template_end_of_turn(tokenizer) or eot_ids[0])
    added = getattr(tokenizer, "get_added_vocab", dict)()
    return TokenizerInfo(bos_id, adds_bos, eot_ids[0], eot_token, eot_ids[0] if pad_id is None else pad_id, has_offsets,
                         chat_eot, frozenset(added[token] for token in TOOL_CALL_ENDS if token in added))


# ----------------------------------------------------------------------------------------------------------------
# Rendering a record to text + the character spans that are targets
# ----------------------------------------------------------------------------------------------------------------


def _render_chat(tokenizer: Any, messages: list[dict], generation_prompt: bool, where: str,
                 tools: list[dict] | None = None, template_kwargs: Mapping[str, Any] | None = None) -> str:
    """The chat as the template writes it; ``template_kwargs`` are the template's own options (Qwen3's
    ``enable_thinking``), passed to ``apply_chat_template``."""
    if not getattr(tokenizer, "chat_template", None):
        raise LorakitError(f"{where}: a chat, but this model's tokenizer has no chat template to write it with (a base "
                           "model?); put a chat template into the model folder (chat_template.jinja, e.g. its instruct "
                           "version's), or give prompt/completion or text records")
    try:
        with _stopped_clock(tokenizer):
            if any("content" in m and m["content"] is None for m in messages):
                return _render_with_null_content(tokenizer, messages, generation_prompt, tools, template_kwargs)
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                                 **({"tools": tools} if tools else {}), **(template_kwargs or {}))
    except Exception as exc:  # jinja raises TemplateError (e.g. "roles must alternate") or anything the template does
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        error = LorakitError(f"{where}: the chat template rejected this chat ({reason}){_template_fix(reason, messages)}")
        error.template_rejected = True
        raise error from None
    return text


# the date chat templates that write today's date (Llama 3.2 / 3.3's "Today Date: 01 Dec 2026", Granite's, Mistral
# Small's, through transformers' strftime_now) write into every training chat: a fixed one, as the tokens of a run must
# not change with the day it runs on. With the real date, a run resumed the next day (or a torchrun process that
# tokenized after midnight) had other token ids and was refused as "other training data", and lorakit eval's loss of
# the run's validation set moved from day to day. The date is context, never a target; Llama's templates take
# chat_template_kwargs '{"date_string": "26 Jul 2024"}' to write another
TEMPLATE_DATE = datetime.datetime(2026, 1, 1)


class _TemplateDate(datetime.datetime):
    """``datetime`` whose ``now()`` is :data:`TEMPLATE_DATE`, for transformers' ``strftime_now``."""

    @classmethod
    def now(cls, tz=None):  # noqa: ARG003 (datetime.now's signature)
        return TEMPLATE_DATE


@contextlib.contextmanager
def _stopped_clock(tokenizer: Any) -> Iterator[None]:
    """Inside, a chat template's ``strftime_now`` reads :data:`TEMPLATE_DATE`. transformers hands a template only
    plain data (a callable passed as a template option becomes a string), so the ``datetime`` its ``strftime_now``
    reads is swapped for the block, and only for a template that calls it."""
    from transformers.utils import chat_template_utils

    template = getattr(tokenizer, "chat_template", None)
    source = template if isinstance(template, str) else " ".join(map(str, (template or {}).values()))
    real = getattr(chat_template_utils, "datetime", None)
    if "strftime_now" not in source or not (isinstance(real, type) and issubclass(real, datetime.datetime)):
        # another transformers, whose strftime_now reads no datetime class there: left as it is
        yield
        return
    chat_template_utils.datetime = _TemplateDate
    try:
        yield
    finally:
        chat_template_utils.datetime = real


def _template_fix(reason: str, messages: list[dict]) -> str:
    """What to change in the data for the two refusals templates raise most (Gemma's, Mistral's, Llama 2's): a
    system turn they take none of, and turns that do not alternate; "" for any other reason."""
    said = reason.lower()
    systems = [m for m in messages if m["role"] == "system"]
    if "system" in said and systems and not any(str(m.get("content") or "").strip() for m in systems):
        return "; this model's template takes no system turn, and this chat's is empty: remove it"
    if "system" in said and systems:
        return "; this model's template takes no system turn: put the system text at the start of the first user turn"
    if "alternate" in said:
        return ("; this model's template takes turns that alternate between user and assistant: join consecutive turns "
                "of one role into one")
    return ""


def _render_with_null_content(tokenizer: Any, messages: list[dict], generation_prompt: bool,
                              tools: list[dict] | None, template_kwargs: Mapping[str, Any] | None) -> str:
    """The chat rendered with its null contents kept: ``apply_chat_template`` (transformers 5) removes every key whose
    value is None before the template runs, and DeepSeek-R1's template writes a turn's tool calls only when
    ``message['content'] is none``. Only :func:`lorakit.train.chat_turns.tool_call_variants`' null-content variant
    holds a None, tried after the chat as given; it renders through the function ``apply_chat_template`` calls, with
    the same variables (the tokenizer's special tokens, the tools, the template options)."""
    try:
        from transformers.utils.chat_template_utils import render_jinja_template
    except ImportError:  # an older transformers keeps None: its apply_chat_template passes it through
        render_jinja_template = None
    if render_jinja_template is None:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                             **({"tools": tools} if tools else {}), **(template_kwargs or {}))
    rendered, _ = render_jinja_template(conversations=[messages], tools=tools or None,
                                        chat_template=tokenizer.get_chat_template(None, tools or None),
                                        add_generation_prompt=generation_prompt,
                                        **{**tokenizer.special_tokens_map, **(template_kwargs or {})})
    return rendered[0]


def for_tokenizer(record: Record | Mapping, tokenizer: Any) -> Record:
    """The record validated, as this tokenizer trains it: a chat that has a prompt/completion form (an Alpaca
    record) takes that form when the tokenizer has no chat template."""
    record = validate_record(record)
    template = getattr(tokenizer, "chat_template", None)
    # a template lorakit train saved to stand for the prompt format (formats.frame_chat_template) is that format
    if record.fallback is not None and (not template or frame_of_template(template)):
        return record.fallback
    return record


def render(record: Record | Mapping, tokenizer: Any, *,
           chat_template_kwargs: Mapping[str, Any] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """Render a record to the text the model sees and the character spans ``[start, end)`` that are targets.

    For a chat, the span of assistant turn i starts where ``render(messages[:i], add_generation_prompt=True)``
    ends and stops where ``render(messages[:i+1])`` ends, so it holds the answer, the end-of-turn token and
    whatever filler the template puts after it (masked later). Assistant turns given ``"weight": 0`` are rendered
    but are not targets. A chat whose template rewrites earlier turns (Qwen3 drops their reasoning) trains as
    several examples: see :func:`render_examples`; this function then names it. ``chat_template_kwargs`` are
    options of the chat template (e.g. ``{"enable_thinking": False}`` for Qwen3), used wherever it renders.
    """
    examples = _render_examples(record, tokenizer, chat_template_kwargs)[0]
    if len(examples) > 1:
        raise LorakitError(f"{validate_record(record).where}: this model's chat template rewrites earlier turns, so the "
                           f"chat trains as {len(examples)} examples (one per assistant turn); call render_examples "
                           "or tokenize_examples")
    return examples[0]


def render_examples(record: Record | Mapping, tokenizer: Any, *,
                    chat_template_kwargs: Mapping[str, Any] | None = None) -> list[tuple[str, list[tuple[int, int]]]]:
    """The examples a record trains as, each ``(text, target character spans)``: one for text and prompt/completion
    records and for chats whose template renders each prefix of the chat as a prefix of it (:func:`render`); one per
    assistant turn (as the template writes it when that turn is generated) for templates that rewrite earlier turns
    (lorakit/train/chat_turns.py says how)."""
    return _render_examples(record, tokenizer, chat_template_kwargs)[0]


def _render_examples(record: Record | Mapping, tokenizer: Any, template_kwargs: Mapping[str, Any] | None = None
                     ) -> tuple[list[tuple[str, list[tuple[int, int]]]], bool, bool]:
    """:func:`render_examples`, whether the chat was split per assistant turn and whether its tool call ids were
    shortened for the template (Mistral's 9 characters)."""
    record = for_tokenizer(record, tokenizer)
    if record.shape == "text":
        return [(record["text"], [(0, len(record["text"]))])], False, False
    if record.shape == "prompt_completion":
        prompt, completion = record["prompt"], record["completion"]
        return [(prompt + completion, [(len(prompt), len(prompt) + len(completion))])], False, False
    messages, where, tools = record["messages"], record.where, openai_tools(record.fields.get("tools"))
    unsupervised = record.fields.get("unsupervised", ())
    targets = [i for i, msg in enumerate(messages) if msg["role"] == "assistant" and i not in unsupervised]
    if targets and targets[0] == 0:
        raise LorakitError(f"{where}: the chat starts with an assistant turn; add the user turn it answers first")

    def check(i: int, target: str) -> None:
        msg = messages[i]
        answer = msg["content"].split("</think>")[-1].strip()  # the text of the turn, past its reasoning
        for call in msg.get("tool_calls", ()):
            name = call["function"]["name"]
            if name not in target:  # the target would lack the call it teaches
                raise missing_call_error(where, i, name, answer)
            check_arguments(call["function"].get("arguments"), name, target, f"{where}: messages[{i}]")
        if msg.get("tool_calls") and answer and answer[:200] not in target:
            raise LorakitError(f"{where}: messages[{i}] has text beside its tool calls, but this model's chat template "
                               f"writes only the calls, so {answer[:30]!r} would not be learnt; move the text into an "
                               "assistant turn of its own or remove it (content null)")
        for key in REASONING_KEYS:  # the target would teach the answer without the reasoning that leads to it
            if msg.get(key) and msg[key].strip()[:200] not in target:
                raise LorakitError(f"{where}: messages[{i}] has {key!r}, but this model's chat template does not write "
                                   "it; put the reasoning into the content (e.g. '<think>...</think>' before the "
                                   "answer) or remove the key")
        if content_reasoning(msg) and content_reasoning(msg)[:200] not in target and i in folded:
            raise LorakitError(f"{where}: messages[{i}] has {folded[i]!r}, but this model's chat template writes it "
                               "neither as a field nor as '<think>...</think>' in the content, so the answer would be "
                               f"learnt without it; remove {folded[i]!r}, or use a model whose template keeps reasoning")
        if content_reasoning(msg) and content_reasoning(msg)[:200] not in target:
            raise LorakitError(f"{where}: messages[{i}] has '<think>...</think>' reasoning in its content, but this "
                               "model's chat template drops it when it writes the turn, so the answer would be learnt "
                               "without it; remove the <think> block, or use a model whose template keeps reasoning")

    messages, folded = _reasoning_in_content(messages, tokenizer)
    return tool_chat_examples(messages, targets, lambda msgs, prompt: _render_chat(
        tokenizer, msgs, prompt, where, tools, template_kwargs), where, check, tools)


def _reasoning_in_content(messages: list[dict], tokenizer: Any) -> tuple[list[dict], dict[int, str]]:
    """Assistant turns whose reasoning is a separate key (``reasoning_content``: the DeepSeek API's output field)
    that a ``<think>`` template never reads get it as ``<think>\n...\n</think>\n\n`` before their content, the form
    DeepSeek-R1 / QwQ templates read (they open ``<think>`` in the generation prompt). Templates that read the key
    (Qwen3) get the messages unchanged, and so do templates that never mention ``<think>`` (the check then refuses
    the key, saying how to put it in the content: lorakit does not invent a reasoning format for a model). One that
    drops ``<think>`` too is refused by the check on the target.
    Returns the messages and ``{index: key}`` of the turns changed."""
    template = getattr(tokenizer, "chat_template", None)
    source = template if isinstance(template, str) else " ".join(map(str, (template or {}).values()))
    out, folded = [], {}
    for i, msg in enumerate(messages):
        key = next((k for k in REASONING_KEYS if msg.get(k)), None)
        if (msg["role"] != "assistant" or key is None or key in source or "<think>" not in source
                or "</think>" in (msg.get("content") or "")):
            out.append(msg)
            continue
        rest = {k: v for k, v in msg.items() if k != key}
        out.append({**rest, "content": f"<think>\n{msg[key].strip()}\n</think>\n\n{msg.get('content') or ''}"})
        folded[i] = key
    return out, folded


# ----------------------------------------------------------------------------------------------------------------
# Tokenization with labels
# ----------------------------------------------------------------------------------------------------------------


def _tokenize_with_spans(text: str, spans: list[tuple[int, int]], tokenizer: Any, info: TokenizerInfo):
    """Token ids of ``text`` and, per character span, the ``[a, b)`` token range that overlaps it.

    With offsets (fast tokenizers) the text is tokenized once, as at inference; a token that straddles a span
    boundary (e.g. a prompt ending in a space merged into the completion's first word) counts as a target.
    Without offsets, the text is cut at the span boundaries and each piece tokenized alone.
    """
    if info.has_offsets:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
        starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
        ranges = []
        if all(a <= b for a, b in zip(starts, starts[1:])) and all(a <= b for a, b in zip(ends, ends[1:])):
            # offsets in text order (every tokenizer we met): the tokens overlapping a span are those ending after
            # its start and starting before its end, found by bisection; a scan of every token for every span made
            # a long chat quadratic (0.4 s of a 60-turn chat's 1.1 s)
            return ids, token_ranges(starts, ends, spans, len(ids))
        for start, end in spans:
            inside = [k for k, (s, e) in enumerate(offsets) if e > start and s < end]
            ranges.append((inside[0], inside[-1] + 1) if inside else (len(ids), len(ids)))
        return ids, ranges
    ids, ranges, cursor = [], [], 0
    for start, end in spans:
        ids += tokenizer(text[cursor:start], add_special_tokens=False)["input_ids"] if start > cursor else []
        a = len(ids)
        ids += tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        ranges.append((a, len(ids)))
        cursor = end
    if cursor < len(text):
        ids += tokenizer(text[cursor:], add_special_tokens=False)["input_ids"]
    return ids, ranges


def tokenize_example(
    record: Record | Mapping,
    tokenizer: Any,
    max_length: int,
    overflow: str = "drop",
    *,
    eot_token: str | None = None,
    info: TokenizerInfo | None = None,
    drops: Counter | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """Tokenize one record into ``input_ids`` and ``labels`` (lists of int of the same length L <= max_length).

    Args:
        record: a :class:`Record` or a raw dict of one of the three shapes (validated here).
        tokenizer: a transformers tokenizer (a chat template is needed for ``messages`` records).
        max_length: the most tokens an example may have.
        overflow: what to do with a longer example: "drop" (return None), "truncate" (keep the first
            ``max_length`` tokens; None if no target is left), "error" (raise), or "split" (a text record in
            windows of ``max_length`` tokens, every token trained once: :func:`tokenize_examples` only; any other
            record is dropped).
        eot_token: the end-of-turn token (default: the tokenizer's eos token).
        info: a precomputed :func:`tokenizer_info` (saves re-inspecting the tokenizer per example).
        drops: if given, counts why an example was dropped: ``"too_long"`` (overflow="drop") or ``"no_target"``
            (its prompt alone fills max_length, so truncation left nothing to learn); ``"too_long_min_tokens"``
            holds the length of the shortest example dropped as too long.
        chat_template_kwargs: options of the chat template (Qwen3: ``{"enable_thinking": False}``).

    Returns:
        ``{"input_ids": [...], "labels": [...], "truncated": bool}`` (a truncated one also has ``"cut_targets"``:
        the target tokens cut off) with ``labels[k] == IGNORE_INDEX`` where
        token k is not a target, or None when the example was dropped.

    Raises:
        LorakitError: a bad record, an example too long with overflow="error", or a chat that trains as several
            examples (its template rewrites earlier turns: use :func:`tokenize_examples`).
    """
    record, info = _checked(record, tokenizer, max_length, overflow, eot_token, info)
    if overflow == "split" and record.shape == "text":  # a long text trains as several windows
        raise LorakitError(f"{record.where}: overflow='split' may make several examples of a text; use "
                           "tokenize_examples")
    with turns_as_given(record):
        text, spans = render(record, tokenizer, chat_template_kwargs=chat_template_kwargs)
        return _tokenize_rendered(record, text, spans, tokenizer, max_length, overflow, info, drops)


def tokenize_examples(
    record: Record | Mapping,
    tokenizer: Any,
    max_length: int,
    overflow: str = "drop",
    *,
    eot_token: str | None = None,
    info: TokenizerInfo | None = None,
    drops: Counter | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """:func:`tokenize_example` for each example the record trains as (:func:`render_examples`: several for a chat
    whose template rewrites earlier turns, one otherwise); the examples dropped are left out (and counted in
    ``drops``)."""
    return _tokenize_record(record, tokenizer, max_length, overflow, eot_token, info, drops, chat_template_kwargs)[0]


def _tokenize_record(record: Record | Mapping, tokenizer: Any, max_length: int, overflow: str, eot_token: str | None,
                     info: TokenizerInfo | None, drops: Counter | None,
                     template_kwargs: Mapping[str, Any] | None = None) -> tuple[list[dict[str, Any]], bool, bool]:
    """:func:`tokenize_examples`, whether the chat was split per assistant turn and whether its call ids were
    shortened."""
    record, info = _checked(record, tokenizer, max_length, overflow, eot_token, info)
    with turns_as_given(record):  # a ShareGPT chat's errors name its conversations[i], not messages[i]
        return _tokenize_checked(record, tokenizer, max_length, overflow, info, drops, template_kwargs)


def _tokenize_checked(record: Record, tokenizer: Any, max_length: int, overflow: str, info: TokenizerInfo,
                      drops: Counter | None, template_kwargs: Mapping[str, Any] | None
                      ) -> tuple[list[dict[str, Any]], bool, bool]:
    """The body of :func:`_tokenize_record`, on a record :func:`_checked` has validated."""
    if overflow == "split" and record.shape == "text":  # a document longer than a row: every token of it trained
        text, spans = render(record, tokenizer, chat_template_kwargs=template_kwargs)
        whole = _tokenize_rendered(record, text, spans, tokenizer, sys.maxsize, "error", info, drops)
        return _windows(whole, max_length, drops), False, False
    rendered, per_turn, short_ids = _render_examples(record, tokenizer, template_kwargs)
    # one example per turn: each shares all but its end with the one before, tokenized once (None: each alone)
    shared = shared_tokens(rendered, tokenizer) if per_turn and info.has_offsets else None
    examples = [_tokenize_rendered(record, text, spans, tokenizer, max_length, overflow, info, drops,
                                   shared[t] if shared else None) for t, (text, spans) in enumerate(rendered)]
    return [ex for ex in examples if ex is not None], per_turn, short_ids


def _windows(example: dict[str, Any] | None, max_length: int, drops: Counter | None) -> list[dict[str, Any]]:
    """A tokenized text example in windows of at most ``max_length`` tokens (overflow="split"), each starting on the
    last token of the one before: a window's first label is never predicted (nothing precedes it), so with that one
    token of overlap every token but the text's first is a target exactly once. Windows after the first are marked
    ``"split": True`` (counted in the summary). ``example``: input_ids and labels of the whole text (or None)."""
    if example is None:
        return []
    ids, labels = example["input_ids"], example["labels"]
    windows, start = [], 0
    while True:
        window_labels = list(labels[start:start + max_length])
        if start:
            window_labels[0] = IGNORE_INDEX  # the previous window's last target
        windows.append({"input_ids": ids[start:start + max_length], "labels": window_labels, "truncated": False,
                        "split": bool(start)})
        if start + max_length >= len(ids):
            break
        start += max_length - 1
    kept = [w for w in windows if w["labels"].count(IGNORE_INDEX) < len(w["labels"])]
    if not kept:
        _dropped(drops, "no_target")
    return kept


def _checked(record: Record | Mapping, tokenizer: Any, max_length: int, overflow: str, eot_token: str | None,
             info: TokenizerInfo | None) -> tuple[Record, TokenizerInfo]:
    """The options checked, the record validated for this tokenizer and its ``TokenizerInfo`` (``info`` if given):
    what tokenizing one record, as one example or as several, starts with."""
    if overflow not in OVERFLOW_CHOICES:
        raise LorakitError(f"overflow={overflow!r} (--overflow) is not one of {', '.join(OVERFLOW_CHOICES)}")
    if max_length < 2:
        raise LorakitError(f"max_length={max_length} (--max-length) is too small; an example needs at least 2 tokens")
    record = for_tokenizer(record, tokenizer)
    info = info or tokenizer_info(tokenizer, eot_token)
    return record, info


def _tokenize_rendered(record: Record, text: str, spans: list[tuple[int, int]], tokenizer: Any, max_length: int,
                       overflow: str, info: TokenizerInfo, drops: Counter | None,
                       tokens: tuple[list[int], list[tuple[int, int]]] | None = None) -> dict[str, Any] | None:
    """One rendered example to ``input_ids`` and ``labels`` (the body of :func:`tokenize_example`); ``tokens``: its
    ids and span token ranges when already known (:func:`lorakit.train.chat_tokens.shared_tokens`)."""
    ids, ranges = tokens or _tokenize_with_spans(text, spans, tokenizer, info)

    input_ids: list[int] = []
    labels: list[int] = []
    pos = 0
    for a, b in ranges:
        input_ids += ids[pos:a]
        labels += [IGNORE_INDEX] * (a - pos)
        target = ids[a:b]
        eot = info.chat_eot_id if record.shape == "messages" and info.chat_eot_id is not None else info.eot_id
        if record.shape == "messages":  # the template's own end of turn, followed by filler such as "\n"
            last_eot = max((k for k, t in enumerate(target) if t == eot or t in info.call_end_ids), default=None)
        else:  # the user's own text: all of it is a target; it ends the turn only if its last token does
            last_eot = len(target) - 1 if target and target[-1] == eot else None
        if last_eot is None:  # the template / completion did not end the turn: add the end-of-turn token
            input_ids += target + [eot]
            labels += target + [eot]
        else:  # supervise through the end-of-turn token; template filler after it is not a target
            input_ids += target
            labels += target[: last_eot + 1] + [IGNORE_INDEX] * (len(target) - last_eot - 1)
        pos = b
    input_ids += ids[pos:]
    labels += [IGNORE_INDEX] * (len(ids) - pos)

    if info.adds_bos and (not input_ids or input_ids[0] != info.bos_id):
        input_ids.insert(0, info.bos_id)
        labels.insert(0, IGNORE_INDEX)
    labels[0] = IGNORE_INDEX  # nothing precedes position 0, so it is never predicted

    truncated = False
    if len(input_ids) > max_length:
        if overflow == "error":
            raise LorakitError(
                f"{record.where}: example is {len(input_ids)} tokens, longer than max_length={max_length}; "
                # called from the CLI and from Python alike: name the flags and the parameters
                "raise --max-length (max_length in Python), or pass --overflow drop or --overflow truncate "
                "(overflow='drop' / 'truncate')"
            )
        if overflow in ("drop", "split"):  # split cuts text records only (_windows): a cut chat would teach a cut answer
            if drops is not None:  # the shortest overlong example: what max_length would have kept one
                drops["too_long_min_tokens"] = min(drops.get("too_long_min_tokens") or len(input_ids), len(input_ids))
            return _dropped(drops, "too_long")
        cut = len(labels) - max_length - labels[max_length:].count(IGNORE_INDEX)
        input_ids, labels, truncated = input_ids[:max_length], labels[:max_length], True
    if labels.count(IGNORE_INDEX) == len(labels):  # (count: a Python loop over each long per-turn example was slow)
        return _dropped(drops, "no_target")  # truncation cut every target away: nothing to learn from this example
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated, **({"cut_targets": cut} if truncated else {})}


def _dropped(drops: Counter | None, reason: str) -> None:
    if drops is not None:
        drops[reason] += 1
    return None


def generation_prompt(record: Record | Mapping, tokenizer: Any, *, info: TokenizerInfo | None = None,
                      chat_template_kwargs: Mapping[str, Any] | None = None) -> list[int]:
    """Token ids to feed ``generate`` for evaluation: the chat up to its last assistant turn plus the generation
    prompt, or the prompt of a prompt/completion record; tokenized exactly as in training (same BOS rule)."""
    record = for_tokenizer(record, tokenizer)
    with turns_as_given(record):
        return _generation_prompt(record, tokenizer, info or tokenizer_info(tokenizer), chat_template_kwargs)


def _generation_prompt(record: Record, tokenizer: Any, info: TokenizerInfo,
                       chat_template_kwargs: Mapping[str, Any] | None) -> list[int]:
    """The body of :func:`generation_prompt`, on a record validated for ``tokenizer``."""
    if record.shape == "messages" and len(record["messages"]) - 1 not in record.fields.get("unsupervised", ()):
        # the context the last answer was trained after: the template's prompt, with the calls of earlier turns in
        # the form this template reads (DeepSeek's JSON-text arguments)
        text, spans = render_examples(record, tokenizer, chat_template_kwargs=chat_template_kwargs)[-1]
        text = text[:spans[-1][0]]
    elif record.shape == "messages":  # a last answer of weight 0 is not trained: the template's prompt for it
        text = _render_chat(tokenizer, record["messages"][:-1], True, record.where,
                            openai_tools(record.fields.get("tools")), chat_template_kwargs)
    elif record.shape == "prompt_completion":
        text = record["prompt"]
    else:
        raise LorakitError(f"{record.where}: a text record has no prompt to generate from; use prompt/completion or messages")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
    if info.adds_bos and (not ids or ids[0] != info.bos_id):
        ids.insert(0, info.bos_id)
    return ids


def reference_text(record: Record | Mapping) -> str:
    """The answer a generation is scored against: the last assistant turn, or the completion.

    A last turn that calls tools has its calls after its text, one OpenAI-style JSON object per call
    (``{"name": ..., "arguments": {...}}``): never the empty content, which an empty generation would match. Each
    template writes calls in its own form (``<tool_call>`` blocks, ``[TOOL_CALLS]``), so a call is rarely an exact
    match; the loss on the validation set is the measure for those chats."""
    record = validate_record(record)
    if record.shape == "messages":
        last = record["messages"][-1]
        calls = [json.dumps({"name": call["function"]["name"], "arguments": call["function"].get("arguments", {})},
                            ensure_ascii=False) for call in last.get("tool_calls", ())]
        return "\n".join(([last["content"]] if last["content"].strip() else []) + calls)
    if record.shape == "prompt_completion":
        return record["completion"]
    raise LorakitError(f"{record.where}: a text record has no reference answer; use prompt/completion or messages")


# ----------------------------------------------------------------------------------------------------------------
# Dataset and summary
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class DataSummary:
    """What happened to the records on the way to training rows.

    Attributes:
        examples: examples kept. dropped: examples dropped (too long with overflow="drop", or no target left
        after truncation). truncated: examples kept but cut to max_length. supervised_tokens: label positions
        that are targets. tokens: all tokens of kept examples. rows: dataset rows (== examples unless packed).
        shapes: records per shape. max_length: the limit used. too_long / no_target: the dropped examples by
        reason (longer than max_length; no target left within it). first_dropped: where the first dropped one
        came from. trimmed_chats: chats that ended in user/tool turns after their last answer, which were trimmed.
        per_turn_chats: chats trained as one example per assistant turn (:func:`render_examples`).
        cut_targets: target tokens that overflow="truncate" cut off the examples it kept.
        split_texts: text records longer than max_length that overflow="split" trained as several windows.
        short_id_chats: chats whose tool call ids were cut to 9 characters for the template (Mistral's).
        untokenized_markup: the special-token markup the chat template writes (``<|im_end|>``) that the tokenizer
        has no token for (a ChatML template on a base model without ChatML's tokens), when chats are trained.
        special_text_chats: chats whose messages spell a special token of the tokenizer ("<|im_end|>" in a user's
        text), which the tokenizer reads as that token; first_special_text says where the first one is.
    """

    examples: int = 0
    dropped: int = 0
    truncated: int = 0
    supervised_tokens: int = 0
    tokens: int = 0
    rows: int = 0
    max_length: int = 0
    packed: bool = False
    shapes: dict[str, int] = field(default_factory=dict)
    too_long: int = 0  # of ``dropped``: longer than max_length under overflow="drop"
    no_target: int = 0  # of ``dropped``: no target token left within max_length (a prompt that fills it)
    first_dropped: str | None = None  # where the first dropped example came from ("train.jsonl:12")
    trimmed_chats: int = 0  # chats whose turns after the last assistant turn were trimmed (kept or not)
    per_turn_chats: int = 0  # chats trained as one example per assistant turn (a template that rewrites earlier turns)
    short_id_chats: int = 0  # chats whose tool call ids were cut to the 9 characters Mistral's template requires
    cut_targets: int = 0  # target tokens that truncation cut off (overflow="truncate"): not learnt
    split_texts: int = 0  # text records longer than max_length trained as several windows (overflow="split")
    untokenized_markup: tuple[str, ...] = ()  # markup the chat template writes that is no token of the tokenizer
    special_text_chats: int = 0  # chats whose text spells a special token of the tokenizer (read as that token)
    first_special_text: str | None = None  # the first of them: "train.jsonl:3 messages[1] (user) has '<|im_end|>'"

    def __str__(self) -> str:
        shapes = ", ".join(f"{n} {s}" for s, n in sorted(self.shapes.items()))
        records = sum(self.shapes.values())
        if records != self.examples:  # drops, or chats split per turn: "8 examples (9 prompt_completion)" misread
            shapes = f"from {records} record{'s' * (records != 1)}: {shapes}"
        packed = f", packed into {self.rows} rows" if self.packed else ""
        return (
            f"{self.examples} example{'s' * (self.examples != 1)} ({shapes}), {self.dropped} dropped, "
            f"{self.truncated} truncated at "
            f"max_length={self.max_length}; {self.supervised_tokens} supervised of {self.tokens} tokens{packed}"
        )


    def drop_note(self) -> str | None:
        """One line on dropped examples (why, the first one, what to do about it), on chats trimmed after their
        last answer and on chats trained per assistant turn; None when none of these happened. It starts with
        "warning:" when chats spell special tokens in their text (:mod:`lorakit.train.special_text`) or the chat template
        writes markup the tokenizer has no token for: said once per dataset, since either silently changes the
        sequence trained on."""
        note, warnings = self._note(), []
        if self.untokenized_markup:
            marks, one = ", ".join(map(repr, self.untokenized_markup)), len(self.untokenized_markup) == 1
            warnings.append(f"this model's chat template writes {marks}, which {'is not a token' if one else 'are not tokens'}"
                            " of its tokenizer, so the chat markup trains as plain text that the model learns to write (and "
                            "no end of turn is found in it): use the chat template made for this tokenizer (its "
                            "instruct version's chat_template.jinja), or give prompt/completion records")
        if self.special_text_chats:
            n = self.special_text_chats
            warnings.append(f"{n} chat{'s spell' if n > 1 else ' spells'} a special token of this tokenizer in its text "
                            f"(the first: {self.first_special_text}), which the tokenizer reads as that token, not as "
                            "text, so the model trains on a different chat than the file's (an answer that ends with "
                            "the end-of-turn token? turns written in the template's markup?): remove the token from "
                            "the data, or give records that are meant to hold the markup as {\"text\": ...}")
        if not warnings:
            return note
        return "warning: " + "; ".join(warnings) + ("; " + note[len("note: "):] if note else "")

    def _note(self) -> str | None:
        """:meth:`drop_note` but for the special tokens."""
        n = self.trimmed_chats
        trimmed = (f"{n} chat{'s end' if n > 1 else ' ends'} with turns after the last assistant reply, which were "
                   "trimmed (nothing follows them to learn)") if n else None
        if self.per_turn_chats:  # said once per dataset: why there are more examples than records
            n = self.per_turn_chats
            split = (f"{n} chat{'s' if n > 1 else ''} trained as one example per assistant turn, because this model's "
                     "chat template rewrites earlier turns (e.g. drops their <think> reasoning) or its generation "
                     "prompt differs from the turn it renders: each turn is learnt as the template writes it when that "
                     "turn is generated")
            trimmed = f"{trimmed}; {split}" if trimmed else split
        if self.short_id_chats:  # the ids the model learns to write are not the ones in the file
            n = self.short_id_chats
            ids = (f"the tool call ids of {n} chat{'s' if n > 1 else ''} were cut to the 9 characters this model's "
                   "chat template requires (their last 9, as vLLM does for Mistral models)")
            trimmed = f"{trimmed}; {ids}" if trimmed else ids
        if self.cut_targets:  # truncation kept the examples but not all they teach: say how much of it was lost
            n, share = self.truncated, self.cut_targets / (self.cut_targets + self.supervised_tokens)
            cut = (f"{n} example{'s were' if n > 1 else ' was'} truncated at max_length={self.max_length}, cutting off "
                   f"{self.cut_targets} target tokens ({share:.0%} of all targets: the end of an answer or a text, "
                   "later turns), which are not learnt (raise --max-length to keep them)")
            trimmed = f"{trimmed}; {cut}" if trimmed else cut
        if self.split_texts:  # why there are more examples than records
            n = self.split_texts
            windows = (f"{n} text{'s' if n > 1 else ''} longer than max_length={self.max_length} "
                       f"{'were' if n > 1 else 'was'} split into windows of at most {self.max_length} tokens, every "
                       "token trained once")
            trimmed = f"{trimmed}; {windows}" if trimmed else windows
        if not self.dropped:
            return f"note: {trimmed}" if trimmed else None
        parts = []
        if self.too_long:
            parts.append(f"{self.too_long} longer than max_length={self.max_length} tokens (raise --max-length or "
                         "pass --overflow truncate)")
        if self.no_target:
            parts.append(f"{self.no_target} whose prompt fills max_length={self.max_length}, leaving no target "
                         "(raise --max-length or shorten the prompts)")
        total = self.examples + self.dropped
        if self.first_dropped and self.first_dropped != "<record>":  # the file and line to look at
            parts.append(f"the first is {self.first_dropped}")
        return f"note: {self.dropped} of {total} examples were dropped: " + "; ".join(parts + ([trimmed] if trimmed else []))


class SupervisedDataset(torch.utils.data.Dataset):
    """Tokenized examples (or packed rows) ready for a :class:`Collator`.

    Item i is a dict with ``input_ids`` and ``labels`` (lists of int), and for packed rows also
    ``position_ids`` and ``seq_lens``. ``records`` holds the records that were kept, in order, for generation
    evaluation (:func:`generation_prompt`, :func:`reference_text`); ``summary`` says what was dropped.
    """

    def __init__(self, rows: list[dict[str, Any]], records: list[Record], summary: DataSummary):
        self.rows, self.records, self.summary = rows, records, summary

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.rows[index]


def build_dataset(
    records: Iterable[Record | Mapping],
    tokenizer: Any,
    max_length: int = 512,
    overflow: str = "drop",
    *,
    pack: bool = False,
    eot_token: str | None = None,
    name: str = "dataset",
    chat_template_kwargs: Mapping[str, Any] | None = None,
    progress: bool | str = False,
) -> SupervisedDataset:
    """Tokenize every record (see :func:`tokenize_example`) and optionally pack the results; ``chat_template_kwargs``
    are options of the chat template (Qwen3: ``{"enable_thinking": False}``). ``progress``: a tqdm bar on stderr
    (True), a plain line now and then ("lines", for a log file) or nothing (False), shown only once tokenizing has
    taken :data:`PROGRESS_DELAY_S` (100k chats take a minute or more; a small set says nothing).

    Raises:
        LorakitError: a bad record, an example too long with overflow="error", or no example left.
    """
    info = tokenizer_info(tokenizer, eot_token)
    summary = DataSummary(max_length=max_length, packed=pack)
    shapes: Counter[str] = Counter()
    examples, kept = [], []
    drops: Counter[str] = Counter()
    n_records = 0
    specials, checked_markup = special_token_texts(tokenizer), False
    if progress and isinstance(records, Sized):  # a generator has no total to show progress against
        from lorakit.train.evaluate import _bar

        records = _bar(records, len(records), f"tokenizing {name}", progress, unit="record", delay_s=PROGRESS_DELAY_S)
    for raw in records:
        if not isinstance(raw, Record):  # a dict given in Python: its errors name its index in the list
            raw = validate_record(raw, f"{name}[{n_records}]")
        record = for_tokenizer(raw, tokenizer)  # an Alpaca record counts as the shape it trains as
        n_records += 1
        if record.shape == "messages" and not checked_markup:  # once: the template is the same for every chat
            summary.untokenized_markup, checked_markup = tuple(markup_not_in_vocabulary(tokenizer)), True
        spelled = spelled_special_token(record, specials)
        if spelled:
            summary.special_text_chats += 1
            summary.first_special_text = summary.first_special_text or \
                f"{record.where} {turn_named_as_given(record, spelled)}"
        shapes[record.shape] += 1
        summary.trimmed_chats += bool(record.fields.get("trimmed_turns"))
        dropped_before = drops["too_long"] + drops["no_target"]
        tokenized, per_turn, short_ids = _tokenize_record(record, tokenizer, max_length, overflow, None, info, drops,
                                                          chat_template_kwargs)
        summary.per_turn_chats += per_turn
        summary.short_id_chats += short_ids
        summary.split_texts += any(ex.get("split") for ex in tokenized)
        if drops["too_long"] + drops["no_target"] > dropped_before:  # a chat split per turn may lose some of its turns
            summary.dropped += drops["too_long"] + drops["no_target"] - dropped_before
            summary.first_dropped = summary.first_dropped or record.where
        for ex in tokenized:
            summary.truncated += ex["truncated"]
            summary.cut_targets += ex.get("cut_targets", 0)
            summary.tokens += len(ex["input_ids"])
            summary.supervised_tokens += len(ex["labels"]) - ex["labels"].count(IGNORE_INDEX)
            examples.append({"input_ids": ex["input_ids"], "labels": ex["labels"]})
        if tokenized:
            kept.append(record)
    if n_records == 0:
        raise LorakitError(f"{name} is empty: give at least one record")
    summary.too_long, summary.no_target = drops["too_long"], drops["no_target"]
    if not examples:
        source = "" if summary.first_dropped == "<record>" else (  # the file to fix
            f" ({summary.first_dropped}" + (", ...)" if n_records > 1 else ")"))
        if drops["no_target"] and not drops["too_long"]:
            raise LorakitError(
                f"{name}: no examples left: in all {n_records}{source} the prompt alone fills max_length={max_length} "
                "tokens, so truncation leaves no completion to learn; raise max_length (--max-length) or shorten the "
                "prompts"
            )
        shortest = drops.get("too_long_min_tokens")
        raise LorakitError(
            f"{name}: no examples left: all {n_records}{source} are longer than max_length={max_length} tokens"
            + (f" (the shortest has {shortest})" if shortest else "")
            + (f" ({drops['no_target']} with no target within it)" if drops["no_target"] else "")
            + "; raise max_length (--max-length) or truncate them (--overflow truncate)"
            + (", or split text records into windows of max_length (--overflow split)" if shapes.get("text")
               and overflow != "split" else "")
        )
    summary.examples, summary.shapes = len(examples), dict(shapes)
    rows = pack_examples(examples, max_length) if pack else examples
    summary.rows = len(rows)
    return SupervisedDataset(rows, kept, summary)


def validation_count(n: int, val_fraction: float) -> int:
    """How many of ``n`` records ``val_fraction`` holds out: ``round(n * val_fraction)``, at least 1."""
    return max(1, round(n * val_fraction))


def split_records(records: Sequence[Record], val_fraction: float, seed: int = 0) -> tuple[list[Record], list[Record]]:
    """Split records into (train, validation) with a seeded shuffle; each split keeps the original order.

    The validation split has ``round(len(records) * val_fraction)`` records (at least 1); both must be non-empty.
    """
    if not 0.0 < val_fraction < 1.0:
        raise LorakitError(f"--val-fraction / val_fraction {val_fraction} must be between 0 and 1 (e.g. 0.1)")
    n = len(records)
    n_val = validation_count(n, val_fraction)
    if n_val >= n:
        raise LorakitError(f"cannot hold out {val_fraction:.0%} of {n} records and keep any for training; lower "
                           "--val-fraction (val_fraction in Python) or add data")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    val_idx = set(order[:n_val])
    return [r for i, r in enumerate(records) if i not in val_idx], [r for i, r in enumerate(records) if i in val_idx]


@dataclass
class DataBundle:
    """What :func:`build_datasets` returns: the training set and the validation set (None if not asked for)."""

    train: SupervisedDataset
    val: SupervisedDataset | None


def python_records(data: Any, name: str) -> list[Record | Mapping]:
    """The examples given in Python: a pandas DataFrame or a ``datasets.Dataset`` read as a Parquet file's rows
    (:func:`lorakit.train.sources.table_records`), any other iterable as its items (validated when tokenized, named
    ``name[i]``); one dict (of columns, or of splits) is refused, since iterating it gives its keys."""
    from lorakit.train.sources import table_records

    if type(data).__name__ == "DataFrame" and hasattr(data, "to_dict"):  # pandas: iterating gives the column names
        return table_records(data.to_dict("records"), name)  # read as a Parquet file's rows (nulls, numpy arrays)
    if hasattr(data, "features") and hasattr(data, "column_names"):  # a datasets.Dataset: a table too
        return table_records(data, name)
    if isinstance(data, Mapping):  # iterating gives its keys, which were then refused as records of type string
        splits = [key for key in data if str(key).lower() in ("train", "validation", "valid", "val", "test", "dev")]
        if splits and len(splits) == len(data):
            raise LorakitError(f"{name}: a dict of splits ({', '.join(map(str, data))}); pass one split, e.g. "
                               f"data[{str(splits[0])!r}]")
        raise LorakitError(f"{name}: one dict ({', '.join(map(str, list(data)[:4]))}); pass a list of records, one dict "
                           "per example (a dict of columns: datasets.Dataset.from_dict(columns))")
    return list(data)


def _records(source: Any, name: str) -> list[Record]:
    """Paths are read; records, dicts, a DataFrame or a ``datasets.Dataset`` given in Python are validated."""
    if isinstance(source, (str, Path)) or (isinstance(source, (list, tuple)) and all(
            isinstance(item, (str, Path)) for item in source)):
        return read_many(source)
    return [validate_record(record, f"{name}[{i}]") for i, record in enumerate(python_records(source, name))]


def validation_in_training(train: SupervisedDataset, validation: SupervisedDataset) -> str | None:
    """The warning for a validation set whose examples are mostly training ones too, else None: the same file given
    as both, or data that repeats its records (a file given twice to weigh it up, upsampled rows) split by
    --val-fraction, which holds out one copy and trains on the other. Such a set scores memorisation: its loss keeps
    falling while the model overfits, and the best adapter is chosen by it. A few shared examples (duplicates in
    real data) are not worth a line: only more than half of them are."""
    def key(record: Record) -> str:
        return json.dumps([record.shape, record.fields], sort_keys=True, default=repr)

    seen = {key(record) for record in train.records}
    shared, total = sum(key(record) in seen for record in validation.records), len(validation.records)
    if total and shared == total:
        return (f"validation data: all {total} examples are also in the training data (the same file "
                "given twice?), so the validation loss cannot show overfitting; hold out examples the model does not "
                "train on (--val-fraction 0.1)")
    if 2 * shared > total:
        return (f"validation data: {shared} of its {total} examples are also in the training data (records repeated "
                "in the data, e.g. a file given twice, split by --val-fraction?), so the validation loss can hardly "
                "show overfitting; remove the repeats before holding out, or give a separate --val-data file")
    return None


def validation_in_another_format(train: SupervisedDataset, validation: SupervisedDataset,
                                 tokenizer: Any) -> str | None:
    """The warning for a validation set rendered in another prompt format than the training set, else None: chats
    (``messages``) go through the chat template, ``text`` and ``prompt``/``completion`` records are plain text. A
    model trained on chats and scored on plain prompts (or the reverse) shows a validation loss and exact match
    that do not follow its training, with no word why. Sets that mix both, and a tokenizer without a chat template
    (chat-like records then train as plain prompts too), are left alone."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    trained = {record.shape == "messages" for record in train.records}
    scored = {record.shape == "messages" for record in validation.records}
    if len(trained) != 1 or len(scored) != 1 or trained == scored:
        return None

    def kind(dataset: SupervisedDataset) -> str:
        shapes = sorted({record.shape for record in dataset.records})
        return ("chats (messages)" if shapes == ["messages"]
                else " and ".join(s.replace("_", "/") for s in shapes) + " records (plain text)")

    return (f"validation data: the training examples are {kind(train)}, the validation examples {kind(validation)}; "
            "chats are rendered with the chat template and the others as plain text, so the validation loss and "
            "exact match score another prompt format than the one trained: give the validation data in the training "
            "data's shape (or hold out training data: --val-fraction 0.1)")


def build_datasets(
    train: str | Path | Sequence[str | Path],
    tokenizer: Any,
    *,
    validation: str | Path | Sequence[str | Path] | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    max_length: int = 512,
    overflow: str = "drop",
    pack: bool = False,
    eot_token: str | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    progress: bool | str = False,
) -> DataBundle:
    """Read files (JSONL, CSV, datasets folders), split or read validation, tokenize: what ``--data`` does.

    ``train`` and ``validation`` are paths, or lists of records already read (:func:`read_many`). The validation
    set is never packed: it is scored per example. Give ``validation`` or ``val_fraction`` (not both), or neither
    for no validation set. ``progress`` as in :func:`build_dataset`.
    """
    if validation is not None and val_fraction is not None:
        raise LorakitError("give a validation file or a validation fraction, not both")
    records = _records(train, "training data")
    val_records = None
    if validation is not None:
        val_records = _records(validation, "validation data")
    elif val_fraction is not None:
        records, val_records = split_records(records, val_fraction, seed)
    train_ds = build_dataset(records, tokenizer, max_length, overflow, pack=pack, eot_token=eot_token, name="training data",
                             chat_template_kwargs=chat_template_kwargs, progress=progress)
    val_ds = None
    if val_records is not None:
        val_ds = build_dataset(val_records, tokenizer, max_length, overflow, eot_token=eot_token, name="validation data",
                               chat_template_kwargs=chat_template_kwargs, progress=progress)
    return DataBundle(train_ds, val_ds)


def pad_id_for(tokenizer: Any, eot_token: str | None = None) -> int:
    """The pad id to give :class:`Collator`: the tokenizer's pad token, else its end-of-turn token."""
    return tokenizer_info(tokenizer, eot_token).pad_id
