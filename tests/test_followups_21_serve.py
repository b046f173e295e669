"""``lorakit serve`` as a demanding new user drives it with the openai package (session 21), over real sockets.

Probed on the embedded smollm2-135m with the README's demo adapter and a peft-saved LoRA (every chat, responses,
completions, parse / stream helper, error and raw-HTTP path of the brief); what broke is pinned here:

- tool_choice "required" or a named function: the server starts the call in the prompt and the model wrote the
  rest unconstrained, so a model that does not call well (the demo adapter's base with a hermes template: the name
  "Paris", arguments that were the tool's schema, prose after the call) made the request a 500 "the model did not
  write a call", streamed or not, on /v1/chat/completions and /v1/responses, though the server holds answers to
  grammars (llguidance) and vLLM holds forced calls to the tools' schemas. Now the rest of the call is a grammar
  (``lorakit/serve/forced_grammar.py``): a callable name, arguments valid for its ``parameters``, written as
  templates write JSON, then the call's end (Qwen's added ``</tool_call>`` token too).
"""

from __future__ import annotations

import json

import httpx
import pytest

from test_serve_support import ServerProcess, make_tokenizer
from test_train_tool_calls import QWEN25

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
        "required": ["city"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "get_time", "description": "The time now", "parameters": {
        "type": "object", "properties": {"utc": {"type": "boolean"}}, "required": ["utc"],
        "additionalProperties": False}}},
]
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny random Llama (it writes no call by itself) whose tokenizer holds ``<tool_call>`` / ``</tool_call>``
    as added tokens and whose template is Qwen2.5's (hermes calls), as Qwen2.5's."""
    from conftest import tiny_llama

    root = tmp_path_factory.mktemp("forced21")
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["<tool_call>", "</tool_call>"])
    tokenizer.chat_template = QWEN25
    model = tiny_llama(seed=3, vocab_size=len(tokenizer), max_position_embeddings=1024,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    (root / "adapters").mkdir()
    process = ServerProcess(root / "model", root / "adapters", "--max-tokens", "48", log=root / "server.log")
    client = httpx.Client(base_url=process.url, timeout=120)
    try:
        yield {"client": client, "process": process}
    finally:
        client.close()
        process.stop()


def _chat(server, **body) -> httpx.Response:
    return server["client"].post("/v1/chat/completions", json={
        "model": "base", "messages": QUESTION, "tools": TOOLS, "max_tokens": 48, "temperature": 0, **body})


def _valid(name: str, arguments: str) -> None:
    """``arguments`` is JSON valid for tool ``name``'s schema, written as templates write it (", " and ": ")."""
    parsed = json.loads(arguments)
    assert arguments == json.dumps(parsed)
    if name == "get_weather":
        assert set(parsed) == {"city"} and parsed["city"] in ("Paris", "Rome", "Oslo")
    else:
        assert name == "get_time" and set(parsed) == {"utc"} and isinstance(parsed["utc"], bool)


def _streamed_calls(server, **body) -> tuple[list[dict], list[str]]:
    """The streamed choice's calls joined as the openai package joins them, and its finish reasons."""
    calls, reasons = {}, []
    with server["client"].stream("POST", "/v1/chat/completions", json={
            "model": "base", "messages": QUESTION, "tools": TOOLS, "max_tokens": 48, "temperature": 0,
            "stream": True, **body}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            for choice in event["choices"]:
                reasons += [choice["finish_reason"]] if choice["finish_reason"] else []
                for part in choice["delta"].get("tool_calls") or ():
                    held = calls.setdefault(part["index"], {"name": "", "arguments": ""})
                    held["name"] += part["function"].get("name") or ""
                    held["arguments"] += part["function"].get("arguments") or ""
    return [calls[i] for i in sorted(calls)], reasons


def test_auto_writes_no_call_so_the_forced_ones_are_the_grammars(server):
    """The model left free calls nothing (so what follows is the grammar's doing, not the model's habit)."""
    answer = _chat(server, tool_choice="auto").json()["choices"][0]
    assert answer["message"].get("tool_calls") in (None, [])


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}},
                                    {"type": "allowed_tools", "allowed_tools": {"mode": "required", "tools": [
                                        {"type": "function", "function": {"name": "get_time"}}]}}])
def test_a_forced_call_is_a_call_of_a_tool_with_valid_arguments(server, choice):
    """Before: a 500 "the model did not write a call" (what it wrote: no well-formed call). Now one call, of the
    named (or allowed) function where one is, its arguments valid for the schema; streamed, the same call."""
    response = _chat(server, tool_choice=choice)
    assert response.status_code == 200, response.text[:400]
    choice_0 = response.json()["choices"][0]
    assert choice_0["finish_reason"] == "tool_calls" and choice_0["message"]["content"] is None
    calls = choice_0["message"]["tool_calls"]
    assert len(calls) == 1 and calls[0]["type"] == "function"
    name = calls[0]["function"]["name"]
    assert name == "get_time" if choice != "required" else name in ("get_weather", "get_time")
    _valid(name, calls[0]["function"]["arguments"])
    streamed, reasons = _streamed_calls(server, tool_choice=choice)
    assert streamed == [{"name": name, "arguments": calls[0]["function"]["arguments"]}] and reasons == ["tool_calls"]


def test_a_forced_call_on_responses(server):
    """/v1/responses' flat tools and tool_choice: one function_call item, valid arguments (before: a 500)."""
    tools = [{"type": "function", **tool["function"]} for tool in TOOLS]
    for choice in ("required", {"type": "function", "name": "get_weather"}):
        response = server["client"].post("/v1/responses", json={
            "model": "base", "input": QUESTION, "tools": tools, "tool_choice": choice, "max_output_tokens": 48,
            "temperature": 0})
        assert response.status_code == 200, response.text[:400]
        items = [item for item in response.json()["output"] if item["type"] == "function_call"]
        assert len(items) == 1
        assert choice == "required" or items[0]["name"] == "get_weather"
        _valid(items[0]["name"], items[0]["arguments"])


def test_forced_call_grammar_text():
    """The grammar per format: the rest after each format's prefix, markers the tokenizer holds as one added token
    as ``<[id]>``; Mistral v11's [CALL_ID] format and an unknown name are left unconstrained (None)."""
    from lorakit.serve.forced_grammar import forced_call_grammar

    names = {"get_weather", "get_time"}
    hermes = forced_call_grammar("hermes", TOOLS, "", names, lambda text: "<[7]>")
    assert hermes.startswith('start: ("get_time" "\\", \\"arguments\\": " args0 | "get_weather" ') and \
        '"}" ("\\n" <[7]>)?' in hermes
    named = forced_call_grammar("llama3_json", TOOLS, "get_weather", names, json.dumps)
    assert named.splitlines()[0] == 'start: (args0) "}"' and '"enum": ["Paris", "Rome", "Oslo"]' in named
    assert forced_call_grammar("mistral", TOOLS, "get_time", names, json.dumps).splitlines()[0] == 'start: (args0) "}]"'
    assert forced_call_grammar("mistral_args", TOOLS, "", names, lambda text: "<[9]>").startswith(
        'start: ("get_time" <[9]> args0 | "get_weather" <[9]> args1)\n')
    assert forced_call_grammar("mistral_call_id", TOOLS, "", names, json.dumps) is None
    assert forced_call_grammar("hermes", TOOLS, "nope", names, json.dumps) is None
