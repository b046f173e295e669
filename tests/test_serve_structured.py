"""Structured outputs on ``lorakit serve``: ``response_format`` (chat) and ``text.format`` (responses) of type
``json_schema`` / ``json_object``, decoded under an llguidance grammar (``lorakit/serve/structured.py``).

A random tiny model writes noise unless constrained, so every answer that parses and matches its schema here is
the constraint's doing. Over the real HTTP server with the ``openai`` package: several seeds, greedy and sampled,
streamed and not, rows with a format running beside rows without one (whose answers must not change), both
decoders (transformers and the static decoder); a bad schema, a format with tool calls and a missing llguidance are
one-line 400s; ``max_tokens`` cutting an answer gives ``"length"``.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from test_serve_support import ServerProcess, tiny_hf_folder

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 3},
        "owner": {"type": "object", "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                                                   "ok": {"type": "boolean"}},
                  "required": ["id", "ok"], "additionalProperties": False},
    },
    "required": ["name", "age", "color", "tags", "owner"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe a person as JSON."}]


def valid(value, schema: dict, where: str = "$") -> None:
    """A small JSON-schema check of what SCHEMA uses (type, enum, properties, required, additionalProperties,
    items, maxItems, maxLength, minimum, maximum); raises AssertionError naming the place."""
    kinds = {"object": dict, "string": str, "array": list, "boolean": bool}
    if "enum" in schema:
        assert value in schema["enum"], f"{where}: {value!r} not in {schema['enum']}"
    kind = schema.get("type")
    if kind == "integer":
        assert isinstance(value, int) and not isinstance(value, bool), f"{where}: {value!r} is not an integer"
        assert schema.get("minimum", value) <= value <= schema.get("maximum", value), f"{where}: {value} out of range"
    elif kind is not None:
        assert isinstance(value, kinds[kind]), f"{where}: {value!r} is not a {kind}"
    if kind == "string":
        assert len(value) <= schema.get("maxLength", len(value)), f"{where}: {value!r} is too long"
    if kind == "array":
        assert len(value) <= schema.get("maxItems", len(value)), f"{where}: too many items"
        for i, item in enumerate(value):
            valid(item, schema["items"], f"{where}[{i}]")
    if kind == "object":
        properties = schema.get("properties", {})
        missing = set(schema.get("required", ())) - set(value)
        assert not missing, f"{where}: missing {missing}"
        if schema.get("additionalProperties") is False:
            assert set(value) <= set(properties), f"{where}: extra keys {set(value) - set(properties)}"
        for key, item in value.items():
            if key in properties:
                valid(item, properties[key], f"{where}.{key}")


def test_the_validator_can_fail():
    valid({"name": "ab", "age": 3, "color": "red", "tags": ["x"], "owner": {"id": 1, "ok": True}}, SCHEMA)
    for bad in [{"name": "ab", "age": 3, "color": "pink", "tags": [], "owner": {"id": 1, "ok": True}},
                {"name": "ab", "age": 300, "color": "red", "tags": [], "owner": {"id": 1, "ok": True}},
                {"name": "ab", "age": 3, "color": "red", "tags": [], "owner": {"id": 1}},
                {"name": "abcdefgh", "age": 3, "color": "red", "tags": [], "owner": {"id": 1, "ok": True}}]:
        with pytest.raises(AssertionError):
            valid(bad, SCHEMA)


def test_constraint_in_process():
    """The matcher's mask against llguidance's own bitmask, token by token along a sampled walk: the same tokens
    allowed; logit columns past the tokenizer's vocabulary are never allowed; the walk ends as valid JSON; the same
    schema compiles once."""
    import llguidance.numpy
    import numpy as np
    import torch

    from lorakit.serve.structured import compile_format
    from test_serve_support import make_tokenizer

    tokenizer = make_tokenizer()
    columns = len(tokenizer) + 7  # a model whose embedding table is padded past the tokenizer
    end = (tokenizer.eos_token_id,)
    grammar = compile_format(tokenizer, columns, end, SCHEMA, "person")
    assert compile_format(tokenizer, columns, end, SCHEMA, "person").start is grammar.start
    for seed in range(3):
        constraint, reference = grammar.constraint(), grammar.constraint()
        bits = llguidance.numpy.allocate_token_bitmask(1, grammar.vocab)
        generator, tokens = torch.Generator().manual_seed(seed), []
        while not constraint.done:
            logits = torch.randn(columns, generator=generator)
            masked = constraint.mask(logits)
            llguidance.numpy.fill_next_token_bitmask(reference.matcher, bits)
            expected = np.unpackbits(bits[0].view(np.uint8), bitorder="little")[:grammar.vocab].astype(bool)
            assert torch.equal(torch.isfinite(masked[:grammar.vocab]), torch.from_numpy(expected))
            assert torch.isinf(masked[len(tokenizer):]).all()
            assert torch.equal(masked[torch.isfinite(masked)], logits[torch.isfinite(masked)])  # kept ones unchanged
            token = int(torch.multinomial(torch.softmax(masked, -1), 1, generator=generator))
            assert constraint.consume(token) and reference.consume(token)
            tokens.append(token)
        assert end[0] not in tokens
        valid(json.loads(tokenizer.decode(tokens)), SCHEMA)


def _start(root, *extra):
    process = ServerProcess(root / "model", root / "adapters", "--max-tokens", "160", *extra, log=root / f"server{len(extra)}.log")
    return process


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("structured")
    tiny_hf_folder(root / "model")
    (root / "adapters").mkdir()
    return root


@pytest.fixture(scope="module")
def server(root):
    process = _start(root)
    try:
        yield {"url": process.url, "sdk": openai.OpenAI(base_url=process.url + "/v1", api_key="x", max_retries=0)}
    finally:
        process.stop()


def _assert_one_line_400(server, words: str, **fields) -> None:
    """A chat request with ``fields`` is a 400 whose one-line message holds ``words`` (no traceback)."""
    response = httpx.post(server["url"] + "/v1/chat/completions", timeout=30,
                          json={"model": "base", "messages": MESSAGES, **fields})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert words in message and "\n" not in message and "Traceback" not in message


def _answer(sdk, stream: bool = False, **extra) -> tuple[str, str]:
    """(content, finish_reason) of one chat answer, streamed or not."""
    body = {"model": "base", "messages": MESSAGES, "max_tokens": 150, **extra}
    if not stream:
        choice = sdk.chat.completions.create(**body).choices[0]
        return choice.message.content, choice.finish_reason
    text, reason = "", None
    for chunk in sdk.chat.completions.create(stream=True, **body):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            reason = chunk.choices[0].finish_reason or reason
    return text, reason


def _plain(sdk, seed: int | None, temperature: float) -> str:
    return sdk.chat.completions.create(model="base", messages=[{"role": "user", "content": f"Tell me {seed}"}],
                                       max_tokens=24, seed=seed, temperature=temperature).choices[0].message.content


def _check_mixed(sdk) -> list[str]:
    """Constrained rows (greedy and sampled, streamed and not) beside plain rows: every constrained answer matches
    the schema, and the plain rows' answers equal those of a run with no constrained row. Returns the answers."""
    plain = [(None, 0.0), (3, 1.0), (4, 0.8)]
    alone = [_plain(sdk, seed, t) for seed, t in plain]
    constrained = [dict(temperature=0.0), dict(seed=0, temperature=1.0), dict(seed=1, temperature=1.0, top_p=0.9),
                   dict(seed=2, temperature=1.3, stream=True), dict(temperature=0.0, stream=True)]
    with ThreadPoolExecutor(len(plain) + len(constrained)) as pool:
        futures = [pool.submit(_answer, sdk, response_format=FORMAT, **c) for c in constrained]
        beside = [pool.submit(_plain, sdk, seed, t) for seed, t in plain]
        answers = [f.result() for f in futures]
        assert [f.result() for f in beside] == alone
    for text, reason in answers:
        assert reason == "stop", text
        valid(json.loads(text), SCHEMA)
    return [text for text, _ in answers]


