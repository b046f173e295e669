"""``lorakit serve`` audited as a demanding user and a hostile client would use it (audit 13), over a real socket:
the ``openai`` package and raw ``http.client`` requests against one server of a tiny random Llama, two adapters
saved by lorakit and one saved by peft. Each test named after a defect failed before its fix; every test checks
that the server still answers correctly afterwards.
"""

from __future__ import annotations

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import peft
import pytest
import torch

from http_helpers import api_error
from test_serve_support import ServerProcess, make_adapter, never_ending, tiny_hf_folder, wait_idle

LONG = 2000  # tokens of a generation that runs for seconds on the test machine


def _peft_adapter(model_dir: Path, folder: Path, seed: int) -> None:
    """peft's LoRA on q_proj and v_proj with random non-zero B, saved as peft saves it."""
    from transformers import AutoModelForCausalLM

    theirs = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                                 peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_B" in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    theirs.save_pretrained(folder)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit13_serve")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.5, max_position_embeddings=LONG + 64)
    base = never_ending(model_dir)
    adapters = root / "adapters"
    make_adapter(base, adapters / "orders", seed=3)
    make_adapter(base, adapters / "support-v2", seed=4)
    _peft_adapter(model_dir, adapters / "peft-qv", seed=5)
    make_adapter(base, root / "spare", seed=6)  # copied in and out of the adapters folder by the tests
    process = ServerProcess(model_dir, adapters, "--max-tokens", str(LONG), log=root / "server.log")
    client = httpx.Client(base_url=process.url, timeout=60)
    try:
        yield {"url": process.url, "client": client, "process": process, "root": root, "adapters": adapters}
    finally:
        client.close()
        process.stop()


def _sdk(server):
    import openai

    return openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)


def _text(client, model: str, prompt: str = "Hello", max_tokens: int = 8) -> str:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                    "temperature": 0})
    assert response.status_code == 200, response.text[:500]
    return response.json()["choices"][0]["text"]


