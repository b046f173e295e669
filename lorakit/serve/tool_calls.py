"""Tool calling on ``/v1/chat/completions``: the tools and an agent's history through the chat template, and the
model's calls read back out of its text (what vLLM serves with ``--enable-auto-tool-choice --tool-call-parser
hermes`` / ``llama3_json`` / ``mistral``).

Parsed formats, chosen from the chat template that rendered the request (as vLLM's ``--tool-call-parser``; an
adapter folder's own template where it has one: ``model_text.py``):

- ``hermes``: Hermes / Qwen2.5 / Qwen3 write each call as a block ``<tool_call>\\n{"name": ..., "arguments":
  {...}}\\n</tool_call>`` (one or several) after any text;
- ``llama3_json``: Llama 3.1 / 3.2 / 3.3 answer a call with nothing but ``{"name": ..., "parameters": {...}}``
  (several joined by ``;``);
- ``mistral``: Mistral v0.3 templates write ``[TOOL_CALLS] [{"name": ..., "arguments": {...}, "id": ...}]`` after
  any text;
- ``mistral_args`` / ``mistral_call_id``: newer Mistral tokenizers (v11+: Mistral-Small-3.1 / 3.2, Magistral,
  Devstral, Ministral 3) write each call as ``[TOOL_CALLS]name[ARGS]{...}``, one after the other after any text;
  v11 templates put the call's 9-character id between them (``[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}``), and that
  id is the one returned, so the agent's next request hands the template the id the model wrote.

A marker the tokenizer marks special (``[TOOL_CALLS]``, ``[ARGS]``, ``[CALL_ID]``; ``<tool_call>`` in Hermes
tokenizers) is kept in the answer's text for such requests (:func:`kept_tokens`). A template that writes calls
another way is refused for requests whose calls would be parsed, never answered with calls left in the text. An
answer's calls are returned only when every one is well formed (JSON with a ``name`` among the request's tools, or
among those its allowed_tools tool_choice allows, and object arguments, which are returned as the model wrote them);
otherwise the whole text is the content, as vLLM's parsers do: never an error. Streamed, each call goes out as it is
written (:class:`ToolCallStream`). With allowed_tools the call's name is also restricted as it is written
(``tool_names.py``); tool_choice "required" and a named function start the call in the prompt (:func:`forced_prefix`).
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

from lorakit.errors import LorakitError
from lorakit.serve.text import held_prefix

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
ARGS_MARK, CALL_ID_MARK = "[ARGS]", "[CALL_ID]"  # v11+ Mistral tokenizers: [TOOL_CALLS]name([CALL_ID]id)[ARGS]{...}
# where a call starts, in formats with text before it
MARKERS = {"hermes": CALL_OPEN, "mistral": MISTRAL_OPEN, "mistral_args": MISTRAL_OPEN, "mistral_call_id": MISTRAL_OPEN}
PARSED_FORMATS = ("the hermes format (<tool_call>{...}</tool_call> blocks: Qwen2.5, Qwen3, Hermes 2 Pro / 3 templates), "
                  "Llama 3.1-3.3's JSON ({\"name\", \"parameters\"}), Mistral's [TOOL_CALLS] [{...}] (v0.3) and "
                  "[TOOL_CALLS]name[ARGS]{...} (Mistral-Small-3.1/3.2, Magistral, Devstral, Ministral 3)")
# a block, or a last block the model did not close (it ended its turn right after the JSON)
_BLOCK = re.compile(re.escape(CALL_OPEN) + r"(.*?)" + re.escape(CALL_CLOSE) + "|" + re.escape(CALL_OPEN) + r"(.*)$",
                    re.DOTALL)


def template_text(tokenizer: Any, tools: list | None) -> str:
    """The chat template transformers uses for a request with these tools ("" when there is none); a tokenizer may
    hold several named templates (Hermes 2 Pro: "default" and "tool_use")."""
    try:
        template = tokenizer.get_chat_template(None, tools or None)
    except Exception:  # no template, or none of the name asked for
        return ""
    return template if isinstance(template, str) else ""


def call_format(tokenizer: Any, tools: list | None) -> str | None:
    """The format the template writes calls in, among those parsed here: "hermes" (it writes ``<tool_call>``
    blocks), "mistral_call_id" / "mistral_args" (``[TOOL_CALLS]`` and ``[ARGS]``, with or without ``[CALL_ID]``),
    "mistral" (``[TOOL_CALLS]`` then a list), "llama3_json" (``'{"name": "' + tool_call.name`` then
    ``"parameters": ``), or None."""
    template = template_text(tokenizer, tools)
    if CALL_OPEN in template:
        return "hermes"
    if MISTRAL_OPEN in template and ARGS_MARK in template:  # v11+ tokenizers: one [TOOL_CALLS]name[ARGS]{...} per call
        return "mistral_call_id" if CALL_ID_MARK in template else "mistral_args"
    if MISTRAL_OPEN + " [" in template or MISTRAL_OPEN + "[" in template:  # a JSON list (v0.3; Nemo: no space)
        return "mistral"
    if "tool_call.name" in template and '"parameters": ' in template:
        return "llama3_json"
    return None


def kept_tokens(tokenizer: Any, fmt: str) -> frozenset[int]:
    """The format's marker tokens that the tokenizer marks special (Mistral's ``[TOOL_CALLS]``; Hermes 2 Pro / 3
    tokenizers mark ``<tool_call>``): decoding skips special tokens, so these must be kept for the parser to see the calls (vLLM
    turns ``skip_special_tokens`` off for its hermes parser for the same reason)."""
    markers = {"hermes": (CALL_OPEN, CALL_CLOSE), "mistral": (MISTRAL_OPEN,), "mistral_args": (MISTRAL_OPEN, ARGS_MARK),
               "mistral_call_id": (MISTRAL_OPEN, ARGS_MARK, CALL_ID_MARK)}.get(fmt, ())
    if not markers:
        return frozenset()
    from lorakit.serve.text import special_ids

    special = special_ids(tokenizer)
    ids = {tokenizer.convert_tokens_to_ids(marker) for marker in markers}
    return frozenset(i for i in ids if isinstance(i, int) and i in special)


def call_end_tokens(tokenizer: Any, fmt: str | None) -> tuple[int, ...]:
    """Tokens that end a call turn beside the end of turn: Llama 3.1 ends a call with ``<|eom_id|>`` ("end of
    message": the tool's result comes next), which its generation_config lists as an end but its tokenizer does
    not (vLLM stops there too)."""
    if fmt != "llama3_json":
        return ()
    token = tokenizer.get_vocab().get("<|eom_id|>")
    return () if token is None else (int(token),)


def forced_prefix(fmt: str, name: str) -> str:
    """The start of a call as the template writes it in format ``fmt``, up to the function's arguments (``name``
    given: tool_choice names it) or up to its name (``name`` "": tool_choice "required").

    The server puts it at the start of the answer (after the generation prompt), so the model continues a call
    it has begun: what it writes next is read back with the prefix by :func:`parse_calls`, and an answer that does
    not form a well-formed call of a given tool is an error, never a call made up by the server. With llguidance
    the rest is held to a grammar: a callable name, arguments valid for its schema (``forced_grammar.py``);
    without it (or where that grammar cannot be built) the arguments are the model's, unchecked, and so is the
    name unless allowed_tools restricts it (``tool_names.NameGate``). A reasoning model (Qwen3) then calls without
    reasoning first.
    """
    if fmt in ("mistral_args", "mistral_call_id"):  # the name, then the id the model writes (v11) or the arguments
        return MISTRAL_OPEN + (name + (CALL_ID_MARK if fmt == "mistral_call_id" else ARGS_MARK) if name else "")
    head = {"hermes": CALL_OPEN + '\n{"name": "', "llama3_json": '{"name": "', "mistral": MISTRAL_OPEN + ' [{"name": "'}[fmt]
    if not name:
        return head
    return head + name + '", "' + ("parameters" if fmt == "llama3_json" else "arguments") + '": '


def forced_calls(text: str, fmt: str, tool_names: set[str], name: str, single: bool = False
                 ) -> tuple[str | None, list[dict]]:
    """``(content, calls)`` of an answer whose start was :func:`forced_prefix` (``text``: prefix + the model's
    continuation); raises ``LorakitError`` (one line: what the model wrote instead) when it holds no well-formed call
    (of ``name`` where given)."""
    parsed = parse_calls(text, fmt, tool_names, single)
    if parsed is None or (name and parsed[1][0]["function"]["name"] != name):
        wanted = f"a call of {name!r}" if name else "a call of one of the tools"
        shown = text[:160] + ("..." if len(text) > 160 else "")
        raise LorakitError(f"the model did not write {wanted} (tool_choice {'names it' if name else 'required'}): "
                           f"its answer {shown!r} is no well-formed call in the {fmt} format (cut by max_tokens, or "
                           "written without the tools' grammar, which needs llguidance); retry with a larger "
                           "max_tokens or temperature > 0, or send tool_choice 'auto'")
    return parsed


def parse_calls(text: str, fmt: str, tool_names: set[str], single: bool = False
                ) -> tuple[str | None, list[dict]] | None:
    """``(content, calls)`` read from ``text`` in format ``fmt``, or None when it holds no well-formed calls;
    ``single`` (the request's ``parallel_tool_calls`` false): only the first call, as OpenAI answers then."""
    parse = {"hermes": parse_tool_calls, "llama3_json": parse_llama_json, "mistral": parse_mistral,
             "mistral_args": parse_mistral_args, "mistral_call_id": parse_mistral_args}[fmt]
    parsed = parse(text, tool_names)
    return parsed if parsed is None or not single else (parsed[0], parsed[1][:1])


def parse_tool_calls(text: str, tool_names: set[str]) -> tuple[str | None, list[dict]] | None:
    """``text`` -> ``(content, calls)`` when it holds hermes blocks that are all well formed, else None.

    ``content`` is the text outside the blocks with trailing whitespace removed (None when nothing is left);
    ``calls`` are OpenAI's ``{"id": "call_...", "type": "function", "function": {"name", "arguments"}}`` with
    ``arguments`` a JSON string. A block naming a function not in ``tool_names``, whose JSON does not parse, or
    whose arguments are not an object makes the whole text plain content (None).
    """
    if CALL_OPEN not in text:
        return None
    calls, outside, end = [], [], 0
    for match in _BLOCK.finditer(text):
        outside.append(text[end:match.start()])
        end = match.end()
        block = match.group(1) if match.group(1) is not None else match.group(2)
        call = _read_call(block, tool_names, _raw_arguments(block, _skip(block, 0)))
        if call is None:
            return None
        calls.append(call)
    outside.append(text[end:])
    content = "".join(outside).rstrip()
    return (content or None), calls


def parse_llama_json(text: str, tool_names: set[str]) -> tuple[None, list[dict]] | None:
    """Llama 3.1's calls: the whole answer is ``{"name": ..., "parameters": {...}}`` objects joined by ``;`` (as
    vLLM's llama3_json parser reads them; ``<|python_tag|>`` before them is a special token, not in the text).
    ``(None, calls)``, or None when the answer is anything else."""
    stripped = text.strip()
    if not stripped.startswith("{"):
        return None
    decoder, calls, at = json.JSONDecoder(), [], 0
    while at < len(stripped):
        try:
            data, end = decoder.raw_decode(stripped, at)
        except (ValueError, RecursionError):  # a model can nest deeper than json recurses
            return None
        call = _read_call(data, tool_names, _raw_arguments(stripped, at))
        if call is None:
            return None
        calls.append(call)
        at = end
        while at < len(stripped) and stripped[at] in " \t\n;":
            at += 1
    return None, calls


def parse_mistral(text: str, tool_names: set[str]) -> tuple[str | None, list[dict]] | None:
    """Mistral's calls: ``[TOOL_CALLS]`` then a JSON list of ``{"name", "arguments"}`` objects, after any text
    (the content, trailing whitespace removed), as vLLM's mistral parser reads them."""
    at = text.find(MISTRAL_OPEN)
    if at < 0:
        return None
    try:
        data = json.loads(text[at + len(MISTRAL_OPEN):])
    except (ValueError, RecursionError):  # a model can nest deeper than json recurses
        return None
    items = data if isinstance(data, list) else [data]
    first = _skip(text, at + len(MISTRAL_OPEN))
    starts = _list_items(text, first) if isinstance(data, list) else [first]  # where each call's object is
    calls = [_read_call(item, tool_names, _raw_arguments(text, start) if len(starts) == len(items) else None)
             for item, start in zip(items, starts if len(starts) == len(items) else [first] * len(items))]
    if not calls or None in calls:
        return None
    return (text[:at].rstrip() or None), calls


def parse_mistral_args(text: str, tool_names: set[str]) -> tuple[str | None, list[dict]] | None:
    """Calls of v11+ Mistral tokenizers: after any text (the content, trailing whitespace removed), one or more
    ``[TOOL_CALLS]name[ARGS]{...}``, each optionally with ``[CALL_ID]id`` before ``[ARGS]`` (then the call's id),
    and nothing else but whitespace between and after them. None when any call is not well formed (a name not
    among the tools, arguments that are not one JSON object, an empty id, text after a call)."""
    at = text.find(MISTRAL_OPEN)
    if at < 0:
        return None
    decoder, calls, pos = json.JSONDecoder(), [], at
    while pos < len(text):
        if not text.startswith(MISTRAL_OPEN, pos):
            return None  # text after a call's arguments
        pos += len(MISTRAL_OPEN)
        args = text.find(ARGS_MARK, pos)
        if args < 0:
            return None
        name, has_id, call_id = text[pos:args].partition(CALL_ID_MARK)
        start = args + len(ARGS_MARK)
        start += len(text[start:]) - len(text[start:].lstrip())
        try:
            arguments, pos = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):  # a model can nest deeper than json recurses
            return None
        call = _read_call({"name": name.strip(), "arguments": arguments}, tool_names, text[start:pos]) \
            if isinstance(arguments, dict) else None
        if call is None or (has_id and (not call_id.strip() or len(call_id.split()) != 1)):
            return None
        if has_id:  # the id the model wrote: the template reads it back in the agent's next request
            call["id"] = call_id.strip()
        calls.append(call)
        pos += len(text[pos:]) - len(text[pos:].lstrip())
    return (text[:at].rstrip() or None), calls


