"""Where each assistant turn of a chat is in the text the chat template writes, for templates of every kind.

A chat is trained as the template renders it. The target of assistant turn i is what the model writes after the
template's generation prompt: ``render(messages[:i], add_generation_prompt=True)`` is the context, and the target
runs to where ``render(messages[:i + 1])`` ends. Two kinds of template:

- **Prefix templates** (ChatML, Llama 3, Gemma, SmolLM2, ...) render every prefix of a chat as a prefix of the whole
  chat. The whole chat is then ONE example with a target span per assistant turn (the fast path, unchanged).
- **Templates that rewrite earlier turns**: Qwen3 writes an assistant turn's ``<think>`` reasoning only while it
  is after the last user query (gpt-oss likewise drops the analysis of earlier turns), so ``render(messages[:2])``
  (the first answer, with its reasoning, or with Qwen3's empty ``<think>\\n\\n</think>`` block) is not the start of
  the whole chat (the first answer, reasoning dropped). One example of the whole chat would teach each earlier
  answer without the reasoning the model writes at inference. Such a chat trains as several examples, one per
  assistant turn, each rendered as the template renders it when that turn is the one being generated: the earlier
  turns are masked context exactly as at inference, the turn itself is the target. Consecutive turns whose
  examples are prefixes of each other share one example (a Qwen3 tool-calling chain after the last user query is
  one), so tokens are not repeated where the template does not require it. A long chat's renders are read from
  windows (:mod:`lorakit.train.chat_rewrites`) and its examples share their tokens (:mod:`lorakit.train.chat_tokens`),
  in time linear in the chat.

A generation prompt that opens a block the rendered turn does not show (DeepSeek-R1 distills and QwQ end it with
``<think>\\n`` and strip the reasoning from every turn they render) is continued with the turn as the user wrote it
(``<think>\\nreasoning\\n</think>\\n\\nanswer`` in the content): that is what the model writes after that prompt.
A prompt that only adds whitespace after the turn's header is continued with the turn as rendered. A template that
writes the context one way when it ends the chat and another when an answer follows (Mistral v0.3 puts the system
prompt and tool list into the last user turn only; Hermes closes a tool result differently when it is last) has the
turn, as the whole chat writes it, continue the prompt after the prompt's own last words (``_after_prompt_tail``).

OpenAI tool calls reach templates written for different conventions (arguments as a dict or JSON text, null
content, Mistral's 9-character ids) through :func:`tool_call_variants`, tried in order by the caller.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from lorakit.errors import LorakitError
from lorakit.train.chat_prefix import prefix_spans
from lorakit.train.chat_rewrites import common_prefix_length, rewritten_renders
from lorakit.train.formats import REASONING_KEYS

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
Span = tuple[int, int]
# messages the exact renders of a chat render in all (2i per turn i) past which the chat says why it is slow: about
# 10 s (a 1,001-message chat of 500 turns renders 500,000; its windows would have rendered ~10,000)
SLOW_RENDERS = 200_000
# render(messages, add_generation_prompt) -> text, with the record's tools and error location bound in
Render = Callable[[list, bool], str]


def content_reasoning(message: Mapping) -> str:
    """The reasoning written inside an assistant turn's content as ``<think>...</think>`` ("" when there is none)."""
    content = message.get("content")
    if not isinstance(content, str) or THINK_CLOSE not in content:
        return ""
    return content.split(THINK_CLOSE)[0].split(THINK_OPEN)[-1].strip()


