"""``lorakit serve`` audited as a demanding client (audit 14), over a real socket: adapter loads that read slowly
(the files are read without the pool's lock; one read for many requests naming one adapter; a failed load leaves
nothing in the model), then OpenAI protocol corners the earlier audits did not cover. One server of a tiny random
Llama; its reads of adapter folders named ``slow*`` take ``SLOW_READ_S`` (a ``sitecustomize`` hook on the
server's PYTHONPATH wraps ``lorakit.io.read_adapter`` and logs each read), as from a slow network disk, and so
does each look at the folder of a loaded adapter named ``nfs*``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

import lorakit
from lorakit.serve.pool import AdapterPool
from conftest import tiny_llama
from http_helpers import sse_events
from test_serve_support import ServerProcess, make_adapter, tiny_hf_folder, wait_idle

SLOW_READ_S = 1.5

_HOOK = '''
import os, time
import lorakit.io as io

_real = io.read_adapter


def read_adapter(folder, *args, **kwargs):
    name = os.path.basename(os.fspath(folder))
    with open(os.environ["AUDIT14_READS"], "a") as log:
        log.write(name + "\\n")
    if name.startswith("slow"):
        time.sleep(float(os.environ["AUDIT14_SLOW_S"]))
    return _real(folder, *args, **kwargs)


io.read_adapter = read_adapter

import lorakit.serve.pool as pool

_real_listed = pool.listed_adapter


def listed_adapter(root, name):  # the look at a loaded adapter's folder that each request on it makes
    if name.startswith("nfs"):
        with open(os.environ["AUDIT14_READS"], "a") as log:
            log.write("stat:" + name + "\\n")
        time.sleep(float(os.environ["AUDIT14_SLOW_S"]))
    return _real_listed(root, name)


pool.listed_adapter = listed_adapter
'''


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("audit14_serve")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.5)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    adapters = root / "adapters"
    for seed, name in enumerate(("fast", "slow1", "slow2", "slow3", "nfs1"), start=3):
        make_adapter(base, adapters / name, seed=seed)
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(_HOOK)
    reads = root / "reads.log"
    reads.write_text("")
    path = os.pathsep.join(filter(None, [str(hooks), os.environ.get("PYTHONPATH")]))  # the hook first, not alone
    env = {"PYTHONPATH": path, "AUDIT14_READS": str(reads), "AUDIT14_SLOW_S": str(SLOW_READ_S)}
    process = ServerProcess(model_dir, adapters, "--max-loaded", "3", log=root / "server.log", env=env)
    client = httpx.Client(base_url=process.url, timeout=60)
    try:
        yield {"url": process.url, "client": client, "process": process, "reads": reads, "adapters": adapters,
               "model": model_dir}
    finally:
        client.close()
        process.stop()


def _complete(url: str, model: str, max_tokens: int = 4, **extra) -> httpx.Response:
    with httpx.Client(base_url=url, timeout=60) as own:
        return own.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": max_tokens,
                                                 "temperature": 0, **extra})


def _reads(server, name: str) -> int:
    return server["reads"].read_text().split().count(name)


def _await_first(server, name: str) -> None:
    """Wait (10 s at most) until the server's hook logged ``name`` once: its slowed read or look has begun."""
    deadline = time.monotonic() + 10
    while _reads(server, name) == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _reads(server, name) == 1


# -- part 1: slow adapter loads ----------------------------------------------------------------------------------
def test_a_slow_adapter_read_does_not_stall_the_base_or_other_adapters(server):
    """While adapter slow1's files take 1.5 s to read, requests on the base and on adapter fast (first load
    included) are answered at once; slow1's own request then answers too."""
    url = server["url"]
    assert _complete(url, "base").status_code == 200  # warm
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(_complete, url, "slow1")
        _await_first(server, "slow1")  # its read has begun
        took = {}
        for model in ("base", "fast", "fast"):
            started = time.monotonic()
            answer = _complete(url, model)
            took.setdefault(model, []).append(time.monotonic() - started)
            assert answer.status_code == 200, answer.text[:300]
        assert not slow.done()  # these were answered while slow1 was still being read
        assert max(max(t) for t in took.values()) < SLOW_READ_S / 2, took
        answer = slow.result(30)
    assert answer.status_code == 200 and answer.json()["model"] == "slow1", answer.text[:300]