# -- model names -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sent, meant", [
    ("order", "orders"), ("Orders", "orders"), ("support_v2", "support-v2"), ("peft_qv", "peft-qv"),
    ("org/base", "base"), ("../orders", "orders"), ("BASE", "base"), ("..%2F..%2Fpeft-qv", "peft-qv"),
])
def test_a_misspelt_model_name_gets_a_did_you_mean(server, sent, meant):
    """A misspelt model (a typo, the wrong case, a Hugging Face id "org/name", a path) was answered "no adapter
    named 'order' in the adapters folder" (or "adapter name ... is not allowed"), naming neither the model meant nor
    where the names are listed. Now the nearest served name is suggested, on every route that takes a name."""
    import openai

    sdk = _sdk(server)
    with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as caught:
        sdk.chat.completions.create(model=sent, messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    assert f"did you mean {meant!r}?" in caught.value.message, caught.value.message
    client = server["client"]
    for response in (client.post("/v1/completions", json={"model": sent, "prompt": "hi", "max_tokens": 2}),
                     client.post("/v1/responses", json={"model": sent, "input": "hi", "max_output_tokens": 16})):
        error = api_error(response, 400 if "/" in sent or "%" in sent else 404)
        assert f"did you mean {meant!r}?" in error["message"] and error["param"] == "model", error
    if "/" not in sent and "%" not in sent:  # a slash in the path is a sub-path of the route, not this name
        error = api_error(client.get(f"/v1/models/{sent}"), 404)
        assert f"did you mean {meant!r}?" in error["message"], error
    if meant != "base":  # the base is no adapter to load
        status = 400 if "/" in sent or "%" in sent else 404
        error = api_error(client.post("/v1/adapters/load", json={"name": sent}), status)
        assert f"did you mean {meant!r}?" in error["message"] and error["param"] == "name", error


def test_a_name_like_no_model_says_where_the_names_are(server):
    """"gpt-4o-mini" (a client's default model) is like none of the served names: the 404 says where they are."""
    import openai

    with pytest.raises(openai.NotFoundError) as caught:
        _sdk(server).completions.create(model="gpt-4o-mini", prompt="hi", max_tokens=2)
    assert caught.value.code == "model_not_found" and caught.value.status_code == 404
    assert "did you mean" not in caught.value.message and "GET /v1/models" in caught.value.message
    assert _text(server["client"], "orders")


# -- adapter folders that change while served ---------------------------------------------------------------------
def test_an_adapter_removed_from_disk_is_no_longer_served(server):
    """An adapter folder deleted while its adapter was in memory: /v1/models and GET /v1/models/NAME said it no
    longer existed, yet requests naming it were served from memory, indefinitely (and POST /v1/adapters/load said
    404 while leaving it loaded). A request in flight when the folder goes finishes; later ones are 404s that say
    the folder was removed, and its memory is freed. Put back, the folder's current files are what serves."""
    client, adapters = server["client"], server["adapters"]
    shutil.copytree(server["root"] / "spare", adapters / "temp")
    try:
        answer = _text(client, "temp")
        with httpx.Client(base_url=server["url"], timeout=60) as own, own.stream(
                "POST", "/v1/completions", json={"model": "temp", "prompt": "x", "max_tokens": 40, "temperature": 0,
                                                 "stream": True}) as streaming:
            lines = streaming.iter_lines()
            next(lines)  # generating on "temp"
            shutil.rmtree(adapters / "temp")
            events = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
            assert events[-1]["choices"][0]["finish_reason"] == "length"  # the request in flight finished
        assert "temp" not in [m["id"] for m in client.get("/v1/models").json()["data"]]
        body = {"model": "temp", "prompt": "Hello", "max_tokens": 8, "temperature": 0}
        error = api_error(client.post("/v1/completions", json=body), 404)
        assert error["code"] == "model_not_found" and error["message"] == (
            "no adapter named 'temp' in the adapters folder: its folder was removed while it was loaded, so it is "
            "unloaded; put the folder back to serve it again"), error
        assert "temp" not in [a["name"] for a in client.get("/v1/adapters").json()["data"]]  # its memory is freed
        for response in (client.post("/v1/completions", json=body),
                         client.post("/v1/adapters/load", json={"name": "temp"})):
            assert "no adapter named 'temp'" in api_error(response, 404)["message"]
        # another adapter's files under the same name: those are served, not the old copy
        shutil.copytree(adapters / "orders", adapters / "temp")
        assert _text(client, "temp") == _text(client, "orders") != answer
    finally:
        shutil.rmtree(adapters / "temp", ignore_errors=True)
    assert wait_idle(client, 5.0)
    assert _text(client, "support-v2")


def test_load_of_a_removed_adapter_unloads_it(server):
    """POST /v1/adapters/load of an adapter whose folder was removed answered 404 and kept it in memory."""
    client, adapters = server["client"], server["adapters"]
    shutil.copytree(server["root"] / "spare", adapters / "temp2")
    try:
        assert client.post("/v1/adapters/load", json={"name": "temp2"}).status_code == 200
        shutil.rmtree(adapters / "temp2")
        error = api_error(client.post("/v1/adapters/load", json={"name": "temp2"}), 404)
        assert "removed" in error["message"], error
        assert "temp2" not in [a["name"] for a in client.get("/v1/adapters").json()["data"]]
    finally:
        shutil.rmtree(adapters / "temp2", ignore_errors=True)


# -- requests that wait: for a batch row, for room to load their adapter ---------------------------------------
def _raw_stream(url: str, body: dict, stream: bool = True):
    """A (streaming) completion sent on a bare socket, so the test decides when the client goes."""
    import socket

    host, port = url.rsplit("/", 1)[-1].split(":")
    sock = socket.create_connection((host, int(port)))
    data = json.dumps({**body, "stream": stream}).encode()
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data)
    return sock


@pytest.fixture(scope="module")
def small(server):
    """A second server on the same folders with two batch rows and room for one adapter in memory."""
    root = server["root"]
    process = ServerProcess(root / "model", server["adapters"], "--max-tokens", str(LONG), "--max-batch", "2",
                            "--max-loaded", "1", log=root / "server_small.log")
    client = httpx.Client(base_url=process.url, timeout=60)
    try:
        yield {"url": process.url, "client": client, "log": root / "server_small.log"}
    finally:
        client.close()
        process.stop()


