"""Tool calling on ``lorakit serve``'s ``/v1/chat/completions`` (what vLLM serves with ``--enable-auto-tool-choice
--tool-call-parser hermes``), on a real server over real sockets.

The server's model is a tiny Llama whose answer is known: its attention and MLP outputs are zero, so each position
sees only its own token's embedding, and its embeddings and output rows chain the generation prompt's last token to
``Let me check.`` ``<tool_call>`` ``{"name": "get_weather", ...}`` ``</tool_call>`` ``<|im_end|>`` (words added to
its Qwen2.5-template tokenizer as tokens). So a greedy answer is a well-formed hermes call, as a tool-use adapter
trained by lorakit writes it, and the server must return it as OpenAI ``tool_calls``.

Before: any non-empty ``tools`` was a 400 "tools is not supported (no function calling)", as were ``tool`` turns
and an assistant turn's ``tool_calls``, so a trained tool-use adapter could not be served to an agent framework.
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import httpx
import pytest
import torch

from conftest import tiny_llama
from test_serve_support import ServerProcess, make_tokenizer
from test_train_tool_calls import QWEN25, TOOLS, family

from lorakit.serve.protocol import APIError, ChatRequest
from lorakit.serve.tool_calls import ToolCallStream, parse_calls, parse_tool_calls
from lorakit.serve.transport import parse

CALL_JSON = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
ANSWER = f"Let me check.<tool_call>\n{CALL_JSON}\n</tool_call>"  # what the server's model writes, greedy
QUESTION = [{"role": "user", "content": "Weather in Paris?"}]


def _scripted_server(root, name: str, words: list[str], special: tuple[str, ...] = ()):
    """A server whose model answers any chat with ``words`` (each added to the tokenizer of template family
    ``name`` as one token; the last an end-of-turn token): see the module docstring. ``special``: added tokens
    the tokenizer then marks special."""
    from transformers import AutoTokenizer

    family(name).save_pretrained(root / "model")
    if special:
        _mark_special(root / "model", special)
    tokenizer = AutoTokenizer.from_pretrained(root / "model")  # a copy: the shared one stays as other tests built it
    tokenizer.add_tokens([w for w in words if w not in tokenizer.get_vocab()])
    prompt = tokenizer.apply_chat_template(QUESTION, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                           return_dict=False)
    chain = [prompt[-1], *tokenizer.convert_tokens_to_ids(words)]
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        for layer in model.model.layers:  # each position sees its own token only: a table of next tokens
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.lm_head.weight.normal_(0, 0.02)
        for k, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token] = torch.nn.functional.one_hot(torch.tensor(k), 32).float()
            model.lm_head.weight[following] = 10 * torch.nn.functional.one_hot(torch.tensor(k), 32).float()
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "adapters").mkdir()
    # its words are tokens added to the tokenizer, which llguidance reads as markers, never as text: forced calls
    # unconstrained (--tool-call-grammar off, as without llguidance), so the scripted words go through
    proc = ServerProcess(root / "model", root / "adapters", "--max-tokens", "32", "--tool-call-grammar", "off",
                         log=root / "server.log")
    return proc, httpx.Client(base_url=proc.url, timeout=60), tokenizer


def _mark_special(folder, tokens: tuple[str, ...]) -> None:
    """Mark added tokens special in a saved tokenizer, as Hermes 2 Pro / 3 tokenizers mark ``<tool_call>``."""
    for name in ("tokenizer.json", "tokenizer_config.json"):
        data = json.loads((folder / name).read_text())
        for token in [*data.get("added_tokens", ()), *data.get("added_tokens_decoder", {}).values()]:
            if token["content"] in tokens:
                token["special"] = True
        (folder / name).write_text(json.dumps(data))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    words = ["Let me check.", "<tool_call>", f"\n{CALL_JSON}\n", "</tool_call>", "<|im_end|>"]
    proc, client, tokenizer = _scripted_server(tmp_path_factory.mktemp("tools"), "qwen2.5", words)
    try:
        yield {"url": proc.url, "client": client, "server": proc, "tokenizer": tokenizer}
    finally:
        client.close()
        proc.stop()


def _chat(client, messages=QUESTION, **extra) -> dict:
    response = client.post("/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 16,
                                                         "temperature": 0, **extra})
    assert response.status_code == 200, response.text[:500]
    return response.json()


def _error(response: httpx.Response) -> dict:
    assert response.status_code == 400, response.text[:500]
    error = response.json()["error"]
    assert "\n" not in error["message"] and error["message"]
    return error


def _stream(client, **body) -> list[dict]:
    with client.stream("POST", "/v1/chat/completions", json={"model": "base", "messages": QUESTION, "max_tokens": 16,
                                                            "temperature": 0, "stream": True, **body}) as response:
        assert response.status_code == 200, response.read()
        raw = response.read().decode()
    blocks = raw.split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""], raw[-200:]
    return [json.loads(block[6:]) for block in blocks[:-2]]


def _joined_calls(deltas: list[dict]) -> list[dict]:
    """A streamed choice's calls as clients join them (the openai package does): by ``index``, the head (id, type,
    name) once, then the pieces of arguments appended; each call as ``{"id", "function": {"name", "arguments"}}``."""
    calls: dict[int, dict] = {}
    for delta in deltas:
        for part in delta["delta"].get("tool_calls") or ():
            if "id" in part:
                assert part["index"] not in calls and part["type"] == "function"
                calls[part["index"]] = {"id": part["id"], "function": dict(part["function"])}
            else:
                calls[part["index"]]["function"]["arguments"] += part["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]


# -- over the socket ---------------------------------------------------------------------------------------------
def test_a_call_is_returned_as_tool_calls(server):
    tokenizer = server["tokenizer"]
    answer = _chat(server["client"], tools=TOOLS)
    choice = answer["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls" and message["content"] == "Let me check."
    [call] = message["tool_calls"]
    assert call["id"].startswith("call_") and len(call["id"]) > 10 and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # the tools reached the template: the prompt is the template's with the tools section, token for token
    with_tools = tokenizer.apply_chat_template(QUESTION, tools=TOOLS, add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    without = _chat(server["client"])
    assert answer["usage"]["prompt_tokens"] == len(with_tools) > without["usage"]["prompt_tokens"] + 20
    # no tools: the same words are plain text, as before
    assert without["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert without["choices"][0]["finish_reason"] == "stop"


def test_tool_choice_none_and_unknown_functions_leave_text(server):
    client = server["client"]
    none = _chat(client, tools=TOOLS, tool_choice="none")
    assert none["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert none["choices"][0]["finish_reason"] == "stop"
    assert none["usage"]["prompt_tokens"] == _chat(client, tools=TOOLS)["usage"]["prompt_tokens"]  # tools still shown
    other = [{"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
    unknown = _chat(client, tools=other, tool_choice="auto")  # the model calls a function it was not given
    assert unknown["choices"][0]["message"] == {"role": "assistant", "content": ANSWER}
    assert unknown["choices"][0]["finish_reason"] == "stop"


def test_stream_adds_up_to_the_answer(server):
    events = _stream(server["client"], tools=TOOLS, stream_options={"include_usage": True})
    deltas = [e["choices"][0] for e in events if e["choices"]]
    content = "".join(d["delta"].get("content") or "" for d in deltas)
    calls = _joined_calls(deltas)
    assert content == "Let me check." and [d["finish_reason"] for d in deltas if d["finish_reason"]] == ["tool_calls"]
    assert len(calls) == 1 and calls[0]["id"].startswith("call_")
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    # the call streams as it is written: its head with empty arguments first, then its arguments
    parts = [p for d in deltas for p in d["delta"].get("tool_calls") or ()]
    assert [p["function"] for p in parts] == [{"name": "get_weather", "arguments": ""}, {"arguments": '{"city": "Paris"}'}]
    assert not any("<tool_call>" in (d["delta"].get("content") or "") for d in deltas)
    assert events[-1]["usage"]["completion_tokens"] == 5
    plain = _stream(server["client"], tools=TOOLS, tool_choice="none")
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in plain) == ANSWER


def test_openai_sdk_agent_loop(server):
    """The openai package parses the answer and the chunks; the reply and a tool result go back as the next turn."""
    import openai

    sdk = openai.OpenAI(base_url=server["url"] + "/v1", api_key="none", max_retries=0)
    reply = sdk.chat.completions.create(model="base", messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=16)
    message = reply.choices[0].message
    assert reply.choices[0].finish_reason == "tool_calls" and message.tool_calls[0].function.name == "get_weather"
    assert json.loads(message.tool_calls[0].function.arguments) == {"city": "Paris"}
    streamed = {}
    for chunk in sdk.chat.completions.create(model="base", messages=QUESTION, tools=TOOLS, temperature=0,
                                             max_tokens=16, stream=True):
        for delta in chunk.choices[0].delta.tool_calls or ():
            streamed.setdefault(delta.index, [delta.function.name, ""])[1] += delta.function.arguments or ""
    assert streamed == {0: ["get_weather", message.tool_calls[0].function.arguments]}
    # the agent's second turn: the reply as the SDK dumps it (content null), then the tool's result
    history = [*QUESTION, message.model_dump(),
               {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"temp": 21}'}]
    second = sdk.chat.completions.create(model="base", messages=history, tools=TOOLS, temperature=0, max_tokens=16)
    expected = server["tokenizer"].apply_chat_template(
        [*QUESTION, {"role": "assistant", "content": "Let me check.", "tool_calls": [
            {"id": message.tool_calls[0].id, "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
         history[-1]], tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert '{"city": "Paris"}' in expected and "<tool_response>\n{\"temp\": 21}" in expected
    assert second.usage.prompt_tokens == len(server["tokenizer"](expected, add_special_tokens=False)["input_ids"])
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        sdk.chat.completions.create(model="base", messages=QUESTION, tools=TOOLS,
                                    tool_choice={"type": "function", "function": {"name": "get_time"}})


@pytest.mark.parametrize("extra, param, words", [
    ({"tool_choice": "required"}, "tool_choice", "not supported without tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "get_time"}}}, "tool_choice",
     "not among the tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "allowed_tools", "allowed_tools": {"mode": "auto", "tools": []}}},
     "tool_choice", "at least one"),
    ({"tools": TOOLS, "tool_choice": "any"}, "tool_choice", "not supported"),
    ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools.0.function.name", "missing"),
    ({"tools": [{"type": "custom", "function": {"name": "f"}}]}, "tools", "only function tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameter": {}}}]}, "tools.0.function.parameter",
     "unknown field"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name", "pattern"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools", "two tools"),
    ({"tools": {"type": "function"}}, "tools", "list"),
    ({"tools": [{"type": "function", "function": {"name": "f", "description": "x" * 300_000}}]}, "messages",
     "characters"),  # refused before the template runs
    ({"messages": [*QUESTION, {"role": "tool", "content": "21"}]}, "messages.1.tool_call_id", "tool_call_id"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": None}]}, "messages.1.content", "required"),
    ({"messages": [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{city: Paris}"}}]}]},
     "messages.1.tool_calls.0.function.arguments", "not JSON"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}]},
     "messages.0.tool_calls", "only assistant"),
])
def test_refusals_name_the_field(server, extra, param, words):
    body = {"model": "base", "messages": QUESTION, **extra}
    error = _error(server["client"].post("/v1/chat/completions", json=body))
    assert error["param"] == param and words in error["message"], error


def test_llama_json_calls(tmp_path):
    """Llama 3.1's template: the answer is the call's JSON alone, returned as tool_calls with no content; streamed,
    nothing of it is content. A request with tools also stops at ``<|eom_id|>``."""
    llama_call = '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    # the call ends with <|eom_id|>, which ends Llama 3.1's call turns (its generation_config, not its tokenizer)
    proc, client, _ = _scripted_server(tmp_path, "llama3.1", [llama_call, "<|eom_id|>"])
    try:
        choice = _chat(client, tools=TOOLS)["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert [c["function"] for c in choice["message"]["tool_calls"]] == [
            {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
        deltas = [e["choices"][0] for e in _stream(client, tools=TOOLS)]
        assert not any(d["delta"].get("content") for d in deltas)
        assert [c["function"] for c in _joined_calls(deltas)] == [
            {"name": "get_weather", "arguments": '{"city": "Paris"}'}]
        assert _chat(client, tools=TOOLS, tool_choice="none")["choices"][0]["message"]["content"] == llama_call
        assert "Traceback" not in proc.output()
    finally:
        client.close()
        proc.stop()


def test_mistral_calls(tmp_path):
    """Mistral's template: ``[TOOL_CALLS]`` is a special token, kept in the text of a request whose calls are
    parsed; the agent's second turn sends the call back with its OpenAI id, which the template (9 characters
    only) gets cut as training cuts it."""
    listed = ' [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}]'
    proc, client, _ = _scripted_server(tmp_path, "mistral", ["[TOOL_CALLS]", listed, "</s>"])
    try:
        answer = _chat(client, tools=TOOLS)
        choice = answer["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        [call] = choice["message"]["tool_calls"]
        assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
        deltas = [e["choices"][0] for e in _stream(client, tools=TOOLS)]
        assert not any(d["delta"].get("content") for d in deltas)
        assert [c["function"] for c in _joined_calls(deltas)] == [call["function"]]
        assert _chat(client)["choices"][0]["message"]["content"] == listed  # no tools: the marker skipped, as before
        history = [*QUESTION, choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "21"}]
        assert _chat(client, history, tools=TOOLS)["usage"]["prompt_tokens"] > answer["usage"]["prompt_tokens"]
    finally:
        client.close()
        proc.stop()


def test_hermes_tokenizer_that_marks_tool_call_special(tmp_path):
    """Hermes tokenizers mark ``<tool_call>`` special, and an answer's text skips special tokens: the markers are
    kept for requests whose calls are parsed (vLLM turns skip_special_tokens off for its hermes parser), so the
    call is found; without tools the answer reads as before (the markers skipped)."""
    words = ["<tool_call>", f"\n{CALL_JSON}\n", "</tool_call>", "<|im_end|>"]
    proc, client, tokenizer = _scripted_server(tmp_path, "hermes", words, special=("<tool_call>", "</tool_call>"))
    try:
        assert tokenizer.decode(tokenizer.convert_tokens_to_ids(words[:3]), skip_special_tokens=True) == \
            f"\n{CALL_JSON}\n"
        choice = _chat(client, tools=TOOLS)["choices"][0]
        assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
        assert [c["function"]["name"] for c in choice["message"]["tool_calls"]] == ["get_weather"]
        deltas = [e["choices"][0] for e in _stream(client, tools=TOOLS)]
        assert [c["function"]["name"] for c in _joined_calls(deltas)] == ["get_weather"]
        assert _chat(client)["choices"][0]["message"]["content"] == f"\n{CALL_JSON}\n"
    finally:
        client.close()
        proc.stop()


def test_still_serving_without_tracebacks(server):
    assert server["client"].get("/health").json()["status"] == "ok"
    assert "Traceback" not in server["server"].output()


# -- in process: templates of other formats, the parser and the stream assembly --------------------------------
def _state():
    return SimpleNamespace(max_prompt_tokens=4096)


def _encode(tokenizer, body: dict):
    from lorakit.serve.app import _encode_tools
    from lorakit.serve.model_text import ModelText

    request = parse(ChatRequest, {"model": "m", **body})
    return _encode_tools(_state(), ModelText(tokenizer, (), None, len(tokenizer)), request, request.openai_tools())


def test_templates_of_other_formats_are_refused_by_name():
    """A template that writes calls in a format lorakit does not parse (DeepSeek's, or a custom one): refused,
    not answered with the calls left in the text; with tool_choice "none" (calls not parsed) it serves. A template
    without tools (ChatML) is told it writes neither the tools nor an earlier call."""
    from lorakit.serve.tool_calls import call_format

    assert [call_format(family(name), TOOLS) for name in ("qwen2.5", "qwen3", "hermes", "llama3.1", "mistral",
                                                          "deepseek-v3.1")] == \
        ["hermes", "hermes", "hermes", "llama3_json", "mistral", None]
    other = copy.deepcopy(family("qwen2.5"))  # a template that writes the tools, and calls in a format of its own
    other.chat_template = QWEN25.replace("tool_call>", "function_call>")
    assert call_format(other, TOOLS) is None
    with pytest.raises(APIError) as refused:
        _encode(other, {"messages": QUESTION, "tools": TOOLS})
    assert refused.value.param == "tools" and "hermes" in refused.value.message and "Llama" in refused.value.message
    ids = _encode(other, {"messages": QUESTION, "tools": TOOLS, "tool_choice": "none"})
    assert "get_weather" in other.decode(ids)
    llama = family("llama3.1")
    assert "get_weather" in llama.decode(_encode(llama, {"messages": QUESTION, "tools": TOOLS}))
    chatml = make_tokenizer()
    with pytest.raises(APIError) as unwritten:
        _encode(chatml, {"messages": QUESTION, "tools": TOOLS, "tool_choice": "none"})
    assert unwritten.value.param == "tools" and "does not write the tools" in unwritten.value.message
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
               {"role": "tool", "tool_call_id": "c1", "content": "21"}]
    with pytest.raises(APIError) as dropped:
        _encode(chatml, {"messages": history})
    assert dropped.value.param == "messages.1.tool_calls"
    # a one-letter name is somewhere in any prompt: what counts is whether the template writes it
    short = json.loads(json.dumps(history).replace("get_weather", "f"))
    with pytest.raises(APIError) as dropped:
        _encode(chatml, {"messages": short})
    assert dropped.value.param == "messages.1.tool_calls"
    with pytest.raises(APIError) as unwritten:
        _encode(chatml, {"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}],
                         "tool_choice": "none"})
    assert unwritten.value.param == "tools"
    qwen = family("qwen2.5")
    assert "<tool_call>" in qwen.decode(_encode(qwen, {"messages": short, "tools": [
        {"type": "function", "function": {"name": "f"}}]}))


def test_history_renders_as_training_does():
    """An earlier call goes to the template with dict arguments (Qwen's ``tojson``), so it reads as the adapter was
    trained on; Mistral's template, which wants 9-character ids, gets the ids cut as training cuts them."""
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_abcdefghijkl", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_abcdefghijkl", "content": "21"}]
    qwen = family("qwen2.5")
    text = qwen.decode(_encode(qwen, {"messages": history, "tools": TOOLS}))
    assert f"<tool_call>\n{CALL_JSON}\n</tool_call>" in text and "\\\"city" not in text
    mistral = family("mistral")
    text = mistral.decode(_encode(mistral, {"messages": history, "tools": TOOLS, "tool_choice": "none"}))
    assert '"id": "defghijkl"' in text and '{"city": "Paris"}' in text


