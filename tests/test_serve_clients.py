"""``lorakit serve`` as clients we have not seen would use it: the ``openai`` package and the wrappers around it,
strict SSE parsers, sloppy or broken HTTP clients, over a real socket.

One server per module. Each test pins a bug found by acting as such a client against a real server (before the
fix: a 400 for a request OpenAI accepts, a 404 for an OpenAI route, a 500 that failed other clients' rows, a
traceback in the server log, a connection held forever, wrong bytes in an answer, or a refusal of what lm-eval and
other OpenAI clients send: ``n``, ``echo``, a batch of prompts, five stop strings). ``test_serve.py`` and
``test_serve_hostile.py`` cover the ordinary paths and the hostile bodies and adapter folders; nothing here
repeats them.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from http_helpers import api_error
from test_serve_support import ServerProcess, make_adapter, never_ending, tiny_hf_folder

CONTEXT = 256  # the tiny model's max_position_embeddings: the server's context


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("clients")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.5)
    from transformers import AutoTokenizer

    base = never_ending(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    adapters = root / "adapters"
    for seed, name in enumerate(("a0", "a1", "a2")):
        make_adapter(base, adapters / name, seed=seed + 11)
    make_adapter(base, adapters / "my adapter", seed=14)  # a name no client can send: told at start
    log = root / "server.log"
    server = ServerProcess(model_dir, adapters, "--max-tokens", "200", "--body-timeout", "1",
                           "--cors-origin", "http://ui.example", log=log)
    client = httpx.Client(base_url=server.url, timeout=60)
    try:
        yield {"url": server.url, "client": client, "server": server, "tokenizer": tokenizer, "model_dir": model_dir,
               "adapters": adapters}
    finally:
        client.close()
        server.stop()


def _ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text[:500]
    return response.json()


def _chat(client, messages=None, **extra) -> httpx.Response:
    body = {"model": "a0", "messages": messages or [{"role": "user", "content": "Hello"}], "max_tokens": 6,
            "temperature": 0, **extra}
    return client.post("/v1/chat/completions", json=body)


def _text(client, model="a0", prompt="Hello", max_tokens=8, **extra) -> str:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return _ok(client.post("/v1/completions", json=body))["choices"][0]["text"]


def _raw(url: str, data: bytes) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    sock = socket.create_connection((host, int(port)))
    sock.sendall(data)
    return sock


# -- what openai-package clients and their wrappers send ---------------------------------------------------------
def test_null_means_the_default(server):
    """Wrappers (LangChain, LiteLLM, hand-written ones) send ``"temperature": null`` for "not given"; OpenAI reads
    null as the default. Before the fix: 400 'temperature: Input should be a valid number, got null null'."""
    client = server["client"]
    plain = _ok(_chat(client))["choices"][0]["message"]["content"]
    nulls = {"top_p": None, "n": None, "stream": None, "stop": None, "logprobs": None, "top_logprobs": None,
             "presence_penalty": None, "frequency_penalty": None, "logit_bias": None, "seed": None, "user": None,
             "stream_options": None, "max_completion_tokens": None}
    assert _ok(_chat(client, **nulls))["choices"][0]["message"]["content"] == plain
    body = {"model": "a1", "prompt": "Hello", "temperature": 0, "echo": None, "best_of": None, "suffix": None,
            "logprobs": None, "n": None}
    assert _ok(client.post("/v1/completions", json=body))["usage"]["completion_tokens"] == 16  # null max_tokens: 16
    error = api_error(client.post("/v1/completions", json={"model": None, "prompt": "hi"}), 400)  # required: refused
    assert error["param"] == "model" and error["message"].endswith("got null"), error


def test_echoed_reply_and_off_values_accepted(server):
    """``messages.append(reply.choices[0].message.model_dump())`` sends back refusal/annotations/audio/
    function_call/tool_calls as null; wrappers send ``tools: []``, ``tool_choice: "none"`` and friends. Before the
    fix: 400 'unknown field messages.1.refusal' (and 'unknown field tools', ...)."""
    client = server["client"]
    first = _ok(_chat(client))["choices"][0]["message"]
    citation = {"type": "url_citation", "url_citation": {"url": "https://x.example", "title": "x", "start_index": 0,
                                                         "end_index": 1}}  # an answer's citations: metadata
    echoed = {**first, "refusal": None, "annotations": [citation], "audio": None, "function_call": None,
              "tool_calls": None}
    history = [{"role": "user", "content": "Hello"}, echoed, {"role": "user", "content": "More"}]
    expected = _ok(_chat(client, [history[0], first, history[2]]))["choices"][0]["message"]["content"]
    assert _ok(_chat(client, history))["choices"][0]["message"]["content"] == expected
    off = {"tools": [], "tool_choice": "none", "parallel_tool_calls": False, "functions": [], "store": False,
           "response_format": {"type": "text"}, "modalities": ["text"], "safety_identifier": "u-1",
           "prompt_cache_key": "k"}
    plain = _ok(_chat(client))["choices"][0]["message"]["content"]
    assert _ok(_chat(client, **off))["choices"][0]["message"]["content"] == plain
    events = _sse(client, "/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "Hello"}],
                                                   "max_tokens": 6, "temperature": 0, "stream_options":
                                                   {"include_usage": True, "include_obfuscation": False}})
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == plain
    # the "on" values are refused by name, never silently ignored
    for field, value in [("tools", [{"type": "function", "function": {"name": "f"}}]), ("tool_choice", "required"),
                         ("response_format", {"type": "grammar"}), ("store", True), ("modalities", ["audio"])]:
        error = api_error(_chat(client, **{field: value}), 400)
        assert error["param"].startswith(field) and "not supported" in error["message"], error
    tool_call = {**first, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}
    assert api_error(_chat(client, [history[0], tool_call]), 400)["param"] == "messages.1.tool_calls"


def test_models_retrieve(server):
    """``client.models.retrieve("a0")`` is ``GET /v1/models/a0``. Before the fix: 404 'Not Found' for every model."""
    client = server["client"]
    listed = {m["id"]: m for m in _ok(client.get("/v1/models"))["data"]}
    for name in ("base", "a0", "a2"):
        assert _ok(client.get(f"/v1/models/{name}")) == listed[name]
    assert api_error(client.get("/v1/models/nope"), 404)["code"] == "model_not_found"
    assert api_error(client.get("/v1/models/..%2F..%2Fetc"), 400)["code"] == "invalid_adapter_name"


@pytest.mark.parametrize("method, path, words", [
    ("POST", "/chat/completions", "did you mean /v1/chat/completions? Set the client's base_url to the server ending in /v1"),
    ("GET", "/models/a0", "did you mean /v1/models/a0?"),
    ("GET", "/v1/v1/models", "did you mean /v1/models? Set the client's base_url to the server without /v1"),
    ("POST", "/v1/completions/", "did you mean /v1/completions (no trailing slash)?"),
    ("POST", "/v1/chat/completion", "the API is /health, /v1/models"),
])
def test_wrong_base_url_is_named(server, method, path, words):
    """``OpenAI(base_url="http://host:8000")`` (no /v1) is a new user's first mistake. Before the fix: 404 'Not Found'."""
    error = api_error(server["client"].request(method, path, json={}), 404)
    assert words in error["message"] and error["code"] == "not_found", error