def chat_examples(messages: Sequence[Mapping], targets: Sequence[int], render: Render, where: str,
                  check: Callable[[int, str], None], written: Sequence[Mapping] | None = None
                  ) -> tuple[list[tuple[str, list[Span]]], bool]:
    """The examples a chat trains as: ``[(text, [(start, end), ...])]`` with the character spans that are targets.

    Args:
        messages: the chat's messages, as the template is given them.
        targets: the indices of the assistant turns to learn (each > 0), in order.
        render: renders a list of messages, with or without the generation prompt.
        where: the record's location ("train.jsonl:12") for errors.
        check: ``check(i, target_text)`` raises when turn i's target lacks what the message holds (a tool call, its
            reasoning), so that nothing the user wrote is silently not learnt.
        written: the messages as the user wrote them, where ``messages`` is a :func:`tool_call_variants` variant
            (a turn's reasoning is read from them); default ``messages``.

    Returns:
        (examples, per_turn): one example (the whole chat) and False for a prefix template; else the per-turn
        examples (see the module docstring) and True.
    """
    full = render(list(messages), False)
    spans = prefix_spans(messages, targets, render, full)  # a long chat, in linear time; None: the exact renders
    if spans is not None:
        for i, (start, end) in zip(targets, spans):
            check(i, full[start:end])
        return [(full, spans)], False
    renders = rewritten_renders(messages, targets, render, full)  # a long chat, in linear time; None: the exact ones
    if renders is None and 2 * sum(targets) >= SLOW_RENDERS:  # the per-record progress would stand still a while
        warnings.warn(f"{where}: this chat of {len(messages):,} messages is rendered prefix by prefix, once per "
                      f"assistant turn ({len(targets):,}), which takes time growing with the square of its length: its "
                      "chat template writes a shorter chat in a way the fast path could not follow; split it into "
                      "shorter chats if this is too slow", stacklevel=2)
    turns = []  # (i, context with generation prompt, render through turn i)
    for t, i in enumerate(targets):  # the chat through its last message is the whole chat, already rendered
        if renders is not None:
            turns.append((i, *renders[t]))
            continue
        through = full if i + 1 == len(messages) else render(list(messages[: i + 1]), False)
        turns.append((i, render(list(messages[:i]), True), through))
    if all(full.startswith(before) and full.startswith(through) and len(through) > len(before)
           for _, before, through in turns):
        for i, before, through in turns:
            check(i, through[len(before):])
        return [(full, [(len(before), len(through)) for _, before, through in turns])], False
    located = []  # (text, start) per turn, in order, so that the first faulty turn is the one reported
    for i, before, through in turns:
        text, start = _locate_turn((written or messages)[i], i, before, through, where)
        check(i, text[start:])
        located.append((text, start))
    groups: list[tuple[str, list[Span]]] = []  # built from the last turn back: a turn joins the example after it
    for text, start in reversed(located):  # when its own example is a prefix of that one
        if groups and groups[-1][0].startswith(text):
            groups[-1][1].insert(0, (start, len(text)))
        else:
            groups.append((text, [(start, len(text))]))
    return groups[::-1], True


def tool_chat_examples(messages: Sequence[Mapping], targets: Sequence[int], render: Render, where: str,
                       check: Callable[[int, str], None], tools: list[dict] | None
                       ) -> tuple[list[tuple[str, list[Span]]], bool, bool]:
    """:func:`chat_examples` of the first :func:`tool_call_variants` variant the template writes in full, and whether
    that variant shortened the call ids; then the record's ``tools`` must be in the prompt of its first example
    (:func:`check_tools_written`); ``tools`` are the schemas ``render`` hands the template.

    When no variant is written in full, the error of the first variant that got furthest is raised: past the
    template (which refuses dict arguments in DeepSeek's, long ids in Mistral's) and past writing the calls (R1's
    needs null content), so that it names what the data lacks (the reasoning R1's prompt opens, text the template
    drops); an error a variant causes itself (a tojson template writing JSON text as a string) is not reported.
    """
    errors: list[LorakitError] = []
    for short_ids, variant in tool_call_variants(messages):
        try:
            examples, per_turn = chat_examples(variant, targets, render, where, check, written=messages)
        except LorakitError as exc:
            errors.append(exc)
            continue
        first_text, first_spans = examples[0]
        check_tools_written(tools, first_text[:first_spans[0][0]], where)  # the prompt of the first turn learnt
        return examples, per_turn, short_ids

    def stage(error: LorakitError) -> int:  # how far the variant got: the template refused it, wrote no call, more
        return 0 if getattr(error, "template_rejected", False) else 1 if getattr(error, "missing_call", False) else 2

    told = [e for e in errors if not getattr(e, "variant_only", False)] or errors
    raise max(told, key=stage)  # the first of those that got furthest


