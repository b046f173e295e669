"""``lorakit serve`` on the OpenAI spec's less-travelled paths (session 23), over real sockets (one server for the
module, on a tiny random Llama).

- ``/v1/completions`` with ``echo: true`` and ``max_tokens: 0`` (lm-eval's scoring of a prompt) beside a format
  (``response_format``, ``guided_choice``, ``structured_outputs``, ``guided_json``) was a 500 "internal error:
  IndexError" with a traceback in the server log: the format's matchers were built for the rows that generate,
  and there were none. Nothing is generated, so nothing is held: the prompt comes back scored, as without a format.
- A request whose own options together allow no token (``allowed_token_ids`` no JSON starts with beside
  ``response_format`` json_object, ``bad_words`` banning the words of a ``guided_choice``, ``min_tokens`` with
  ``allowed_token_ids`` holding only the end token) was a 500 "generation failed: sampling failed: ..." of type
  server_error, which the openai package retries twice, failing the same way each time. It is the client's to
  change: now a 400 naming the options that left nothing (streamed: the error event says the same; /v1/responses'
  ``response.failed`` has OpenAI's ``invalid_prompt`` code for it, and for a format the answer could not follow,
  where it said ``server_error``); logits that are not finite stay the server's 500.
- An adapter name made only of the allowed characters but refused all the same (``_draft``, ``.hidden``, ``a..b``,
  129 characters) was told "use a folder name of the adapters folder (letters, digits, '.', '_', '-'; no paths)",
  which it was; a ``lora_name`` (POST /v1/load_lora_adapter), which names no folder, was told the same. The
  message now states the whole rule (starting with a letter or digit, at most 128, no '..').
- A JSON schema with a string ``format`` llguidance does not know (what Pydantic writes for ``SecretStr``:
  ``password``, ``bytes``: ``binary``, ``Path``: ``path``; ``uri-reference``, ...) was a 400 "the schema cannot be
  used: Unknown format: password", and a tool's parameters with one lost their grammar. JSON Schema reads a format
  as an annotation a validator may not know; vLLM serves these schemas. Such formats are now left out of the
  grammar; the ones llguidance knows (date, uuid, ...) still hold the answer, and a "format" inside ``const`` /
  ``enum`` data stays as sent.
"""

from __future__ import annotations

import json
import re
import shutil

import httpx
import pytest
import torch

from test_serve_support import ServerProcess, make_adapter, tiny_hf_folder

FORMATS = [{"response_format": {"type": "json_object"}}, {"guided_choice": ["ab", "c"]},
           {"structured_outputs": {"regex": "a+"}}, {"guided_json": {"type": "object"}},
           {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object"}}}}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("fu23")
    model = tiny_hf_folder(root / "model")
    adapters = root / "adapters"
    adapters.mkdir()
    make_adapter(AutoModelForCausalLM.from_pretrained(model), adapters / "good", seed=1)
    shutil.copytree(adapters / "good", adapters / "_draft")  # a folder whose name clients cannot send
    log = root / "server.log"
    process = ServerProcess(model, adapters, "--max-tokens", "32", log=log)
    client = httpx.Client(base_url=process.url, timeout=60)
    try:
        yield {"client": client, "process": process, "log": log, "adapters": adapters}
    finally:
        client.close()
        process.stop()


def _still_serves(server) -> None:
    """The server answers a plain request after the one under test, and its log holds no traceback."""
    answer = server["client"].post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2,
                                                             "temperature": 0})
    assert answer.status_code == 200, answer.text
    assert "Traceback" not in server["log"].read_text(errors="replace")


def _events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.text.splitlines()
            if line.startswith("data: ") and line != "data: [DONE]"]