PARSE_CASES = [
    (ANSWER, "Let me check.", [("get_weather", {"city": "Paris"})]),
    (f"\n<tool_call>\n{CALL_JSON}\n</tool_call>\n", None, [("get_weather", {"city": "Paris"})]),
    (f"<tool_call>\n{CALL_JSON}\n</tool_call>\n<tool_call>\n"
     '{"name": "get_time", "arguments": "{\\"zone\\": \\"CET\\"}"}\n</tool_call>', None,
     [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]),
    (f"Sure. <tool_call>{CALL_JSON}", "Sure.", [("get_weather", {"city": "Paris"})]),  # not closed: ended its turn
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par\n', None, None),  # cut by max_tokens
    ('<tool_call>\n{"name": "delete_all", "arguments": {}}\n</tool_call>', None, None),  # not a given tool
    ('<tool_call>\n{"name": "get_weather", "arguments": [1]}\n</tool_call>', None, None),
    (f"<tool_call>\n{CALL_JSON}\n</tool_call><tool_call>not json</tool_call>", None, None),
    ("I use <tool_cal and < tool_call> in prose.", None, None),
]


@pytest.mark.parametrize("text, content, calls", PARSE_CASES)
def test_parser(text, content, calls):
    parsed = parse_tool_calls(text, {"get_weather", "get_time"})
    if calls is None:
        assert parsed is None
        return
    assert parsed[0] == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed[1]] == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in parsed[1])
    assert len({c["id"] for c in parsed[1]}) == len(calls)


