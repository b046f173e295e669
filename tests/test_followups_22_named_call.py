"""A named ``tool_choice`` on a chat template without a tool-call format (session 22), over a real server.

instructor's default Mode.TOOLS and LangChain's ``with_structured_output(method="function_calling")`` send
``tool_choice: {"type": "function", "function": {"name": X}}`` with one tool. On a template that writes no tool
calls (the tiny model's ChatML, as smollm2-135m's) that was a 400. vLLM serves it on any model: the answer is held to
the function's ``parameters`` schema and returned as that function's one call (content "", finish_reason "stop").
lorakit now does the same, streamed and not; "required" on such a template stays a 400 (no format says which
function a call names), and nothing is added to the prompt (the template writes no tools).
"""

from __future__ import annotations

import json

import pytest

from test_serve_support import tiny_server_client

# a schema a random tiny model fills in few tokens (compact JSON: no free whitespace)
PLACE = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Milan", "Rome"]},
                                          "rush": {"type": "boolean"}},
         "required": ["city", "rush"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "Ship", "description": "ship an order", "parameters": PLACE}},
         {"type": "function", "function": {"name": "Other"}}]  # no parameters: it takes none
BODY = {"model": "base", "messages": [{"role": "user", "content": "Send it to Milan, fast."}], "max_tokens": 64,
        "temperature": 0, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "Ship"}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server_client(tmp_path_factory.mktemp("named22"), "--max-tokens", "64") as client:
        yield client


def _valid_place(arguments: str) -> None:
    """``arguments`` parse as JSON that PLACE accepts (checked by hand: jsonschema is no test dependency)."""
    value = json.loads(arguments)
    assert set(value) == {"city", "rush"}, arguments
    assert value["city"] in ("Milan", "Rome") and isinstance(value["rush"], bool), arguments


def _streamed(server, body: dict) -> list[dict]:
    """The chunks of a streamed answer (``data: [DONE]`` left out)."""
    with server.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()[:300]
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def test_named_function_answers_as_its_call(server):
    answer = server.post("/v1/chat/completions", json=BODY)
    assert answer.status_code == 200, answer.text[:300]
    choice = answer.json()["choices"][0]
    assert choice["finish_reason"] == "stop"  # vLLM's (and OpenAI's) for a named tool_choice
    message = choice["message"]
    assert message["role"] == "assistant" and not message["content"]
    [call] = message["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"]["name"] == "Ship"
    _valid_place(call["function"]["arguments"])


def test_named_function_streams_as_its_call(server):
    whole = server.post("/v1/chat/completions", json=BODY).json()["choices"][0]["message"]["tool_calls"][0]
    chunks = _streamed(server, BODY)
    deltas = [d for c in chunks for choice in c["choices"] for d in choice["delta"].get("tool_calls", ())]
    assert deltas[0]["function"]["name"] == "Ship" and deltas[0]["type"] == "function" and deltas[0]["id"]
    assert all(d["index"] == 0 for d in deltas) and all("name" not in d["function"] for d in deltas[1:])
    arguments = "".join(d["function"]["arguments"] for d in deltas)
    assert arguments == whole["function"]["arguments"]  # greedy: the same JSON as the non-streamed call
    _valid_place(arguments)
    assert not "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "stop"


def test_function_without_parameters_is_an_empty_object(server):
    answer = server.post("/v1/chat/completions",
                         json={**BODY, "tool_choice": {"type": "function", "function": {"name": "Other"}}})
    assert answer.status_code == 200, answer.text[:300]
    call = answer.json()["choices"][0]["message"]["tool_calls"][0]
    assert call["function"]["name"] == "Other" and json.loads(call["function"]["arguments"]) == {}


def test_required_stays_a_400(server):
    response = server.post("/v1/chat/completions", json={**BODY, "tool_choice": "required"})
    assert response.status_code == 400, response.text[:300]
    assert "tools are not supported with this model's chat template" in response.json()["error"]["message"]


def test_nothing_is_added_to_the_prompt(server):
    """The prompt is the chat's alone (the template writes no tools), as without tools."""
    plain = {k: v for k, v in BODY.items() if k not in ("tools", "tool_choice")}
    without = server.post("/v1/chat/completions", json={**plain, "return_prompt_text": True}).json()
    named = server.post("/v1/chat/completions", json={**BODY, "return_prompt_text": True}).json()
    assert named["prompt_text"] == without["prompt_text"] and "Ship" not in named["prompt_text"]


