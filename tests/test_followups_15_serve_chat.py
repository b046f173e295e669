"""vLLM's chat-rendering fields on ``lorakit serve``'s /v1/chat/completions, and limits on rendering chat templates,
over real sockets.

- ``add_generation_prompt`` / ``continue_final_message`` / ``echo`` / ``documents`` / ``chat_template`` (vLLM's
  extra_body fields): each was refused as an unknown field; now each renders the prompt as transformers renders
  it with that keyword (checked by ``usage.prompt_tokens``), or is refused in one line where it cannot be honoured
  (both prompt flags, a template that never reads documents, a request's template without
  ``--trust-request-chat-template``).
- An adapter folder's chat template is Jinja run on every request: one that loops for ages on a sample chat is
  refused at load (it hung the loading thread, and the request, for good); one slow only on some messages costs
  that request a 400 after the render deadline, while the server answers others meanwhile and afterwards.
- The start-up output names the adapters that bring their own chat template.
"""

from __future__ import annotations

import functools
import json
import threading
import time

import httpx
import pytest

from conftest import tiny_llama
from test_serve_support import CHATML, ServerProcess, make_adapter, make_tokenizer

QUESTION = [{"role": "user", "content": "Capital of France?"}]
PREFILL = QUESTION + [{"role": "assistant", "content": "Paris is"}]
# reads the documents, as Command-R's and Granite's templates do
RAG = ("{% if documents %}<|im_start|>system\n{% for d in documents %}[{{ d['title'] }}] {{ d['text'] }}\n"
       "{% endfor %}<|im_end|>\n{% endif %}" + CHATML)
LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}" + CHATML
# slow only when a message says SLOW: passes the load check, then stalls the request that sends it
TRIGGER = ("{% for m in messages %}{% if m['content'] == 'SLOW' %}{% for i in range(100000) %}"
           "{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}{% endfor %}" + CHATML)
OTHER = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return make_tokenizer()


def _rendered(messages, template=None, **kwargs) -> int:
    """Prompt tokens of ``messages`` as transformers renders them with ``template`` (default: the base's)."""
    kwargs.setdefault("add_generation_prompt", True)
    return len(_tokenizer().apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=False,
                                                **kwargs))


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    tokenizer = make_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    for seed, (name, template) in enumerate((("plain", None), ("rag", RAG), ("loops", LOOPS), ("trigger", TRIGGER))):
        folder = make_adapter(model, root / "adapters" / name, seed=seed)
        if template is not None:
            own = make_tokenizer()
            own.chat_template = template
            own.save_pretrained(folder)
    started: dict[str, ServerProcess] = {}
    errors = []

    def start(key: str, *extra: str) -> None:
        try:
            started[key] = ServerProcess(root / "model", root / "adapters", "--max-tokens", "8", *extra,
                                         log=root / f"{key}.log")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=start, args=("plain",)),
               threading.Thread(target=start, args=("trusted", "--trust-request-chat-template"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    clients = {key: httpx.Client(base_url=process.url, timeout=120) for key, process in started.items()}
    try:
        assert not errors, errors
        yield {"client": clients["plain"], "trusted": clients["trusted"], "process": started["plain"]}
    finally:
        for client in clients.values():
            client.close()
        for process in started.values():  # both told first, then waited for: they stop together
            if process.process.poll() is None:
                process.process.terminate()
        for process in started.values():
            process.stop()


def _chat(client, messages, model: str = "base", status: int = 200, **extra) -> dict:
    response = client.post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 4,
                                                         "temperature": 0, **extra})
    assert response.status_code == status, response.text[:500]
    return response.json()


def test_generation_prompt_and_continue_final_message_render_as_transformers(servers):
    client = servers["client"]
    assert _chat(client, QUESTION)["usage"]["prompt_tokens"] == _rendered(QUESTION)
    assert _chat(client, QUESTION, add_generation_prompt=False)["usage"]["prompt_tokens"] == \
        _rendered(QUESTION, add_generation_prompt=False) < _rendered(QUESTION)
    # the answer continues "Paris is": the prompt ends inside the assistant's turn, with no <|im_end|>
    answer = _chat(client, PREFILL, add_generation_prompt=False, continue_final_message=True)
    assert answer["usage"]["prompt_tokens"] == _rendered(PREFILL, add_generation_prompt=False,
                                                         continue_final_message=True) \
        == _rendered(PREFILL, add_generation_prompt=False) - 2  # <|im_end|> and its newline left out
    # vLLM's rule: both flags at once is the client's 400, in one line
    error = _chat(client, PREFILL, status=400, continue_final_message=True)["error"]
    assert "continue_final_message" in error["message"] and "add_generation_prompt" in error["message"]
    assert "\n" not in error["message"]
    error = _chat(client, QUESTION, status=400, add_generation_prompt=False, continue_final_message=True)["error"]
    assert "must be the assistant's" in error["message"] and "'user'" in error["message"]
    # null is "not given", as for every optional field
    assert _chat(client, QUESTION, add_generation_prompt=None, echo=None)["usage"]["prompt_tokens"] == \
        _rendered(QUESTION)