def test_json_schema_answers_match_beside_plain_rows(server):
    answers = _check_mixed(server["sdk"])
    assert answers[0] == answers[4]  # greedy: streamed or not, the same answer
    assert len(set(answers[:4])) > 1  # sampled answers differ: the schema leaves choices, not one forced text
    again, _ = _answer(server["sdk"], response_format=FORMAT, seed=0, temperature=1.0)
    assert again == answers[1]  # a seed repeats its answer


def test_more_seeds_and_n(server):
    sdk = server["sdk"]
    response = sdk.chat.completions.create(model="base", messages=MESSAGES, max_tokens=150, n=3, seed=7,
                                           temperature=1.0, response_format=FORMAT)
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        valid(json.loads(choice.message.content), SCHEMA)


def test_completions_take_a_format_too(server):
    """vLLM's extension: response_format on /v1/completions."""
    response = server["sdk"].completions.create(model="base", prompt="A person:", max_tokens=150, temperature=1.0,
                                                seed=3, n=2, extra_body={"response_format": FORMAT})
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        valid(json.loads(choice.text), SCHEMA)


def test_vllm_structured_outputs(server):
    """vLLM's ``structured_outputs`` (extra_body): choice, regex, a Lark grammar, json (as a schema or its text)."""
    sdk = server["sdk"]

    def ask(seed: int, **outputs) -> str:
        choice = sdk.chat.completions.create(model="base", messages=MESSAGES, max_tokens=150, seed=seed, temperature=1.0,
                                             extra_body={"structured_outputs": outputs}).choices[0]
        assert choice.finish_reason == "stop", choice
        return choice.message.content

    colors = ["red", "green", "dark blue", 'say "hi"\n']
    answers = {ask(seed, choice=colors) for seed in range(6)}
    assert answers <= set(colors) and len(answers) > 1
    for seed in range(3):
        assert re.fullmatch(r"[0-9]{3}-[a-z]{2,5}", ask(seed, regex=r"[0-9]{3}-[a-z]{2,5}"))
        said = ask(seed, grammar='start: "yes" | "no" | "n=" NUM\nNUM: /[0-9]{1,3}/')
        assert said in ("yes", "no") or re.fullmatch(r"n=[0-9]{1,3}", said)
    valid(json.loads(ask(1, json=SCHEMA)), SCHEMA)
    valid(json.loads(ask(2, json=json.dumps(SCHEMA))), SCHEMA)
    text = server["sdk"].completions.create(model="base", prompt="Pick:", max_tokens=20, temperature=0,
                                            extra_body={"structured_outputs": {"choice": colors}}).choices[0].text
    assert text in colors