def test_wrong_method_names_the_right_one(server):
    for method, path, allowed in [("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/completions", "POST"),
                                  ("POST", "/v1/models", "GET, HEAD"), ("DELETE", "/v1/adapters/load", "POST")]:
        response = server["client"].request(method, path)
        error = api_error(response, 405)
        assert error["message"] == f"{method} is not allowed on {path}; use {allowed}", error
        assert response.headers["allow"] == allowed


def test_default_max_tokens_fits_the_context(server):
    """A completion without ``max_tokens`` (OpenAI's default, 16) on a prompt that leaves fewer than 16 tokens of
    context. Before the fix: 400 'prompt plus max_tokens (16) exceeds the context', about a field never sent."""
    client = server["client"]
    body = {"model": "a1", "prompt": [5] * (CONTEXT - 6), "temperature": 0}
    assert _ok(client.post("/v1/completions", json=body))["usage"]["completion_tokens"] == 6
    assert api_error(client.post("/v1/completions", json={**body, "max_tokens": 16}), 400)["param"] == "max_tokens"
    # the error names the field the client sent (the openai package sends max_completion_tokens for chat)
    error = api_error(_chat(client, max_tokens=None, max_completion_tokens=500), 400)
    assert error["param"] == "max_completion_tokens" and error["message"].startswith("max_completion_tokens 500 is over")