def _read_call(block: Any, tool_names: set[str], raw: str | None = None) -> dict | None:
    """One call from a block's JSON text (or its decoded value), or None when it is not a call of a given tool.
    ``raw``: the arguments object as the model wrote it, returned as the call's ``arguments`` (OpenAI's are the
    model's text), so that a stream that sends it as it comes (:class:`ToolCallStream`) adds up to the same; the
    arguments are re-serialized when it is None or written as JSON text inside JSON."""
    if isinstance(block, str):
        try:
            data = json.loads(block)
        except (ValueError, RecursionError):  # a model can nest deeper than json recurses
            return None
    else:
        data = block
    if not isinstance(data, dict) or not isinstance(data.get("name"), str) or data["name"] not in tool_names:
        return None
    arguments = data.get("arguments", data.get("parameters", {}))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except (ValueError, RecursionError):  # a model can nest deeper than json recurses
            return None
    if not isinstance(arguments, dict):
        return None
    if raw is None or not raw.startswith("{") or json.loads(raw) != arguments:
        raw = json.dumps(arguments, ensure_ascii=False)
    return {"id": _new_id(), "type": "function", "function": {"name": data["name"], "arguments": raw}}


def _new_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


# -- where calls are in partial text: for the stream, and the raw arguments of the parsers --------------------------
_WHITESPACE = " \t\n\r"
_DECODER = json.JSONDecoder()