@pytest.mark.parametrize("outputs, words", [
    ({"regex": "(?=a)b"}, "look-around"),
    ({"grammar": "start: undefined_rule"}, "undefined_rule"),
    ({"choice": ["a"], "regex": "a"}, "exactly one of"),
    ({}, "exactly one of"),
    ({"json": "{not json"}, "not JSON"),
    ({"regex": "a", "whitespace_pattern": " "}, "whitespace_pattern applies to JSON formats only"),
])
def test_bad_structured_outputs_are_one_line_400s(server, outputs, words):
    _assert_one_line_400(server, words, structured_outputs=outputs)
    both = httpx.post(server["url"] + "/v1/chat/completions", timeout=30, json={
        "model": "base", "messages": MESSAGES, "structured_outputs": {"choice": ["a"]},
        "response_format": {"type": "json_object"}})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]


def test_json_object(server):
    """Any JSON object: free strings let a random model write until max_tokens, so of six sampled answers those
    that end are checked (seeds 0, 3 and 4 end on this model), the others must still be a JSON prefix."""
    response = server["sdk"].chat.completions.create(model="base", messages=MESSAGES, max_tokens=150, n=6, seed=0,
                                                     temperature=1.0, response_format={"type": "json_object"})
    ended = [c.message.content for c in response.choices if c.finish_reason == "stop"]
    assert len(ended) >= 2
    assert all(isinstance(json.loads(text), dict) for text in ended)
    assert all(c.message.content.startswith("{") for c in response.choices)


