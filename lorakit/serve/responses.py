"""OpenAI's Responses API objects (``POST /v1/responses``): the response and its server-sent events.

The subset vLLM also serves. Generation is the chat endpoint's (``app._submit``: chat template, adapters batched
with other requests, the same limits), so for the same messages and adapter the answer is the chat completion's:
its reasoning (a ``<think>`` or ``[THINK]`` block, ``reasoning.py``), its text, its tool calls
(``tool_calls.py``). What differs is the wire format, output items in that order:

    {"id": "resp_...", "object": "response", "status": "completed" | "incomplete", "output": [
        {"type": "reasoning", "id": "rs_...", "summary": [], "content": [{"type": "reasoning_text", "text"}], ...},
        {"type": "message", "id": "msg_...", "status", "role": "assistant",
         "content": [{"type": "output_text", "text", "annotations": []}]},
        {"type": "function_call", "id": "fc_...", "call_id": "call_...", "name", "arguments", "status"}, ...],
     "usage": {"input_tokens", "output_tokens", "total_tokens", ...}, ...the request's settings echoed}

The reasoning item is there when the answer reasoned; the message when it has text, or neither reasoning
unfinished nor calls (an answer cut by ``max_output_tokens`` while thinking has no message, as OpenAI's).

A streamed answer is OpenAI's event sequence, each event ``{"type", "sequence_number", ...}`` on an SSE
``event:``/``data:`` pair: ``response.created``, ``response.in_progress``; for each item as it comes,
``response.output_item.added`` ... ``response.output_item.done``: a reasoning item's ``content_part.added``,
``reasoning_text.delta`` (one per piece), ``reasoning_text.done``, ``content_part.done``; a message's
``content_part.added``, ``output_text.delta``, ``output_text.done``, ``content_part.done``; a function call's
item (id, call_id, name, empty arguments) once the model has written its name, ``function_call_arguments.delta``
as it writes the arguments, ``.done`` with them whole once the answer has ended and the call parses (a forced
call, held whole, comes as one delta then); then ``response.completed`` or ``response.incomplete``
(``response.failed`` if generation fails). No ``[DONE]``: OpenAI ends the Responses stream with the last event.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING

from lorakit.serve.answers import failure, logprobs_object
from lorakit.serve.engine import Request, TokenInfo
from lorakit.serve.named_call import SchemaCall
from lorakit.serve.protocol import ResponsesRequest
from lorakit.serve.reasoning import AnswerStart, ReasoningStream
from lorakit.errors import LorakitError
from lorakit.serve.tool_calls import ToolCallStream, forced_calls, parse_calls

if TYPE_CHECKING:
    from lorakit.serve.app import ServerState, _Bridge
    from lorakit.serve.model_text import ModelText


def new_ids(request_id: str | None = None) -> tuple[str, str]:
    """A response id and its message item's id, in OpenAI's forms; ``request_id``: vLLM's field, the response's
    id where the client sent one (vLLM's ``resp_`` prefix added unless it has it)."""
    ident = f"resp_{uuid.uuid4().hex}" if request_id is None else \
        request_id if request_id.startswith("resp_") else f"resp_{request_id}"
    return ident, f"msg_{uuid.uuid4().hex}"


def _status(reason: str) -> str:
    """The engine's finish reason -> the response's status: "length" (max_output_tokens, or the room the context
    left) is OpenAI's "incomplete"."""
    return "completed" if reason == "stop" else "incomplete"


def _part(text: str, logprobs: list[dict] | None = None) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _message(item_id: str, text: str | None, status: str, logprobs: list[dict] | None = None) -> dict:
    """The output message item; ``text`` None: the item as first announced, with no content part yet;
    ``logprobs``: its text part's (the answer's tokens', :func:`answer_logprobs`)."""
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if text is None else [_part(text, logprobs)]}


def answer_logprobs(text: ModelText, infos: list[tuple[int, TokenInfo]]) -> list[dict]:
    """The Responses API's logprobs of these ``(token, TokenInfo)``: ``{"token", "bytes", "logprob",
    "top_logprobs"}`` each, as chat's ``logprobs.content``. As vLLM's, a message's list holds every token of the
    answer (a reasoning block's and a call's too): the tokens are the answer's, whatever items they fall in."""
    return logprobs_object(text, infos, chat=True)["content"]