def test_many_requests_naming_an_adapter_not_in_memory_read_it_once(server):
    """Six clients name slow2 at once: one reads its files, the others wait for that read and share its load (each
    read held one more copy of the tensors: forty clients on a 500 MB adapter held 20 GB). All six get the
    adapter's answer."""
    url = server["url"]
    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda _: _complete(url, "slow2"), range(6)))
    assert all(a.status_code == 200 for a in answers), [a.text[:200] for a in answers]
    assert len({a.json()["choices"][0]["text"] for a in answers}) == 1
    assert _reads(server, "slow2") == 1, server["reads"].read_text()
    loaded = [entry["name"] for entry in server["client"].get("/v1/adapters").json()["data"]]
    assert loaded.count("slow2") == 1
    assert wait_idle(server["client"], 5.0)


def test_a_request_waiting_on_anothers_load_can_leave(server):
    """A client that leaves while another request reads its adapter is released (no pin left behind), and the
    load still completes for the one that reads."""
    url = server["url"]
    with ThreadPoolExecutor(1) as pool:
        reader = pool.submit(_complete, url, "slow3")
        deadline = time.monotonic() + 10
        while _reads(server, "slow3") == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(httpx.ReadTimeout):
            with httpx.Client(base_url=url, timeout=0.3) as impatient:
                impatient.post("/v1/completions", json={"model": "slow3", "prompt": "x", "max_tokens": 2})
        assert reader.result(30).status_code == 200
    assert wait_idle(server["client"], 5.0)
    pins = {e["name"]: e["in_use"] for e in server["client"].get("/v1/adapters").json()["data"]}
    assert pins.get("slow3") == 0, pins
    assert _reads(server, "slow3") == 1


def test_a_slow_look_at_one_adapters_folder_does_not_stall_the_others(server):
    """Each request on a loaded adapter looks whether its folder is still there (a few ``stat`` calls). That ran
    under the pool's lock: on a slow disk the requests of every adapter queued behind each other's look (1.5 s
    here). It runs unlocked now."""
    url = server["url"]
    assert _complete(url, "nfs1").status_code == 200  # its first load does not look (the files are read)
    assert _complete(url, "fast").status_code == 200
    with ThreadPoolExecutor(1) as pool:
        looking = pool.submit(_complete, url, "nfs1")
        _await_first(server, "stat:nfs1")  # its look has begun
        started = time.monotonic()
        answer = _complete(url, "fast")
        took = time.monotonic() - started
        assert answer.status_code == 200 and not looking.done()
        assert took < SLOW_READ_S / 2, took
        assert looking.result(30).status_code == 200


# -- part 1: the pool, directly ----------------------------------------------------------------------------------
@pytest.fixture
def pool(tmp_path):
    model = tiny_llama()
    for seed, name in enumerate(("a", "b", "c"), start=1):
        make_adapter(model, tmp_path / "adapters" / name, seed=seed)
    return AdapterPool(model, tmp_path / "adapters", threading.RLock(), max_loaded=2)


def test_a_load_that_fails_half_way_leaves_nothing_in_the_model(pool, monkeypatch):
    """Out of memory after the adapter's layers were injected (load_adapter's inject runs before its cleanup
    starts) left an adapter in the model that no pool entry named: never used, never deleted, memory held for
    good, one more each retry."""
    import lorakit.io

    real = lorakit.io.inject

    def inject(*args, **kwargs):
        real(*args, **kwargs)
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(lorakit.io, "inject", inject)
    for _ in range(2):
        with pytest.raises(torch.OutOfMemoryError):
            pool.acquire("a")
    assert lorakit.adapter_names(pool.model) == [] and not pool._loaded
    monkeypatch.setattr(lorakit.io, "inject", real)
    internal = pool.acquire("a")
    assert lorakit.adapter_names(pool.model) == [internal]


