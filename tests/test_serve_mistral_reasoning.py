"""Mistral's reasoning models on ``lorakit serve``: Magistral-Small-2507 / 2509 and the Ministral 3 reasoning models
write their thinking as ``[THINK]...[/THINK]`` (special tokens of the tekken tokenizers), then the answer and any
``[TOOL_CALLS]name[ARGS]{...}`` calls (what vLLM serves with ``--reasoning-parser mistral``).

Their chat templates write ``[THINK]`` into the prompt only inside a system message (the default system prompt
shows the format) and end the generation prompt at ``[/INST]``, so the model opens the block itself. The server
(``--reasoning-parser auto``) picks the mistral parser from the template and returns the block as
``reasoning_content`` (``delta.reasoning_content`` streamed, a ``reasoning`` item on ``/v1/responses``), the calls
after it parsed. Before: the markers were special tokens that decoding dropped, so the reasoning was glued to the
answer in ``content`` ("I need the weather.Let me check.") and the calls were never split off it.

The model is the scripted one of test_serve_tools (a table of next tokens), the template a copy of the shape of
Magistral-Small-2509's (its message loop, its default system prompt with ``[THINK]``), written here.
"""

from __future__ import annotations

import json

import pytest

from test_mistral_args_tools import MISTRAL_V11_SPECIALS
from test_serve_tools import QUESTION, _scripted_server
from test_train_tool_calls import FAMILIES, TOOLS, family

from lorakit.serve.reasoning import (MISTRAL, THINK, ReasoningStream, select_parser, split_reasoning)
from lorakit.serve.text import TextAssembler

# Magistral-Small-2509's layout (the Ministral 3 reasoning models publish the same): a default system prompt that
# shows the [THINK] format, "thinking" chunks in system and assistant messages, calls "[TOOL_CALLS]name[ARGS]{json}"
MAGISTRAL_THINKING = r"""{%- set default_system_message = 'First draft your thinking process until you are sure of a response. Your thinking process must follow the template below:[THINK]Your thoughts, as long as you want.[/THINK]Here, provide a self-contained response.' %}
{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {{- '[SYSTEM_PROMPT]' -}}
    {%- if messages[0]['content'] is string %}
        {{- messages[0]['content'] -}}
    {%- else %}
        {%- for block in messages[0]['content'] %}
            {%- if block['type'] == 'text' %}
                {{- block['text'] }}
            {%- elif block['type'] == 'thinking' %}
                {{- '[THINK]' + block['thinking'] + '[/THINK]' }}
            {%- else %}
                {{- raise_exception('Only text and thinking chunks are supported in system message contents.') }}
            {%- endif %}
        {%- endfor %}
    {%- endif %}
    {{- '[/SYSTEM_PROMPT]' -}}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
    {{- '[SYSTEM_PROMPT]' + default_system_message + '[/SYSTEM_PROMPT]' }}
{%- endif %}
{%- if tools is defined and tools is not none and tools|length > 0 %}
    {{- '[AVAILABLE_TOOLS]' + (tools| tojson) + '[/AVAILABLE_TOOLS]' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'user' %}
        {{- '[INST]' + message['content'] + '[/INST]' }}
    {%- elif message['role'] == 'assistant' %}
        {%- if message['content'] is string %}
            {{- message['content'] }}
        {%- else %}
            {%- for block in message['content'] %}
                {%- if block['type'] == 'text' %}
                    {{- block['text'] }}
                {%- elif block['type'] == 'thinking' %}
                    {{- '[THINK]' + block['thinking'] + '[/THINK]' }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message['tool_calls'] is defined and message['tool_calls'] is not none %}
            {%- for tool in message['tool_calls'] %}
                {%- set arguments = tool['function']['arguments'] %}
                {%- if arguments is not string %}
                    {%- set arguments = arguments|tojson %}
                {%- endif %}
                {{- '[TOOL_CALLS]' + tool['function']['name'] + '[ARGS]' + arguments }}
            {%- endfor %}
        {%- endif %}
        {{- eos_token }}
    {%- elif message['role'] == 'tool' %}
        {{- '[TOOL_RESULTS]' + message['content']|string + '[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception('Only user, assistant and tool roles are supported, got ' + message['role'] + '.') }}
    {%- endif %}
{%- endfor %}
"""
FAMILIES.setdefault("magistral-thinking", (MAGISTRAL_THINKING, MISTRAL_V11_SPECIALS, "<s>", "</s>", "<unk>", ()))
ARGUMENTS = '{"city": "Paris"}'
WORDS = ["[THINK]", "I need the weather.", "[/THINK]", "Let me check.", "[TOOL_CALLS]", "get_weather", "[ARGS]",
         ARGUMENTS, "</s>"]