def _skip(text: str, at: int) -> int:
    """The first position at or after ``at`` that is not JSON whitespace."""
    while at < len(text) and text[at] in _WHITESPACE:
        at += 1
    return at


def _value_end(text: str, start: int) -> int | None:
    """Where the JSON value starting at ``start`` ends, or None (not complete yet, or not JSON)."""
    try:
        return _DECODER.raw_decode(text, start)[1]
    except (ValueError, RecursionError):  # a model can nest deeper than json recurses
        return None


def _members(text: str, start: int) -> tuple[list[tuple[str, int, int | None]], int | None]:
    """The members of the JSON object at ``text[start]`` as far as the text holds them: ``(key, where its value
    starts, where it ends or None while it is not complete)``, and where the object ends (None: not yet, or it is
    not an object). A member is listed once its value has begun."""
    out: list[tuple[str, int, int | None]] = []
    if start >= len(text) or text[start] != "{":
        return out, None
    at = _skip(text, start + 1)
    if at < len(text) and text[at] == "}":
        return out, at + 1
    while at < len(text):
        after = _value_end(text, at) if text[at] == '"' else None
        if after is None:
            return out, None
        key = json.loads(text[at:after])
        at = _skip(text, after)
        if at >= len(text) or text[at] != ":":
            return out, None
        value = _skip(text, at + 1)
        if value >= len(text):
            return out, None
        end = _value_end(text, value)
        out.append((key, value, end))
        if end is None:
            return out, None
        at = _skip(text, end)
        if at < len(text) and text[at] == "}":
            return out, at + 1
        if at >= len(text) or text[at] != ",":
            return out, None
        at = _skip(text, at + 1)
    return out, None