def openai_tools(tools: list[dict] | None) -> list[dict] | None:
    """Tool schemas in OpenAI's form, ``{"type": "function", "function": {"name", "description", "parameters"}}``, as
    chat templates read them (Mistral's reads ``tool.function``) and inference servers send them: a bare function
    schema (``{"name", "parameters"}``, as glaive- and xlam-style datasets write tools) is wrapped."""
    if not tools:
        return tools
    return [{"type": "function", "function": tool} if "function" not in tool and "name" in tool else tool
            for tool in tools]


def check_tools_written(tools: list[dict] | None, prompt: str, where: str) -> None:
    """Raise when the record's tool schemas are not in the prompt of its first example: the template has no tools
    section, so the calls would be learnt without the schemas the model is shown at inference."""
    for tool in tools or ():
        function = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
        name = function.get("name")
        if isinstance(name, str) and name and name not in prompt:
            raise LorakitError(f"{where}: field 'tools' ({name!r}) is not written by this model's chat template (it has "
                               "no tools section), so the model would learn without the schemas; describe the tools in "
                               "the system message, as this model's card says, and remove 'tools', or use a model whose "
                               "template writes them")


def check_arguments(arguments: Any, name: str, target: str, at: str) -> None:
    """Raise when the target does not hold a call's arguments as JSON: a template that prints the dict as Python
    (``{'city': 'Paris'}``), writes a JSON string again as a string, or leaves out an argument's value."""
    if not isinstance(arguments, Mapping) or not arguments:
        return
    as_json = json.dumps(arguments, ensure_ascii=False)
    if str(arguments) != as_json and str(arguments) in target:
        raise LorakitError(f"{at} calls tool {name!r}, but this model's chat template writes its arguments as a Python "
                           f"dict ({str(arguments)[:40]}), not JSON; use prompt/completion records for this tokenizer")
    if json.dumps(as_json, ensure_ascii=False) in target:  # only the JSON-text variant can give this (a tojson template)
        error = LorakitError(f"{at} calls tool {name!r}, but this model's chat template writes its arguments as a JSON "
                             "string inside JSON; use prompt/completion records for this tokenizer")
        error.variant_only = True
        raise error
    for key, value in arguments.items():
        if isinstance(value, str) and value and value[:100] not in target and \
                json.dumps(value, ensure_ascii=False)[1:-1][:100] not in target:
            raise LorakitError(f"{at} calls tool {name!r}, but this model's chat template does not write its argument "
                               f"{key!r}; use a model whose template writes tool arguments, or prompt/completion records")


def missing_call_error(where: str, i: int, name: str, answer: str) -> LorakitError:
    """The error for assistant turn i whose call of tool ``name`` the chat template does not write; ``answer`` is
    the turn's text (past its reasoning), which some templates (DeepSeek-R1's) write instead of the calls."""
    if answer:
        error = LorakitError(f"{where}: messages[{i}] calls tool {name!r}, but this model's chat template does not write "
                             "the calls of a turn that also has text (DeepSeek-R1's writes them only when the content is "
                             f"empty): move the text {answer[:30]!r} into an assistant turn of its own or remove it")
    else:
        error = LorakitError(f"{where}: messages[{i}] calls tool {name!r}, but this model's chat template does not write "
                             "tool calls; use a model whose template supports tools, or write the call into the content")
    error.missing_call = True  # tool_chat_examples prefers what a variant that wrote the call found missing
    return error


