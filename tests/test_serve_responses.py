"""OpenAI's Responses API (``POST /v1/responses``) on a real ``lorakit serve`` process, over real sockets.

The answer is the chat endpoint's: same chat template, same adapter, same engine, so greedy answers are equal
text for text and token for token. The wire format is checked against the ``openai`` package's own types
(``Response`` and every stream event validated by pydantic, so a missing required field or a wrong literal
fails) and by the package's client itself (``client.responses.create``, streaming, the ``responses.stream``
helper that rebuilds the answer from the events).
"""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from test_serve_support import ServerProcess, make_adapter, tiny_hf_folder, wait_idle

KEY = "responses-key"
HEADERS = {"Authorization": f"Bearer {KEY}"}
LONG = 900  # tokens of a generation long enough to see whether a cancelled one stops
LONG_INPUT = "Paris is the capital of"  # a turn the model never ends
STREAM_ORDER = ["response.created", "response.in_progress", "response.output_item.added",
                "response.content_part.added"]
STREAM_END = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("responses")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.5, max_position_embeddings=1024)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorakit.generation import encode_prompt, end_of_turn_ids

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    eots = end_of_turn_ids(tokenizer)
    with torch.no_grad():
        for token in eots:  # first the model never ends a turn (a zero logit, below the largest random one)
            base.lm_head.weight[token] = 0
        hello = _greedy(base, encode_prompt(tokenizer, [{"role": "user", "content": "Hello"}], chat=True), 6)
        long = _greedy(base, encode_prompt(tokenizer, [{"role": "user", "content": LONG_INPUT}], chat=True), LONG)
        # then it ends where it would say a token of its answer to "Hello" that its long answer never holds
        end = next(token for token in hello[2:] if token not in long)
        for token in eots:
            base.lm_head.weight[token] = 1.001 * base.lm_head.weight[end]
    base.save_pretrained(model_dir)
    adapters = root / "adapters"
    for seed, name in enumerate(("a0", "a1")):
        make_adapter(base, adapters / name, seed=seed + 31)
    make_adapter(base, adapters / "zero", seed=40, std=0.0)  # B = 0: answers exactly as the base
    proc = ServerProcess(model_dir, adapters, "--max-tokens", str(LONG), "--max-prompt-tokens", "128",
                         "--cors-origin", "http://ui.example", api_key=KEY, log=root / "server.log")
    client = httpx.Client(base_url=proc.url, headers=HEADERS, timeout=60)
    try:
        yield {"url": proc.url, "client": client, "server": proc}
    finally:
        client.close()
        proc.stop()


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    from lorakit.generation import decode, prefill

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one-token steps of a tiny model: 15x slower with threads fighting on a busy machine
    try:
        logits, batch = prefill(model, [ids], [None])
        tokens = []
        for _ in range(steps):
            tokens.append(int(logits[0].argmax()))
            logits = decode(model, batch, tokens[-1:], [None])
        return tokens
    finally:
        torch.set_num_threads(threads)


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text[:500]
    return response.json()


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert "\n" not in response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _validated(body: dict):
    """The body as the openai package's ``Response``, validated (required fields, types, literals)."""
    from openai.types.responses import Response

    return Response.model_validate(body)