def test_each_streamed_choice_is_its_own_call(server):
    """n=2, sampled, with logprobs: each choice streams one call (its own id), and its deltas join to valid JSON."""
    chunks = _streamed(server, {**BODY, "n": 2, "temperature": 1.0, "seed": 3, "logprobs": True})
    ids, arguments = {}, {0: "", 1: ""}
    for chunk in chunks:
        for choice in chunk["choices"]:
            for delta in choice["delta"].get("tool_calls", ()):
                if "id" in delta:
                    ids[choice["index"]] = delta["id"]
                arguments[choice["index"]] += delta["function"]["arguments"]
    assert len(set(ids.values())) == 2
    for text in arguments.values():
        _valid_place(text)


# -- the Responses API (session 23): the same named call, as a function_call output item ------------------------
RESPONSES_BODY = {"model": "base", "input": "Send it to Milan, fast.", "max_output_tokens": 64, "temperature": 0,
                  "tools": [{"type": "function", "name": "Ship", "parameters": PLACE},
                            {"type": "function", "name": "Other"}],
                  "tool_choice": {"type": "function", "name": "Ship"}}


def _response_events(server, body: dict) -> list[dict]:
    with server.stream("POST", "/v1/responses", json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()[:300]
        return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]


def test_responses_named_function_answers_as_its_call(server):
    answer = server.post("/v1/responses", json=RESPONSES_BODY)
    assert answer.status_code == 200, answer.text[:300]
    response = answer.json()
    assert response["status"] == "completed"
    [item] = response["output"]  # no message: the answer is the call
    assert item["type"] == "function_call" and item["name"] == "Ship" and item["status"] == "completed"
    assert item["call_id"].startswith("call_") and item["id"] == "fc_" + item["call_id"].removeprefix("call_")
    _valid_place(item["arguments"])
    assert response["tool_choice"] == {"type": "function", "name": "Ship"}


def test_responses_named_function_streams_as_its_call(server):
    whole = server.post("/v1/responses", json=RESPONSES_BODY).json()["output"][0]
    events = _response_events(server, RESPONSES_BODY)
    kinds = [event["type"] for event in events]
    assert kinds[:3] == ["response.created", "response.in_progress", "response.output_item.added"]
    assert kinds[-3:] == ["response.function_call_arguments.done", "response.output_item.done", "response.completed"]
    assert "response.output_text.delta" not in kinds and "response.content_part.added" not in kinds
    added = events[2]["item"]
    assert added["type"] == "function_call" and added["name"] == "Ship" and added["arguments"] == ""
    deltas = [event for event in events if event["type"] == "response.function_call_arguments.delta"]
    assert deltas and all(event["item_id"] == added["id"] and event["output_index"] == 0 for event in deltas)
    arguments = "".join(event["delta"] for event in deltas)
    assert arguments == events[-3]["arguments"] == whole["arguments"]  # greedy: the non-streamed call
    done = events[-2]["item"]
    assert done == {**added, "arguments": arguments, "status": "completed"}
    assert events[-1]["response"]["output"] == [done]
    assert [event["sequence_number"] for event in events] == list(range(len(events)))


def test_responses_named_function_cut_short_is_incomplete(server):
    """max_output_tokens cuts the JSON: the call item says "incomplete" (the arguments as written), streamed or not,
    and the response's reason is max_output_tokens."""
    body = {**RESPONSES_BODY, "max_output_tokens": 16}  # OpenAI's least; the JSON needs more here
    response = server.post("/v1/responses", json=body).json()
    assert response["status"] == "incomplete"
    assert response["incomplete_details"] == {"reason": "max_output_tokens"}
    [item] = response["output"]
    assert item["type"] == "function_call" and item["status"] == "incomplete" and item["arguments"]
    events = _response_events(server, body)
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["output"][0]["arguments"] == item["arguments"]
    assert events[-1]["response"]["output"][0]["status"] == "incomplete"


def test_responses_named_function_without_parameters_and_required(server):
    other = server.post("/v1/responses", json={**RESPONSES_BODY, "tool_choice": {"type": "function", "name": "Other"}})
    assert other.status_code == 200, other.text[:300]
    [item] = other.json()["output"]
    assert item["name"] == "Other" and json.loads(item["arguments"]) == {}
    required = server.post("/v1/responses", json={**RESPONSES_BODY, "tool_choice": "required"})
    assert required.status_code == 400, required.text[:300]
    assert "tools are not supported with this model's chat template" in required.json()["error"]["message"]