def _wait_for(client, key: str, value: int, seconds: float) -> dict:
    deadline = time.monotonic() + seconds
    while (health := client.get("/health").json())[key] != value and time.monotonic() < deadline:
        time.sleep(0.05)
    return health


def _long(url: str, model: str):
    sock = _raw_stream(url, {"model": model, "prompt": "x", "max_tokens": LONG, "temperature": 0})
    sock.recv(1)  # generating
    return sock


def test_a_queued_request_whose_client_left_frees_its_adapter_at_once(server, small):
    """With every row of the batch busy, a request waits in the engine's queue. Its client leaving marked it
    cancelled, but it stayed queued, its adapter pinned ("serving N request(s)" to an unload, never evicted) and
    counted in /health's waiting, until a row came free (a long generation's whole run). Now it leaves the queue
    at the next step."""
    client = small["client"]
    runners = [_long(small["url"], "orders"), _long(small["url"], "base")]  # both rows taken
    try:
        queued = [_raw_stream(small["url"], {"model": "orders", "prompt": "x", "max_tokens": 4, "temperature": 0},
                              stream) for stream in (True, False)]
        assert _wait_for(client, "waiting", 2, 10)["waiting"] == 2
        assert client.get("/v1/adapters").json()["data"][0]["in_use"] == 3
        for sock in queued:
            sock.close()
        health = _wait_for(client, "waiting", 0, 3)
        assert health["waiting"] == 0 and health["running"] == 2, health  # the long ones still run
        # a request leaves the queue a moment before its pin is released (on a loaded CI machine, after the check)
        deadline = time.monotonic() + 3
        while (in_use := client.get("/v1/adapters").json()["data"][0]["in_use"]) != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_use == 1
        assert client.get("/health").json()["running"] == 2  # freed while the long ones still run
    finally:
        for sock in runners:
            sock.close()
    assert wait_idle(client, 5.0)
    assert _text(client, "orders") == _text(server["client"], "orders")