def _list_items(text: str, start: int) -> list[int]:
    """Where each complete value of the JSON list at ``text[start]`` starts (as far as the text holds them)."""
    if start >= len(text) or text[start] != "[":
        return []
    starts, at = [], _skip(text, start + 1)
    while at < len(text):
        end = _value_end(text, at)
        if end is None:
            starts.append(at)  # the value being written
            return starts
        starts.append(at)
        at = _skip(text, end)
        if at >= len(text) or text[at] != ",":
            return starts
        at = _skip(text, at + 1)
    return starts


def _raw_arguments(text: str, start: int) -> str | None:
    """The text of the ``arguments`` (or ``parameters``) member of the JSON object at ``text[start]``."""
    for key, value, end in _members(text, start)[0]:
        if key in ("arguments", "parameters") and end is not None:
            return text[value:end]
    return None


# one call as far as the text shows it: (name once complete, the id the model wrote, where the arguments begin,
# where they end (None: not yet)), and where the call ends (None: not yet)
_Progress = tuple[str | None, str | None, int | None, int | None]


def _json_call_progress(text: str, start: int) -> tuple[_Progress, int | None]:
    """A call written as one JSON object (hermes, llama3_json, Mistral v0.3's list items) at ``text[start]``."""
    members, end = _members(text, start)
    name = arg_start = arg_end = None
    for key, value, value_end in members:
        if key == "name" and value_end is not None:
            name = json.loads(text[value:value_end])
        elif key in ("arguments", "parameters"):
            arg_start, arg_end = value, value_end
    return (name if isinstance(name, str) else None, None, arg_start, arg_end), end