def _reasoning(item_id: str, text: str | None, status: str) -> dict:
    """The reasoning item (the ``openai`` package's ``ResponseReasoningItem``): its text as one ``reasoning_text``
    part, no summary (none is written), nothing encrypted (nothing is hidden); ``text`` None: as first announced."""
    return {"type": "reasoning", "id": item_id, "summary": [], "status": status, "encrypted_content": None,
            "content": [] if text is None else [{"type": "reasoning_text", "text": text}]}


def _function_call(call: dict, status: str, arguments: str | None = None) -> dict:
    """A ``function_call`` item of a parsed call (``tool_calls`` form); its item id follows the call's id."""
    return {"type": "function_call", "id": "fc_" + call["id"].removeprefix("call_"), "call_id": call["id"],
            "name": call["function"]["name"],
            "arguments": call["function"]["arguments"] if arguments is None else arguments, "status": status}


def _reasoning_id(item_id: str) -> str:
    return "rs_" + item_id.removeprefix("msg_")


def usage(input_tokens: int, output_tokens: int, reasoning_tokens: int = 0, cached_tokens: int = 0) -> dict:
    """The Responses API's usage; ``cached_tokens``: input tokens the static decoder's prefix cache copied."""
    return {"input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": cached_tokens, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": input_tokens + output_tokens}


def response_object(body: ResponsesRequest, ident: str, created: int, status: str, output: list[dict],
                    usage: dict | None = None, error: dict | None = None) -> dict:
    """The Response object: ``status`` "in_progress" (stream start), "completed", "incomplete" or "failed"; the
    request's settings are echoed as OpenAI echoes them (defaults where the client left them out)."""
    return {
        "id": ident, "object": "response", "created_at": created, "status": status,
        "background": False, "completed_at": int(time.time()) if status == "completed" else None,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "max_tool_calls": None, "metadata": body.metadata or {}, "model": body.model, "output": output,
        "parallel_tool_calls": True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        "previous_response_id": None, "prompt_cache_key": body.prompt_cache_key,
        "reasoning": {"effort": body.reasoning.effort if body.reasoning is not None else None, "summary": None},
        "safety_identifier": body.safety_identifier,
        "service_tier": "default", "store": False,  # nothing is kept, whatever the request asked
        "temperature": body.temperature, "text": {"format": _format(body), "verbosity": "medium"},
        "tool_choice": body.tool_choice if body.tool_choice is not None else "auto",  # a named or allowed_tools one too
        "tools": [tool.model_dump(exclude_none=True) for tool in body.tools or ()],
        "top_logprobs": body.top_logprobs or 0, "top_p": body.top_p, "truncation": "disabled", "usage": usage, "user": body.user,
    }


def _format(body) -> dict:
    """``text.format`` as the request gave it (a json_schema's name, schema and strict), OpenAI's echo of it."""
    given = body.text.format if body.text is not None else None
    return {"type": "text"} if given is None else given.model_dump(by_alias=True, exclude_none=True)


def output_items(item_id: str, reasoning: str | None, content: str | None, calls: list[dict] | None,
                 status: str, logprobs: list[dict] | None = None) -> list[dict]:
    """The answer's output items: reasoning (if any), the message (if it has text, or nothing else to say), the
    calls; ``content`` None: the answer ended inside its reasoning."""
    items = []
    if reasoning is not None:
        items.append(_reasoning(_reasoning_id(item_id), reasoning, status if content is None else "completed"))
    if content is not None and (content or not calls):
        items.append(_message(item_id, content, status, logprobs))
    items += [_function_call(call, "completed") for call in calls or ()]
    return items


def final_response(body: ResponsesRequest, ident: str, item_id: str, created: int, pieces: list[str], reason: str,
                   input_tokens: int, output_tokens: int, think: AnswerStart | str | None = None,
                   calls: tuple[str, set[str], bool, str | None] | None = None,
                   logprobs: list[dict] | None = None, cached_tokens: int = 0,
                   named: SchemaCall | None = None) -> dict:
    """The finished answer (the non-streamed body) from its engine pieces (``logprobs``: the answer's, where asked:
    :func:`answer_logprobs`); ``think``: where the answer starts
    with respect to its reasoning block (``ReasoningParser.start``; None: no reasoning is split off); ``calls``:
    (format, tool names, first call only, the forced start of a call or None) when calls are parsed; ``named``: a
    named function on a template without a call format (``named_call.py``): the answer (its text after any
    reasoning) is that function's one call. Raises ``LorakitError`` when a forced call was not written
    (``tool_calls.forced_calls``)."""
    reasoning, content, reasoning_tokens = None, "".join(pieces), 0
    if think is not None:
        split = ReasoningStream.of(pieces, think)
        (reasoning, content), reasoning_tokens = split.result(), split.reasoning_tokens
    status = _status(reason)
    if named is not None:  # no message: the text is the call's arguments (its item "incomplete" when cut)
        output = [] if reasoning is None else \
            [_reasoning(_reasoning_id(item_id), reasoning, status if content is None else "completed")]
        if content is not None:
            output.append(_function_call(named.call(content), status))
        return response_object(body, ident, created, status, output,
                               usage(input_tokens, output_tokens, reasoning_tokens, cached_tokens))
    if calls and calls[3] is not None:  # the answer continues the call its prompt began
        parsed = forced_calls(calls[3] + content, calls[0], calls[1], _forced_name(body), calls[2])
    else:
        parsed = parse_calls(content, *calls[:3]) if calls and content else None
    if parsed is not None:
        content = parsed[0] or ""
    output = output_items(item_id, reasoning, content, parsed[1] if parsed else None, status, logprobs)
    return response_object(body, ident, created, status, output,
                           usage(input_tokens, output_tokens, reasoning_tokens, cached_tokens))


def _forced_name(body: ResponsesRequest) -> str:
    return body.forced_call() or ""


async def response_events(state: ServerState, body: ResponsesRequest, job: Request, bridge: _Bridge, ident: str,
                          item_id: str, created: int, input_tokens: int, think: AnswerStart | str | None = None,
                          calls: tuple[str, set[str], bool, str | None] | None = None,
                          side: ModelText | None = None, named: SchemaCall | None = None):
    """The SSE stream of one answer, from the engine events of ``job`` (``app._submit``'s bridge); ``think`` and
    ``calls`` as for :func:`final_response`, whose output the events add up to. A client that goes away closes
    this generator, and ``finally`` cancels the job, as the chat stream does.

    Items take output indices in the order they open. A call opens (``output_item.added`` with its id, call_id,
    name and empty arguments) once its name is written, while the message before it may still be open: the
    message takes the text the model writes after the calls too (hermes blocks can have text between and after
    them), and closes first. A call's arguments stream as the model writes them
    (``tool_calls.ToolCallStream``, the chat stream's), each piece a ``function_call_arguments.delta``; ``.done``
    and ``output_item.done`` carry the whole arguments once the answer has ended and the calls parse. A call whose
    head was sent but that does not parse in the end (cut by ``max_output_tokens``, broken JSON) cannot be taken
    back: its item ends "incomplete" with the arguments sent, and the whole text is the message, which then opens
    after it where no text came before (the non-streamed answer has only the message).

    With logprobs asked (``body.logprobs_count()``; ``side``: the request's text side, which names the tokens),
    each ``output_text.delta`` carries the logprobs of the tokens that came since the last one (a reasoning
    block's before the first), and ``output_text.done`` and the message item all the answer's tokens', as the
    non-streamed answer.

    With ``named`` (a named function on a template without a call format: ``named_call.py``) there is no message:
    the answer's text (after any reasoning) streams as that one call's arguments, its item added with the first
    piece, as vLLM streams a named call.
    """
    sequence = 0

    def event(kind: str, **fields) -> str:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    thinking = ReasoningStream(think) if think is not None else None
    forced = calls[3] if calls else None
    # a forced call is held whole (as on chat): one the model does not finish is an error, never half sent
    holder = ToolCallStream(calls[1], calls[0], calls[2], incremental=forced is None) if calls else None
    if forced is not None:
        holder.feed(forced)  # the call's start: held like any call, never streamed as text
    slots: list[dict | None] = []  # the output items by output index; None while the item is open
    open_items: dict[str, int] = {}  # "reasoning" / "message" -> its output index while it is open
    texts = {"reasoning": "", "message": ""}
    call_items: list[tuple[int, dict]] = []  # each call whose head was sent: (its output index, its item as added)
    rs_id = _reasoning_id(item_id)
    logged = body.logprobs_count() is not None
    pending: list[tuple[int, TokenInfo]] = []  # tokens whose logprobs no delta carried yet
    all_logprobs: list[dict] = []

    def where(kind: str) -> dict:
        return {"item_id": rs_id if kind == "reasoning" else item_id, "output_index": open_items[kind],
                "content_index": 0}

    def open_slot() -> int:
        slots.append(None)
        return len(slots) - 1

    def open_item(kind: str):
        open_items[kind] = open_slot()
        if kind == "reasoning":
            yield event("response.output_item.added", output_index=open_items[kind],
                        item=_reasoning(rs_id, None, "in_progress"))
            yield event("response.content_part.added", **where(kind), part={"type": "reasoning_text", "text": ""})
        else:
            yield event("response.output_item.added", output_index=open_items[kind],
                        item=_message(item_id, None, "in_progress"))
            yield event("response.content_part.added", **where(kind), part=_part(""))

    def add(kind: str, text: str):
        if not text:
            return
        if kind not in open_items:
            yield from open_item(kind)
        texts[kind] += text
        if kind == "reasoning":
            yield event("response.reasoning_text.delta", **where(kind), delta=text)
            return
        yield event("response.output_text.delta", **where(kind), delta=text, logprobs=flushed())

    def flushed() -> list[dict]:
        """The logprobs of the tokens no delta carried yet (none unless asked), now counted as sent."""
        if not logged or not pending:
            return []
        entries = answer_logprobs(side, pending)
        all_logprobs.extend(entries)
        pending.clear()
        return entries

    def close(kind: str, status: str):
        text = texts[kind]
        if kind == "reasoning":
            yield event("response.reasoning_text.done", **where(kind), text=text)
            yield event("response.content_part.done", **where(kind), part={"type": "reasoning_text", "text": text})
            item = _reasoning(rs_id, text, status)
        else:
            flushed()  # the tokens after the last delta (a call's, the end's): the message's whole list has them
            yield event("response.output_text.done", **where(kind), text=text, logprobs=all_logprobs)
            yield event("response.content_part.done", **where(kind), part=_part(text, all_logprobs))
            item = _message(item_id, text, status, all_logprobs)
        index = open_items.pop(kind)
        yield event("response.output_item.done", output_index=index, item=item)
        slots[index] = item

    def call_events(deltas: list[dict]):
        """``ToolCallStream``'s ``delta.tool_calls`` entries -> a call's item at its head, then its argument pieces."""
        for delta in deltas:
            if "id" in delta:  # the call's head (its name complete): the item, with no arguments yet
                head = {"id": delta["id"], "function": {"name": delta["function"]["name"]}}
                item = _function_call(head, "in_progress", "")
                call_items.append((open_slot(), item))
                yield event("response.output_item.added", output_index=call_items[-1][0], item=item)
            index, item = call_items[delta["index"]]
            piece = delta["function"].get("arguments")
            if piece:
                yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=index,
                            delta=piece)

    named_head = named.call("") if named is not None else None  # the named call's id, fixed for all its events
    named_slot: list[int] = []  # its output index once its item was added

    def named_events(piece: str, status: str | None = None):
        """The named call's item (added once, before its first piece), a piece of its arguments; with ``status``,
        its end (the arguments whole)."""
        item = _function_call(named_head, "in_progress", "")
        if not named_slot:
            named_slot.append(open_slot())
            yield event("response.output_item.added", output_index=named_slot[0], item=item)
        if piece:
            texts["message"] += piece
            yield event("response.function_call_arguments.delta", item_id=item["id"], output_index=named_slot[0],
                        delta=piece)
        if status is not None:
            done = _function_call(named_head, status, texts["message"])
            yield event("response.function_call_arguments.done", item_id=done["id"], output_index=named_slot[0],
                        arguments=done["arguments"])
            yield event("response.output_item.done", output_index=named_slot[0], item=done)
            slots[named_slot[0]] = done

    def end_calls(found: list[dict] | None):
        """Each call's ``.done`` and ``output_item.done``: the parsed calls whole; calls begun but not parsed in
        the end, "incomplete" with the arguments sent."""
        for i, (index, item) in enumerate(call_items):
            if found is not None and i < len(found):  # (always: a call is begun only once it is well formed so far)
                done = _function_call(found[i], "completed")
            else:
                done = {**item, "arguments": holder.sent[i][2], "status": "incomplete"}
            yield event("response.function_call_arguments.done", item_id=done["id"], output_index=index,
                        arguments=done["arguments"])
            yield event("response.output_item.done", output_index=index, item=done)
            slots[index] = done

    reason = None
    try:
        start = response_object(body, ident, created, "in_progress", [])
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        found = None
        while reason is None:
            kind, _, text, *rest = await bridge.queue.get()
            if kind == "token" and rest[1] is not None:
                pending.append((rest[0], rest[1]))
            if kind == "done":
                reason = rest[0]
            if reason is not None and reason.startswith("error"):
                break
            if thinking is None:
                reasoning = ""
            else:
                reasoning, text = thinking.feed(text) if reason is None else thinking.finish(text)
            for chunk in add("reasoning", reasoning):
                yield chunk
            if "reasoning" in open_items and thinking.finished_thinking:
                for chunk in close("reasoning", "completed"):
                    yield chunk
            if holder is not None:
                if reason is None:
                    text = holder.feed(text)
                elif forced is not None:
                    try:
                        content, found = forced_calls(holder.text + text, calls[0], calls[1], _forced_name(body),
                                                      calls[2])
                    except LorakitError as error:
                        reason = f"error: {error}"
                        break
                    text = (content or "")[holder.emitted:]
                else:
                    text, found = holder.finish(text)
            for chunk in add("message", text) if named is None else named_events(text) if text else ():
                yield chunk
            if holder is not None and reason is None:
                for chunk in call_events(holder.call_deltas()):
                    yield chunk
        if reason.startswith("error"):
            status, refusal = failure(reason)
            # the request's own doing (a format it could not follow, options that allowed no token): its 400 when
            # not streamed, so OpenAI's code for a request at fault, not server_error's "generation failed"
            error = {"code": "server_error" if status >= 500 else "invalid_prompt",
                     "message": refusal["error"]["message"]}
            if reason.startswith("error: the model did not write"):  # a forced call (tool_calls.forced_calls)
                error = {"code": "server_error", "message": reason[7:]}
            for kind, index in open_items.items():
                slots[index] = _reasoning(rs_id, texts["reasoning"], "incomplete") if kind == "reasoning" else \
                    _message(item_id, texts["message"], "incomplete")
            for i, (index, item) in enumerate(call_items):
                if slots[index] is None:
                    slots[index] = {**item, "arguments": holder.sent[i][2], "status": "incomplete"}
            if named_slot:
                slots[named_slot[0]] = _function_call(named_head, "incomplete", texts["message"])
            cached = getattr(job, "cached", None) or 0
            failed = response_object(body, ident, created, "failed", slots, usage(input_tokens, len(job.tokens), 0, cached),
                                     error=error)
            yield event("response.failed", response=failed)
            return
        status = _status(reason)
        if "reasoning" in open_items:  # the answer ended inside its reasoning
            for chunk in close("reasoning", status):
                yield chunk
        unfinished = thinking is not None and not thinking.finished_thinking
        if named is not None and not unfinished:  # the call, also where no text came (as the non-streamed answer)
            for chunk in named_events("", status):
                yield chunk
        elif named is None and "message" not in open_items and not unfinished and not found:  # no text: said so
            for chunk in open_item("message"):
                yield chunk
        if "message" in open_items:
            for chunk in close("message", status):
                yield chunk
        if found:  # the rest of the calls begun, and the calls not begun (not streamed: held whole), whole
            for chunk in call_events(holder.rest_deltas(found)):
                yield chunk
        for chunk in end_calls(found):
            yield chunk
        tokens = thinking.reasoning_tokens if thinking is not None else 0
        cached = getattr(job, "cached", None) or 0
        final = response_object(body, ident, created, status, slots, usage(input_tokens, len(job.tokens), tokens, cached))
        yield event("response.completed" if status == "completed" else "response.incomplete", response=final)
    finally:
        if reason is None:  # the client went away: stop generating for it
            state.engine.cancel(job)