@pytest.mark.parametrize("fmt", FORMATS, ids=["json_object", "guided_choice", "regex", "guided_json", "json_schema"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_echo_only_scoring_beside_a_format_is_answered(server, fmt, stream):
    """Before: a 500 "internal error: IndexError" (``_constraints`` read ``params[0]`` of no rows), its traceback
    in the log. Now the scored prompt, as without the format."""
    body = {"model": "base", "prompt": ["ab", "cd"], "max_tokens": 0, "echo": True, "logprobs": 1, **fmt}
    response = server["client"].post("/v1/completions", json={**body, "stream": stream})
    assert response.status_code == 200, response.text
    if stream:
        choices = [choice for event in _events(response) for choice in event["choices"]]
        assert all("error" not in event for event in _events(response))
    else:
        choices = response.json()["choices"]
    assert sorted(choice["text"] for choice in choices if choice["text"]) == ["ab", "cd"]
    plain = server["client"].post("/v1/completions", json={k: v for k, v in body.items() if k not in fmt}).json()
    if not stream:
        assert [c["logprobs"] for c in choices] == [c["logprobs"] for c in plain["choices"]]
    _still_serves(server)


@pytest.mark.parametrize("options, named", [
    ({"response_format": {"type": "json_object"}, "allowed_token_ids": [5, 6]}, "allowed_token_ids and the format"),
    ({"guided_choice": ["ab", "c"], "bad_words": ["ab", "c"]}, "bad_words and the format"),
    ({"min_tokens": 2, "allowed_token_ids": [2]}, "allowed_token_ids and min_tokens"),  # 2: <|im_end|>, held back
], ids=["allowed+format", "bad_words+choice", "allowed+min_tokens"])
def test_options_that_allow_no_token_together_are_the_clients_400(server, options, named):
    """Before: a 500 "generation failed: sampling failed: the row's probabilities are NaN or all zero" of type
    server_error (the openai package retries a 500 twice). Now a 400 that names the options; streamed, the error
    event says the same."""
    body = {"model": "base", "prompt": "ab", "max_tokens": 4, "temperature": 0, **options}
    response = server["client"].post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and named in error["message"], error
    assert "left no token" in error["message"]
    streamed = server["client"].post("/v1/completions", json={**body, "stream": True})
    assert streamed.status_code == 200  # the stream had started: the error is its last event
    assert _events(streamed)[-1]["error"]["type"] == "invalid_request_error"
    assert named in _events(streamed)[-1]["error"]["message"]
    chat = server["client"].post("/v1/chat/completions", json={
        "model": "good", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "temperature": 0.5,
        "seed": 1, **options})
    assert chat.status_code == 400 and named in chat.json()["error"]["message"], chat.text
    _still_serves(server)


def test_responses_options_that_allow_no_token_are_the_requests_fault(server):
    """/v1/responses: a 400 when whole; streamed, ``response.failed`` said ``server_error`` and "generation
    failed" for what is the request's doing (a format it cannot follow too). Now OpenAI's ``invalid_prompt``, with
    the 400's message."""
    body = {"model": "base", "input": "hi", "max_output_tokens": 16, "text": {"format": {"type": "json_object"}},
            "allowed_token_ids": [5, 6]}
    whole = server["client"].post("/v1/responses", json=body)
    assert whole.status_code == 400 and "allowed_token_ids" in whole.json()["error"]["message"], whole.text
    streamed = server["client"].post("/v1/responses", json={**body, "stream": True})
    failed = _events(streamed)[-1]
    assert failed["type"] == "response.failed", failed
    assert failed["response"]["error"] == {"code": "invalid_prompt", "message": whole.json()["error"]["message"]}
    _still_serves(server)


def test_a_model_whose_logits_are_not_finite_is_still_the_servers_failure():
    """The engine tells the two apart by the model's own logits: NaN ones stay "sampling failed" (a 500)."""
    from lorakit.generation import SamplingParams
    from lorakit.serve.answers import failure
    from lorakit.serve.engine import Engine, Request
    from lorakit.serve.sampling import RowOptions

    requests = [Request([1], None, SamplingParams(temperature=temperature), lambda *a: True, lambda r: None,
                        options=RowOptions(allowed=(4,), min_tokens=1, ends=(4,)))
                for temperature in (0.0, 1.0)]
    logits = torch.randn(2, 10)
    _, errors = Engine._choose(requests, logits)
    assert all(failure(f"error: {e}")[0] == 400 for e in errors), errors
    _, errors = Engine._choose(requests, torch.full((2, 10), float("nan")))
    assert all(failure(f"error: {e}")[0] == 500 and "not finite" in e for e in errors), errors


@pytest.mark.parametrize("name", ["_draft", ".hidden", "a..b", "x" * 129])
def test_a_refused_adapter_name_is_told_the_whole_rule(server, name):
    """Before: "use a folder name of the adapters folder (letters, digits, '.', '_', '-'; no paths)", to names made
    of just those. Now the rule says how a name starts, its length and '..'."""
    response = server["client"].post("/v1/chat/completions", json={
        "model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "starting with a letter or digit" in message and "128" in message and "'..'" in message, message
    loaded = server["client"].post("/v1/load_lora_adapter", json={"lora_name": name,
                                                                  "lora_path": str(server["adapters"] / "good")})
    assert loaded.status_code == 400, loaded.text
    message = loaded.json()["error"]["message"]
    assert message.startswith("lora_name ") and "starting with a letter or digit" in message, message
    assert "adapters folder" not in message  # a lora_name names no folder: its lora_path does


def test_the_server_names_the_rule_for_a_folder_it_skips(server):
    """Start-up says why ``_draft`` is not served, with the rule it breaks."""
    log = server["log"].read_text(errors="replace")
    line = next(line for line in log.splitlines() if "'_draft'" in line)
    assert "is not served" in line and "starting with a letter or digit" in line, line


PYDANTIC = {"properties": {"name": {"title": "Name", "type": "string"},  # SecretStr, bytes, Path fields
                           "key": {"format": "password", "title": "Key", "type": "string", "writeOnly": True},
                           "data": {"format": "binary", "title": "Data", "type": "string"},
                           "where": {"format": "path", "title": "Where", "type": "string"}},
            "required": ["name", "key", "data", "where"], "title": "M", "type": "object"}


def _formatted(server, schema, max_tokens=32):
    return server["client"].post("/v1/chat/completions", json={
        "model": "base", "messages": [{"role": "user", "content": "hi"}], "max_tokens": max_tokens, "temperature": 0,
        "response_format": {"type": "json_schema", "json_schema": {"name": "M", "schema": schema}}})


def test_formats_llguidance_does_not_know_are_annotations(server):
    """Before: a 400 "the schema cannot be used: Unknown format: password" for a Pydantic model's schema."""
    answer = _formatted(server, PYDANTIC)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"].startswith('{"name":"')
    for unknown in ("uri-reference", "json-string", "x" * 100):
        assert _formatted(server, {"type": "string", "format": unknown}).status_code == 200
    # a format llguidance knows still holds the answer
    date = _formatted(server, {"type": "string", "format": "date"}).json()["choices"][0]
    assert date["finish_reason"] == "stop" and re.fullmatch(r'"\d{4}-\d{2}-\d{2}"', date["message"]["content"]), date
    # "format" as data (a const, an enum) is no annotation: the answer is that data
    const = _formatted(server, {"const": {"format": "password"}}).json()["choices"][0]
    assert json.loads(const["message"]["content"]) == {"format": "password"}, const
    _still_serves(server)


def test_a_tools_parameters_keep_their_grammar_beside_an_unknown_format():
    """The forced call's grammar (tool_choice required / named) is built from the same schema, less the unknown
    formats: before, llguidance refused it and the call was written without a grammar."""
    from lorakit.serve.forced_grammar import _object_schema
    from lorakit.serve.structured import known_formats_only

    schema = _object_schema(PYDANTIC)
    assert "format" not in schema["properties"]["key"] and "format" not in schema["properties"]["data"]
    assert known_formats_only({"type": "string", "format": "date-time"}) == {"type": "string", "format": "date-time"}
    assert known_formats_only({"enum": [{"format": "binary"}], "properties": {"format": {"format": "path"}}}) == \
        {"enum": [{"format": "binary"}], "properties": {"format": {}}}