def tool_call_variants(messages: Sequence[Mapping]) -> list[tuple[bool, list[Mapping]]]:
    """The chat as validated, then as the templates written for other conventions of OpenAI tool calls read it;
    each with whether its call ids were shortened.

    Validation gives each call's ``arguments`` as a dict and a call turn's null content as ``""``, as transformers'
    chat templates expect (Qwen, Llama 3.1 and Mistral write ``arguments | tojson``; a null would print "None"); a
    call without ``type`` gets OpenAI's only one, "function" (DeepSeek's templates write it). DeepSeek's templates
    instead concatenate ``arguments`` as a JSON string (a dict fails) and R1's writes the calls only when ``content
    is none`` (an empty string drops them; ``lorakit.train.data`` renders a None through transformers' own render
    function, since ``apply_chat_template`` removes it). Mistral's refuses call ids that are not 9 characters long, which OpenAI's
    (``call_...``) never are: the last variant gives every call id its last 9 characters, as vLLM does for Mistral
    models (zero-padded when shorter; numbered in order when missing, each tool result taking the id of the call it
    answers). The variants are tried in order and the first the template writes in full (every call, its arguments,
    the content) is trained; a chat without tool calls has one.
    """
    calls = [i for i, msg in enumerate(messages) if msg.get("tool_calls")]
    if not calls:
        return [(False, list(messages))]

    def variant(text_arguments: bool, null_content: bool, short_ids: bool = False) -> list[Mapping]:
        out = [dict(msg) for msg in messages]
        for i in calls:
            msg = out[i]
            msg["tool_calls"] = [{**call, "type": call.get("type") or "function"} for call in msg["tool_calls"]]
            if text_arguments:
                msg["tool_calls"] = [{**call, "function": {**call["function"], "arguments": json.dumps(
                    call["function"].get("arguments", {}), ensure_ascii=False)}} for call in msg["tool_calls"]]
            if null_content and not str(msg.get("content") or "").split(THINK_CLOSE)[-1].strip():
                msg["content"] = None
        return _nine_character_ids(out) if short_ids else out

    # a turn with no answer text (none, or only its <think> reasoning, which _locate_turn reads from the original)
    empty = any(not str(messages[i].get("content") or "").split(THINK_CLOSE)[-1].strip() for i in calls)
    flags = [(False, False), (True, False)] + ([(False, True), (True, True)] if empty else [])
    ids = [call.get("id") for i in calls for call in messages[i]["tool_calls"]]
    ids += [msg.get("tool_call_id") for msg in messages if msg["role"] == "tool"]
    if any(not isinstance(x, str) or len(x) != 9 for x in ids):
        flags.append((False, False, True))
    return [(len(f) > 2, variant(*f)) for f in flags]


def _nine_character_ids(messages: list[dict]) -> list[dict]:
    """The chat with every tool call id, and each tool result's ``tool_call_id``, 9 characters long (see
    :func:`tool_call_variants`)."""
    def short(value: str) -> str:
        return value[-9:].rjust(9, "0")

    count, pending = 0, []  # the ids of the last turn's calls that no tool result has answered yet
    for msg in messages:
        if msg.get("tool_calls"):
            calls = []
            for call in msg["tool_calls"]:
                count += 1
                calls.append({**call, "id": short(call["id"]) if isinstance(call.get("id"), str) else f"{count:09d}"})
            msg["tool_calls"], pending = calls, [call["id"] for call in calls]
        elif msg["role"] == "tool":
            given = msg.get("tool_call_id")
            msg["tool_call_id"] = short(given) if isinstance(given, str) else (pending[0] if pending else f"{0:09d}")
            if msg["tool_call_id"] in pending:
                pending.remove(msg["tool_call_id"])
    return messages


