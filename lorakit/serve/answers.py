"""The OpenAI answer objects that need the tokenizer: logprobs (chat and completions forms, an echoed prompt's)
and the server-sent events of a streamed answer. The tokenizer is the request's (``model_text.ModelText``: an
adapter folder's own, or the base's), the one that decodes its answer.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from lorakit.errors import LorakitError
from lorakit.serve.engine import NO_TOKEN, Request, TokenInfo
from lorakit.serve.protocol import error_body
from lorakit.serve.reasoning import ReasoningStream
from lorakit.serve.named_call import ArgumentStream, SchemaCall
from lorakit.serve.tool_calls import ToolCallStream, forced_calls

if TYPE_CHECKING:
    from lorakit.serve.app import ServerState, _Bridge
    from lorakit.serve.model_text import ModelText


STRUCTURED_FAILURE = "error: structured output: "  # the engine's finish reason where a row's format failed
NO_TOKEN_FAILURE = f"error: {NO_TOKEN}"  # ... where the request's options together allowed no token


def failure(reason: str) -> tuple[int, dict]:
    """The HTTP status and OpenAI error body of a job that finished with ``reason`` "error: ...": a format that
    could not be followed (a grammar over llguidance's limits, or one that allows no token the model has) is the
    request's 400, as is a row the request's own options left no token to draw (``engine.NO_TOKEN``); anything
    else failed in the server, a 500."""
    if reason.startswith(STRUCTURED_FAILURE):
        return 400, error_body(f"the answer could not follow the format: {reason[len(STRUCTURED_FAILURE):]}",
                               code="invalid_response_format")
    if reason.startswith(NO_TOKEN_FAILURE):  # the request's options allow no token together: the client's to change
        return 400, error_body(f"the request's {reason[len(NO_TOKEN_FAILURE):]}", code="invalid_request")
    return 500, error_body(f"generation failed: {reason[7:]}", type="server_error")


def token_text(text: ModelText, token: int) -> str:
    return text.decode([token])


def token_name(text: ModelText, token: int, as_ids: bool = False) -> str:
    """A token as logprobs name it: its text, or with ``as_ids`` (vLLM's return_tokens_as_token_ids)
    "token_id:<id>", which names a token whose text alone is no valid UTF-8 (U+FFFD) too."""
    return f"token_id:{token}" if as_ids else token_text(text, token)


def _top_dict(text: ModelText, top: list[tuple[int, float]], as_ids: bool = False) -> dict[str, float]:
    """The completions API's ``{token text: logprob}``; where two tokens read the same (two partial characters
    both decode to U+FFFD) the likelier one's value stays, not the last one's."""
    out: dict[str, float] = {}
    for token, logprob in top:
        out.setdefault(token_name(text, token, as_ids), logprob)
    return out


def logprobs_object(text: ModelText, infos: list[tuple[int, TokenInfo]], chat: bool, offset: int = 0,
                    as_ids: bool = False) -> dict:
    """OpenAI's logprobs object for these tokens; ``offset``: characters of completion text before the first;
    ``as_ids``: tokens named by id (:func:`token_name`; the text offsets still count the text's characters)."""
    if chat:
        content = []
        for token, info in infos:
            # bytes: the token's own, so that joined they rebuild the text even where a token holds part of a
            # character (its decoded text is then U+FFFD)
            top = [{"token": token_name(text, i, as_ids), "logprob": lp, "bytes": text.token_bytes(i)}
                   for i, lp in info.top]
            content.append({"token": token_name(text, token, as_ids), "logprob": info.logprob,
                            "bytes": text.token_bytes(token), "top_logprobs": top})
        return {"content": content}
    offsets, position = [], offset
    for token, _ in infos:
        offsets.append(position)
        position += len(token_text(text, token))
    return {"tokens": [token_name(text, t, as_ids) for t, _ in infos],
            "token_logprobs": [info.logprob for _, info in infos],
            "top_logprobs": [_top_dict(text, info.top, as_ids) for _, info in infos],
            "text_offset": offsets}


def prompt_logprobs(text: ModelText, prompt_ids: list[int], infos: list[TokenInfo | None],
                    as_ids: bool = False) -> dict:
    """The completions logprobs object of an echoed prompt: the first token has no log-probability (null)."""
    offsets = [0]
    for token in prompt_ids[:-1]:
        offsets.append(offsets[-1] + len(token_text(text, token)))
    return {"tokens": [token_name(text, t, as_ids) for t in prompt_ids],
            "token_logprobs": [None if info is None else info.logprob for info in infos],
            "top_logprobs": [None if info is None else _top_dict(text, info.top, as_ids) for info in infos],
            "text_offset": offsets}


def vllm_prompt_logprobs(text: ModelText, prompt_ids: list[int], infos: list[TokenInfo | None]) -> list:
    """vLLM's ``prompt_logprobs``: per prompt token, None for the first (nothing before it predicts it), else
    ``{token id: {"logprob", "rank", "decoded_token"}}`` for the prompt's token (its rank in the vocabulary, 1
    the likeliest) then the ``top`` most likely ones there (ranks 1, 2, ...; the prompt's token once). JSON
    writes the ids as strings, as vLLM's answer does."""
    out: list[dict | None] = []
    for token, info in zip(prompt_ids, infos):
        if info is None:
            out.append(None)
            continue
        entry = {str(token): {"logprob": info.logprob, "rank": info.rank, "decoded_token": token_text(text, token)}}
        for rank, (other, logprob) in enumerate(info.top, 1):
            entry.setdefault(str(other), {"logprob": logprob, "rank": rank, "decoded_token": token_text(text, other)})
        out.append(entry)
    return out


async def stream_events(state: ServerState, body, jobs: list[Request], bridge: _Bridge, ident: str, created: int,
                  chat: bool, prompt_tokens: int, logprobs: int | None, tools: tuple[str, set[str], bool] | None = None,
                  think: str | None = None, forced: str | None = None, echoes: list[str] | None = None,
                  prompt_lps: list[dict] | None = None, side: ModelText | None = None,
                  prompt_ids: list[list[int]] | None = None, prompt_text: str | None = None,
                  named: SchemaCall | None = None):
    """Server-sent events: one chunk per piece of final text, each choice's finish reason as it ends, then the
    usage (``stream_options.include_usage``), then ``[DONE]``.

    With ``logprobs``, each chunk carries the tokens that produced it (a token whose text is held back, a partial
    character or a possible stop string, rides on the next chunk; a stop string's tokens are in none), so the
    chunks' logprobs together equal the non-streaming answer's. With ``n`` > 1 the choices' chunks interleave, each with its ``index``.

    With ``tools`` (a chat request whose calls are parsed: their format, the tools' names, whether only the first
    call is returned), text streams as
    content until a call starts; then each call streams as the model writes it (a chunk with its id and name,
    then chunks of its arguments; ``tool_calls.ToolCallStream``), the rest at the end with the finish reason
    "tool_calls", so the chunks add up to the non-streamed message.

    With ``think`` (a chat request whose answer's reasoning block, ``<think>`` or Mistral's ``[THINK]``, is split
    off: ``ReasoningParser.start`` of its prompt), the reasoning streams first as ``delta.reasoning_content`` chunks, then the rest goes on as above
    (``reasoning.ReasoningStream``: a tag split over chunks is held until it is whole).

    With ``forced`` (tool_choice "required" or a named function: the start of the call the prompt ends with), the
    answer is held whole and its calls come at the end, or an error event when it forms no call.

    With ``named`` (a named function on a template without a call format: ``named_call.py``), each choice's text
    streams as its one call: the call's id and name first, then the text as argument pieces (finish "stop").

    With ``echoes`` (completions' ``echo``: prompt p's text, which choice ``p * n + i`` starts with), each choice's
    first chunk is its prompt, with ``prompt_lps[p]`` (the prompt's logprobs) when logprobs were asked.

    ``side``: the request's text side (``ModelText``), which writes the logprobs' tokens (needed with ``logprobs``
    only).

    vLLM's options, read from ``body``: ``return_tokens_as_token_ids`` names the logprobs' tokens by id;
    ``include_reasoning`` false sends no reasoning chunks; ``stream_options.continuous_usage_stats`` (with
    include_usage) puts each chunk's choice's usage so far on it; ``return_token_ids`` (with ``prompt_ids``, the
    prompts' ids) gives each chunk the ids of the tokens that came since its choice's last chunk, and the first
    chunk the prompt's ids (chat: on the response, as vLLM; completions: on the choice); ``prompt_text`` (chat's
    return_prompt_text) rides on the response's first chunk.
    """
    kind = "chat.completion.chunk" if chat else "text_completion"
    include_usage = body.stream_options is not None and body.stream_options.include_usage
    continuous = include_usage and body.stream_options.continuous_usage_stats
    as_ids = body.return_tokens_as_token_ids
    shown_reasoning = getattr(body, "include_reasoning", True)
    counts = [0] * len(jobs)  # tokens of each choice so far (continuous usage)
    new_ids: list[list[int]] | None = [[] for _ in jobs] if body.return_token_ids else None
    prompt_sent = [False] * len(jobs)
    pending: list[list[tuple[int, TokenInfo]]] = [[] for _ in jobs]  # tokens whose logprobs are not sent yet
    sent = [0] * len(jobs)  # tokens whose logprobs are sent
    ready = [0] * len(jobs)  # tokens whose logprobs may be sent: their text is in the answer (event's settled)
    offsets = [0] * len(jobs)
    reasons: list[str | None] = [None] * len(jobs)

    holders = [ToolCallStream(tools[1], tools[0], tools[2], incremental=forced is None) for _ in jobs] \
        if tools else None  # a forced call is held whole: one the model does not finish is an error
    for holder in holders if forced is not None else ():
        holder.feed(forced)  # the call's start: held like any call, never streamed as content
    thinking = [ReasoningStream(think) for _ in jobs] if think is not None else None
    arguments = [ArgumentStream(named) for _ in jobs] if named is not None else None

    def chunk(index: int, text: str | None, finish: str | None, first: bool = False,
              tool_calls: list[dict] | None = None, reasoning: str | None = None, prompt_lp: dict | None = None) -> str:
        lp = prompt_lp
        flush = ready[index] - sent[index]
        if logprobs is not None and flush > 0 and prompt_lp is None:
            lp = logprobs_object(side, pending[index][:flush], chat, offsets[index], as_ids)
            del pending[index][:flush]
            sent[index] += flush
        offsets[index] += len(text or "")
        if chat:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            if reasoning:
                delta["reasoning_content"] = reasoning
            if tool_calls:
                delta["tool_calls"] = tool_calls
            choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": lp}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish, "logprobs": lp}
        payload = {"id": ident, "object": kind, "created": created, "model": body.model, "choices": [choice]}
        if new_ids is not None:
            choice["token_ids"], new_ids[index] = new_ids[index], []
            if not prompt_sent[index]:
                prompt_sent[index] = True
                if not chat:
                    choice["prompt_token_ids"] = prompt_ids[index // body.n]
                elif index == 0:  # chat: one prompt, on the response's first chunk
                    payload["prompt_token_ids"] = prompt_ids[0]
        if prompt_text is not None and first and index == 0:
            payload["prompt_text"] = prompt_text
        if continuous:
            payload["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": counts[index],
                                "total_tokens": prompt_tokens + counts[index]}
        elif include_usage:
            payload["usage"] = None  # as OpenAI: every chunk has the key, only the last one a value
        return f"data: {json.dumps(payload)}\n\n"

    try:
        if chat:
            for index in range(len(jobs)):
                yield chunk(index, "", None, first=True)
        for index in range(len(jobs)) if echoes is not None else ():
            prompt = index // body.n
            yield chunk(index, echoes[prompt], None, prompt_lp=None if prompt_lps is None else prompt_lps[prompt])
        failed = None
        while None in reasons:
            event = await bridge.queue.get()
            index = event[1]
            if event[0] == "token":
                if event[4] is not None:
                    pending[index].append((event[3], event[4]))
                counts[index] += 1
                if new_ids is not None:
                    new_ids[index].append(event[3])
                ready[index] = event[5]
                reasoning, text = ("", event[2]) if thinking is None else thinking[index].feed(event[2])
                if reasoning and shown_reasoning:
                    yield chunk(index, None, None, reasoning=reasoning)
                text = text if holders is None else holders[index].feed(text)
                if text and arguments is not None:  # the answer is the named call's arguments
                    yield chunk(index, None, None, tool_calls=arguments[index].deltas(text))
                elif text:
                    yield chunk(index, text, None)
                deltas = holders[index].call_deltas() if holders is not None else None
                if deltas:  # the calls as they are written
                    yield chunk(index, None, None, tool_calls=deltas)
                continue
            reasons[index] = reason = event[3]
            ready[index] = event[4]  # a stop string's tokens never are: the logprobs end with the text
            if reason.startswith("error"):
                failed = reason
                break
            finish = "stop" if reason == "stop" else "length"
            text, calls = event[2], None
            if thinking is not None:
                reasoning, text = thinking[index].finish(text)
                if reasoning and shown_reasoning:
                    yield chunk(index, None, None, reasoning=reasoning)
            if holders is not None and forced is not None:
                holder = holders[index]
                try:
                    content, calls = forced_calls(holder.text + text, tools[0], tools[1], body.forced_call(), tools[2])
                except LorakitError as error:
                    failed = str(error)
                    break
                text = (content or "")[holder.emitted:]
            elif holders is not None:
                text, calls = holders[index].finish(text)
            if arguments is not None:  # the call's last piece (its head, where nothing came before)
                deltas = arguments[index].deltas(text)
                if deltas or (logprobs is not None and ready[index] > sent[index]):
                    yield chunk(index, None, None, tool_calls=deltas)
            elif text or (logprobs is not None and ready[index] > sent[index]):
                yield chunk(index, text, None)
            if calls:
                deltas = holders[index].rest_deltas(calls)
                if deltas:
                    yield chunk(index, None, None, tool_calls=deltas)
                finish = "tool_calls"
            yield chunk(index, None, finish)
        if failed is not None and not failed.startswith("error"):  # a forced call the model did not write
            yield f"data: {json.dumps(error_body(failed, type='server_error', code='invalid_tool_call'))}\n\n"
        elif failed is not None:
            yield f"data: {json.dumps(failure(failed)[1])}\n\n"
        elif include_usage:
            completion = sum(len(job.tokens) for job in jobs)
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
                     "total_tokens": prompt_tokens + completion, **prompt_details(jobs, body.n)}
            if thinking is not None:
                usage["completion_tokens_details"] = {"reasoning_tokens": sum(t.reasoning_tokens for t in thinking)}
            yield f"data: {json.dumps({'id': ident, 'object': kind, 'created': created, 'model': body.model, 'choices': [], 'usage': usage})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        for job, reason in zip(jobs, reasons):
            if reason is None:  # the client went away (or another choice failed): stop generating for it
                state.engine.cancel(job)


def prompt_details(jobs: list, n: int) -> dict:
    """OpenAI's ``usage.prompt_tokens_details`` where the static decoder's prefix cache served the prompts: the
    prompt tokens it copied, each prompt once as ``prompt_tokens`` counts it (its first choice's: the others of a
    request's n copy what that one computed); {} without a prefix cache."""
    cached = [getattr(job, "cached", None) for job in jobs[::n]]
    if not cached or any(c is None for c in cached):
        return {}
    return {"prompt_tokens_details": {"cached_tokens": sum(cached)}}