def _calls_progress(text: str, fmt: str) -> list[_Progress]:
    """The calls a held answer shows so far, in order; a call is listed once it has begun, the next only once
    the one before has ended."""
    out: list[_Progress] = []
    if fmt == "hermes":
        starts = [m.end() for m in re.finditer(re.escape(CALL_OPEN), text)]
        for start in starts:
            progress, end = _json_call_progress(text, _skip(text, start))
            out.append(progress)
            if end is None:
                break
        return out
    if fmt == "llama3_json":
        at = _skip(text, 0)
        while at < len(text):
            progress, end = _json_call_progress(text, at)
            out.append(progress)
            if end is None:
                break
            at = end
            while at < len(text) and text[at] in " \t\n;":
                at += 1
        return out
    marker = text.find(MISTRAL_OPEN)
    if marker < 0:
        return out
    if fmt == "mistral":
        for start in _list_items(text, _skip(text, marker + len(MISTRAL_OPEN))):
            progress, end = _json_call_progress(text, start)
            out.append(progress)
            if end is None:
                break
        return out
    at = marker  # mistral_args / mistral_call_id: [TOOL_CALLS]name([CALL_ID]id)[ARGS]{...}, one after the other
    while text.startswith(MISTRAL_OPEN, at):
        at += len(MISTRAL_OPEN)
        args = text.find(ARGS_MARK, at)
        if args < 0:
            out.append((None, None, None, None))
            break
        name, has_id, call_id = text[at:args].partition(CALL_ID_MARK)
        value = _skip(text, args + len(ARGS_MARK))
        end = _value_end(text, value) if value < len(text) else None
        out.append((name.strip(), call_id.strip() if has_id else None, value if value < len(text) else None, end))
        if end is None:
            break
        at = _skip(text, end)
    return out


