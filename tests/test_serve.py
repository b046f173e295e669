"""``lorakit serve`` end to end: the real server process (``python -m lorakit serve``) and a real HTTP client.

One server per module (startup is the slow part). Expected answers come from an independent reference in this
process: the same folders loaded with transformers + ``lorakit.load_adapter``, one adapter active, no KV cache,
no padding, no mixed batch, greedy one token at a time, in float64: conftest.TOLERANCE[float32] bounds a float32
model's error against float64, and this model's large activations (initializer_range 0.5) make a float32 reference
err by more than that itself.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

import lorakit
from lorakit import generation
from conftest import TOLERANCE, tiny_llama
from test_serve_support import ServerProcess, make_adapter, tiny_hf_folder

KEY = "test-key-123"
HEADERS = {"Authorization": f"Bearer {KEY}"}
GOOD = [f"a{i}" for i in range(10)]  # 10 good adapters, --max-loaded 8: the pool must evict
PROMPTS = ["Hello", "Paris is the capital of", "LoRA adapters add a low-rank update to", "The quick brown fox",
           "Numbers: 1 2 3", "Servers answer many", "How are you", "Berlin is"]


class Reference:
    """Greedy decoding without any of the server's machinery, for expected answers and log-probabilities, in float64
    (the float32 server is held to float32's tolerance against it)."""

    def __init__(self, model_dir: Path, adapters_dir: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        for name in GOOD:
            lorakit.load_adapter(self.model, adapters_dir / name, adapter=name)
        # a float32 reference recomputing the whole prefix each step differed from float64 by 4e-5 in a log-probability
        # (Berlin is, a6, token 10) where the server's cached float32 decode stayed within 1e-5 of it
        self.model.double()
        self.stop_ids = set(generation.end_of_turn_ids(self.tokenizer))
        self.cache: dict = {}
        self.lock = threading.Lock()  # client threads share this model: one reference run at a time

    def run(self, prompt, adapter: str | None, max_tokens: int, chat: bool = False) -> tuple[str, list[float]]:
        key = (json.dumps(prompt), adapter, max_tokens, chat)
        with self.lock:
            if key not in self.cache:
                self.cache[key] = self._run(prompt, adapter, max_tokens, chat)
            return self.cache[key]

    def _run(self, prompt, adapter: str | None, max_tokens: int, chat: bool) -> tuple[str, list[float]]:
        ids = generation.encode_prompt(self.tokenizer, prompt, chat=chat)
        tokens, logprobs = [], []
        with torch.inference_mode():
            if adapter is None:
                context = lorakit.disable_adapters(self.model)
            else:
                lorakit.set_adapter(self.model, adapter)
                context = contextlib.nullcontext()
            with context:
                for _ in range(max_tokens):
                    logits = self.model(torch.tensor([ids + tokens])).logits[0, -1]
                    token = int(torch.argmax(logits))
                    tokens.append(token)
                    logprobs.append(float(torch.log_softmax(logits, -1)[token]))
                    if token in self.stop_ids:
                        break
        text = self.tokenizer.decode([t for t in tokens if t not in self.stop_ids], skip_special_tokens=True)
        return text, logprobs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.5)
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    adapters = root / "adapters"
    for i, name in enumerate(GOOD):
        make_adapter(base, adapters / name, seed=i + 1, target_modules=["q_proj", "v_proj", "down_proj"] if i % 2 else "all-linear")
    _bad_adapters(root, adapters, base)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAKIT_DISABLE_TRITON", "1")  # the reference runs the plain PyTorch path, fast on CPU
        server = ServerProcess(model_dir, adapters, "--max-loaded", "8", "--max-rank", "16", "--max-adapter-mb", "0.06",
                               "--max-prompt-tokens", "64", "--max-tokens", "64", api_key=KEY, log=root / "server.log")
        try:
            client = httpx.Client(base_url=server.url, headers=HEADERS, timeout=60)
            yield {"root": root, "url": server.url, "client": client, "ref": Reference(model_dir, adapters),
                   "server": server}
            client.close()
        finally:
            server.stop()


def _bad_adapters(root: Path, adapters: Path, base) -> None:
    from safetensors.torch import load_file, save_file

    make_adapter(base, adapters / "highrank", seed=20, r=32, target_modules=["q_proj"])  # rank 32 > --max-rank 16
    make_adapter(base, adapters / "toobig", seed=21, r=16)  # 16 x all-linear: ~74 KB > 0.06 MiB
    wrong = make_adapter(base, adapters / "wrongshape", seed=22)
    tensors = load_file(wrong / "adapter_model.safetensors")
    key = next(k for k in tensors if k.endswith("lora_A.weight"))
    tensors[key] = torch.randn(4, tensors[key].shape[1] + 3)
    save_file(tensors, wrong / "adapter_model.safetensors")
    notarget = make_adapter(base, adapters / "notarget", seed=23, target_modules=["q_proj"])
    config = json.loads((notarget / "adapter_config.json").read_text())
    config["target_modules"] = ["q_proj", "fancy_proj"]
    (notarget / "adapter_config.json").write_text(json.dumps(config))
    other = tiny_llama(seed=3, vocab_size=base.config.vocab_size, num_attention_heads=8, num_key_value_heads=4)
    make_adapter(other, adapters / "otherbase", seed=24)  # same shapes, another architecture: fingerprint differs
    pickled = adapters / "pickled"
    pickled.mkdir()
    (pickled / "adapter_config.json").write_text((adapters / "a0" / "adapter_config.json").read_text())
    (pickled / "adapter_model.bin").write_bytes(pickle.dumps(_Exploit(str(root / "PWNED"))))
    disguised = adapters / "disguised"
    disguised.mkdir()
    (disguised / "adapter_config.json").write_text((adapters / "a0" / "adapter_config.json").read_text())
    (disguised / "adapter_model.safetensors").write_bytes(pickle.dumps(_Exploit(str(root / "PWNED"))))
    # a valid adapter outside the folder, reachable only through links
    outside = make_adapter(base, root / "outside", seed=25)
    (adapters / "escape").symlink_to(outside, target_is_directory=True)
    filelink = adapters / "filelink"
    filelink.mkdir()
    (filelink / "adapter_config.json").write_text((outside / "adapter_config.json").read_text())
    (filelink / "adapter_model.safetensors").symlink_to(outside / "adapter_model.safetensors")


class _Exploit:
    """Unpickling this creates a file: the marker proves whether anything was unpickled."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def complete(client, model: str, prompt, max_tokens: int = 12, **extra) -> dict:
    response = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                                    "temperature": 0, **extra})
    assert response.status_code == 200, response.text
    return response.json()


def check_answer(setup, model: str, prompt: str, max_tokens: int = 12) -> None:
    answer = complete(setup["client"], model, prompt, max_tokens, logprobs=1)
    text, logprobs = setup["ref"].run(prompt, None if model == "base" else model, max_tokens)
    choice = answer["choices"][0]
    assert choice["text"] == text, (model, prompt)
    rtol, atol = TOLERANCE[torch.float32]
    torch.testing.assert_close(torch.tensor(choice["logprobs"]["token_logprobs"]), torch.tensor(logprobs), rtol=rtol, atol=atol)


# -- answers -------------------------------------------------------------------------------------------------------
def test_models_lists_base_and_adapters(setup):
    data = setup["client"].get("/v1/models").json()["data"]
    ids = [m["id"] for m in data]
    assert ids[0] == "base" and set(GOOD) <= set(ids)
    assert "escape" not in ids and "filelink" not in ids  # links that leave the folder are not adapters


def test_each_adapter_equals_offline_generation(setup):
    texts = set()
    for i, model in enumerate(["base", *GOOD]):
        check_answer(setup, model, PROMPTS[i % len(PROMPTS)])
        texts.add(setup["ref"].run(PROMPTS[0], None if model == "base" else model, 12)[0])
    assert len(texts) >= 6  # the adapters really change the answers
    loaded = setup["client"].get("/v1/adapters").json()["data"]
    assert len(loaded) == 8  # --max-loaded 8 with 10 adapters used: least recently used evicted
    assert {"a0", "a1"}.isdisjoint({a["name"] for a in loaded})


def test_chat_equals_offline_chat_template(setup):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    response = setup["client"].post("/v1/chat/completions", json={"model": "a3", "messages": messages, "max_tokens": 10,
                                                                   "temperature": 0})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["message"]["content"] == setup["ref"].run(messages, "a3", 10)[0]
    assert body["usage"]["completion_tokens"] <= 10


def test_streaming_equals_non_streaming(setup):
    expected = setup["ref"].run(PROMPTS[1], "a2", 16)[0]
    pieces, finish = [], None
    with setup["client"].stream("POST", "/v1/completions", json={"model": "a2", "prompt": PROMPTS[1], "max_tokens": 16,
                                                                 "temperature": 0, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    for line in lines[:-1]:
        choice = json.loads(line[len("data: "):])["choices"][0]
        pieces.append(choice["text"])
        finish = choice["finish_reason"] or finish
    assert "".join(pieces) == expected and finish in ("stop", "length")


def test_stop_string_truncates(setup):
    text = setup["ref"].run(PROMPTS[2], "a4", 16)[0]
    assert len(text) > 4
    stop = text[2:4]
    choice = complete(setup["client"], "a4", PROMPTS[2], 16, stop=[stop])["choices"][0]
    assert choice["text"] == text[: text.find(stop)] and choice["finish_reason"] == "stop"


def test_sampling_with_seed_is_reproducible(setup):
    body = {"temperature": 0.9, "top_p": 0.9, "seed": 7}
    first = complete(setup["client"], "a5", PROMPTS[3], 12, **body)["choices"][0]["text"]
    second = complete(setup["client"], "a5", PROMPTS[3], 12, **body)["choices"][0]["text"]
    assert first == second


def test_32_concurrent_clients_over_8_adapters(setup):
    client = setup["client"]
    before = client.get("/health").json()
    steps_before = before["steps"]
    jobs = [(GOOD[i % 8], PROMPTS[(i * 3) % len(PROMPTS)]) for i in range(32)]
    for model, prompt in jobs:  # expected answers first, so the clients really run concurrently
        setup["ref"].run(prompt, model, 12)
    with ThreadPoolExecutor(32) as pool:
        list(pool.map(lambda job: check_answer(setup, *job), jobs))
    after = client.get("/health").json()
    steps = after["steps"] - steps_before
    assert steps < 32 * 12 / 2, f"{steps} engine steps for 32 x 12 tokens: requests were not batched together"
    # /health splits the engine's time: every request was prefilled once, in batches; decode steps took time
    assert after["prefill_rows"] - before["prefill_rows"] == 32
    assert after["prefill_calls"] - before["prefill_calls"] < 32
    assert after["decode_steps"] > before["decode_steps"] and after["decode_s"] > before["decode_s"]
    assert after["prefill_s"] > before["prefill_s"]


def test_load_and_unload_during_traffic(setup):
    client = setup["client"]
    stop = threading.Event()
    errors: list[BaseException] = []

    def traffic(k: int) -> None:
        i = 0
        while not stop.is_set():
            try:
                check_answer(setup, GOOD[k], PROMPTS[(k + i) % len(PROMPTS)], 8)
            except BaseException as error:  # reported below
                errors.append(error)
                return
            i += 1

    for k in range(4):
        for i in range(3):
            setup["ref"].run(PROMPTS[(k + i) % len(PROMPTS)], GOOD[k], 8)
    threads = [threading.Thread(target=traffic, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    try:
        for cycle in range(2):
            for name in GOOD[6:10]:
                assert client.post("/v1/adapters/load", json={"name": name}).status_code == 200
                check_answer(setup, name, PROMPTS[cycle], 6)
                response = client.post("/v1/adapters/unload", json={"name": name})
                assert response.status_code == 200, response.text
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
    assert not errors, errors[0]


def test_unload_refused_while_in_use(setup):
    client = setup["client"]
    prompt = "x " * 25  # ~50 tokens: long enough that 64 new tokens take a while
    with client.stream("POST", "/v1/completions", json={"model": "a5", "prompt": prompt, "max_tokens": 64,
                                                        "temperature": 0, "stream": True,
                                                        "stop": ["this never appears \u2603"]}) as response:
        assert response.status_code == 200, response.read()
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data:"))
        busy = client.post("/v1/adapters/unload", json={"name": "a5"})
        list(lines)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "adapter_busy"
    assert client.post("/v1/adapters/unload", json={"name": "a5"}).status_code == 200


# -- attacks and bad input ----------------------------------------------------------------------------------------
def _assert_error(response: httpx.Response, status: int | tuple[int, ...]) -> dict:
    statuses = (status,) if isinstance(status, int) else status
    assert response.status_code in statuses, (response.status_code, response.text)
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


@pytest.mark.parametrize("name", ["../outside", "..", ".", "a0/../a1", "%2e%2e%2foutside", "..%2Foutside", "a0\x00",
                                  "escape", "filelink", "~root", "a0/", "", "x" * 300, "ABSOLUTE"])
def test_path_tricks_refused(setup, name):
    if name == "ABSOLUTE":
        name = str(setup["root"] / "outside")
    client = setup["client"]
    _assert_error(client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2}), (400, 404))
    _assert_error(client.post("/v1/adapters/load", json={"name": name}), (400, 404))
    loaded = {a["name"] for a in client.get("/v1/adapters").json()["data"]}
    assert loaded <= set(GOOD)  # nothing from outside the folder was loaded under any name


@pytest.mark.parametrize("name, words", [
    ("highrank", "rank 32 is above --max-rank 16; start the server with --max-rank 32 or more"), ("toobig", "over the limit"), ("wrongshape", "shape"),
    ("notarget", "fancy_proj"), ("otherbase", "another base model"), ("pickled", "pickled"),
    ("disguised", "not a valid safetensors"),
])
def test_admission_checks(setup, name, words):
    client = setup["client"]
    error = _assert_error(client.post("/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 2}), 400)
    assert error["code"] == "adapter_rejected" and words in error["message"], error
    error = _assert_error(client.post("/v1/adapters/load", json={"name": name}), 400)
    assert words in error["message"]
    assert not (setup["root"] / "PWNED").exists()  # nothing was unpickled
    check_answer(setup, "a1", PROMPTS[0], 4)  # and the server keeps serving


@pytest.mark.parametrize("body, status, param", [
    ('{"model": "a0", "prompt": ', 400, None),  # malformed JSON
    ('[1, 2]', 400, None),
    ({"model": "a0", "prompt": "hi", "temperatur": 0.5}, 400, "temperatur"),  # unknown field
    ({"model": "a0"}, 400, "prompt"),
    ({"model": "a0", "prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"model": "a0", "prompt": "hi", "temperature": 5}, 400, "temperature"),
    ({"model": "a0", "prompt": "hi", "n": 17}, 400, "n"),  # n takes 1 to 16
    ({"model": "a0", "prompt": "word " * 200}, 400, "prompt"),  # over --max-prompt-tokens 64
    ({"model": "a0", "prompt": "hi", "max_tokens": 1000}, 400, "max_tokens"),  # over --max-tokens 64
    ({"model": "a0", "prompt": [1, 2, 10**9]}, 400, "prompt"),
    ({"model": "no-such-adapter", "prompt": "hi"}, 404, "model"),
    ({"model": "a0", "prompt": "x" * (2 << 20)}, 413, None),
])
def test_bad_completion_requests(setup, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    response = setup["client"].post("/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert _assert_error(response, status)["param"] == param


@pytest.mark.parametrize("body, param", [
    ({"model": "a0", "messages": []}, "messages"),
    ({"model": "a0", "messages": [{"role": "function", "content": "x"}]}, "messages.0.role"),
    ({"model": "a0", "messages": [{"role": "user", "content": "x", "extra": 1}]}, "messages.0.extra"),
    ({"model": "a0", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_bad_chat_requests(setup, body, param):
    assert _assert_error(setup["client"].post("/v1/chat/completions", json=body), 400)["param"] == param


def test_api_key_checked_everywhere_but_health(setup):
    url = setup["url"]
    assert httpx.get(url + "/health").status_code == 200
    for method, path, body in [("GET", "/v1/models", None), ("GET", "/v1/adapters", None),
                               ("POST", "/v1/completions", {"model": "a0", "prompt": "hi"}),
                               ("POST", "/v1/chat/completions", {"model": "a0", "messages": [{"role": "user", "content": "x"}]}),
                               ("POST", "/v1/adapters/load", {"name": "a0"}), ("POST", "/v1/adapters/unload", {"name": "a0"})]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, url + path, json=body, headers=headers)
            assert _assert_error(response, 401)["code"] == "invalid_api_key"


def test_unknown_route_and_method(setup):
    _assert_error(setup["client"].get("/v1/nothing"), 404)
    _assert_error(setup["client"].get("/v1/completions"), 405)


def test_server_still_healthy_after_everything(setup):
    assert setup["client"].get("/health").json()["status"] == "ok"
    check_answer(setup, "a7", PROMPTS[5])
    assert "Traceback" not in setup["server"].output()