LLAMA_CASES = [
    ('{"name": "get_weather", "parameters": {"city": "Paris"}}', [("get_weather", {"city": "Paris"})]),
    (' {"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "arguments": {}}\n',
     [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    ('{"name": "get_weather", "parameters": {"city": "Par', None),  # cut by max_tokens
    ('{"name": "delete_all", "parameters": {}}', None),
    ('{"name": "get_weather", "parameters": {}} and then some words', None),
    ('The answer is {"name": "get_weather"}', None),  # a call is the whole answer
    ("It is 21 degrees.", None),
]


def test_parallel_tool_calls_false_keeps_the_first():
    two = f"<tool_call>\n{CALL_JSON}\n</tool_call>\n<tool_call>\n{CALL_JSON.replace('Paris', 'Rome')}\n</tool_call>"
    assert len(parse_calls(two, "hermes", {"get_weather"})[1]) == 2
    content, [call] = parse_calls(two, "hermes", {"get_weather"}, single=True)
    assert content is None and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    holder = ToolCallStream({"get_weather"}, "hermes", single=True)
    assert holder.feed(two) == "" and [c["function"] for c in holder.finish()[1]] == [call["function"]]


MISTRAL_CASES = [
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "abcdefghi"}]', None,
     [("get_weather", {"city": "Paris"})]),
    ('Checking. [TOOL_CALLS][{"name": "get_weather", "arguments": {}}, {"name": "get_time", "arguments": {}}]',
     "Checking.", [("get_weather", {}), ("get_time", {})]),
    ('[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Pa', None, None),  # cut by max_tokens
    ('[TOOL_CALLS] [{"name": "rm", "arguments": {}}]', None, None),
    ("It is [TOOL 21 degrees.", None, None),
]