def test_requests_waiting_for_an_adapter_slot_do_not_stall_the_others(server, small):
    """With --max-loaded 1 and its adapter busy, a request for another adapter waits (up to a minute) for room to
    load it, and it waited on one of the server's worker threads: forty such requests held them all, and every
    other request (the base model's, one on the loaded adapter) waited for a thread to tokenize its prompt, until
    the busy adapter's generation ended. Now they wait apart, and the others are served at once."""
    client = small["client"]
    runner = _long(small["url"], "orders")  # the one slot, pinned
    try:
        waiting = [_raw_stream(small["url"], {"model": "support-v2", "prompt": "x", "max_tokens": 2,
                                              "temperature": 0}, stream=False) for _ in range(45)]
        time.sleep(0.5)  # all of them in the pool, waiting for room
        for model in ("base", "orders"):
            start = time.monotonic()
            answer = _text(client, model)
            assert time.monotonic() - start < 2.0, model
            assert answer == _text(server["client"], model)
        assert client.get("/health").json()["running"] == 1
        for sock in waiting:
            sock.close()
    finally:
        runner.close()
    assert wait_idle(client, 10.0)
    deadline = time.monotonic() + 10  # the waiters left: each one's pin, taken once there was room, is given back
    while any(a["in_use"] for a in client.get("/v1/adapters").json()["data"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(a["in_use"] == 0 for a in client.get("/v1/adapters").json()["data"])
    assert _text(client, "support-v2") == _text(server["client"], "support-v2")
    assert "Traceback" not in small["log"].read_text()


def test_clients_that_left_while_waiting_for_an_adapter_slot_load_nothing(server, small):
    """A request waiting for room to load its adapter went on waiting after its client left, up to a minute, then
    loaded the adapter (evicting one in use a moment before) for an answer nobody would read. Now it stops
    waiting when its client goes."""
    client = small["client"]
    assert client.post("/v1/adapters/load", json={"name": "orders"}).status_code == 200
    runner = _long(small["url"], "orders")  # the one slot, pinned
    try:
        ghosts = [_raw_stream(small["url"], {"model": name, "prompt": "x", "max_tokens": 2, "temperature": 0},
                              stream=i % 2 == 0) for i, name in enumerate(["support-v2", "peft-qv"] * 4)]
        time.sleep(0.5)  # all waiting for room
        for sock in ghosts:
            sock.close()
        time.sleep(1.0)
    finally:
        runner.close()
    assert wait_idle(client, 5.0)
    time.sleep(1.0)  # a waiter that outlived its client would load its adapter now
    assert [a["name"] for a in client.get("/v1/adapters").json()["data"]] == ["orders"]
    assert _text(client, "peft-qv") == _text(server["client"], "peft-qv")  # a live client still gets its adapter


def test_refusals_do_not_show_the_servers_folders(server):
    """A broken adapter's refusal went to the client with the server's absolute paths in it ("/srv/.../adapters/
    half/adapter_model.safetensors not found"), showing any client how the machine's disk is laid out. Paths are
    now given inside the adapters folder; the name hint is given only for names, not for a refused link."""
    import os

    client, adapters = server["client"], server["adapters"]
    (adapters / "half").mkdir()
    shutil.copy(adapters / "orders" / "adapter_config.json", adapters / "half")
    (adapters / "nest" / "nest").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(adapters / "orders" / name, adapters / "nest" / "nest")
    os.symlink(server["root"] / "spare", adapters / "outside")
    try:
        for name, words in (("half", "half/adapter_model.safetensors not found"),
                            ("nest", "move the files of nest/nest up into nest")):
            for response in (client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2}),
                             client.post("/v1/adapters/load", json={"name": name})):
                error = api_error(response, 400)
                assert words in error["message"] and str(server["root"]) not in error["message"], error
                assert error["message"].count(str(adapters)) == 0 and "/tmp" not in error["message"], error
        error = api_error(client.post("/v1/completions", json={"model": "outside", "prompt": "hi"}), 400)
        assert error["message"] == "adapter 'outside' is a link that leaves the adapters folder; refused", error
    finally:
        shutil.rmtree(adapters / "half")
        shutil.rmtree(adapters / "nest")
        os.unlink(adapters / "outside")
    assert _text(client, "orders")


# -- OpenAI chat fields ------------------------------------------------------------------------------------------
def test_openai_chat_fields_are_accepted_or_refused_by_name(server):
    """OpenAI's chat fields that clients and agent frameworks send (metadata, service_tier, prediction, a null
    audio, the legacy function_call "none") were 400 "unknown field 'metadata'", as if they were typos, though
    /v1/responses takes its own metadata and service_tier. Those that change nothing here are taken; the controls
    this server cannot honour (verbosity, web search, audio output, a forced legacy function call, a
    reasoning_effort OpenAI does not define: its efforts reach the chat template since session 16) are refused by
    name, saying why."""
    import openai

    sdk = _sdk(server)
    messages = [{"role": "user", "content": "Hello"}]
    plain = sdk.chat.completions.create(model="peft-qv", messages=messages, max_tokens=6, temperature=0)
    taken = {"metadata": {"run": "audit-13", "user": "u1"}, "service_tier": "auto", "prompt_cache_retention": "24h",
             "prediction": {"type": "content", "content": "Hello there"}, "audio": None,
             "reasoning_effort": None, "verbosity": "medium", "web_search_options": None}
    same = sdk.chat.completions.create(model="peft-qv", messages=messages, max_tokens=6, temperature=0, **taken)
    assert same.choices[0].message.content == plain.choices[0].message.content
    legacy = sdk.chat.completions.create(model="peft-qv", messages=messages, max_tokens=6, temperature=0,
                                         extra_body={"function_call": "none", "functions": []})
    assert legacy.choices[0].message.content == plain.choices[0].message.content
    refused = [("reasoning_effort", "extreme"), ("verbosity", "low"), ("web_search_options", {}),
               ("audio", {"voice": "alloy", "format": "wav"}), ("metadata", {f"k{i}": "v" for i in range(17)}),
               ("service_tier", "fastest")]
    for field, value in refused:
        with pytest.raises(openai.BadRequestError) as caught:
            sdk.chat.completions.create(model="peft-qv", messages=messages, max_tokens=6, **{field: value})
        assert caught.value.body["param"] == field, (field, caught.value.body)
        assert "unknown field" not in caught.value.message, caught.value.message
    error = api_error(server["client"].post("/v1/chat/completions", json={
        "model": "peft-qv", "messages": messages, "function_call": {"name": "f"}}), 400)
    assert error["param"] == "function_call" and "tools" in error["message"], error