def test_an_eviction_during_a_first_load_makes_room_for_it(pool):
    """c is read while a and b fill the pool; b is released meanwhile, so c evicts it; a, pinned, stays."""
    inside, go, real = threading.Event(), threading.Event(), pool._admit

    def admit(name, folder):
        if name == "c":
            inside.set()
            assert go.wait(30)
        return real(name, folder)

    pool._admit = admit
    result = {}
    thread = threading.Thread(target=lambda: result.update(c=pool.acquire("c", timeout=10)))
    thread.start()
    assert inside.wait(30)
    pool.acquire("a"), pool.acquire("b")  # admitted while c is read: the lock is free
    pool.release("b")
    go.set()
    thread.join(30)
    assert set(pool._loaded) == {"a", "c"} and pool._loaded["c"].internal == result["c"]
    assert sorted(lorakit.adapter_names(pool.model)) == sorted(e.internal for e in pool._loaded.values())


# -- part 2: the protocol ----------------------------------------------------------------------------------------
PROMPTS = ["Paris is", "The quick brown fox", "Hello", "Berlin", "hi", "Numbers: 0 1 2"]


@pytest.mark.parametrize("chat", [False, True])
def test_logprobs_end_where_a_stop_string_cuts_the_text(server, chat):
    """A stop string cuts the text, but the logprobs went on with the stop string's tokens (and, after a partial
    character, more): text_offset past the end of the text, chat ``bytes`` that rebuilt the text and the stop
    string. They now cover the tokens whose text begins in the answer, streamed or not."""
    url = server["url"]

    def request(prompt: str) -> tuple[str, dict]:
        if chat:
            return "/v1/chat/completions", {"model": "base", "messages": [{"role": "user", "content": prompt}],
                                            "logprobs": True, "top_logprobs": 1, "max_tokens": 24, "temperature": 0}
        return "/v1/completions", {"model": "base", "prompt": prompt, "logprobs": 1, "max_tokens": 24,
                                   "temperature": 0}

    def tokens_of(choice_logprobs: dict) -> list[str]:
        return [t["token"] for t in choice_logprobs["content"]] if chat else choice_logprobs["tokens"]

    def text_of(choice: dict) -> str:
        return choice["message"]["content"] if chat else choice["text"]

    with httpx.Client(base_url=url, timeout=60) as own:
        for prompt in PROMPTS:  # one whose answer begins with three whole-character tokens (a random model)
            path, body = request(prompt)
            full = own.post(path, json=body).json()["choices"][0]
            tokens = tokens_of(full["logprobs"])
            if len(tokens) < 3 or any("\ufffd" in t or not t for t in tokens[:3]):
                continue
            stop = tokens[1][-1] + tokens[2]  # spans the boundary of tokens 1 and 2
            cut = len(tokens[0]) + len(tokens[1]) - 1
            if text_of(full).index(stop) == cut:
                break
        else:
            pytest.fail("no prompt's answer begins with three whole-character tokens")
        starts = [len("".join(tokens[:i])) for i in range(3)]
        kept = [t for t, start in zip(tokens, starts) if start < cut]  # whose text begins before the cut
        answer = own.post(path, json={**body, "stop": stop}).json()["choices"][0]
    expected = text_of(full)[:cut]
    assert text_of(answer) == expected and answer["finish_reason"] == "stop"
    assert tokens_of(answer["logprobs"]) == kept, (stop, tokens_of(answer["logprobs"]), kept)
    if chat:
        joined = b"".join(bytes(t["bytes"]) for t in answer["logprobs"]["content"])
        assert joined.startswith(expected.encode()) and len(joined) < len(expected.encode()) + len(stop.encode())
    else:
        assert all(offset < len(expected) for offset in answer["logprobs"]["text_offset"])
    events = sse_events(server, path, {**body, "stop": stop})
    streamed = [t for e in events if e["choices"] and e["choices"][0]["logprobs"]
                for t in tokens_of(e["choices"][0]["logprobs"])]
    assert streamed == kept
    text = "".join((e["choices"][0]["delta"].get("content") or "") if chat else e["choices"][0]["text"]
                   for e in events if e["choices"])
    assert text == expected