class ToolCallStream:
    """One streamed choice of a request with tools: text is passed on as content while no call has started (no
    ``<tool_call>`` / ``[TOOL_CALLS]``; for llama3_json, an answer that does not start with ``{``); from there on it is held, and
    :meth:`finish` reads the calls out of the whole text.

    What :meth:`feed` passes on is always a prefix of the content :func:`parse_calls` gives the whole text
    (a tail that may grow into ``<tool_call>``, and trailing whitespace, are held back until the next text shows
    what they are), so the streamed content plus :meth:`finish`'s rest equals the non-streamed answer's.

    With ``incremental``, the calls stream as they are written, as vLLM's streaming parsers send them
    (:meth:`call_deltas`): a call's id, type and name with empty arguments once its name is complete and among the
    tools, then its arguments object as the model writes it, piece by piece; :meth:`rest_deltas` sends what is
    left at the end. The arguments of the parsed calls are the model's text, so a client that joins the pieces
    (the openai package does) gets the non-streamed calls. A call the model breaks off (cut by ``max_tokens``)
    after it began streaming cannot be taken back: its pieces stay sent and the whole text follows as content, as
    the non-streamed answer has it.
    """

    def __init__(self, tool_names: set[str], fmt: str = "hermes", single: bool = False, incremental: bool = False):
        self.tool_names, self.fmt, self.single, self.incremental = tool_names, fmt, single, incremental
        self.text = ""
        self.emitted = 0
        self.sent: list[list[str]] = []  # per call begun in the stream: [id, name, the arguments sent so far]

    def feed(self, piece: str) -> str:
        """Newly final text -> the content to stream now (possibly "")."""
        self.text += piece
        if self.fmt == "llama3_json":  # a call is the whole answer: hold an answer that starts as JSON
            end = 0 if self.text.lstrip().startswith("{") else len(self.text)
        else:
            marker = MARKERS[self.fmt]
            start = self.text.find(marker, max(0, self.emitted - len(marker)))
            end = start if start >= 0 else len(self.text) - held_prefix(self.text, marker)
        end = len(self.text[:end].rstrip())  # whitespace before a call is not content
        if end <= self.emitted:
            return ""
        out, self.emitted = self.text[self.emitted:end], end
        return out

    def finish(self, last: str = "") -> tuple[str, list[dict] | None]:
        """``(rest of the content, calls or None)`` once the choice has ended, ``last`` being its final text; the
        calls begun in the stream keep the ids they were sent with."""
        self.text += last
        parsed = parse_calls(self.text, self.fmt, self.tool_names, self.single)
        if parsed is None:
            return self.text[self.emitted:], None
        content, calls = parsed
        for call, (ident, _, _) in zip(calls, self.sent):
            call["id"] = ident
        return (content or "")[self.emitted:], calls

    def call_deltas(self) -> list[dict]:
        """The ``delta.tool_calls`` entries the held text now adds (none without ``incremental``): see the class."""
        if not self.incremental:
            return []
        if self.fmt == "llama3_json":
            if not self.text.lstrip().startswith("{"):
                return []
        elif MARKERS[self.fmt] not in self.text:
            return []
        out = []
        for i, (name, call_id, start, end) in enumerate(_calls_progress(self.text, self.fmt)):
            if (self.single and i > 0) or name is None or name not in self.tool_names:
                break
            if i == len(self.sent):  # the call's head, once: its name is complete
                self.sent.append([call_id or _new_id(), name, ""])
                out.append({"index": i, "id": self.sent[i][0], "type": "function",
                            "function": {"name": name, "arguments": ""}})
            if start is None or self.text[start] != "{":  # arguments not begun, or JSON text: sent at the end
                break
            piece = self.text[start:len(self.text) if end is None else end][len(self.sent[i][2]):]
            if piece:
                self.sent[i][2] += piece
                out.append({"index": i, "function": {"arguments": piece}})
            if end is None:
                break
        return out

    def rest_deltas(self, calls: list[dict]) -> list[dict]:
        """The ``delta.tool_calls`` entries that complete ``calls`` (:meth:`finish`'s) after what
        :meth:`call_deltas` sent: the rest of the arguments of a call begun, each other call whole."""
        out = []
        for i, call in enumerate(calls):
            if i >= len(self.sent):
                out.append({"index": i, **call})
                continue
            arguments = call["function"]["arguments"]
            sent = self.sent[i][2]
            rest = arguments[len(sent):] if arguments.startswith(sent) else arguments  # (always: the model's text)
            if rest:
                out.append({"index": i, "function": {"arguments": rest}})
        return out