# -- many clients at once ------------------------------------------------------------------------------------------
def test_sdk_clients_mixing_lorakit_and_peft_adapters_get_their_answers_alone(server):
    """Twenty-four openai-package clients at once over the base, two lorakit adapters and a peft one: chat with
    n=2 and a seed, greedy completions with logprobs, seeded streams with include_usage. Each answer equals the same
    request sent alone (the log-probabilities to float32 rounding: a batch's shape changes the matmuls' order)."""
    sdk = _sdk(server)
    models = ["orders", "support-v2", "peft-qv", "base"]

    def run(i: int):
        model, kind = models[i % 4], i % 3
        if kind == 0:
            reply = sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": f"q{i % 5}"}],
                                                max_tokens=8, temperature=0.9, seed=i, n=2)
            return [choice.message.content for choice in reply.choices], None
        if kind == 1:
            reply = sdk.completions.create(model=model, prompt=f"p{i % 5}", max_tokens=8, temperature=0, logprobs=2)
            return reply.choices[0].text, reply.choices[0].logprobs.token_logprobs
        chunks = list(sdk.chat.completions.create(
            model=model, messages=[{"role": "user", "content": f"s{i % 5}"}], max_tokens=8, temperature=1.0,
            top_p=0.9, seed=100 + i, stream=True, stream_options={"include_usage": True}))
        assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage.completion_tokens == 8
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), None

    alone = [run(i) for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        together = list(pool.map(run, range(24)))
    for i, ((text, logprobs), (want, want_logprobs)) in enumerate(zip(together, alone)):
        assert text == want, (i, text, want)
        if logprobs is not None:
            torch.testing.assert_close(torch.tensor(logprobs), torch.tensor(want_logprobs), rtol=0, atol=1e-4)
    assert len({str(a[0]) for a in alone}) > 12  # the adapters and seeds give different answers
    assert wait_idle(server["client"], 5.0)


# -- requests that are not HTTP ----------------------------------------------------------------------------------
@pytest.mark.parametrize("head", [
    b"GARBAGE\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1e3\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\nno colon here\r\n\r\n",
    b"GET /health HTTP/1.1\r\n\r\n",  # HTTP/1.1 without a Host header
])
def test_a_malformed_http_request_gets_the_openai_error_body(server, head):
    """A request the HTTP parser refuses was answered by uvicorn in plain text ("Invalid HTTP request received."),
    the one answer of the server that was not OpenAI's error body. Now it is one, still a 400 that closes the
    connection."""
    import socket

    host, port = server["url"].rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(head)
        raw = b""
        while chunk := sock.recv(65536):
            raw += chunk
    status, _, rest = raw.partition(b"\r\n")
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert status == b"HTTP/1.1 400 Bad Request", raw[:300]
    assert b"content-type: application/json" in headers.lower() and b"connection: close" in headers.lower()
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_http"
    assert error["message"].startswith("malformed HTTP request") and "\n" not in error["message"]
    assert _text(server["client"], "orders")


# -- structured outputs ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schema", [{"$ref": "#"}, {"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}])
def test_a_schema_no_answer_can_follow_is_the_clients_400(server, schema):
    """A schema that refers only to itself compiles, but no text can follow it: llguidance's matcher then fails
    and allows the end token alone, so the answer was "" with finish_reason "stop", which says the content
    parses and matches the schema. Now the request is a 400 that says the answer could not follow the format."""
    import openai

    sdk = _sdk(server)
    fmt = {"type": "json_schema", "json_schema": {"name": "loop", "schema": schema}}
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.BadRequestError) as caught:
        sdk.chat.completions.create(model="orders", messages=messages, max_tokens=8, response_format=fmt)
    assert caught.value.code == "invalid_response_format", caught.value.body
    assert caught.value.body["message"].startswith("the answer could not follow the format: ")
    assert "<state>" not in caught.value.message and "\n" not in caught.value.message
    with pytest.raises(openai.APIError, match="the answer could not follow the format"):
        list(sdk.chat.completions.create(model="orders", messages=messages, max_tokens=8, response_format=fmt,
                                         stream=True))
    plain = {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer"}}}
    reply = sdk.chat.completions.create(model="orders", messages=messages, max_tokens=8, response_format=plain,
                                        temperature=0)
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), int)