@pytest.mark.parametrize("text, content, calls", MISTRAL_CASES)
def test_mistral_parser(text, content, calls):
    parsed = parse_calls(text, "mistral", {"get_weather", "get_time"})
    if calls is None:
        assert parsed is None
        return
    assert parsed[0] == content
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed[1]] == calls


@pytest.mark.parametrize("text, calls", LLAMA_CASES)
def test_llama_json_parser(text, calls):
    parsed = parse_calls(text, "llama3_json", {"get_weather", "get_time"})
    if calls is None:
        assert parsed is None
        return
    assert parsed[0] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed[1]] == calls


@pytest.mark.parametrize("fmt, text", [("hermes", case[0]) for case in PARSE_CASES] +
                         [("hermes", text) for text in ("plain answer  \n", " ", "a <tool", "x\n <tool_")] +
                         [("llama3_json", case[0]) for case in LLAMA_CASES] + [("llama3_json", " \n")] +
                         [("mistral", case[0]) for case in MISTRAL_CASES] + [("mistral", "a [TOOL")])
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_stream_assembly_equals_the_answer(fmt, text, size):
    """Fed in pieces of any size, the streamed content plus the rest at the end is the non-streamed content, and
    no piece of a call is ever streamed as content when the text is a call."""
    holder = ToolCallStream({"get_weather", "get_time"}, fmt)
    streamed = "".join(holder.feed(text[i:i + size]) for i in range(0, len(text), size))
    rest, calls = holder.finish()
    parsed = parse_calls(text, fmt, {"get_weather", "get_time"})
    if parsed is None:
        assert calls is None and streamed + rest == text
    else:
        assert streamed + rest == (parsed[0] or "") and "<tool" not in streamed and "{" not in streamed
        assert "[TOOL" not in streamed
        assert [c["function"] for c in calls] == [c["function"] for c in parsed[1]]