def test_echo_starts_the_answer_with_the_continued_message(servers):
    client = servers["client"]
    fields = dict(add_generation_prompt=False, continue_final_message=True, echo=True)
    content = _chat(client, PREFILL, **fields)["choices"][0]["message"]["content"]
    plain = _chat(client, PREFILL, add_generation_prompt=False, continue_final_message=True)
    assert content == "Paris is" + plain["choices"][0]["message"]["content"]
    # streamed: the echoed text is the first content chunk, and the chunks add up to the whole answer
    pieces = []
    with client.stream("POST", "/v1/chat/completions", json={"model": "base", "messages": PREFILL, "max_tokens": 4,
                                                             "temperature": 0, "stream": True, **fields}) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                if delta.get("content"):
                    pieces.append(delta["content"])
    assert pieces[0] == "Paris is" and "".join(pieces) == content
    # the last message is the user's: nothing to echo (vLLM echoes only the answer's role)
    assert _chat(client, QUESTION, echo=True)["choices"][0]["message"]["content"] == \
        _chat(client, QUESTION)["choices"][0]["message"]["content"]


def test_documents_reach_templates_that_read_them_and_are_refused_elsewhere(servers):
    client = servers["client"]
    documents = [{"title": "Atlas", "text": "Paris is the capital of France."}]
    answer = _chat(client, QUESTION, model="rag", documents=documents)
    assert answer["usage"]["prompt_tokens"] == _rendered(QUESTION, RAG, documents=documents) > _rendered(QUESTION, RAG)
    error = _chat(client, QUESTION, status=400, documents=documents)["error"]  # the base's ChatML never reads them
    assert error["param"] == "documents" and "not read by this model's chat template" in error["message"]
    assert _chat(client, QUESTION, status=400, documents=[{"title": 1}])["error"]["param"].startswith("documents")


def test_a_requests_chat_template_needs_the_servers_option(servers):
    error = _chat(servers["client"], QUESTION, status=400, chat_template=OTHER)["error"]
    assert error["param"] == "chat_template" and "--trust-request-chat-template" in error["message"]
    trusted = servers["trusted"]
    assert _chat(trusted, QUESTION, chat_template=OTHER)["usage"]["prompt_tokens"] == _rendered(QUESTION, OTHER) \
        != _rendered(QUESTION)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    assert "tools" in _chat(trusted, QUESTION, status=400, chat_template=OTHER, tools=tools)["error"]["message"]
    # a client's template is Jinja too: one that builds a 10 GB string is refused before it runs in the server
    error = _chat(trusted, QUESTION, status=400, chat_template="{{ 'x' * 10000000000 }}" + OTHER)["error"]
    assert error["param"] == "chat_template" and "MiB of memory" in error["message"]
    assert _chat(trusted, QUESTION)["choices"]
    # chat_template_kwargs may not set these (the fields do): refused as before
    assert _chat(trusted, QUESTION, status=400, chat_template_kwargs={"chat_template": OTHER})["error"]


def test_an_adapter_whose_template_loops_is_refused_at_load(servers):
    client = servers["client"]
    start = time.monotonic()
    error = _chat(client, QUESTION, model="loops", status=400)["error"]
    assert time.monotonic() - start < 80
    assert error["code"] == "adapter_rejected" and "'loops'" in error["message"]
    assert "chat template takes over 5 s" in error["message"] and "\n" not in error["message"]
    assert _chat(client, QUESTION, model="plain")["choices"]  # the server serves on


def test_a_template_slow_on_some_messages_times_out_while_others_are_served(servers):
    client = servers["client"]
    assert _chat(client, QUESTION, model="trigger")["choices"]  # loaded: its sample chat renders at once
    result = {}

    def slow() -> None:
        with httpx.Client(base_url=servers["process"].url, timeout=120) as own:
            start = time.monotonic()
            result["response"] = own.post("/v1/chat/completions", json={
                "model": "trigger", "messages": [{"role": "user", "content": "SLOW"}], "max_tokens": 4})
            result["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=slow)
    thread.start()
    time.sleep(1.0)  # the render is stuck in its loop now
    latencies = []
    while thread.is_alive() and len(latencies) < 3:
        start = time.monotonic()
        assert client.get("/health").status_code == 200
        assert _chat(client, QUESTION)["choices"]
        latencies.append(time.monotonic() - start)
    thread.join(timeout=90)
    assert latencies and max(latencies) < 4.0, latencies
    response = result["response"]
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert error["code"] == "chat_template_timeout" and "'trigger'" in error["message"] and "5 s" in error["message"]
    assert 4.5 < result["seconds"] < 60
    # the adapter's text side (its lock) is free again: its next chat is answered at once
    start = time.monotonic()
    assert _chat(client, QUESTION, model="trigger")["choices"]
    assert time.monotonic() - start < 10


def test_start_up_names_adapters_with_their_own_chat_template(servers):
    lines = [line for line in servers["process"].output().splitlines() if "their own chat template" in line]
    assert len(lines) == 1, servers["process"].output()
    assert all(name in lines[0] for name in ("loops", "rag", "trigger")) and "plain" not in lines[0]
