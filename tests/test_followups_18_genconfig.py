"""``lorakit serve --generation-config {auto,vllm}``: the model's generation_config.json sets the sampling defaults.

A request that left temperature / top_p / top_k out got OpenAI's defaults (temperature 1, top_p 1, no top_k)
whatever the model's authors had set, where vLLM (``--generation-config auto``, its default) gives the model's.
The model folder here sets ``top_k: 1`` (with ``do_sample: true`` and a sampling temperature, as Qwen3's and
Llama 3's files do), so under 'auto' a request that leaves top_k out is greedy: it equals the temperature-0 answer
whatever its seed; a request that sends its own top_k still samples; under 'vllm' the same request samples. The
file's temperature of 3 is over what a request may send (2), so it is left out and said at start.
"""

from __future__ import annotations

import json

import httpx
import pytest

from test_serve_support import ServerProcess, make_adapter, never_ending, tiny_hf_folder

PROMPT = {"prompt": "Hello there", "max_tokens": 8}
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("genconfig")
    folder = tiny_hf_folder(root / "model")
    base = never_ending(folder)  # answers run to max_tokens: every one of the 8 tokens is compared
    make_adapter(base, root / "adapters" / "a0", seed=1)
    path = folder / "generation_config.json"
    values = json.loads(path.read_text())
    values.update(do_sample=True, top_k=1, top_p=0.9, temperature=3.0, min_p=0.0, repetition_penalty=1.0)
    path.write_text(json.dumps(values))
    return folder


@pytest.fixture(scope="module")
def servers(model_dir):
    """{"auto": ..., "vllm": ...}: a server of each --generation-config, started side by side (each start is
    mostly imports, which on a busy machine take long: in parallel the module stays within its time)."""
    from concurrent.futures import ThreadPoolExecutor

    root = model_dir.parent
    flags = {"auto": (), "vllm": ("--generation-config", "vllm")}
    with ThreadPoolExecutor(2) as pool:
        futures = {kind: pool.submit(ServerProcess, model_dir, root / "adapters", *extra, log=root / f"{kind}.log")
                   for kind, extra in flags.items()}
        procs = {}
        for kind, future in futures.items():
            try:
                procs[kind] = future.result()
            except Exception:
                for proc in procs.values():
                    proc.stop()
                raise
    clients = {kind: httpx.Client(base_url=proc.url, timeout=60) for kind, proc in procs.items()}
    try:
        yield {kind: {"client": clients[kind], "proc": procs[kind]} for kind in procs}
    finally:
        for kind in procs:
            clients[kind].close()
            procs[kind].stop()


@pytest.fixture(scope="module")
def auto(servers):
    return servers["auto"]


def _text(client, path: str, body: dict) -> str:
    response = client.post(path, json=body)
    assert response.status_code == 200, response.text[:400]
    answer = response.json()
    if path == "/v1/completions":
        return answer["choices"][0]["text"]
    if path == "/v1/chat/completions":
        return answer["choices"][0]["message"]["content"]
    return answer["output"][-1]["content"][0]["text"]


ENDPOINTS = [("/v1/completions", {**PROMPT}),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8}),
             ("/v1/responses", {"input": "Hello there", "max_output_tokens": 16})]


@pytest.mark.parametrize("model", ["base", "a0"])
@pytest.mark.parametrize("path,body", ENDPOINTS)
def test_auto_a_request_without_top_k_gets_the_files_top_k_and_is_greedy(auto, path, body, model):
    client = auto["client"]
    greedy = _text(client, path, {**body, "model": model, "temperature": 0})
    for seed in SEEDS:  # temperature left out, top_k sent as null: both the model's (3 is ignored; top_k 1 wins)
        seeded = {"seed": seed} if path != "/v1/responses" else {}  # the Responses API takes no seed
        assert _text(client, path, {**body, "model": model, **seeded, "top_k": None}) == greedy


def test_auto_a_client_value_wins_over_the_files(auto):
    client = auto["client"]
    greedy = _text(client, "/v1/completions", {**PROMPT, "model": "base", "temperature": 0})
    sampled = {_text(client, "/v1/completions", {**PROMPT, "model": "base", "seed": s, "top_k": 0, "top_p": 1.0})
               for s in SEEDS}
    assert sampled - {greedy}, "top_k 0 sent by the client still gave the file's top_k 1 (greedy)"


def test_auto_responses_echo_the_defaults_used_and_the_start_says_them(auto):
    answer = auto["client"].post("/v1/responses", json={"model": "base", "input": "Hi", "max_output_tokens": 16}).json()
    assert answer["top_p"] == 0.9 and answer["temperature"] == 1.0  # the file's top_p; its temperature 3 refused
    sent = auto["client"].post("/v1/responses", json={"model": "base", "input": "Hi", "max_output_tokens": 16,
                                                      "top_p": 0.5}).json()
    assert sent["top_p"] == 0.5
    log = auto["proc"].output()
    line = next(l for l in log.splitlines() if "default sampling parameters" in l)
    assert "top_k=1" in line and "top_p=0.9" in line and "temperature" not in line
    assert "--generation-config vllm" in line
    assert "temperature 3.0 is not a number from 0 to 2" in log


def test_vllm_keeps_openais_defaults(servers):
    client, proc = servers["vllm"]["client"], servers["vllm"]["proc"]
    greedy = _text(client, "/v1/completions", {**PROMPT, "model": "base", "temperature": 0})
    sampled = {_text(client, "/v1/completions", {**PROMPT, "model": "base", "seed": s}) for s in SEEDS}
    assert sampled - {greedy}, "--generation-config vllm still took the file's top_k 1"
    answer = client.post("/v1/responses", json={"model": "base", "input": "Hi", "max_output_tokens": 16}).json()
    assert answer["top_p"] == 1.0 and answer["temperature"] == 1.0
    assert "default sampling parameters" not in proc.output()
