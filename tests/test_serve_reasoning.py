"""Reasoning models on ``lorakit serve`` (what vLLM serves with ``--reasoning-parser deepseek_r1`` / ``qwen3``),
and tools on ``/v1/responses``.

A Qwen3 / DeepSeek-R1 / QwQ answer starts with its ``<think>`` block; the server returns it as
``message.reasoning_content`` (``delta.reasoning_content`` chunks first when streamed; a ``reasoning`` output item
on ``/v1/responses``) and only the rest as ``content``, whose tool calls are then parsed. Before: the whole
block (Qwen3's empty one too) was in ``content``, and ``/v1/responses`` refused tools.

The servers' models answer known words (``test_serve_tools._scripted_server``: a tiny Llama whose generation is a
table of next tokens) with the real chat templates of Qwen3 and DeepSeek-R1 (``test_train_tool_calls``), since a
random model never writes ``<think>``. The parser itself is tested on strings and on token streams, fed in pieces
of every size, so tags split over pieces are covered.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import pytest

from test_serve_support import ServerProcess, make_tokenizer
from test_serve_tools import CALL_JSON, QUESTION, _scripted_server
from test_train_tool_calls import TOOLS, family

from lorakit.serve.reasoning import THINK, ReasoningStream, prompt_state, select_parser, split_reasoning
from lorakit.serve.text import TextAssembler

THOUGHT = "\nI need the weather.\n"
QWEN3_WORDS = ["<think>", THOUGHT, "</think>", "\n\n", "Let me check.", "<tool_call>", f"\n{CALL_JSON}\n",
               "</tool_call>", "<|im_end|>"]
R1_WORDS = ["I need the weather.", "</think>", "\n\n", "It is sunny.", "<｜end▁of▁sentence｜>"]
RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                    "parameters": t["function"]["parameters"]} for t in TOOLS]


# -- the parser on strings and token streams ----------------------------------------------------------------------
SPLITS = [  # (where the answer starts, the answer, reasoning, content)
    ("start", "<think>\nI think.\n</think>\n\nHello!", "I think.", "Hello!"),
    ("start", "  <think>a <b> c</think>Hi </think> there", "a <b> c", "Hi </think> there"),
    ("start", "<think>\n\n</think>\n\nHello", None, "Hello"),  # Qwen3's empty block
    ("inside", "Let me see.\n</think>\n\nAnswer", "Let me see.", "Answer"),  # R1 / QwQ: the prompt opened it
    ("inside", "Still thinking about </thi", "Still thinking about </thi", None),  # max_tokens hit while thinking
    ("start", "<think>\nhalf", "half", None),
    ("inside", "", None, None),
    ("inside", "\n<think>\nAgain.</think>Done", "Again.", "Done"),  # an opening tag the prompt had: dropped
    ("inside", "<th", "<th", None),
    ("closed", "Hello <think>x</think>", None, "Hello <think>x</think>"),  # the prompt held the block
    ("start", "Hello <think>x</think>", None, "Hello <think>x</think>"),  # only a block at the start is reasoning
    ("start", "", None, ""),
    ("start", "\n <thi", None, "<thi"),
    ("start", "<think>plan</think>\n\n<tool_call>\n{}\n</tool_call>", "plan", "<tool_call>\n{}\n</tool_call>"),
]


@pytest.mark.parametrize("state, text, reasoning, content", SPLITS)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 1000])
def test_split_in_pieces_of_any_size(state, text, reasoning, content, size):
    """The whole answer splits as expected; fed in pieces, the streamed parts add up to that split, and no piece
    ever streams part of a tag."""
    assert split_reasoning(text, state) == (reasoning, content)
    stream = ReasoningStream(state)
    parts = [stream.feed(text[i:i + size]) for i in range(0, len(text), size)] + [stream.finish()]
    assert "".join(r for r, _ in parts) == (reasoning or "")
    assert "".join(c for _, c in parts) == (content or "")
    assert stream.result() == (reasoning, content)  # so no piece held part of a tag it should not


@pytest.mark.parametrize("tokenizer", ["qwen3", "bpe"])
def test_token_streams(tokenizer):
    """Token by token through the server's detokenizer: with Qwen3's tokenizer ``<think>`` is one token, with a
    plain BPE one it is split over several, and a multi-byte character is held until whole."""
    tok = family("qwen3") if tokenizer == "qwen3" else make_tokenizer()
    text = "<think>\nDeux et deux 🙂 font quatre.\n</think>\n\nÇa fait 4 🙂."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert (tok.convert_tokens_to_ids("<think>") in ids) == (tokenizer == "qwen3")
    assembler, stream = TextAssembler(tok, [], ()), ReasoningStream("start")
    parts = [stream.feed(assembler.add(token)) for token in ids]
    parts.append(stream.finish(assembler.finish()))
    assert "".join(r for r, _ in parts) == "Deux et deux 🙂 font quatre."
    assert "".join(c for _, c in parts) == "Ça fait 4 🙂."
    assert sum(1 for r, c in parts if r or c) > 5  # streamed as it came, not all at the end
    assert not any("<" in r + c or "\ufffd" in r + c for r, c in parts)
    assert stream.reasoning_tokens == ids.index(tok.convert_tokens_to_ids("</think>")) + 1 \
        if tokenizer == "qwen3" else stream.reasoning_tokens > 3


def test_where_answers_start_and_auto_detection():
    """From the rendered prompt: Qwen3 thinking -> "start", Qwen3 with enable_thinking false -> "closed" (its
    prompt holds the empty block), DeepSeek-R1 -> "inside" (its prompt opens <think>). ``auto`` is on for templates
    that write <think> only; a tokenizer that marks <think> special gets the tags kept in the text."""
    def tail(name, **kwargs):
        return prompt_state(family(name).apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False,
                                                             **kwargs)[-30:])

    assert tail("qwen3") == "start" and tail("qwen3", enable_thinking=False) == "closed"
    assert tail("deepseek-r1") == "inside" and tail("qwen2.5") == "start"
    assert [select_parser(family(n), "auto") for n in ("qwen3", "deepseek-r1", "qwen2.5", "llama3.1", "mistral")] \
        == [THINK, THINK, None, None, None]
    assert select_parser(family("qwen3"), "none") is None and select_parser(family("qwen2.5"), "deepseek_r1") is THINK
    assert THINK.tokens(family("qwen3")) == frozenset()  # plain added tokens, as in Qwen3's tokenizer
    special = make_tokenizer()
    special.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    keep = THINK.tokens(special)
    assert len(keep) == 2
    ids = special("<think>x</think>y", add_special_tokens=False)["input_ids"]
    assembler = TextAssembler(special, [], (), keep=keep)
    assert "".join(assembler.add(i) for i in ids) + assembler.finish() == "<think>x</think>y"


# -- a Qwen3 server over the socket --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen3")
    proc, client, tokenizer = _scripted_server(root, "qwen3", QWEN3_WORDS)
    try:
        yield {"url": proc.url, "client": client, "server": proc, "tokenizer": tokenizer}
    finally:
        client.close()
        proc.stop()


def _chat(client, **extra) -> dict:
    body = {"model": "base", "messages": QUESTION, "max_tokens": 16, "temperature": 0, **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def _chat_stream(client, **extra) -> list[dict]:
    body = {"model": "base", "messages": QUESTION, "max_tokens": 16, "temperature": 0, "stream": True, **extra}
    with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        blocks = response.read().decode().split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    return [json.loads(block[6:]) for block in blocks[:-2]]


def test_chat_reasoning_then_a_call(qwen3):
    client = qwen3["client"]
    assert "reasoning parser on" in qwen3["server"].output()  # said at start-up
    answer = _chat(client, tools=TOOLS)
    choice = answer["choices"][0]
    assert choice["message"]["reasoning_content"] == "I need the weather."
    assert choice["message"]["content"] == "Let me check." and choice["finish_reason"] == "tool_calls"
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}  # <think>, text, </think>
    plain = _chat(client)["choices"][0]  # no tools: the call is text, the reasoning still split off
    assert plain["message"] == {"role": "assistant", "reasoning_content": "I need the weather.",
                                "content": f"Let me check.<tool_call>\n{CALL_JSON}\n</tool_call>"}
    cut = _chat(client, max_tokens=2)["choices"][0]  # max_tokens reached while thinking: all reasoning
    assert cut["message"]["reasoning_content"] == "I need the weather." and cut["message"]["content"] is None
    assert cut["finish_reason"] == "length"


def test_chat_stream_reasoning_first(qwen3):
    events = _chat_stream(qwen3["client"], tools=TOOLS, stream_options={"include_usage": True})
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    kinds = [("reasoning" if d.get("reasoning_content") else "content" if d.get("content") else
              "calls" if d.get("tool_calls") else None) for d in deltas]
    kinds = [k for k in kinds if k]
    assert kinds == sorted(kinds, key=["reasoning", "content", "calls"].index) and kinds[0] == "reasoning"
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "I need the weather."
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
    # (a call streams as its head, with the name, then pieces of its arguments)
    assert [c["function"]["name"] for d in deltas for c in d.get("tool_calls") or () if "id" in c] == ["get_weather"]
    assert events[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_thinking_off_and_history_with_reasoning(qwen3):
    """``chat_template_kwargs`` {"enable_thinking": false}: the prompt holds the empty block, the answer is all
    content; an earlier answer sent back as the openai package dumps it (``reasoning_content`` included) is
    accepted, and the template writes its reasoning as Qwen3 does (dropped before the last question)."""
    import openai

    client, tokenizer = qwen3["client"], qwen3["tokenizer"]
    off = _chat(client, tools=TOOLS, chat_template_kwargs={"enable_thinking": False})
    message = off["choices"][0]["message"]
    assert message["reasoning_content"] is None and message["content"] == "Let me check."
    assert message["tool_calls"][0]["function"]["name"] == "get_weather"
    on = _chat(client, tools=TOOLS)
    assert off["usage"]["prompt_tokens"] > on["usage"]["prompt_tokens"]
    sdk = openai.OpenAI(base_url=qwen3["url"] + "/v1", api_key="none", max_retries=0)
    reply = sdk.chat.completions.create(model="base", messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=16)
    dumped = reply.choices[0].message.model_dump()
    assert dumped["reasoning_content"] == "I need the weather."
    history = [*QUESTION, dumped, {"role": "tool", "tool_call_id": dumped["tool_calls"][0]["id"], "content": "21"}]
    second = sdk.chat.completions.create(model="base", messages=history, tools=TOOLS, temperature=0, max_tokens=16)
    call = dumped["tool_calls"][0]
    expected = tokenizer.apply_chat_template(
        [*QUESTION, {"role": "assistant", "content": "Let me check.", "reasoning_content": "I need the weather.",
                     "tool_calls": [{"id": call["id"], "type": "function", "function": {
                         "name": "get_weather", "arguments": {"city": "Paris"}}}]}, history[-1]],
        tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert "<think>\nI need the weather.\n</think>" in expected  # a turn after the last question keeps it
    assert second.usage.prompt_tokens == len(tokenizer(expected, add_special_tokens=False)["input_ids"])


def _respond(client, **extra) -> dict:
    body = {"model": "base", "input": QUESTION, "max_output_tokens": 16, "temperature": 0, **extra}
    response = client.post("/v1/responses", json=body)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def _response_stream(url: str, body: dict) -> list[dict]:
    import httpx

    events = []
    with httpx.Client(base_url=url, timeout=60) as own, own.stream("POST", "/v1/responses", json={
            "model": "base", "input": QUESTION, "max_output_tokens": 16, "temperature": 0, "stream": True,
            **body}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


def test_responses_reasoning_and_function_calls(qwen3):
    from openai.types.responses import Response

    body = _respond(qwen3["client"], tools=RESPONSES_TOOLS)
    response = Response.model_validate(body)
    assert [item.type for item in response.output] == ["reasoning", "message", "function_call"]
    reasoning, message, call = response.output
    assert reasoning.content[0].text == "I need the weather." and reasoning.summary == []
    assert reasoning.id.startswith("rs_") and message.content[0].text == response.output_text == "Let me check."
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_") and call.status == "completed"
    assert body["status"] == "completed" and body["usage"]["output_tokens_details"]["reasoning_tokens"] == 3
    assert body["tools"] == [{**RESPONSES_TOOLS[0]}]
    none = Response.model_validate(_respond(qwen3["client"], tools=RESPONSES_TOOLS, tool_choice="none"))
    assert [item.type for item in none.output] == ["reasoning", "message"] and "<tool_call>" in none.output_text
    off = Response.model_validate(_respond(qwen3["client"], tools=RESPONSES_TOOLS,
                                           chat_template_kwargs={"enable_thinking": False}))
    assert [item.type for item in off.output] == ["message", "function_call"]


def test_responses_stream_adds_up(qwen3):
    from pydantic import TypeAdapter

    from openai.types.responses import Response, ResponseStreamEvent

    whole = Response.model_validate(_respond(qwen3["client"], tools=RESPONSES_TOOLS))
    events = _response_stream(qwen3["url"], {"tools": RESPONSES_TOOLS})
    parsed = [TypeAdapter(ResponseStreamEvent).validate_python(e) for e in events]
    kinds = [p.type for p in parsed]
    deltas = kinds.count("response.reasoning_text.delta")
    assert kinds == (["response.created", "response.in_progress", "response.output_item.added",
                      "response.content_part.added"] + ["response.reasoning_text.delta"] * deltas +
                     ["response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
                      "response.output_item.added", "response.content_part.added", "response.output_text.delta",
                      # the call opens as its name is written, while the message may still take text after it
                      "response.output_item.added", "response.function_call_arguments.delta",
                      "response.output_text.done", "response.content_part.done", "response.output_item.done",
                      "response.function_call_arguments.done", "response.output_item.done", "response.completed"])
    assert [p.sequence_number for p in parsed] == list(range(len(parsed)))
    assert [p.output_index for p in parsed if p.type == "response.output_item.added"] == [0, 1, 2]
    assert "".join(p.delta for p in parsed if p.type == "response.reasoning_text.delta") == "I need the weather."
    final = parsed[-1].response
    assert [(i.type, getattr(i, "name", None)) for i in final.output] == \
        [(i.type, getattr(i, "name", None)) for i in whole.output]
    assert final.output_text == whole.output_text and final.output[2].arguments == whole.output[2].arguments
    added = next(p for p in parsed if p.type == "response.output_item.added" and p.item.type == "function_call")
    assert added.item.arguments == "" and added.item.call_id == final.output[2].call_id
    assert [p.item.id for p in parsed if p.type == "response.output_item.done"] == [i.id for i in final.output]


def test_responses_agent_loop_with_the_sdk(qwen3):
    """The openai package's client and stream helper; the answer's items (reasoning, message, call) go back as
    the next turn's input with the tool's result, rendered as chat completions render the same history."""
    import openai

    sdk = openai.OpenAI(base_url=qwen3["url"] + "/v1", api_key="none", max_retries=0)
    reply = sdk.responses.create(model="base", input=QUESTION, tools=RESPONSES_TOOLS, temperature=0,
                                 max_output_tokens=16)
    with sdk.responses.stream(model="base", input=QUESTION, tools=RESPONSES_TOOLS, temperature=0,
                              max_output_tokens=16) as stream:
        final = stream.get_final_response()
    assert [i.type for i in final.output] == [i.type for i in reply.output] == ["reasoning", "message",
                                                                                "function_call"]
    call = reply.output[2]
    history = [*QUESTION, *[item.model_dump() for item in reply.output],
               {"type": "function_call_output", "call_id": call.call_id, "output": '{"temp": 21}'}]
    again = sdk.responses.create(model="base", input=history, tools=RESPONSES_TOOLS, temperature=0,
                                 max_output_tokens=16)
    chat = sdk.chat.completions.create(model="base", tools=TOOLS, temperature=0, max_tokens=16, messages=[
        *QUESTION, {"role": "assistant", "content": "Let me check.", "reasoning_content": "I need the weather.",
                    "tool_calls": [{"id": call.call_id, "type": "function",
                                    "function": {"name": "get_weather", "arguments": call.arguments}}]},
        {"role": "tool", "tool_call_id": call.call_id, "content": '{"temp": 21}'}])
    assert again.usage.input_tokens == chat.usage.prompt_tokens > reply.usage.input_tokens + 20
    with pytest.raises(openai.BadRequestError, match="web_search"):
        sdk.responses.create(model="base", input="x", tools=[{"type": "web_search"}])
    assert "Traceback" not in qwen3["server"].output()


# -- DeepSeek-R1: the prompt opens the block -----------------------------------------------------------------------
def test_deepseek_r1_answers_start_inside_the_block(tmp_path):
    proc, client, _ = _scripted_server(tmp_path, "deepseek-r1", R1_WORDS)
    try:
        message = _chat(client)["choices"][0]["message"]
        assert message == {"role": "assistant", "reasoning_content": "I need the weather.", "content": "It is sunny."}
        deltas = [e["choices"][0]["delta"] for e in _chat_stream(client)]
        assert "".join(d.get("reasoning_content") or "" for d in deltas) == "I need the weather."
        assert "".join(d.get("content") or "" for d in deltas) == "It is sunny."
        cut = _chat(client, max_tokens=1)["choices"][0]
        assert cut["message"]["reasoning_content"] == "I need the weather." and cut["message"]["content"] is None
        response = _respond(client)
        assert [i["type"] for i in response["output"]] == ["reasoning", "message"]
        assert response["output"][0]["content"][0]["text"] == "I need the weather."
        assert "Traceback" not in proc.output()
    finally:
        client.close()
        proc.stop()
    # --reasoning-parser none: the answer as written (what the server did before), said at start-up
    import httpx

    plain = ServerProcess(tmp_path / "model", tmp_path / "adapters", "--reasoning-parser", "none",
                          log=tmp_path / "plain.log")
    try:
        with httpx.Client(base_url=plain.url, timeout=60) as client:
            message = _chat(client)["choices"][0]["message"]
        assert message == {"role": "assistant", "content": "I need the weather.</think>\n\nIt is sunny."}
        assert "reasoning parser off" in plain.output()
    finally:
        plain.stop()


# -- in process: an answer cut while thinking, streamed on /v1/responses ------------------------------------------
def test_responses_stream_cut_while_thinking():
    from pydantic import TypeAdapter

    from openai.types.responses import ResponseStreamEvent

    from lorakit.serve.protocol import ResponsesRequest
    from lorakit.serve.responses import final_response, response_events

    body = ResponsesRequest.model_validate({"model": "m", "input": "Hello"})
    pieces = ["<thi", "nk>\nStep one", " </th", "en two"]
    queue = asyncio.Queue()
    for settled, piece in enumerate(pieces, 1):  # the bridge's events: (.., settled tokens)
        queue.put_nowait(("token", 0, piece, 1, None, settled))
    queue.put_nowait(("done", 0, "", "length", len(pieces)))
    state = SimpleNamespace(engine=SimpleNamespace(cancel=lambda job: None))

    async def run():
        return [json.loads(chunk.split("data: ", 1)[1]) async for chunk in response_events(
            state, body, SimpleNamespace(tokens=[1] * 4), SimpleNamespace(queue=queue), "resp_x", "msg_x", 0, 3,
            "start")]

    events = [TypeAdapter(ResponseStreamEvent).validate_python(e) for e in asyncio.run(run())]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "Step one </then two"
    assert not any(e.type.startswith("response.output_text") for e in events)
    last = events[-1]
    assert last.type == "response.incomplete" and [i.type for i in last.response.output] == ["reasoning"]
    assert last.response.output[0].status == "incomplete" and last.response.output_text == ""
    whole = final_response(body, "resp_x", "msg_x", 0, [*pieces, ""], "length", 3, 4, "start")
    assert whole["status"] == "incomplete" and [i["type"] for i in whole["output"]] == ["reasoning"]
    assert whole["output"][0] == last.response.output[0].model_dump()
    assert whole["usage"]["output_tokens_details"]["reasoning_tokens"] == 4