RESPONSES_TOOLS = [{"type": "function", "name": t["function"]["name"], "description": t["function"]["description"],
                    "parameters": t["function"]["parameters"]} for t in TOOLS]


# -- the parser and its choice -------------------------------------------------------------------------------------
SPLITS = [  # (where the answer starts, the answer, reasoning, content)
    ("start", "[THINK]I need the weather.[/THINK]Let me check.", "I need the weather.", "Let me check."),
    ("start", "[THINK]\nplan [x] [/THINK]\n[TOOL_CALLS]f[ARGS]{}", "plan [x]", "[TOOL_CALLS]f[ARGS]{}"),
    ("start", "[THINK]cut while thinking [/THI", "cut while thinking [/THI", None),
    ("start", "Hello [THINK]x[/THINK]", None, "Hello [THINK]x[/THINK]"),  # only a block at the start
    ("start", "[TH", None, "[TH"),
    ("start", "<think>a</think>b", None, "<think>a</think>b"),  # the other marking is text here
    ("inside", "more thought[/THINK]Done", "more thought", "Done"),  # a prompt that opened the block
    ("closed", "[THINK]x[/THINK]y", None, "[THINK]x[/THINK]y"),
]


@pytest.mark.parametrize("where, text, reasoning, content", SPLITS)
@pytest.mark.parametrize("size", [1, 3, 1000])
def test_split_in_pieces_of_any_size(where, text, reasoning, content, size):
    """As the <think> parser, with [THINK] / [/THINK]: fed in pieces, a marker split over pieces never leaks and
    the streamed parts add up to the whole answer's split."""
    start = MISTRAL.start("[/INST]")._replace(where=where)
    assert split_reasoning(text, start) == (reasoning, content)
    stream = ReasoningStream(start)
    parts = [stream.feed(text[i:i + size]) for i in range(0, len(text), size)] + [stream.finish()]
    assert "".join(r for r, _ in parts) == (reasoning or "")
    assert "".join(c for _, c in parts) == (content or "")
    assert stream.result() == (reasoning, content)


def test_auto_picks_the_parser_from_the_template():
    """auto: [THINK] in the template (Magistral's default system prompt, or its thinking chunks) -> mistral;
    <think> -> the <think> parser; neither (Ministral 3 instruct, Mistral v0.3) -> none. The prompt holds [THINK]
    in its system message, yet the answer starts outside the block: the generation prompt ends at [/INST]."""
    import test_mistral_args_tools  # noqa: F401  (registers the ministral3 / magistral families)

    assert select_parser(family("magistral-thinking"), "auto") is MISTRAL
    assert select_parser(family("magistral"), "auto") is MISTRAL  # [THINK] only in its thinking chunks
    assert select_parser(family("qwen3"), "auto") is THINK
    assert [select_parser(family(n), "auto") for n in ("ministral3", "mistral", "qwen2.5")] == [None] * 3
    assert select_parser(family("qwen2.5"), "mistral") is MISTRAL and select_parser(family("qwen3"), "none") is None
    tok = family("magistral-thinking")
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert "[THINK]" in prompt and prompt.endswith("[INST]Weather in Paris?[/INST]")
    assert MISTRAL.start(tok.decode(tok(prompt)["input_ids"][-8:], skip_special_tokens=False)).where == "start"
    # a template whose generation prompt opens the block (or holds a closed one) is read as for <think>
    assert MISTRAL.start("[INST]Hi[/INST][THINK]\n").where == "inside" and MISTRAL.start("[/INST]<think>").where == "start"
    assert MISTRAL.start("[INST]Hi[/INST][THINK][/THINK]").where == "closed"