def test_logit_bias_forces_and_bans_tokens(server):
    """logit_bias was refused whatever it held ("not supported"): clients that force or ban tokens (a yes/no
    classifier with max_tokens 1, a filter of words) could not run. It adds its biases to the logits before the
    token is chosen, greedy or sampled, on both endpoints; bad keys, values and ids are the client's 400."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(server["model"])
    ids = tokenizer.encode("Paris Berlin")
    forced, kept = ids[0], ids[-1]
    assert forced != kept
    client = server["client"]
    prompt = {"prompt": "Hello", "max_tokens": 3}
    chat = {"messages": [{"role": "user", "content": "Hello"}], "max_tokens": 3}
    for path, body in (("/v1/completions", prompt), ("/v1/chat/completions", chat)):
        for sampling in ({"temperature": 0}, {"temperature": 1.0, "seed": 5}):
            answer = client.post(path, json={"model": "base", **body, **sampling, "logit_bias": {str(forced): 100}})
            assert answer.status_code == 200, answer.text[:300]
            choice = answer.json()["choices"][0]
            text = choice["text"] if "text" in choice else choice["message"]["content"]
            assert text == tokenizer.decode([forced] * 3), (path, sampling, text)
    banned = {str(token): -100 for token in range(len(tokenizer)) if token != kept}  # every token but one
    answer = client.post("/v1/completions", json={"model": "fast", **prompt, "temperature": 1.0, "logit_bias": banned})
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == tokenizer.decode([kept] * 3)
    for bias, words in (({"abc": 5}, "is not a token id"), ({"-1": 5}, "is not a token id"),
                        ({"9" * 5000: 1}, "is not a token id"), ({"5": 101}, "between -100 and 100"),
                        ({str(len(tokenizer) + 7): 1}, "not in this model's vocabulary")):
        refused = client.post("/v1/completions", json={"model": "base", **prompt, "logit_bias": bias})
        assert refused.status_code == 400, refused.text[:300]
        error = refused.json()["error"]
        assert words in error["message"] and error["param"] == "logit_bias", error
    assert wait_idle(client, 5.0)


def test_presence_and_frequency_penalties_follow_openais_formula(server):
    """presence_penalty / frequency_penalty were refused unless 0 (chat UIs that offer them as settings got a
    400). Each token the answer holds now has presence + frequency x its count
    taken off its logit, as OpenAI documents: greedy answers equal a reference loop over the model that does so."""
    from collections import Counter

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(server["model"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(server["model"])

    def reference(prompt: list[int], presence: float, frequency: float, steps: int = 8) -> list[str]:
        sequence, counts, out = list(prompt), Counter(), []
        for _ in range(steps):
            with torch.no_grad():
                logits = model(torch.tensor([sequence])).logits[0, -1].float()
            for token, times in counts.items():
                logits[token] -= presence + frequency * times
            token = int(logits.argmax())
            counts[token] += 1
            sequence.append(token)
            out.append(tokenizer.decode([token]))
        return out

    client = server["client"]
    changed = 0
    for prompt, presence, frequency in (([5, 6, 7, 8], 0.0, 2.0), ([5, 6, 7, 8], 1.5, 0.0), ([40, 50, 60], -1.0, 0.0),
                                        ([40, 50, 60], 0.5, 1.0)):
        answer = client.post("/v1/completions", json={
            "model": "base", "prompt": prompt, "max_tokens": 8, "temperature": 0, "logprobs": 0,
            "presence_penalty": presence, "frequency_penalty": frequency})
        assert answer.status_code == 200, answer.text[:300]
        expected = reference(prompt, presence, frequency)
        assert answer.json()["choices"][0]["logprobs"]["tokens"] == expected, (prompt, presence, frequency)
        changed += expected != reference(prompt, 0.0, 0.0)
    assert changed >= 2  # the penalties changed those answers
    refused = client.post("/v1/chat/completions", json={"model": "base", "messages": [{"role": "user", "content": "x"}],
                                                        "presence_penalty": 2.5})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "presence_penalty"


def test_an_idle_connection_stays_open_longer_than_clients_keep_it(server):
    """uvicorn closed connections idle for 5 s, the time httpx (the openai package) keeps them: a request sent on
    one idle for almost that long met the close, and proxies that keep upstream connections longer got errors. A
    connection idle for 6 s still serves the next request."""
    import socket
    from urllib.parse import urlsplit

    address = urlsplit(server["url"])
    body = json.dumps({"model": "base", "prompt": "Hello", "max_tokens": 2}).encode()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n%s" % (len(body), body))

    def answer(sock: socket.socket) -> bytes:
        data = b""
        while b'"usage"' not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data + b"<closed>"
            data += chunk
        return data

    with socket.create_connection((address.hostname, address.port), timeout=30) as sock:
        sock.sendall(request)
        assert answer(sock).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        try:
            sock.sendall(request)
            second = answer(sock)
        except (BrokenPipeError, ConnectionResetError):
            second = b"<closed>"
    assert second.startswith(b"HTTP/1.1 200"), second[:200]


def test_a_stop_string_completed_by_a_token_that_starts_a_character_stops_the_answer(server):
    """Byte-level BPE has tokens such as "c" + the first byte of a character. A stop string completed by one was
    not looked for until the character was whole: when the answer ended there (max_tokens), the stop string came
    back in the text with finish_reason "length" (and otherwise the engine generated on for nothing)."""
    client = server["client"]
    found = None
    for prompt in PROMPTS:  # an answer with such a token (a random model writes many)
        body = {"model": "base", "prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 0}
        tokens = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]["tokens"]
        for k, token in enumerate(tokens):
            stop = token.rstrip("\ufffd")
            if stop != token and stop and "\ufffd" not in stop:
                text = client.post("/v1/completions", json={**body, "max_tokens": k + 1}).json()["choices"][0]["text"]
                if text.endswith("\ufffd") and text.find(stop) == len(text.rstrip("\ufffd")) - len(stop):
                    found = body, k, stop, text
                    break
        if found:
            break
    assert found, "no answer holds a token of text and a partial character"
    body, k, stop, text = found
    for stream in (False, True):
        request = {**body, "max_tokens": k + 1, "stop": stop}
        if stream:
            events = sse_events(server, "/v1/completions", request)
            answer = "".join(e["choices"][0]["text"] for e in events if e["choices"])
            finish = [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1]
        else:
            choice = client.post("/v1/completions", json=request).json()["choices"][0]
            answer, finish = choice["text"], choice["finish_reason"]
        assert (answer, finish) == (text[:text.find(stop)], "stop"), (stop, text, answer, finish)


@pytest.mark.parametrize("extra", [{"logprobs": 1}, {"max_tokens": 0, "logprobs": 0},
                                   {"n": 2, "prompt": ["Paris is", [5, 6, 7]], "stream_options": {"include_usage": True}}])
def test_echo_streams_as_it_answers(server, extra):
    """echo with stream was a 400 ("not supported"): OpenAI's legacy completions stream it, the prompt first. Each
    choice's first chunk is now its prompt (with the prompt's logprobs), and the chunks add up to the non-streamed
    answer, text and logprobs (max_tokens 0: the prompt alone, as a stream)."""
    body = {"model": "fast", "prompt": "Paris is", "max_tokens": 5, "temperature": 0, "echo": True, **extra}
    # stream_options goes with stream only (OpenAI's 400 otherwise)
    whole = server["client"].post("/v1/completions", json={k: v for k, v in body.items() if k != "stream_options"})
    assert whole.status_code == 200, whole.text[:300]
    whole = whole.json()
    events = sse_events(server, "/v1/completions", body)
    for choice in whole["choices"]:
        mine = [c for e in events for c in e["choices"] if c["index"] == choice["index"]]
        assert "".join(c["text"] for c in mine) == choice["text"]
        prompt = body["prompt"] if isinstance(body["prompt"], str) else body["prompt"][choice["index"] // 2]
        if isinstance(prompt, str):
            assert mine[0]["text"] == prompt  # the prompt comes first, whole
        parts = [c["logprobs"] for c in mine if c["logprobs"]]
        if choice["logprobs"] is None:
            assert not parts
        else:
            assert {key: sum((part[key] for part in parts), []) for key in parts[0]} == choice["logprobs"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]
    if "stream_options" in extra:
        assert events[-1]["usage"] == whole["usage"]