def _chat(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
    return _ok(client.post("/v1/chat/completions", json=body))


def _respond(client, model: str, input, max_output_tokens: int, **extra) -> dict:
    body = {"model": model, "input": input, "max_output_tokens": max_output_tokens, "temperature": 0, **extra}
    return _ok(client.post("/v1/responses", json=body))


def _stream(url: str, body: dict) -> list[tuple[str, dict]]:
    """(SSE event name, data) of each event of a streamed answer."""
    events, name = [], None
    with httpx.Client(base_url=url, headers=HEADERS, timeout=60) as own, own.stream(
            "POST", "/v1/responses", json={**body, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line[7:]
            elif line.startswith("data: "):
                events.append((name, json.loads(line[6:])))
    return events


HISTORY = [  # what clients send: typed and untyped items, part lists, an earlier answer's item sent back
    {"role": "developer", "content": "Answer briefly."},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Paris is"}]},
    {"type": "message", "id": "msg_1", "status": "completed", "role": "assistant",
     "content": [{"type": "output_text", "text": "the capital", "annotations": [], "logprobs": []}]},
    {"role": "user", "content": "of France. Berlin is"},
]
AS_CHAT = [{"role": "system", "content": "Be kind."}, {"role": "system", "content": "Answer briefly."},
           {"role": "user", "content": "Paris is"}, {"role": "assistant", "content": "the capital"},
           {"role": "user", "content": "of France. Berlin is"}]


@pytest.mark.parametrize("model", ["base", "a0", "a1"])
def test_answer_is_the_chat_answer(server, model):
    client = server["client"]
    for input, messages, extra in [("Hello", [{"role": "user", "content": "Hello"}], {}),
                                   (HISTORY, AS_CHAT, {"instructions": "Be kind."})]:
        chat = _chat(client, model, messages, 16)
        body = _respond(client, model, input, 16, **extra)
        response = _validated(body)
        choice = chat["choices"][0]
        assert response.output_text == choice["message"]["content"]
        assert body["id"].startswith("resp_") and body["object"] == "response" and body["model"] == model
        item = body["output"][0]
        assert len(body["output"]) == 1 and item["id"].startswith("msg_") and item["role"] == "assistant"
        expected = "completed" if choice["finish_reason"] == "stop" else "incomplete"
        assert body["status"] == item["status"] == expected
        assert body["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
        assert body["usage"]["output_tokens"] == chat["usage"]["completion_tokens"]
        assert body["usage"]["total_tokens"] == chat["usage"]["total_tokens"]
        assert body["instructions"] == extra.get("instructions") and body["store"] is False


def test_completed_and_incomplete(server):
    client = server["client"]
    done = _validated(_respond(server["client"], "base", "Hello", 16))
    assert done.status == "completed" and done.incomplete_details is None and done.output_text  # ended its turn
    assert 3 <= done.usage.output_tokens <= 6  # the end of turn after two to five tokens of text
    cut = _respond(client, "base", LONG_INPUT, 16)  # a turn the model never ends
    assert cut["status"] == "incomplete" and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert cut["output"][0]["status"] == "incomplete" and cut["usage"]["output_tokens"] == 16
    chat = _chat(client, "base", [{"role": "user", "content": LONG_INPUT}], 16)["choices"][0]
    assert _validated(cut).output_text == chat["message"]["content"] and chat["finish_reason"] == "length"
    assert cut["max_output_tokens"] == 16 and cut["temperature"] == 0
    # OpenAI's minimum of 16 tokens, said with the field's name
    error = _error(client.post("/v1/responses", json={"model": "base", "input": "Hello", "max_output_tokens": 15}), 400)
    assert error["param"] == "max_output_tokens" and "16" in error["message"]


def test_top_k_one_is_greedy(server):
    """vLLM's ``top_k`` extension, as on the chat endpoint: sampling at temperature 1 among one token is greedy."""
    client = server["client"]
    greedy = _respond(client, "a1", "How are you", 16)["output"][0]["content"][0]["text"]
    assert all(_respond(client, "a1", "How are you", 16, temperature=1.0, top_k=1)["output"][0]["content"][0]["text"]
               == greedy for _ in range(2))
    assert _error(client.post("/v1/responses", json={"model": "a1", "input": "x", "top_k": -2}), 400)["param"] == "top_k"


@pytest.mark.parametrize("model, input, instructions, status", [("zero", "Hello", None, "completed"),
                                                                 ("a0", HISTORY, "Be kind.", "incomplete")])
def test_stream_events(server, model, input, instructions, status):
    from pydantic import TypeAdapter

    from openai.types.responses import ResponseStreamEvent

    body = {"model": model, "input": input, "instructions": instructions, "max_output_tokens": 16,
            "temperature": 0, "metadata": {"run": "7"}}
    whole = _ok(server["client"].post("/v1/responses", json=body))
    assert whole["status"] == status  # both ends are covered
    events = _stream(server["url"], body)
    kinds = [data["type"] for _, data in events]
    deltas = kinds[len(STREAM_ORDER):len(kinds) - len(STREAM_END) - 1]
    last = f"response.{status}"
    assert kinds == STREAM_ORDER + ["response.output_text.delta"] * len(deltas) + STREAM_END + [last]
    assert len(deltas) >= 2 and [name for name, _ in events] == kinds
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    parsed = [TypeAdapter(ResponseStreamEvent).validate_python(data) for _, data in events]
    assert [type(p).__name__ for p in parsed][:2] == ["ResponseCreatedEvent", "ResponseInProgressEvent"]
    assert parsed[0].response.status == "in_progress" and parsed[0].response.output == []
    text = "".join(p.delta for p in parsed if p.type == "response.output_text.delta")
    assert text == whole["output"][0]["content"][0]["text"] and text  # the deltas join to the non-streamed text
    assert parsed[-4].text == parsed[-3].part.text == parsed[-2].item.content[0].text == text
    final = parsed[-1].response
    assert final.output_text == text and final.status == whole["status"] and final.metadata == {"run": "7"}
    assert final.usage.output_tokens == whole["usage"]["output_tokens"]
    ids = {p.item_id for p in parsed if hasattr(p, "item_id")} | {parsed[2].item.id, final.output[0].id}
    assert len(ids) == 1 and {final.id} == {p.response.id for p in parsed if hasattr(p, "response")}


def test_refusals_name_the_field(server):
    client = server["client"]
    good = {"model": "a0", "input": "Hello", "max_output_tokens": 16}
    cases = [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"tools": [{"type": "web_search"}]}, "tools"),  # hosted tools: none here
        ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
         "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}}, "text.format"),
        ({"reasoning": {"effort": "extreme"}}, "reasoning.effort"),  # "high" is read (test_followups_16_serve_protocol)
        ({"truncation": "auto"}, "truncation"),
        ({"background": True}, "background"),
        ({"include": ["file_search_call.results"]}, "include"),  # logprobs are served (test_followups_16_serve_protocol)
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
         "input.0.content"),
        ({"input": [{"type": "computer_call_output", "call_id": "c", "output": {}}]}, "input"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{x"}]}, "input.0.arguments"),
        ({"max_output_tokens": 15}, "max_output_tokens"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input.0.role"),
        ({"input": []}, "input"),
        ({"input": 7}, "input"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"max_output_tokens": "4"}, "max_output_tokens"),
        ({"max_output_tokens": LONG + 1}, "max_output_tokens"),
        ({"temperature": 3}, "temperature"),
        ({"metadata": {"k": "v" * 513}}, "metadata"),
        ({"input": "word " * 300}, "input"),  # over --max-prompt-tokens 128
        ({"input": [{"role": "user", "content": ""}] * 129}, "input"),  # refused before the template runs
        ({"max_tokens": 16}, "max_tokens"),  # the chat field: unknown here
        ({"model": "../a0"}, "model"),
    ]
    for extra, param in cases:
        error = _error(client.post("/v1/responses", json={**good, **extra}), 400)
        assert error["param"] == param, (extra, error)
        assert ("adapter name" if param == "model" else param.split(".")[0]) in error["message"], (extra, error)
    many = _error(client.post("/v1/chat/completions", json={"model": "a0", "messages": [{"role": "user", "content": ""}]
                                                            * 30_000}), 400)  # chat shares the guard
    assert many["param"] == "messages" and "30,000 messages" in many["message"]
    assert "previous_response_id" in _error(client.post("/v1/responses", json={**good, "previous_response_id": "r"}),
                                             400)["message"]
    assert _error(client.post("/v1/responses", json={**good, "model": "nope"}), 404)["param"] == "model"
    assert _error(client.post("/v1/responses", json={k: v for k, v in good.items() if k != "input"}),
                  400)["message"] == "missing required field 'input'"
    assert _error(httpx.post(server["url"] + "/v1/responses", json=good), 401)["code"] == "invalid_api_key"
    preflight = httpx.options(server["url"] + "/v1/responses", headers={  # a chat page in a browser, as for chat
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "http://ui.example"
    cross = client.post("/v1/responses", json=good, headers={"Origin": "http://ui.example"})
    assert cross.status_code == 200 and cross.headers["access-control-allow-origin"] == "http://ui.example"
    assert _error(client.get("/v1/responses/resp_123"), 404)["code"] == "not_found"  # nothing is stored
    assert "stores no responses" in _error(client.post("/v1/responses/resp_123/cancel"), 404)["message"]
    assert "no trailing slash" in _error(client.post("/v1/responses/", json=good), 404)["message"]
    assert "/v1/responses" in _error(client.post("/responses", json=good), 404)["message"]
    # the "off" values client libraries send are accepted, nulls read as left out
    off = {"tools": [], "tool_choice": "auto", "parallel_tool_calls": False, "truncation": "disabled", "include": [],
           "reasoning": None, "text": {"format": {"type": "text"}}, "store": True, "user": "u1", "top_logprobs": 0,
           "stream_options": None, "service_tier": "auto", "metadata": None, "instructions": None, "top_p": None}
    body = _ok(client.post("/v1/responses", json={**good, **off}))
    assert body["store"] is False and body["parallel_tool_calls"] is False and body["user"] == "u1"


def test_concurrent_with_chat_and_other_adapters(server):
    """Responses and chat requests for three models at once, batched by the engine: each answer is the one it
    gets alone."""
    client = server["client"]
    jobs = [(model, kind) for model in ("base", "a0", "a1") for kind in ("chat", "responses")] * 2
    alone = {model: _chat(client, model, [{"role": "user", "content": "How are you"}], 16)["choices"][0]
             ["message"]["content"] for model in ("base", "a0", "a1")}

    def one(job):
        model, kind = job
        with httpx.Client(base_url=server["url"], headers=HEADERS, timeout=60) as own:
            if kind == "chat":
                return _chat(own, model, [{"role": "user", "content": "How are you"}], 16)["choices"][0]["message"]["content"]
            return _validated(_respond(own, model, "How are you", 16)).output_text

    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(one, jobs))
    assert answers == [alone[model] for model, _ in jobs]
    assert len(set(alone.values())) == 3  # the adapters change the answer


@pytest.mark.parametrize("stream", [False, True])
def test_client_gone_stops_generation(server, stream):
    client = server["client"]
    body = {"model": "zero", "input": LONG_INPUT, "max_output_tokens": LONG, "temperature": 0,
            "stream": stream}
    if not stream:  # the whole generation once: it runs to the limit (the model does not end this turn)
        assert _respond(client, "zero", LONG_INPUT, LONG)["status"] == "incomplete"
    steps = client.get("/health").json()["steps"]
    payload = json.dumps(body).encode()
    sock = socket.create_connection((server["url"].split("//")[1].split(":")[0], int(server["url"].rsplit(":", 1)[1])))
    sock.sendall(b"POST /v1/responses HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
    if stream:  # the stream has started (the headers may come in a packet of their own)
        sock.settimeout(10)
        received = b""
        while b"response.created" not in received:
            chunk = sock.recv(4096)
            assert chunk, received
            received += chunk
    deadline = time.monotonic() + 3  # admitted (a row between waiting and running counts in neither for a moment)
    while client.get("/health").json()["running"] != 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.get("/health").json()["running"] == 1
    sock.close()
    assert wait_idle(client, 3.0), "the generation went on after its client left"
    assert client.get("/health").json()["steps"] - steps < LONG / 2
    assert client.post("/v1/adapters/unload", json={"name": "zero"}).status_code == 200  # its pin was released


def test_openai_sdk(server):
    import openai

    sdk = openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0)
    messages = [{"role": "user", "content": "Paris is the capital of"}]
    chat = sdk.chat.completions.create(model="a0", messages=messages, max_tokens=16, temperature=0)
    reply = sdk.responses.create(model="a0", input="Paris is the capital of", max_output_tokens=16, temperature=0)
    assert reply.output_text == chat.choices[0].message.content and reply.output_text
    assert reply.usage.input_tokens == chat.usage.prompt_tokens
    events = list(sdk.responses.create(model="a0", input=messages, max_output_tokens=16, temperature=0, stream=True))
    assert [e.type for e in events][:4] == STREAM_ORDER and events[-1].response.output_text == reply.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == reply.output_text
    # the helper rebuilds the answer from the events (and wants response.completed: an answer that ends its turn)
    hello = sdk.responses.create(model="zero", input="Hello", max_output_tokens=16, temperature=0)
    with sdk.responses.stream(model="zero", input="Hello", max_output_tokens=16, temperature=0) as stream:
        final = stream.get_final_response()
    assert final.status == hello.status == "completed" and final.output_text == hello.output_text
    # an agent's loop: the answer's output items appended to the input, sent back as the next turn's history
    history = [*messages, *[item.model_dump() for item in reply.output],
               {"role": "user", "content": "and Berlin?"}]
    again = sdk.responses.create(model="a0", input=history, max_output_tokens=16, temperature=0)
    turn = sdk.chat.completions.create(model="a0", max_tokens=16, temperature=0, messages=[
        *messages, {"role": "assistant", "content": reply.output_text}, {"role": "user", "content": "and Berlin?"}])
    assert again.output_text == turn.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        sdk.responses.create(model="a0", input="x", previous_response_id=reply.id)
    with pytest.raises(openai.NotFoundError):
        sdk.responses.retrieve(reply.id)


def test_stream_of_a_failed_or_abandoned_generation():
    """In process, without a model: a generation that fails mid-stream ends with ``response.failed`` (what the
    openai package reads as the end of a failed answer), and a stream closed early cancels its engine job."""
    import asyncio
    from types import SimpleNamespace

    from pydantic import TypeAdapter

    from openai.types.responses import ResponseStreamEvent

    from lorakit.serve.protocol import ResponsesRequest
    from lorakit.serve.responses import response_events

    cancelled = []
    state = SimpleNamespace(engine=SimpleNamespace(cancel=cancelled.append))
    body = ResponsesRequest.model_validate({"model": "a0", "input": "Hello"})

    async def run(events: list[tuple], take: int | None) -> list[dict]:
        bridge = SimpleNamespace(queue=asyncio.Queue())
        for item in events:
            bridge.queue.put_nowait(item)
        job = SimpleNamespace(tokens=[5, 6])
        stream = response_events(state, body, job, bridge, "resp_x", "msg_x", 0, 4)
        out = []
        async for chunk in stream:
            out.append(json.loads(chunk.split("data: ", 1)[1]))
            if take is not None and len(out) == take:
                await stream.aclose()  # what Starlette does when the client goes
                break
        return out

    failed = asyncio.run(run([("token", 0, "Hi", 5, None), ("done", 0, "", "error: RuntimeError")], None))
    parsed = [TypeAdapter(ResponseStreamEvent).validate_python(event) for event in failed]
    assert [p.type for p in parsed] == STREAM_ORDER + ["response.output_text.delta", "response.failed"]
    assert parsed[-1].response.status == "failed" and parsed[-1].response.error.code == "server_error"
    assert "RuntimeError" in parsed[-1].response.error.message and cancelled == []
    assert len(asyncio.run(run([("token", 0, "Hi", 5, None)], 5))) == 5 and len(cancelled) == 1


# -- function calls streamed as the model writes them ---------------------------------------------------------------
# a Llama 3.1 model (the scripted one of test_serve_tools) answering with two calls, the first one's arguments written
# over 16 tokens (one token each piece; its last also closes the call), the second's in one
ARGUMENT_PIECES = ['{"city": ', '"Paris, ', 'Texas", ', '"days": ', '3, ', '"hours": ', '[6, ', '9, ', '12, ', '15, ',
                   '18], ', '"unit": ', '"celsius", ', '"lang": ', '"fr"']
CALL_WORDS = ['{"name": "get_weather", "parameters": ', *ARGUMENT_PIECES, "}}",
              '; {"name": "get_weather", "parameters": ', '{"city": "Rome"}}', "<|eot_id|>"]
FIRST_ARGUMENTS = "".join(ARGUMENT_PIECES) + "}"


@pytest.fixture(scope="module")
def caller(tmp_path_factory):
    from test_serve_tools import _scripted_server
    from test_train_tool_calls import TOOLS

    proc, client, _ = _scripted_server(tmp_path_factory.mktemp("calls"), "llama3.1", CALL_WORDS)
    tools = [{"type": "function", **{k: t["function"][k] for k in ("name", "description", "parameters")}}
             for t in TOOLS]
    try:
        yield {"url": proc.url, "client": client, "server": proc, "tools": tools}
    finally:
        client.close()
        proc.stop()


def _question() -> list[dict]:
    from test_serve_tools import QUESTION

    return QUESTION


def test_function_calls_stream_as_written(caller):
    """The openai package's stream helper rebuilds, from the events, the same items as the non-streamed answer;
    each call opens with its id, call_id, name and empty arguments, its arguments come in several deltas as the
    model writes them (one per token here), then ``.done`` and ``output_item.done`` carry them whole."""
    import openai

    sdk = openai.OpenAI(base_url=caller["url"] + "/v1", api_key="none", max_retries=0)
    request = dict(model="base", input=_question(), tools=caller["tools"], temperature=0, max_output_tokens=32)
    reply = sdk.responses.create(**request)
    assert [(i.type, i.name, i.arguments) for i in reply.output] == [
        ("function_call", "get_weather", FIRST_ARGUMENTS), ("function_call", "get_weather", '{"city": "Rome"}')]
    with sdk.responses.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_response()
    fields = lambda items: [(i.type, i.name, i.arguments, i.status) for i in items]  # (ids differ per answer)
    assert fields(final.output) == fields(reply.output) and final.status == "completed"
    added = [e for e in events if e.type == "response.output_item.added"]
    assert [(e.output_index, e.item.name, e.item.arguments, e.item.status) for e in added] == \
        [(0, "get_weather", "", "in_progress"), (1, "get_weather", "", "in_progress")]
    for index, item in enumerate(final.output):
        assert added[index].item.id == item.id and added[index].item.call_id == item.call_id
        assert item.id.startswith("fc_") and item.call_id.startswith("call_")
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"
                  and e.output_index == index]
        assert "".join(deltas) == item.arguments
        [done] = [e for e in events if e.type == "response.function_call_arguments.done" and e.output_index == index]
        assert done.arguments == item.arguments and done.item_id == item.id
        if index == 0:  # one delta per token, as the model wrote them
            assert deltas == [*ARGUMENT_PIECES, "}"]
    single = dict(request, parallel_tool_calls=False)  # only the first call, streamed or not
    with sdk.responses.stream(**single) as stream:
        only = stream.get_final_response()
    assert fields(only.output) == fields(sdk.responses.create(**single).output) == fields(reply.output[:1])
    kinds = [e.type for e in events]
    first_done = kinds.index("response.function_call_arguments.done")
    assert kinds.index("response.output_item.added", kinds.index("response.output_item.added") + 1) < first_done
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_a_call_cut_by_max_output_tokens(caller):
    """A call whose head and first pieces were streamed but which the limit cuts: its item ends "incomplete"
    with the arguments sent (it cannot be taken back), and the whole text is the message, as the non-streamed
    answer has it (which has only the message)."""
    from pydantic import TypeAdapter

    from openai.types.responses import ResponseStreamEvent

    body = {"model": "base", "input": _question(), "tools": caller["tools"], "temperature": 0,
            "max_output_tokens": 16}  # (OpenAI's least): the call's name and all but its last token
    whole = _validated(_ok(caller["client"].post("/v1/responses", json=body)))
    text = "".join(CALL_WORDS[:16])
    assert [i.type for i in whole.output] == ["message"] and whole.output_text == text
    with httpx.Client(base_url=caller["url"], timeout=60) as own, own.stream(
            "POST", "/v1/responses", json={**body, "stream": True}) as response:
        events = [TypeAdapter(ResponseStreamEvent).validate_python(json.loads(line[6:]))
                  for line in response.iter_lines() if line.startswith("data: ")]
    last = events[-1]
    assert last.type == "response.incomplete"
    call, message = last.response.output
    assert call.type == "function_call" and call.status == "incomplete" and call.arguments == "".join(ARGUMENT_PIECES)
    assert message.type == "message" and message.content[0].text == text
    assert "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta") == call.arguments
    assert [e.item.type for e in events if e.type == "response.output_item.done"] == ["message", "function_call"]
    assert "Traceback" not in caller["server"].output()


def _in_process_events(body: dict, pieces: list[str], reason: str, calls: tuple) -> list:
    """``response_events`` over engine events of ``pieces`` (one token each), then ``reason``, validated."""
    import asyncio
    from types import SimpleNamespace

    from pydantic import TypeAdapter

    from openai.types.responses import ResponseStreamEvent

    from lorakit.serve.protocol import ResponsesRequest
    from lorakit.serve.responses import response_events

    queue = asyncio.Queue()
    for settled, piece in enumerate(pieces, 1):  # the bridge's events: (.., settled tokens)
        queue.put_nowait(("token", 0, piece, 1, None, settled))
    queue.put_nowait(("done", 0, "", reason, len(pieces)))
    state = SimpleNamespace(engine=SimpleNamespace(cancel=lambda job: None))

    async def run():
        return [json.loads(chunk.split("data: ", 1)[1]) async for chunk in response_events(
            state, ResponsesRequest.model_validate(body), SimpleNamespace(tokens=[1] * len(pieces)),
            SimpleNamespace(queue=queue), "resp_x", "msg_x", 0, 3, None, calls)]

    return [TypeAdapter(ResponseStreamEvent).validate_python(e) for e in asyncio.run(run())]


WEATHER_TOOL = {"type": "function", "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_hermes_calls_with_text_around_them_in_process():
    """Hermes blocks with text before, between and after them: the message stays open while the calls stream (the
    text after them joins it at the end, as the non-streamed content has it), so the streamed items are the
    non-streamed ones, field for field (ids aside); each call's arguments come as written."""
    from lorakit.serve.protocol import ResponsesRequest
    from lorakit.serve.responses import final_response

    body = {"model": "m", "input": "x", "tools": [WEATHER_TOOL]}
    pieces = ["Checking.", "<tool_call>", '\n{"name": "get_weather", ', '"arguments": {"city"', ': "Paris"}}\n',
              "</tool_call>", " and ", "<tool_call>", '{"name": "get_weather", "arguments": {}}', "</tool_call>",
              " Done."]
    calls = ("hermes", {"get_weather"}, False, None)
    events = _in_process_events(body, pieces, "stop", calls)
    whole = final_response(ResponsesRequest.model_validate(body), "resp_x", "msg_x", 0, [*pieces, ""], "stop", 3,
                           len(pieces), None, calls)
    final = events[-1].response
    fields = lambda items: [{k: v for k, v in i.items() if k not in ("id", "call_id")} for i in items]
    assert events[-1].type == "response.completed"
    assert fields([i.model_dump(exclude_none=True) for i in final.output]) == fields(
        [{k: v for k, v in i.items() if v is not None} for i in whole["output"]])
    assert final.output_text == "Checking. and  Done."
    deltas = [(e.output_index, e.delta) for e in events if e.type == "response.function_call_arguments.delta"]
    assert deltas == [(1, '{"city"'), (1, ': "Paris"}'), (2, "{}")]
    kinds = [(e.type, getattr(e, "output_index", None)) for e in events]
    assert kinds.index(("response.output_item.added", 1)) < kinds.index(("response.output_text.done", 0)) \
        < kinds.index(("response.output_item.done", 1))


def test_generation_failing_inside_a_call_in_process():
    """A generation that fails after a call's head and first arguments were sent: ``response.failed`` whose
    output holds the call "incomplete" with the arguments sent."""
    body = {"model": "m", "input": "x", "tools": [WEATHER_TOOL]}
    pieces = ["<tool_call>", '{"name": "get_weather", "arguments": ', '{"city": ']
    events = _in_process_events(body, pieces, "error: RuntimeError", ("hermes", {"get_weather"}, False, None))
    assert [e.type for e in events][-3:] == ["response.output_item.added", "response.function_call_arguments.delta",
                                             "response.failed"]
    [call] = events[-1].response.output
    assert call.type == "function_call" and call.status == "incomplete" and call.arguments == '{"city": '
    assert events[-1].response.error.code == "server_error"
