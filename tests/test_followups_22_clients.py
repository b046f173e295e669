"""``lorakit serve`` against third-party clients (session 22): LangChain (langchain-openai 1.7), instructor 1.17,
LiteLLM 1.110 and llama-index (llama-index-llms-openai-like 0.8), over a real socket.

Each client's requests were captured on the wire against a real server (smollm2-135m and a trained adapter). Plain
and streamed chat, ``stream_options``, logprobs, ``n``, ``stop``, ``seed``, ``max_completion_tokens``,
``response_format`` json_object / json_schema (LangChain's ``with_structured_output``, instructor's JSON /
JSON_SCHEMA / MD_JSON modes, LiteLLM's pydantic ``response_format``), completions and the Responses API were all
served as sent. The clients are no test dependencies, so these tests replay their exact bodies with httpx.

What a user of those clients met, and what changed:

- instructor's default mode (TOOLS: a named ``tool_choice`` with one function) and LangChain's
  ``with_structured_output(method="function_calling")`` on a template without tool calls were a 400 that said only
  "send tool_choice 'none' to get the calls as text", which is not what a client extracting an object can use. It
  now names the way that works on such a template: ``response_format`` json_schema (instructor's
  ``Mode.JSON_SCHEMA``, LangChain's ``method='json_schema'``); on a template that never names tools (smollm2's
  ChatML) it no longer advises ``tool_choice 'none'``, which such a template refuses too ("does not write the
  tools"), but to describe the tools in the system message.
- Embedding clients (LangChain's ``OpenAIEmbeddings``, LiteLLM's ``embedding()``) got "no route POST
  '/v1/embeddings'" with the route list: now the 404 says this server generates text and serves no embeddings.
- llama-index's ``structured_predict`` / ``as_structured_llm`` on an OpenAILike model whose name it does not know
  sends ``"tool_choice": "required"`` with no tools (OpenAI and vLLM refuse that too, so it stays a 400). The
  message said "send the functions in tools", which a llama-index user cannot; it now says what to pass
  (``llm_kwargs={'tool_choice': 'none'}``) and how to hold an answer to a schema.
"""

from __future__ import annotations

import httpx
import pytest

from test_serve_support import tiny_server_client

SYSTEM = {"role": "system", "content": "Extract the order as JSON."}
USER = {"role": "user", "content": "Send 3 rain jackets to Milan on Monday."}
ORDER = {"properties": {"item": {"title": "Item", "type": "string"}, "qty": {"title": "Qty", "type": "integer"},
                        "city": {"title": "City", "type": "string"}},
         "required": ["city", "item", "qty"], "type": "object"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with tiny_server_client(tmp_path_factory.mktemp("clients22"), "--max-tokens", "64") as client:
        yield client


def _error(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text[:500]
    return response.json()["error"]["message"]


def test_instructor_tools_mode_names_json_schema(server):
    """instructor.from_openai(client) (default Mode.TOOLS): the body as sent, a named tool_choice."""
    body = {"messages": [SYSTEM, USER], "model": "base", "max_tokens": 64, "temperature": 0,
            "tool_choice": {"type": "function", "function": {"name": "Order"}},
            "tools": [{"type": "function", "function": {
                "name": "Order", "parameters": ORDER,
                "description": "Correctly extracted `Order` with all the required parameters with correct types"}}]}
    # the named function is served as vLLM serves it (its parameters' schema; test_followups_22_named_call.py);
    # "required" still meets the 400, whose advice is checked here
    named = server.post("/v1/chat/completions", json=body)
    assert named.status_code == 200 and named.json()["choices"][0]["message"]["tool_calls"][0]["function"]["name"] \
        == "Order", named.text[:300]
    message = _error(server.post("/v1/chat/completions", json={**body, "tool_choice": "required"}))
    assert "tools are not supported with this model's chat template" in message
    assert "response_format json_schema" in message and "Mode.JSON_SCHEMA" in message
    # this template never names tools: tool_choice 'none' is refused as well, so it is not what the message says
    assert "tool_choice 'none'" not in message and "describe the tools in the system message" in message
    assert "does not write the tools" in _error(server.post("/v1/chat/completions",
                                                            json={**body, "tool_choice": "none"}))
    # what it says to send instead (instructor's Mode.JSON_SCHEMA body) is served, as JSON
    schema = {"model": "base", "messages": [SYSTEM, USER], "max_tokens": 64, "temperature": 0,
              "response_format": {"type": "json_schema", "json_schema": {"name": "Order", "schema": ORDER}}}
    answer = server.post("/v1/chat/completions", json=schema)
    assert answer.status_code == 200, answer.text[:300]


def test_langchain_function_calling_names_json_schema(server):
    """ChatOpenAI(...).with_structured_output(Order, method="function_calling"): the body as sent."""
    body = {"messages": [SYSTEM, USER], "model": "base", "max_completion_tokens": 48, "parallel_tool_calls": False,
            "stream": False, "temperature": 0.0, "tool_choice": {"type": "function", "function": {"name": "Order"}},
            "tools": [{"type": "function", "function": {"name": "Order", "description": "", "parameters": ORDER}}]}
    named = server.post("/v1/chat/completions", json=body)  # served: the call held to Order's schema
    assert named.status_code == 200 and named.json()["choices"][0]["message"]["tool_calls"], named.text[:300]
    message = _error(server.post("/v1/chat/completions", json={**body, "tool_choice": "required"}))
    assert "with_structured_output(method='json_schema')" in message


def test_llama_index_structured_predict_says_what_to_pass(server):
    """OpenAILike(model=..., is_chat_model=True).structured_predict / as_structured_llm: tool_choice "required"
    and no tools (llama-index's OpenAI.structured_predict sets it for every model it does not know)."""
    schema_prompt = ("Extract the order as JSON.\n\n\nHere's a JSON schema to follow:\n{{\"properties\": ...}}\n\n"
                     "Output a valid JSON object but do not repeat the schema.\n")
    body = {"messages": [{"role": "system", "content": schema_prompt}, USER], "model": "base", "max_tokens": 48,
            "stream": False, "temperature": 0.1, "tool_choice": "required"}
    message = _error(server.post("/v1/chat/completions", json=body))
    assert "not supported without tools" in message
    assert "llm_kwargs={'tool_choice': 'none'}" in message
    # what the message says to send is served
    fixed = {**body, "tool_choice": "none"}
    response = server.post("/v1/chat/completions", json=fixed)
    assert response.status_code == 200, response.text[:300]


@pytest.mark.parametrize("body", [
    {"input": ["hi"], "model": "base", "encoding_format": "base64"},  # LangChain's OpenAIEmbeddings (openai SDK)
    {"model": "base", "input": ["hi"]},  # LiteLLM's embedding(model="openai/...")
])
def test_embeddings_say_none_are_served(server, body):
    """Embedding clients pointed at the server: a 404 that says no embeddings are served here (before: only "no
    route POST '/v1/embeddings'; the API is ..."), as OpenAI's error body, which the clients raise."""
    response = server.post("/v1/embeddings", json=body)
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert "serves no embeddings" in message and "/v1/chat/completions" in message