def test_top_p_zero_is_openais_most_likely_token(server):
    """OpenAI takes top_p from 0 to 1, and "temperature 0, top_p 0" is a common recipe for repeatable answers;
    top_p 0 was a 400 ("greater than 0"). It now keeps only the most likely token, as top_p 1e-300 already did:
    sampled at any temperature, the answer is the greedy one."""
    sdk = _sdk(server)
    greedy = sdk.completions.create(model="support-v2", prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    for temperature in (0, 0.7, 2):
        reply = sdk.completions.create(model="support-v2", prompt="Hello", max_tokens=12, temperature=temperature,
                                       top_p=0, seed=5)
        assert reply.choices[0].text == greedy, temperature
    chat = sdk.chat.completions.create(model="support-v2", messages=[{"role": "user", "content": "Hello"}],
                                       max_tokens=6, temperature=1, top_p=0)
    assert chat.choices[0].message.content == sdk.chat.completions.create(
        model="support-v2", messages=[{"role": "user", "content": "Hello"}], max_tokens=6,
        temperature=0).choices[0].message.content
    reply = sdk.responses.create(model="support-v2", input="Hello", max_output_tokens=16, temperature=1, top_p=0)
    assert reply.output_text == sdk.responses.create(model="support-v2", input="Hello", max_output_tokens=16,
                                                     temperature=0).output_text
    error = api_error(server["client"].post("/v1/completions", json={"model": "support-v2", "prompt": "hi",
                                                                     "top_p": -0.1}), 400)
    assert error["param"] == "top_p"


def test_unload_of_a_misspelt_name_suggests_a_loaded_adapter(server):
    """POST /v1/adapters/unload {"name": "Orders"} said only "adapter 'Orders' is not loaded"."""
    client = server["client"]
    assert client.post("/v1/adapters/load", json={"name": "orders"}).status_code == 200
    error = api_error(client.post("/v1/adapters/unload", json={"name": "Orders"}), 404)
    assert error["message"] == "adapter 'Orders' is not loaded; did you mean 'orders'?", error
    error = api_error(client.post("/v1/adapters/unload", json={"name": "gpt-4o"}), 404)
    assert error["message"] == "adapter 'gpt-4o' is not loaded; GET /v1/adapters lists those loaded", error
    assert "orders" in [a["name"] for a in client.get("/v1/adapters").json()["data"]]


def test_the_name_hint_costs_little_for_a_huge_name():
    """The hint runs on the server's event loop: a model name of a megabyte (the body limit) against a folder of
    2,000 adapters lowercased the whole name once per adapter, gigabytes of work while every other request waited."""
    from lorakit.serve.paths import closest

    names = [f"adapter-{i:04d}" for i in range(2000)]
    start = time.perf_counter()
    assert closest("x" * (1 << 20), names) is None
    assert closest("y" * (1 << 20) + "/Adapter-0042", names) == "adapter-0042"
    assert time.perf_counter() - start < 0.5


def test_listing_adapters_while_one_is_admitted_does_not_stall_the_server(server):
    """While an adapter is admitted (its regular expressions tried for up to 2 s, its file read), the pool is
    locked. GET /v1/models, GET /v1/models/NAME and GET /v1/adapters asked the pool on the server's event loop, so
    each of them froze the whole server (every request, /health and other clients' streams) until the admission
    ended. Now they ask from a worker thread."""
    import threading

    client, adapters = server["client"], server["adapters"]
    shutil.copytree(adapters / "orders", adapters / "slowregex")
    config = json.loads((adapters / "slowregex" / "adapter_config.json").read_text())
    (adapters / "slowregex" / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": r"(.*.*)*xyz"}))  # tried in a child process for 2 s, then refused
    latencies: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        with httpx.Client(base_url=server["url"], timeout=30) as own:
            while not stop.is_set():
                start = time.monotonic()
                own.get("/health")
                latencies.append(time.monotonic() - start)
                time.sleep(0.02)

    def admit() -> None:
        with httpx.Client(base_url=server["url"], timeout=30) as own:
            assert own.post("/v1/adapters/load", json={"name": "slowregex"}).status_code == 400

    threads = [threading.Thread(target=probe), threading.Thread(target=admit)]
    try:
        threads[0].start()
        time.sleep(0.2)
        threads[1].start()
        time.sleep(0.3)  # the admission holds the pool now
        for path in ("/v1/models", "/v1/adapters", "/v1/models/orders"):
            assert client.get(path).status_code == 200
        threads[1].join()
    finally:
        stop.set()
        for thread in threads:
            thread.join()
        shutil.rmtree(adapters / "slowregex")
    assert max(latencies) < 0.5, max(latencies)


def test_no_tracebacks_in_the_server_logs(server):
    """Every client mistake above was answered in one line: none left a traceback in the server's log."""
    for log in server["root"].glob("server*.log"):
        assert "Traceback" not in log.read_text(errors="replace"), log


def test_an_adapter_admission_does_not_stall_decoding(server):
    """A request that finishes unpins its adapter from the engine's thread, and an adapter's admission (up to 2 s of
    regex checks, its file read) held the pool's lock: every stream of the server stopped until the admission
    ended whenever a request finished meanwhile. The admission's checks now run without the lock."""
    import threading

    client, adapters = server["client"], server["adapters"]
    shutil.copytree(adapters / "orders", adapters / "slowregex2")
    config = json.loads((adapters / "slowregex2" / "adapter_config.json").read_text())
    (adapters / "slowregex2" / "adapter_config.json").write_text(
        json.dumps({**config, "target_modules": r"(.*.*)*xyz"}))
    gaps: list[float] = []

    def admit() -> None:
        with httpx.Client(base_url=server["url"], timeout=30) as own:
            assert own.post("/v1/adapters/load", json={"name": "slowregex2"}).status_code == 400

    admission = threading.Thread(target=admit)
    try:
        with httpx.Client(base_url=server["url"], timeout=60) as own, own.stream(
                "POST", "/v1/completions", json={"model": "support-v2", "prompt": "x", "max_tokens": LONG,
                                                 "temperature": 0, "stream": True}) as streaming:
            lines = streaming.iter_lines()
            next(lines)
            # a request on "orders" runs into the admission and finishes during it, unpinning from the engine's
            # thread; another one starts during it
            short = threading.Thread(target=lambda: gaps.append(float(bool(_text(client, "orders", max_tokens=150)))))
            short.start()
            time.sleep(0.1)
            admission.start()
            later = threading.Timer(0.3, lambda: gaps.append(float(bool(_text(client, "orders", max_tokens=2)))))
            later.start()
            last = time.monotonic()
            for line in lines:
                now = time.monotonic()
                gaps.append(now - last)
                last = now
                if not admission.is_alive():
                    break
    finally:
        admission.join()
        short.join()
        later.join()
        shutil.rmtree(adapters / "slowregex2")
    assert gaps.count(1.0) == 2  # both requests were answered (their markers among the gaps)
    gaps = [gap for gap in gaps if gap != 1.0]
    assert len(gaps) > 10 and max(gaps) < 0.5, max(gaps)
    assert wait_idle(client, 5.0)