def test_plain_text_answers_are_noise(server):
    """Without a format the tiny model writes no JSON: the tests above check the constraint, not the model."""
    with pytest.raises(ValueError):
        json.loads(_plain(server["sdk"], None, 0.0))


def test_sdk_parse_and_responses(server):
    """The openai package's typed helpers: chat.completions.parse with a pydantic model (strict json_schema) and
    responses.create / responses.parse with text.format."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Owner(BaseModel):
        id: int
        ok: bool

    class Person(BaseModel):
        name: str = Field(max_length=6)
        color: Literal["red", "green", "blue"]
        owner: Owner

    sdk = server["sdk"]
    parsed = sdk.chat.completions.parse(model="base", messages=MESSAGES, response_format=Person, max_tokens=150,
                                        temperature=0.0)
    assert isinstance(parsed.choices[0].message.parsed, Person)
    response = sdk.responses.create(model="base", input="a person", max_output_tokens=150, temperature=0.0,
                                    text={"format": {"type": "json_schema", "name": "person", "schema": SCHEMA,
                                                     "strict": True}})
    assert response.status == "completed"
    valid(json.loads(response.output_text), SCHEMA)
    assert response.text.format.type == "json_schema" and response.text.format.name == "person"  # echoed
    assert response.text.format.schema_ == SCHEMA
    # greedy (the Responses API takes no seed): any JSON object lets this model write one long string, so the answer
    # may end at max_output_tokens ("incomplete"), still a JSON prefix; chat's json_object test checks whole ones
    response = sdk.responses.create(model="base", input="a person", max_output_tokens=150, temperature=0.0,
                                    text={"format": {"type": "json_object"}})
    assert response.output_text.startswith("{")
    if response.status == "completed":
        assert isinstance(json.loads(response.output_text), dict)
    else:
        assert response.incomplete_details.reason == "max_output_tokens"
    with sdk.responses.stream(model="base", input="a person", max_output_tokens=150, temperature=0.0,
                              text={"format": {"type": "json_schema", "name": "p", "schema": SCHEMA}}) as stream:
        final = stream.get_final_response()
    valid(json.loads(final.output_text), SCHEMA)


def test_length_cuts_an_answer(server):
    text, reason = _answer(server["sdk"], response_format=FORMAT, max_tokens=3, temperature=0.0)
    assert reason == "length"
    assert text.startswith("{")
    with pytest.raises(ValueError):
        json.loads(text)  # a prefix of a valid answer, not a whole one


@pytest.mark.parametrize("fmt, words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "frobnicate"}}}, "frobnicate"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)b"}}},
     "look-around"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "json_schema"}, "needs its json_schema"),
    ({"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}, "name"),
    ({"type": "xml"}, "'text', 'json_object' or 'json_schema'"),
])
def test_bad_formats_are_one_line_400s(server, fmt, words):
    _assert_one_line_400(server, words, response_format=fmt)


def test_format_with_tool_calls(server):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    body = {"model": "base", "messages": MESSAGES, "tools": tools, "response_format": {"type": "json_object"},
            "max_tokens": 150, "temperature": 0}
    response = httpx.post(server["url"] + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and "cannot be combined with tool calls" in response.json()["error"]["message"]
    response = httpx.post(server["url"] + "/v1/responses", timeout=30, json={
        "model": "base", "input": "hi", "tools": [{"type": "function", "name": "f"}],
        "text": {"format": {"type": "json_object"}}})
    assert response.status_code == 400 and response.json()["error"]["param"] == "text.format"
    # tool_choice "none": the tools stay in the prompt only (this tiny template writes none), no call is parsed, and
    # the format applies to the whole answer
    from lorakit.serve.app import _format_without_calls
    from lorakit.serve.protocol import ChatRequest

    request = ChatRequest.model_validate({**body, "tool_choice": "none"})
    assert not request.calls_parsed()
    _format_without_calls(request.response_format.spec(), "response_format", request.calls_parsed())


def test_missing_llguidance_is_a_one_line_400(monkeypatch):
    from lorakit.serve import app as app_module
    from lorakit.serve.protocol import APIError
    from lorakit.serve.structured import FormatError, compile_format

    monkeypatch.setitem(sys.modules, "llguidance", None)  # import llguidance now raises ImportError
    monkeypatch.setitem(sys.modules, "llguidance.hf", None)
    with pytest.raises(FormatError, match=r"pip install llguidance"):
        compile_format(object(), 10, (0,), {"type": "object"})

    class Head:
        weight = type("W", (), {"shape": (10, 4)})()

    from lorakit.serve.model_text import ModelText

    state = type("State", (), {"model": type("M", (), {"get_output_embeddings": lambda self: Head()})()})()
    params = [type("P", (), {"stop_token_ids": (0,)})()]
    text = ModelText(object(), (0,), None, 10)
    with pytest.raises(APIError) as caught:
        asyncio.run(app_module._constraints(state, text, ("json_object", None, "json_object"), "response_format",
                                            params, None))
    assert caught.value.status == 400 and "pip install llguidance" in caught.value.message
    assert "\n" not in caught.value.message


def test_static_decoder(root):
    """The same checks through the static decoder (its own prefill and decode step hand logits to sampling)."""
    process = _start(root, "--decoder", "static", "--max-context", "200")
    try:
        answers = _check_mixed(openai.OpenAI(base_url=process.url + "/v1", api_key="x", max_retries=0))
        assert len(set(answers[:4])) > 1
        assert "Traceback" not in process.output()
    finally:
        process.stop()


def test_reasoning_block_first_then_the_format(tmp_path):
    """With a reasoning parser on (Qwen3's template, a scripted model that thinks first), the format applies after
    the block closes, as vLLM does: the reasoning is free text (a grammar applied from the first token would forbid
    ``<think>``), the content matches the schema; with thinking off (the block closed in the prompt) the format
    applies from the first token."""
    from test_serve_tools import _scripted_server

    words = ["<think>", "\nI think.\n", "</think>", "\n\n", "Hello", "<|im_end|>"]
    process, client, _ = _scripted_server(tmp_path, "qwen3", words)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "ok", "schema": schema}}
    try:
        for stream in (False, True):
            for extra in ({}, {"chat_template_kwargs": {"enable_thinking": False}}):
                body = {"model": "base", "messages": MESSAGES, "max_tokens": 30, "temperature": 0,
                        "response_format": fmt, **extra}
                plain = client.post("/v1/chat/completions", json={**body, "response_format": None}).json()
                if not stream:
                    message = client.post("/v1/chat/completions", json=body).json()["choices"][0]["message"]
                    content, reasoning = message["content"], message.get("reasoning_content")
                else:
                    sdk = openai.OpenAI(base_url=process.url + "/v1", api_key="x", max_retries=0)
                    content, reasoning = "", ""
                    for chunk in sdk.chat.completions.create(stream=True, **{k: v for k, v in body.items() if k not in
                                                                             extra}, extra_body=extra):
                        delta = chunk.choices[0].delta if chunk.choices else None
                        content += (delta.content or "") if delta else ""
                        reasoning += (getattr(delta, "reasoning_content", None) or "") if delta else ""
                assert json.loads(content) in ({"ok": True}, {"ok": False})
                if extra:  # no reasoning: constrained from the first token
                    assert not reasoning
                else:
                    assert plain["choices"][0]["message"]["reasoning_content"] == "I think."
                    assert reasoning == "I think."
                    assert plain["choices"][0]["message"]["content"] == "Hello"  # the model's own answer is no JSON
    finally:
        client.close()
        process.stop()