def stream_tool_calls(calls: list[dict]) -> list[dict]:
    """The ``delta.tool_calls`` entries of a streamed answer's calls (each whole, with its ``index``)."""
    return [{"index": i, **call} for i, call in enumerate(calls)]  # (ToolCallStream.rest_deltas with nothing sent)


# -- the request side: history and tools as the template reads them ------------------------------------------------
def template_messages(messages: list) -> list[dict]:
    """Validated ``Message`` objects -> the chat as the template is given it, as training renders it
    (``lorakit.train.formats``): each call's ``arguments`` parsed into a dict, a call turn's null content ``""``;
    a tool turn keeps its ``tool_call_id`` (and ``name``), an answer its ``reasoning_content``."""
    out = []
    for m in messages:
        entry: dict[str, Any] = {"role": m.role if m.role != "developer" else "system", "content": m.text()}
        if m.reasoning_text():  # an earlier answer's reasoning: the template writes it or drops it
            entry["reasoning_content"] = m.reasoning_text()
        if m.tool_calls:
            entry["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": c.function.parsed_arguments()}} for c in m.tool_calls]
        if m.role == "tool":
            entry["tool_call_id"] = m.tool_call_id
            if m.name:
                entry["name"] = m.name
        out.append(entry)
    return out


def render_variant(tokenizer: Any, messages: list[dict], tools: list[dict] | None,
                   template_kwargs: dict | None) -> list[dict]:
    """The form of ``messages`` this template writes every earlier call of: tried in training's order
    (:func:`lorakit.train.chat_turns.tool_call_variants`: dict arguments, then JSON text, then 9-character ids);
    the tools must be written too. Raises ``LorakitError`` (its ``param`` the request field) when the template
    writes neither.

    Written means the call's (the tool's) name occurs more often than in the chat rendered without the calls (the
    tools): a one-letter name is in any prompt.
    """
    from lorakit.train.chat_turns import tool_call_variants

    def render(chat: list[dict], with_tools: list[dict] | None) -> str | None:
        try:
            text = tokenizer.apply_chat_template(chat, tools=with_tools or None, tokenize=False,
                                                 **{"add_generation_prompt": True, **(template_kwargs or {})})
        except Exception:  # a template refuses one convention (Mistral: ids not 9 characters long)
            return None
        return text if isinstance(text, str) else None

    def unwritten(text: str, baseline: str | None, names: list[tuple[Any, str]]) -> tuple[Any, str] | None:
        for where, name in names:
            wanted = sum(1 for _, other in names if other == name)
            if text.count(name) < wanted or (baseline is not None and text.count(name) - baseline.count(name) < wanted):
                return where, name
        return None

    calls = [(i, c["function"]["name"]) for i, m in enumerate(messages) for c in m.get("tool_calls", ())]
    bare = render([{k: v for k, v in m.items() if k != "tool_calls"} for m in messages], tools) if calls else None
    first = None
    for _, variant in tool_call_variants(messages):
        text = render(variant, tools)
        if text is None:
            continue
        first = first or text
        if unwritten(text, bare, calls) is None:
            missing = unwritten(text, render(variant, None), [(None, t["function"]["name"]) for t in tools or ()])
            if missing is not None:
                error = LorakitError(f"tools are not supported by this model's chat template: it does not write the "
                                     f"tools ({missing[1]!r} is not in the prompt); describe them in the system "
                                     "message instead")
                error.param = "tools"
                raise error
            return variant
    if first is None:
        try:
            tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                          **{"add_generation_prompt": True, **(template_kwargs or {})})
            reason = "refused"
        except Exception as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LorakitError(f"the chat template refused these messages: {reason}")
    i, name = unwritten(first, bare, calls)
    error = LorakitError(f"messages[{i}] calls tool {name!r}, but this model's chat template does not write tool calls; "
                         "send the call as text in the content, or use a model whose template supports tools")
    error.param = f"messages.{i}.tool_calls"
    raise error