# -- tool_choice "required" and a named function: the answer starts the call ------------------------------------
FORCED_WORDS = ["<tool_call>", '\n{"name": "', 'get_weather", "arguments": ', '{"city": "Paris"}}\n', "</tool_call>",
                "<|im_end|>"]


@pytest.fixture(scope="module")
def forced(tmp_path_factory):
    """A server whose model writes a whole call (``FORCED_WORDS``), each piece of the call's start one token, so
    a prompt that ends with the start of a call ("required": up to the name; named: up to the arguments) is
    continued as the model would have continued its own call."""
    proc, client, tokenizer = _scripted_server(tmp_path_factory.mktemp("forced"), "qwen2.5", FORCED_WORDS)
    try:
        yield {"url": proc.url, "client": client, "server": proc, "tokenizer": tokenizer}
    finally:
        client.close()
        proc.stop()


def test_forced_prefixes_are_the_templates_calls():
    """The start the server writes is what each template writes for an earlier call, token for token up to the
    arguments."""
    from lorakit.serve.tool_calls import forced_prefix

    call = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [{"id": "abcdefghi", "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}]
    for name, fmt in (("qwen2.5", "hermes"), ("hermes", "hermes"), ("llama3.1", "llama3_json"),
                      ("mistral", "mistral")):
        text = family(name).apply_chat_template(call, tools=TOOLS, tokenize=False)
        named = forced_prefix(fmt, "get_weather")
        assert named + '{"city": "Paris"}' in text and named.startswith(forced_prefix(fmt, "")), name
        assert parse_calls(named + '{"city": "Paris"}}' + ("]" if fmt == "mistral" else ""), fmt,
                           {"get_weather"})[1][0]["function"]["name"] == "get_weather"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_call(forced, choice):
    client = forced["client"]
    auto = _chat(client, tools=TOOLS)["choices"][0]  # the model calls by itself; forced, the same call comes back
    answer = _chat(client, tools=TOOLS, tool_choice=choice)
    message = answer["choices"][0]["message"]
    assert answer["choices"][0]["finish_reason"] == "tool_calls" and message["content"] is None
    assert [c["function"] for c in message["tool_calls"]] == [c["function"] for c in auto["message"]["tool_calls"]] \
        == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    # the call's start is in the prompt: fewer tokens generated than for the model's own call
    prefix = 3 if choice == "required" else 4
    assert answer["usage"]["completion_tokens"] == len(FORCED_WORDS) - prefix + 1
    deltas = [e["choices"][0] for e in _stream(client, tools=TOOLS, tool_choice=choice)]
    assert not any(d["delta"].get("content") for d in deltas)
    assert [c["function"] for c in _joined_calls(deltas)] == \
        [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]
    assert [d["finish_reason"] for d in deltas if d["finish_reason"]] == ["tool_calls"]


def test_a_forced_call_the_model_does_not_finish_is_an_error(forced):
    """Cut after one token the answer is ``{"name": "get_weather", "arguments": `` and no call: the server says so
    (one line, what the model wrote) instead of making a call up; streamed, the error is the last event."""
    client = forced["client"]
    response = client.post("/v1/chat/completions", json={"model": "base", "messages": QUESTION, "tools": TOOLS,
                                                          "tool_choice": "required", "max_tokens": 1})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "invalid_tool_call" and "\n" not in error["message"]
    assert "did not write a call of one of the tools" in error["message"] and "get_weather" in error["message"]
    with client.stream("POST", "/v1/chat/completions", json={
            "model": "base", "messages": QUESTION, "tools": TOOLS, "tool_choice": "required", "max_tokens": 1,
            "stream": True}) as streamed:
        blocks = streamed.read().decode().split("\n\n")
    assert blocks[-2] == "data: [DONE]" and json.loads(blocks[-3][6:])["error"]["code"] == "invalid_tool_call"
    assert not any("tool_calls" in block for block in blocks)
    assert "Traceback" not in forced["server"].output()


@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get_weather"}])
def test_forced_call_on_responses(forced, choice):
    """The same on ``/v1/responses`` (its flat tool and tool_choice forms): one ``function_call`` item, streamed
    as the openai package's events."""
    from pydantic import TypeAdapter

    from openai.types.responses import Response, ResponseStreamEvent

    tools = [{"type": "function", **TOOLS[0]["function"]}]
    body = {"model": "base", "input": QUESTION, "tools": tools, "tool_choice": choice, "max_output_tokens": 16,
            "temperature": 0}
    response = forced["client"].post("/v1/responses", json=body)
    assert response.status_code == 200, response.text
    answer = Response.model_validate(response.json())
    assert [(i.type, i.name, i.arguments) for i in answer.output] == [("function_call", "get_weather",
                                                                       '{"city": "Paris"}')]
    with forced["client"].stream("POST", "/v1/responses", json={**body, "stream": True}) as streamed:
        events = [TypeAdapter(ResponseStreamEvent).validate_python(json.loads(line[6:]))
                  for line in streamed.iter_lines() if line.startswith("data: ")]
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.output_item.added",
                                        "response.function_call_arguments.delta",
                                        "response.function_call_arguments.done", "response.output_item.done",
                                        "response.completed"]
    assert events[-1].response.output[0].arguments == '{"city": "Paris"}'
    refused = forced["client"].post("/v1/responses", json={**body, "tool_choice": {"type": "function", "name": "x"}})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_choice"


def test_forced_call_not_written_on_responses():
    """In process: a forced call the model does not finish is a ``response.failed`` event (streamed) or an error
    (``final_response`` raises, the endpoint answers a 500), never a call made up."""
    import asyncio

    from pydantic import TypeAdapter

    from openai.types.responses import ResponseStreamEvent

    from lorakit.errors import LorakitError
    from lorakit.serve.protocol import ResponsesRequest
    from lorakit.serve.responses import final_response, response_events
    from lorakit.serve.tool_calls import forced_prefix

    tools = [{"type": "function", **TOOLS[0]["function"]}]
    body = ResponsesRequest.model_validate({"model": "m", "input": "x", "tools": tools, "tool_choice": "required"})
    calls = ("hermes", {"get_weather"}, False, forced_prefix("hermes", ""))
    pieces = ['get_weather", "argu', "ments: 12"]
    with pytest.raises(LorakitError, match="did not write a call of one of the tools"):
        final_response(body, "resp_x", "msg_x", 0, [*pieces, ""], "stop", 3, 2, None, calls)
    assert [c["name"] for c in final_response(body, "resp_x", "msg_x", 0, ['get_weather", "arguments": {}}', ""],
                                               "stop", 3, 2, None, calls)["output"]] == ["get_weather"]
    queue = asyncio.Queue()
    for settled, piece in enumerate(pieces, 1):  # the bridge's events: (.., settled tokens)
        queue.put_nowait(("token", 0, piece, 1, None, settled))
    queue.put_nowait(("done", 0, "", "stop", len(pieces)))
    state = SimpleNamespace(engine=SimpleNamespace(cancel=lambda job: None))

    async def run():
        return [json.loads(chunk.split("data: ", 1)[1]) async for chunk in response_events(
            state, body, SimpleNamespace(tokens=[1, 2]), SimpleNamespace(queue=queue), "resp_x", "msg_x", 0, 3,
            None, calls)]

    events = [TypeAdapter(ResponseStreamEvent).validate_python(e) for e in asyncio.run(run())]
    assert [e.type for e in events] == ["response.created", "response.in_progress", "response.failed"]
    assert "did not write a call" in events[-1].response.error.message and events[-1].response.output == []


def test_two_tools_of_one_name_are_refused_in_both_apis():
    """A tool list naming one function twice is a validation error naming it, in chat's and the Responses form."""
    from pydantic import ValidationError

    from lorakit.serve.protocol import ChatRequest, ResponsesRequest

    nested = {"type": "function", "function": {"name": "get", "parameters": {"type": "object", "properties": {}}}}
    flat = {"type": "function", "name": "get", "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(ValidationError, match="two tools are named 'get'"):
        ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                    "tools": [nested, nested]})
    with pytest.raises(ValidationError, match="two tools are named 'get'"):
        ResponsesRequest.model_validate({"model": "m", "input": "hi", "tools": [flat, flat]})
    assert ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                       "tools": [nested]}).tools