def test_markers_are_kept_through_the_detokenizer():
    """[THINK] / [/THINK] are special tokens that decoding drops: the parser's tokens are kept in the answer's
    text (without them the reasoning would be glued to the answer), token by token, the split as whole."""
    tok = family("magistral-thinking")
    keep = MISTRAL.tokens(tok)
    assert keep == frozenset(tok.convert_tokens_to_ids(["[THINK]", "[/THINK]"])) and not THINK.tokens(tok)
    ids = tok("[THINK]Deux et deux 🙂.[/THINK]Quatre.", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "Deux et deux 🙂.Quatre."
    assembler, stream = TextAssembler(tok, [], (), keep=keep), ReasoningStream(MISTRAL.start("[/INST]"))
    parts = [stream.feed(assembler.add(token)) for token in ids] + [stream.finish(assembler.finish())]
    assert stream.result() == ("Deux et deux 🙂.", "Quatre.")
    assert sum(1 for r, c in parts if r) > 2 and not any("[" in r + c for r, c in parts)
    assert stream.reasoning_tokens == ids.index(tok.convert_tokens_to_ids("[/THINK]")) + 1


# -- a Magistral server over the socket ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def magistral(tmp_path_factory):
    root = tmp_path_factory.mktemp("magistral")
    proc, client, tokenizer = _scripted_server(root, "magistral-thinking", WORDS)
    try:
        yield {"url": proc.url, "client": client, "server": proc, "tokenizer": tokenizer, "root": root}
    finally:
        client.close()
        proc.stop()


def _chat(client, **extra) -> dict:
    body = {"model": "base", "messages": QUESTION, "max_tokens": 16, "temperature": 0, **extra}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text[:500]
    return response.json()


def test_chat_reasoning_then_a_call(magistral):
    client = magistral["client"]
    assert "reasoning parser on" in magistral["server"].output() and "[THINK]...[/THINK]" in magistral["server"].output()
    answer = _chat(client, tools=TOOLS)
    choice = answer["choices"][0]
    assert choice["message"]["reasoning_content"] == "I need the weather."
    assert choice["message"]["content"] == "Let me check." and choice["finish_reason"] == "tool_calls"
    assert [c["function"] for c in choice["message"]["tool_calls"]] == [{"name": "get_weather", "arguments": ARGUMENTS}]
    assert answer["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}  # [THINK], text, [/THINK]
    plain = _chat(client)["choices"][0]["message"]  # no tools: [TOOL_CALLS] is a special token decoding drops
    assert plain == {"role": "assistant", "reasoning_content": "I need the weather.",
                     "content": f"Let me check.get_weather{ARGUMENTS}"}
    cut = _chat(client, max_tokens=2)["choices"][0]  # max_tokens reached while thinking: all reasoning
    assert cut["message"]["reasoning_content"] == "I need the weather." and cut["message"]["content"] is None


def test_chat_stream_reasoning_first_then_the_call(magistral):
    body = {"model": "base", "messages": QUESTION, "tools": TOOLS, "max_tokens": 16, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with magistral["client"].stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        blocks = response.read().decode().split("\n\n")
    assert blocks[-2:] == ["data: [DONE]", ""]
    events = [json.loads(block[6:]) for block in blocks[:-2]]
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    kinds = [k for d in deltas for k in ("reasoning_content", "content", "tool_calls") if d.get(k)]
    assert kinds == ["reasoning_content", "content", "tool_calls", "tool_calls"]  # the call's head, its arguments
    assert "".join(d.get("reasoning_content") or "" for d in deltas) == "I need the weather."
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
    calls = [c for d in deltas for c in d.get("tool_calls") or ()]
    assert calls[0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(c["function"]["arguments"] for c in calls) == ARGUMENTS
    assert events[-1]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}


def test_responses_items_streamed_and_not(magistral):
    """The reasoning item, the message and the call, the same whether streamed (the openai package's stream
    helper rebuilds them from the events) or not; the items go back as the next turn's input."""
    import openai

    sdk = openai.OpenAI(base_url=magistral["url"] + "/v1", api_key="none", max_retries=0)
    reply = sdk.responses.create(model="base", input=QUESTION, tools=RESPONSES_TOOLS, temperature=0,
                                 max_output_tokens=16)
    assert [i.type for i in reply.output] == ["reasoning", "message", "function_call"]
    assert reply.output[0].content[0].text == "I need the weather." and reply.output_text == "Let me check."
    assert reply.output[2].name == "get_weather" and reply.output[2].arguments == ARGUMENTS
    assert reply.usage.output_tokens_details.reasoning_tokens == 3
    with sdk.responses.stream(model="base", input=QUESTION, tools=RESPONSES_TOOLS, temperature=0,
                              max_output_tokens=16) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == "I need the weather."
    assert [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in final.output] == \
        [(i.type, getattr(i, "name", None), getattr(i, "arguments", None)) for i in reply.output]
    assert final.output[0].content == reply.output[0].content and final.output_text == reply.output_text
    history = [*QUESTION, *[item.model_dump() for item in reply.output],
               {"type": "function_call_output", "call_id": reply.output[2].call_id, "output": "21"}]
    again = sdk.responses.create(model="base", input=history, tools=RESPONSES_TOOLS, temperature=0,
                                 max_output_tokens=16)
    assert again.usage.input_tokens > reply.usage.input_tokens


def test_history_with_reasoning_is_accepted(magistral):
    """An earlier answer sent back as the openai package dumps it (``reasoning_content`` included) is accepted;
    the template decides what is written of it: Magistral's writes the content and the call, not the reasoning
    (it reads only 'thinking' chunks), as it renders the same turn without ``reasoning_content``."""
    import openai

    tokenizer = magistral["tokenizer"]
    sdk = openai.OpenAI(base_url=magistral["url"] + "/v1", api_key="none", max_retries=0)
    reply = sdk.chat.completions.create(model="base", messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=16)
    dumped = reply.choices[0].message.model_dump()
    assert dumped["reasoning_content"] == "I need the weather."
    history = [*QUESTION, dumped, {"role": "tool", "tool_call_id": dumped["tool_calls"][0]["id"], "content": "21"}]
    second = sdk.chat.completions.create(model="base", messages=history, tools=TOOLS, temperature=0, max_tokens=16)
    expected = tokenizer.apply_chat_template(
        [*QUESTION, {"role": "assistant", "content": "Let me check.", "tool_calls": [{
            "id": dumped["tool_calls"][0]["id"], "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}, history[-1]],
        tools=TOOLS, add_generation_prompt=True, tokenize=False)
    assert 'Let me check.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}</s>[TOOL_RESULTS]21' in expected
    assert second.usage.prompt_tokens == len(tokenizer(expected, add_special_tokens=False)["input_ids"])
    assert "Traceback" not in magistral["server"].output()


def test_parser_none_and_the_cli_choices(magistral):
    """``--reasoning-parser none``: the answer as decoded (what the server did before this parser: the special
    markers skipped, the reasoning glued to the answer), said at start-up; the CLI offers every parser."""
    import argparse

    import httpx

    from test_serve_support import ServerProcess

    from lorakit.serve.cli import add_arguments
    from lorakit.serve.reasoning import PARSERS

    root = magistral["root"]
    plain = ServerProcess(root / "model", root / "adapters", "--reasoning-parser", "none", log=root / "plain.log")
    try:
        with httpx.Client(base_url=plain.url, timeout=60) as client:
            message = _chat(client)["choices"][0]["message"]
        assert message == {"role": "assistant", "content": f"I need the weather.Let me check.get_weather{ARGUMENTS}"}
        assert "reasoning parser off" in plain.output()
    finally:
        plain.stop()
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    [action] = [a for a in parser._actions if a.dest == "reasoning_parser"]
    assert tuple(action.choices) == PARSERS and "mistral" in PARSERS