# -- sampling edge values ------------------------------------------------------------------------------------------
def test_tiny_temperature_and_top_p_are_greedy_and_fail_nobody(server):
    """temperature 1e-45 (or 5e-324) overflowed the logits to inf, top_p 1e-300 rounded to 0 in float32 and kept no
    token: NaN probabilities, a 500, and the engine failed the whole batch, the other clients' rows included."""
    client = server["client"]
    greedy = _text(client, "a0", "The quick", 12)
    long_prompt, long_tokens = "Numbers: 1 2 3", 150
    expected = _text(client, "a1", long_prompt, long_tokens)
    streamed: list[str] = []
    started = threading.Event()

    def other_client() -> None:  # a long generation on another adapter, running through every request below
        with httpx.Client(base_url=server["url"], timeout=60) as own, own.stream(
                "POST", "/v1/completions", json={"model": "a1", "prompt": long_prompt, "max_tokens": long_tokens,
                                                 "temperature": 0, "stream": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    streamed.append(line)
                    started.set()

    thread = threading.Thread(target=other_client)
    thread.start()
    try:
        assert started.wait(30)
        for extra in ({"temperature": 1e-45}, {"temperature": 5e-324}, {"temperature": 1.0, "top_p": 1e-300},
                      {"temperature": 0.7, "top_p": 5e-324, "seed": 3}):
            assert _text(client, "a0", "The quick", 12, **extra) == greedy, extra
    finally:
        thread.join(60)
    events = [json.loads(line[6:]) for line in streamed]
    assert "".join(e["choices"][0]["text"] for e in events) == expected
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_a_row_whose_sampling_fails_fails_alone():
    """The engine, in process: two requests in one batch, one whose sampling raises (a temperature that is 0 in
    float32, past the HTTP layer's guard). Before the fix the exception failed the whole batch: both rows."""
    from conftest import tiny_llama

    from lorakit.generation import SamplingParams, generate
    from lorakit.serve.engine import Engine, Request

    model = tiny_llama(seed=2).eval()
    prompt = [5, 9, 2, 7, 1]
    expected = generate(model, [prompt], [None], [SamplingParams(max_new_tokens=6)])[0].tokens
    engine = Engine(model, threading.RLock(), max_batch=4)
    tokens, reasons, finished = {0: [], 1: []}, {}, threading.Semaphore(0)

    def request(i: int, params) -> Request:
        def on_finish(reason: str) -> None:
            reasons[i] = reason
            finished.release()

        return Request(list(prompt), None, params, lambda token, info: tokens[i].append(token) or True, on_finish)

    try:
        with engine._wake:  # both wait together, so the engine admits them in one step
            engine.submit(request(0, SamplingParams(max_new_tokens=6, temperature=5e-324)))
            engine.submit(request(1, SamplingParams(max_new_tokens=6)))
        assert finished.acquire(timeout=60) and finished.acquire(timeout=60)
    finally:
        engine.close()
    assert reasons[0].startswith("error: ") and tokens[0] == []
    assert reasons[1] == "length" and tokens[1] == expected


def test_top_k(server):
    """``top_k`` is vLLM's (and llama.cpp's) extension, sent by clients and lm-eval ``--gen_kwargs`` built for them.
    Before the fix: 400 'unknown field top_k'."""
    client = server["client"]
    greedy = _text(client, "a1", "The quick", 12)
    assert all(_text(client, "a1", "The quick", 12, temperature=1.0, top_k=1, seed=s) == greedy for s in range(3))
    sampled = {_text(client, "a1", "The quick", 12, temperature=1.0, top_k=-1, seed=s) for s in range(3)}
    assert sampled != {greedy}  # -1: off, as in vLLM
    chat = {"max_tokens": 12, "temperature": 2.0, "top_k": 3, "seed": 5, "logprobs": True, "top_logprobs": 3}
    content = _ok(_chat(client, **chat))["choices"][0]["logprobs"]["content"]
    for entry in content:  # every sampled token is one of the 3 most likely there
        assert (entry["token"], entry["bytes"]) in [(t["token"], t["bytes"]) for t in entry["top_logprobs"]]
    assert any(entry["top_logprobs"][0]["bytes"] != entry["bytes"] for entry in content)  # not just greedy
    assert api_error(client.post("/v1/completions", json={"model": "a1", "prompt": "x", "top_k": -2}),
                     400)["param"] == "top_k"


# -- strict SSE clients --------------------------------------------------------------------------------------------
def _sse(client, path: str, body: dict) -> list[dict]:
    """Parse a stream as a strict client does: every event one ``data:`` line of JSON, ``[DONE]`` last, nothing
    after it, exactly one finish_reason per choice."""
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode("utf-8")
    blocks = raw.split("\n\n")
    assert blocks[-1] == "" and blocks[-2] == "data: [DONE]", raw[-200:]
    events = []
    for block in blocks[:-2]:
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(json.loads(block[6:]))
    finishes = [(c["index"], c["finish_reason"]) for e in events for c in e["choices"] if c["finish_reason"]]
    prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) and not isinstance(body["prompt"][0], int) else 1
    assert sorted(i for i, _ in finishes) == list(range(body.get("n", 1) * prompts)), finishes  # once per choice
    assert all(reason in ("stop", "length") for _, reason in finishes), finishes
    assert len({e["id"] for e in events}) == 1 and all(e["model"] == body["model"] for e in events)
    return events


def test_strict_sse_clients_on_different_adapters(server):
    client = server["client"]
    jobs = []
    for i, model in enumerate(["a0", "a1", "a2", "base"] * 2):
        if i % 2:
            jobs.append(("/v1/completions", {"model": model, "prompt": f"Servers {i}", "max_tokens": 5 + i,
                                             "temperature": 0, "stream_options": {"include_usage": True}}))
        else:
            jobs.append(("/v1/chat/completions", {"model": model, "max_tokens": 5 + i, "temperature": 0,
                                                  "messages": [{"role": "user", "content": f"Hi {i}"}],
                                                  "stream_options": {"include_usage": True}}))
    # stream_options goes with stream only (OpenAI's 400 otherwise)
    whole = [_ok(client.post(path, json={k: v for k, v in body.items() if k != "stream_options"}))
             for path, body in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        streams = list(pool.map(lambda job: _sse(client, *job), jobs))
    for (path, body), answer, events in zip(jobs, whole, streams):
        chat = "chat" in path
        *chunks, last = events
        assert last["choices"] == [] and last["usage"] == answer["usage"]  # usage: the last event, and right
        assert all(e["usage"] is None for e in chunks)
        pieces = [c["delta"].get("content") or "" if chat else c["text"] for e in chunks for c in e["choices"]]
        expected = answer["choices"][0]["message"]["content"] if chat else answer["choices"][0]["text"]
        assert "".join(pieces) == expected and answer["usage"]["completion_tokens"] == body["max_tokens"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        if chat:
            assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
            assert all(e["object"] == "chat.completion.chunk" for e in events)


def test_logprob_bytes_rebuild_the_text(server):
    """OpenAI's ``bytes`` are the token's own bytes, so joined they rebuild the answer. Before the fix they were
    the UTF-8 of the token decoded alone: U+FFFD (EF BF BD) for every token holding part of a character."""
    client = server["client"]
    partial = 0
    for i, model in enumerate(["a0", "a1", "a2", "base"]):
        answer = _ok(_chat(client, [{"role": "user", "content": f"Ünïcödé {i}"}], model=model, max_tokens=24,
                           logprobs=True, top_logprobs=2))["choices"][0]
        content = answer["logprobs"]["content"]
        rebuilt = b"".join(bytes(c["bytes"]) for c in content)
        assert rebuilt.decode("utf-8", errors="replace") == answer["message"]["content"]
        partial += sum(c["token"] == "\ufffd" and bytes(c["bytes"]) != "\ufffd".encode() for c in content)
        for c in content:  # the chosen token is the first alternative: the same token, the same bytes
            assert (c["top_logprobs"][0]["token"], c["top_logprobs"][0]["bytes"]) == (c["token"], c["bytes"])
    assert partial > 0  # the random model does write tokens that hold part of a character: the case was exercised


def test_top_logprobs_keys_that_read_the_same(server):
    """The completions API keys top_logprobs by token text; two tokens holding parts of characters both read
    U+FFFD. Before the fix the later (less likely) one's value overwrote the chosen token's."""
    client, collisions = server["client"], 0
    for i, model in enumerate(["a0", "a1", "a2", "base"]):
        lp = _ok(client.post("/v1/completions", json={"model": model, "prompt": f"Ünïcödé {i}", "max_tokens": 16,
                                                      "temperature": 0, "logprobs": 8}))["choices"][0]["logprobs"]
        for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
            assert top[token] == logprob == max(top.values())  # greedy: the chosen token is the likeliest
            collisions += len(top) < 8
    assert collisions > 0  # the case was exercised


def test_token_bytes_of_a_sentencepiece_tokenizer():
    """Byte-fallback SentencePiece (Llama 2, Mistral) spells lone bytes ``<0xC3>`` and spaces ``\u2581``."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    from lorakit.serve.text import token_bytes

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>", *(f"<0x{i:02X}>" for i in range(256))])
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    text = "the fox é 🙂 dog"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert b"".join(token_bytes(tokenizer, i) for i in ids) == b" " + text.encode()  # the leading space is the piece's
    assert token_bytes(tokenizer, tokenizer.convert_tokens_to_ids("<0xC3>")) == b"\xc3"
    assert token_bytes(tokenizer, tokenizer.eos_token_id) == b"</s>"


def test_token_bytes_of_a_byte_level_tokenizer(server):
    from lorakit.serve.text import token_bytes

    tokenizer = server["tokenizer"]
    text = "Ünïcödé tëxt, emoji 🙂 and 中文 <|im_end|>"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = [token_bytes(tokenizer, i) for i in ids]
    assert b"".join(pieces) == text.encode() and any(tokenizer.decode([i]) == "\ufffd" for i in ids)


# -- echo: scoring a prompt (lm-eval's loglikelihood) ----------------------------------------------------------------
def test_echo_scores_the_prompt(server):
    """lm-eval's ``local-completions`` scores a context + continuation with ``echo: true, max_tokens: 0,
    logprobs: 1`` and reads ``token_logprobs[ctxlen:]``. Before the fix: 400 'echo is not supported'."""
    from transformers import AutoModelForCausalLM

    import lorakit

    client = server["client"]
    ids = server["tokenizer"]("Paris is the capital of France.")["input_ids"]
    answer = _ok(client.post("/v1/completions", json={"model": "a1", "prompt": ids, "echo": True, "max_tokens": 0,
                                                      "logprobs": 2, "temperature": 0}))
    choice = answer["choices"][0]
    assert choice["text"] == server["tokenizer"].decode(ids) and answer["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None and len(lp["tokens"]) == len(ids)
    assert "".join(lp["tokens"]) == choice["text"] and lp["text_offset"][-1] == len(choice["text"]) - len(lp["tokens"][-1])
    model = AutoModelForCausalLM.from_pretrained(server["model_dir"]).eval()  # the reference: plain transformers
    lorakit.load_adapter(model, server["adapters"] / "a1", adapter="a1")
    with torch.inference_mode():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].float(), -1)
    chosen = expected.gather(1, torch.tensor(ids[1:]).unsqueeze(1))[:, 0]
    torch.testing.assert_close(torch.tensor(lp["token_logprobs"][1:]), chosen, rtol=1e-4, atol=1e-4)
    top = [max(t, key=t.get) for t in lp["top_logprobs"][1:]]
    assert top == [server["tokenizer"].decode([i]) for i in expected.argmax(-1).tolist()]
    # with max_tokens: the prompt, then the answer, whose part equals the answer without echo
    plain = _ok(client.post("/v1/completions", json={"model": "a1", "prompt": ids, "max_tokens": 5, "logprobs": 1,
                                                     "temperature": 0}))["choices"][0]
    echoed = _ok(client.post("/v1/completions", json={"model": "a1", "prompt": ids, "max_tokens": 5, "logprobs": 1,
                                                      "temperature": 0, "echo": True}))["choices"][0]
    assert echoed["text"] == choice["text"] + plain["text"]
    assert echoed["logprobs"]["token_logprobs"][len(ids):] == plain["logprobs"]["token_logprobs"]
    assert echoed["logprobs"]["text_offset"][len(ids):] == [o + len(choice["text"]) for o in plain["logprobs"]["text_offset"]]
    assert api_error(client.post("/v1/completions", json={"model": "a1", "prompt": "hi", "max_tokens": 0}),
                     400)["param"] == "max_tokens"
    streamed = client.post("/v1/completions", json={"model": "a1", "prompt": "hi", "echo": True, "stream": True,
                                                    "max_tokens": 2})  # streamed, prompt first (test_newuser_audit_14)
    assert streamed.status_code == 200 and streamed.text.startswith("data: ") and '"text": "hi"' in streamed.text
    assert all(a["in_use"] == 0 for a in _ok(client.get("/v1/adapters"))["data"])  # scoring released its pin


def test_lm_eval_requests(server):
    """What lm-eval's ``local-completions`` sends (its _create_payload) and how it reads the answers (its
    parse_logprobs / parse_generations): a batch of token-id prompts, echo, max_tokens 1, logprobs 1; generation
    with its stop words plus the end-of-text string (5 of them: OpenAI's limit of 4 refused them all)."""
    client, tokenizer = server["client"], server["tokenizer"]
    contexts = [tokenizer("Paris is the capital of")["input_ids"], tokenizer("The quick brown")["input_ids"]]
    continuations = [tokenizer(" France.")["input_ids"], tokenizer(" fox jumps")["input_ids"]]
    requests = [c + k for c, k in zip(contexts, continuations)]
    payload = {"model": "a0", "prompt": requests, "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234,
               "echo": True}
    out = _ok(client.post("/v1/completions", json=payload))
    scores = []
    for choice, context in zip(sorted(out["choices"], key=lambda c: c["index"]), contexts):
        token_logprobs = choice["logprobs"]["token_logprobs"][len(context):-1]
        top = choice["logprobs"]["top_logprobs"][len(context):-1]
        scores.append((sum(token_logprobs), all(t == max(d.values()) for t, d in zip(token_logprobs, top))))
    for (score, _), request, context in zip(scores, requests, contexts):  # each equals scoring it alone
        alone = _ok(client.post("/v1/completions", json={"model": "a0", "prompt": request, "echo": True,
                                                         "max_tokens": 0, "logprobs": 1}))
        assert score == pytest.approx(sum(alone["choices"][0]["logprobs"]["token_logprobs"][len(context):]), abs=1e-4)
    stop = ["Question:", "</s>", "<|im_end|>", "\n\n", "<|endoftext|>"]
    generated = _ok(client.post("/v1/completions", json={"model": "a0", "prompt": ["Q: 2+2?", "Q: 3+3?"],
                                                         "max_tokens": 8, "temperature": 0, "stop": stop, "seed": 1234}))
    assert [c["index"] for c in generated["choices"]] == [0, 1]
    assert api_error(client.post("/v1/completions", json={"model": "a0", "prompt": "x", "stop": ["s"] * 17}),
                     400)["param"] == "stop"


def test_batch_of_prompts(server):
    """A list of prompts in one completions request (the openai package takes one; lm-eval sends its batches so).
    Choice p * n + i is prompt p's answer i, each as if sent alone. Before the fix: 400 'only one prompt'."""
    client = server["client"]
    prompts = ["Hello", [5, 6, 7], "Paris is"]
    alone = [_ok(client.post("/v1/completions", json={"model": "a2", "prompt": prompt, "max_tokens": 6,
                                                      "temperature": 0.9, "seed": 4 + i}))
             for prompt in prompts for i in range(2)]
    body = {"model": "a2", "prompt": prompts, "max_tokens": 6, "temperature": 0.9, "seed": 4, "n": 2}
    batch = _ok(client.post("/v1/completions", json=body))
    assert [c["index"] for c in batch["choices"]] == list(range(6))
    assert [c["text"] for c in batch["choices"]] == [a["choices"][0]["text"] for a in alone]
    assert batch["usage"]["prompt_tokens"] == sum(a["usage"]["prompt_tokens"] for a in alone[::2])
    assert batch["usage"]["completion_tokens"] == sum(a["usage"]["completion_tokens"] for a in alone)
    events = _sse(client, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    for index in range(6):
        assert "".join(c["text"] for e in events for c in e["choices"] if c["index"] == index) == alone[index]["choices"][0]["text"]
    scored = _ok(client.post("/v1/completions", json={"model": "a2", "prompt": prompts[:2], "echo": True,
                                                      "max_tokens": 0, "logprobs": 0}))
    assert [c["text"] for c in scored["choices"]] == ["Hello", server["tokenizer"].decode([5, 6, 7])]
    assert [len(c["logprobs"]["tokens"]) for c in scored["choices"]] == [a["usage"]["prompt_tokens"] for a in alone[:3:2]]
    error = api_error(client.post("/v1/completions", json={"model": "a2", "prompt": ["hi"] * 9, "n": 16}), 400)
    assert error["param"] == "n" and "144 answers, over the limit of 128" in error["message"], error
    error = api_error(client.post("/v1/completions", json={"model": "a2", "prompt": ["hi", [1] * 300]}), 400)
    assert error["message"].startswith("prompt 1 of the batch has 300 tokens"), error
    assert all(a["in_use"] == 0 for a in _ok(client.get("/v1/adapters"))["data"])


def test_score_in_slices_equals_one_forward(monkeypatch):
    """A prompt longer than ``SCORE_LOGITS`` allows is scored a slice of positions per forward: the same numbers."""
    from conftest import tiny_llama

    import lorakit
    from lorakit.serve import engine as engine_module
    from lorakit.serve.engine import Engine

    model = tiny_llama(seed=3)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="x")
    with torch.no_grad():
        for name, parameter in lorakit.lora_parameters(model, "x"):
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.2)
    engine = Engine(model.eval(), threading.RLock(), max_batch=2)
    try:
        prompt = [3, 17, 5, 9, 22, 1, 8, 30, 2, 11, 4]
        whole = engine.score(prompt, "x", 3)
        monkeypatch.setattr(engine_module, "SCORE_LOGITS", 4 * model.get_output_embeddings().weight.shape[0])
        sliced = engine.score(prompt, "x", 3)  # 4 positions per forward: 3 forwards
        base = engine.score(prompt, None, 3)
    finally:
        engine.close()
    assert whole[0] is None and sliced[0] is None and len(whole) == len(prompt)
    for a, b in zip(whole[1:], sliced[1:]):
        assert abs(a.logprob - b.logprob) < 1e-5 and [i for i, _ in a.top] == [i for i, _ in b.top]
    assert any(abs(a.logprob - c.logprob) > 1e-3 for a, c in zip(whole[1:], base[1:]))  # the adapter was applied


# -- n choices ------------------------------------------------------------------------------------------------------
def test_n_choices(server):
    """``n`` > 1 (OpenAI's several choices; LangChain's ``n``). Before the fix: 400 'only n=1 is supported'.
    Choice i samples with seed + i, so choice 0 is the n=1 answer."""
    client = server["client"]
    body = {"model": "a2", "prompt": "Paris is", "max_tokens": 10, "temperature": 1.0, "seed": 5}
    alone = [_ok(client.post("/v1/completions", json={**body, "seed": 5 + i}))["choices"][0]["text"] for i in range(3)]
    assert len(set(alone)) > 1  # the seeds really give different samples
    answer = _ok(client.post("/v1/completions", json={**body, "n": 3, "logprobs": 1}))
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2]
    assert [c["text"] for c in answer["choices"]] == alone
    assert all(len(c["logprobs"]["tokens"]) == 10 for c in answer["choices"])
    assert answer["usage"] == {"prompt_tokens": answer["usage"]["prompt_tokens"], "completion_tokens": 30,
                               "total_tokens": answer["usage"]["prompt_tokens"] + 30}
    chat = {"model": "a1", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 7, "temperature": 0.8,
            "seed": 9, "n": 2}
    whole = _ok(client.post("/v1/chat/completions", json=chat))
    events = _sse(client, "/v1/chat/completions", {**chat, "stream_options": {"include_usage": True}})
    for index in range(2):
        deltas = [c["delta"] for e in events for c in e["choices"] if c["index"] == index]
        assert deltas[0] == {"role": "assistant", "content": ""}
        assert "".join(d.get("content") or "" for d in deltas) == whole["choices"][index]["message"]["content"]
    assert events[-1]["usage"] == whole["usage"] and whole["usage"]["completion_tokens"] == 14
    api_error(client.post("/v1/completions", json={**body, "n": 17}), 400)
    # every choice released its share of the adapter's pin, exactly once
    assert all(a["in_use"] == 0 for a in _ok(client.get("/v1/adapters"))["data"])
    assert _ok(client.post("/v1/adapters/unload", json={"name": "a2"}))["loaded"] is False


def test_n_choices_client_leaves(server):
    client = server["client"]
    body = json.dumps({"model": "a0", "prompt": "x", "max_tokens": 200, "temperature": 0.5, "n": 3, "stream": True})
    sock = _raw(server["url"], b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: %d\r\n\r\n" % len(body) + body.encode())
    steps = _ok(client.get("/health"))["steps"]
    sock.recv(1)
    sock.close()
    def busy() -> bool:  # rows leave the batch a moment before their pins are released: wait for both
        return _ok(client.get("/health"))["running"] > 0 or any(a["in_use"] for a in _ok(client.get("/v1/adapters"))["data"])

    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and busy():
        time.sleep(0.05)
    assert not busy()  # all three rows stopped, long before their 200 tokens
    # rows run to the end take 200 steps; noticing the closed socket took up to 101 on a loaded 2-core CI machine
    assert _ok(client.get("/health"))["steps"] - steps < 170
    assert _ok(client.post("/v1/adapters/unload", json={"name": "a0"}))["loaded"] is False  # and the pin is free


def test_folders_no_client_can_name_are_reported_at_start(server):
    models = [m["id"] for m in _ok(server["client"].get("/v1/models"))["data"]]
    assert "my adapter" not in models
    log = server["server"].log.read_text()  # the whole log: output() is its tail
    assert "folder 'my adapter'" in log and "not allowed" in log


# -- broken HTTP clients -------------------------------------------------------------------------------------------
def test_client_leaving_mid_body_is_no_server_error(server):
    """Before the fix: Starlette's ClientDisconnect became an 'internal error' with a traceback in the log."""
    sock = _raw(server["url"], b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 100\r\n\r\n{\"model\": ")
    time.sleep(0.2)
    sock.close()
    time.sleep(0.5)
    assert "Traceback" not in server["server"].output() and "ClientDisconnect" not in server["server"].output()
    assert _text(server["client"]) == _text(server["client"])


def test_body_shorter_than_content_length_gets_408(server):
    """A client whose Content-Length promises more than it sends. Before the fix: the connection hung forever."""
    sock = _raw(server["url"], b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                               b"Content-Length: 100\r\n\r\n{\"model\": ")
    sock.settimeout(10)
    start, reply = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):  # the server answers, then closes the connection
            reply += chunk
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408") and time.monotonic() - start < 5, reply[:200]
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["code"] == "request_timeout" and "Content-Length" in error["message"]


def test_compressed_body_is_415(server):
    """Before the fix: 400 "malformed JSON body: 'utf-8' codec can't decode byte 0x8b", which hides the cause."""
    import gzip

    body = gzip.compress(json.dumps({"model": "a0", "prompt": "hi", "max_tokens": 2}).encode())
    response = server["client"].post("/v1/completions", content=body, headers={"Content-Encoding": "gzip"})
    assert api_error(response, 415)["code"] == "unsupported_encoding"


def _preflight(client, origin: str) -> httpx.Response:
    return client.options("/v1/chat/completions", headers={
        "Origin": origin, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})


@pytest.mark.parametrize("origins", [(), ("http://ui.example",)])
def test_browser_clients(origins):
    """A chat page in a browser sends a CORS preflight (OPTIONS, no API key) first. Before the fix: a bare 405 (or a
    401 with --api-key) with no hint, and no way to allow the page."""
    from starlette.testclient import TestClient

    from lorakit.serve.app import ServerState, create_app

    state = ServerState(model=None, tokenizer=None, base_name="base", pool=None, engine=None, stop_token_ids=(),
                        context_length=8, max_prompt_tokens=8, max_new_tokens=8, api_key="key", cors_origins=origins)
    with TestClient(create_app(state)) as client:
        if not origins:
            assert "--cors-origin" in api_error(_preflight(client, "http://ui.example"), 405)["message"]
            return
        allowed = _preflight(client, "http://ui.example")
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://ui.example"
        assert api_error(_preflight(client, "http://evil.example"), 400)["code"] == "cors_refused"
        refused = client.get("/v1/models", headers={"Origin": "http://ui.example"})  # no key: still refused
        assert api_error(refused, 401) and refused.headers["access-control-allow-origin"] == "http://ui.example"


def test_cors_origin_flag(server):
    response = _preflight(server["client"], "http://ui.example")
    assert response.status_code == 200 and response.headers["access-control-allow-origin"] == "http://ui.example"
    answer = server["client"].get("/v1/models", headers={"Origin": "http://ui.example"})
    assert answer.status_code == 200 and answer.headers["access-control-allow-origin"] == "http://ui.example"


def test_no_tracebacks_and_still_serving(server):
    assert _text(server["client"], "a2") == _text(server["client"], "a2")
    assert "Traceback" not in server["server"].output(), server["server"].output()


def test_chat_template_kwargs(tmp_path):
    """vLLM's ``chat_template_kwargs`` (Qwen3: {"enable_thinking": false}) reaches the chat template; before, the
    request was refused as an unknown field. Bad options are a 400 naming the field."""
    from transformers import AutoTokenizer

    model_dir = tiny_hf_folder(tmp_path / "model")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.chat_template = tokenizer.chat_template + (  # Qwen3's way: an empty think block closes the prompt
        "{%- if add_generation_prompt and enable_thinking is defined and not enable_thinking %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}")
    tokenizer.save_pretrained(model_dir)
    (tmp_path / "adapters").mkdir()
    server = ServerProcess(model_dir, tmp_path / "adapters")
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            def prompt_tokens(**extra):
                body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, **extra}
                return _ok(client.post("/v1/chat/completions", json=body))["usage"]["prompt_tokens"]

            plain = prompt_tokens()
            assert prompt_tokens(chat_template_kwargs={"enable_thinking": False}) > plain
            assert prompt_tokens(chat_template_kwargs={"enable_thinking": True}) == plain == prompt_tokens(
                chat_template_kwargs=None)
            body = {"model": "base", "messages": [{"role": "user", "content": "Hi"}]}
            for options, words in (({"add_generation_prompt": False}, "is a field of the request"),
                                   ({"not a name": 1}, "is not an option name"), ("yes", "valid dictionary"),
                                   ({f"k{i}": i for i in range(40)}, "over 32 options")):
                error = api_error(client.post("/v1/chat/completions", json={**body, "chat_template_kwargs": options}),
                                  400)
                assert words in error["message"] and "chat_template_kwargs" in (error["param"] or ""), error
    finally:
        server.stop()