def _locate_turn(message: Mapping, i: int, before: str, through: str, where: str) -> tuple[str, int]:
    """Turn i's example text and where its target starts: ``before`` + the rest of ``through`` when ``before`` (the
    generation prompt) starts it, or starts it but for whitespace the prompt adds after the turn's header; else
    ``before`` + the turn as ``through`` writes it after the prompt's own last words (:func:`_after_prompt_tail`:
    templates that write the context differently when it is the end of the chat); else, for a prompt that opens
    ``<think>`` which the template strips from the turn, ``before`` + the turn as written (its reasoning, then the
    answer and the template's end of turn)."""
    if through.startswith(before) and len(through) > len(before):
        return through, len(before)
    head = common_prefix_length(before, through)
    if head < len(before) and not before[head:].strip() and head < len(through):  # the prompt only adds whitespace
        return before + through[head:], len(before)  # ("\n" after the header): the model writes the turn after it
    reasoning = content_reasoning(message) or any(message.get(key) for key in REASONING_KEYS)
    if reasoning and before.rstrip().endswith(THINK_CLOSE):  # Qwen3's enable_thinking=False writes "<think></think>"
        raise LorakitError(f"{where}: messages[{i}] has reasoning, but the generation prompt already closes the "
                           f"<think> block (it ends {before[-24:]!r}; e.g. chat template option enable_thinking false), "
                           "so the model answers there without reasoning; remove the reasoning from the records or "
                           "drop the template option")
    if not before.rstrip().endswith(THINK_OPEN):  # a prompt that opens <think> is handled below
        anchored = _after_prompt_tail(before, through, head)
        if anchored is not None:
            return before + anchored, len(before)
    cut = before.rfind(THINK_OPEN)  # a prompt that ends by opening "<think>" ...
    if cut < 0 or before[cut + len(THINK_OPEN):].strip() or not through.startswith(before[:cut]):
        raise LorakitError(
            f"{where}: the chat template does not write messages[{i}] after the generation prompt it renders for "
            f"messages[:{i}] (the prompt ends {before[-40:]!r}, the turn starts {through[head:][:40]!r}), so the "
            "assistant turn cannot be located; use prompt/completion records for this tokenizer")
    opened, rendered = before[cut:], through[cut:]  # ... which the turn, as the template writes it, lacks
    content = message.get("content") if isinstance(message.get("content"), str) else ""
    if content.startswith(opened):
        written = content[len(opened):]
    elif content.lstrip().startswith(THINK_OPEN):
        written = content.lstrip()[len(THINK_OPEN):].lstrip("\n")
    else:
        written = None
    answer = content.split(THINK_CLOSE)[-1]
    for shown in (answer, answer.lstrip("\n"), answer.lstrip()):  # templates strip the answer's leading newlines
        if written is not None and THINK_CLOSE in content and shown and rendered.startswith(shown):
            return before + written + rendered[len(shown):], len(before)
    if written is not None and THINK_CLOSE in content and not answer.strip() and message.get("tool_calls"):
        return before + written + rendered, len(before)  # reasoning, then the calls (DeepSeek-R1: content only that)
    key = next((key for key in REASONING_KEYS if message.get(key)), None)
    if key:  # the reasoning is there, under a key this template does not read
        raise LorakitError(f"{where}: messages[{i}] has {key!r}, but this model's chat template does not write it; put "
                           f"the reasoning into the content ('{THINK_OPEN}\\n...\\n{THINK_CLOSE}\\n\\n' before the "
                           "answer) or remove the key")
    unwritten = next((c["function"]["name"] for c in message.get("tool_calls", ()) if c["function"]["name"] not in rendered),
                     None)
    if unwritten:  # reasoning would not help: the calls themselves are missing
        raise missing_call_error(where, i, unwritten, answer.strip())
    raise LorakitError(f"{where}: this model's chat template starts each answer with {opened!r} (its generation "
                       f"prompt) but writes messages[{i}] as {rendered[:40]!r}, without reasoning; start the content "
                       f"with the reasoning ('{THINK_OPEN}\\n...\\n{THINK_CLOSE}\\n\\n' before the "
                       f"{'calls' if message.get('tool_calls') else 'answer'}), as the model writes it after that prompt")


# the shortest tail of the prompt trusted to mark where the turn starts: the last user words and "[/INST]", or
# "<|im_start|>assistant\n"; shorter tails ("\n", ">") occur anywhere
MIN_TAIL = 8


def _after_prompt_tail(before: str, through: str, head: int) -> str | None:
    """The turn as ``through`` writes it after the longest tail of the generation prompt ``before`` that ``through``
    repeats past the point where the two differ (``head`` characters in), or None.

    Some templates write the context one way when it ends the chat and another way when an assistant turn follows:
    Mistral v0.3 puts the system prompt into the LAST user turn only, Hermes closes a tool result with
    ``\n</tool_response>`` only when it is not the last message. The prompt the model is given at inference is
    ``before``; the model then writes the turn the way the template writes it in the chat, which starts where the
    prompt's own last words (``...?[/INST]``, ``<|im_end|><|im_start|>assistant\n``) end in ``through``.
    """
    def found(size: int) -> int:  # where the tail of this size occurs in through past head, or -1
        return through.find(before[len(before) - size:], head)

    low, high = 0, len(before) - head  # found(low) holds; a tail found implies every shorter one is: bisect
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if found(mid) >= 0 else (low, mid - 1)
    tail, at = before[len(before) - low:], found(low)
    if low < MIN_TAIL or not tail.strip() or at + low >= len(through):
        return None
    return through[at + low:]
