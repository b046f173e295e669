"""OpenAI's Responses API objects (``POST /v1/responses``): the response and its server-sent events.

The text-generation subset vLLM also serves: one assistant message of one ``output_text`` part. Generation is
the chat endpoint's (``app._submit``: chat template, adapters batched with other requests, the same limits), so
for the same messages and adapter the answer is the chat completion's text. What differs is the wire format:

    {"id": "resp_...", "object": "response", "status": "completed" | "incomplete", "output": [
        {"type": "message", "id": "msg_...", "status", "role": "assistant",
         "content": [{"type": "output_text", "text", "annotations": []}]}],
     "usage": {"input_tokens", "output_tokens", "total_tokens", ...}, ...the request's settings echoed}

A streamed answer is OpenAI's event sequence, each event ``{"type", "sequence_number", ...}`` on an SSE
``event:``/``data:`` pair: ``response.created``, ``response.in_progress``, ``response.output_item.added``,
``response.content_part.added``, ``response.output_text.delta`` (one per piece of final text),
``response.output_text.done``, ``response.content_part.done``, ``response.output_item.done``, then
``response.completed`` or ``response.incomplete`` (``response.failed`` if generation fails). No ``[DONE]``:
OpenAI ends the Responses stream with the last event.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import TYPE_CHECKING

from lorakit.serve.engine import Request
from lorakit.serve.protocol import ResponsesRequest

if TYPE_CHECKING:
    from lorakit.serve.app import ServerState, _Bridge


def new_ids() -> tuple[str, str]:
    """A response id and its message item's id, in OpenAI's forms."""
    return f"resp_{uuid.uuid4().hex}", f"msg_{uuid.uuid4().hex}"


def _status(reason: str) -> str:
    """The engine's finish reason -> the response's status: "length" (max_output_tokens, or the room the context
    left) is OpenAI's "incomplete"."""
    return "completed" if reason == "stop" else "incomplete"


def _part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message(item_id: str, text: str | None, status: str) -> dict:
    """The output message item; ``text`` None: the item as first announced, with no content part yet."""
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if text is None else [_part(text)]}


def usage(input_tokens: int, output_tokens: int) -> dict:
    return {"input_tokens": input_tokens, "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": output_tokens, "output_tokens_details": {"reasoning_tokens": 0},
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
        "reasoning": {"effort": None, "summary": None}, "safety_identifier": body.safety_identifier,
        "service_tier": "default", "store": False,  # nothing is kept, whatever the request asked
        "temperature": body.temperature, "text": {"format": {"type": "text"}, "verbosity": "medium"},
        "tool_choice": body.tool_choice if isinstance(body.tool_choice, str) else "auto", "tools": [],
        "top_logprobs": 0, "top_p": body.top_p, "truncation": "disabled", "usage": usage, "user": body.user,
    }


def final_response(body: ResponsesRequest, ident: str, item_id: str, created: int, text: str, reason: str,
                   input_tokens: int, output_tokens: int) -> dict:
    """The finished answer (the non-streamed body, and the last event's ``response``)."""
    status = _status(reason)
    return response_object(body, ident, created, status, [_message(item_id, text, status)],
                           usage(input_tokens, output_tokens))


async def response_events(state: ServerState, body: ResponsesRequest, job: Request, bridge: _Bridge, ident: str,
                          item_id: str, created: int, input_tokens: int):
    """The SSE stream of one answer, from the engine events of ``job`` (``app._submit``'s bridge). A client that
    goes away closes this generator, and ``finally`` cancels the job, as the chat stream does."""
    sequence = 0

    def event(kind: str, **fields) -> str:
        nonlocal sequence
        payload = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(payload)}\n\n"

    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    reason = None
    try:
        start = response_object(body, ident, created, "in_progress", [])
        yield event("response.created", response=start)
        yield event("response.in_progress", response=start)
        yield event("response.output_item.added", output_index=0, item=_message(item_id, None, "in_progress"))
        yield event("response.content_part.added", **where, part=_part(""))
        pieces: list[str] = []
        while reason is None:
            kind, _, text, *rest = await bridge.queue.get()
            if text:
                pieces.append(text)
                yield event("response.output_text.delta", **where, delta=text, logprobs=[])
            if kind == "done":
                reason = rest[0]
        text = "".join(pieces)
        if reason.startswith("error"):
            error = {"code": "server_error", "message": f"generation failed: {reason[7:]}"}
            failed = response_object(body, ident, created, "failed", [_message(item_id, text, "incomplete")],
                                     usage(input_tokens, len(job.tokens)), error=error)
            yield event("response.failed", response=failed)
            return
        status = _status(reason)
        yield event("response.output_text.done", **where, text=text, logprobs=[])
        yield event("response.content_part.done", **where, part=_part(text))
        yield event("response.output_item.done", output_index=0, item=_message(item_id, text, status))
        final = final_response(body, ident, item_id, created, text, reason, input_tokens, len(job.tokens))
        yield event("response.completed" if status == "completed" else "response.incomplete", response=final)
    finally:
        if reason is None:  # the client went away: stop generating for it
            state.engine.cancel(job)
