"""vLLM's routes beside the OpenAI API on ``lorakit serve`` (lorakit/serve/vllm_routes.py), over real sockets.

Tools written for ``vllm serve`` (RL trainers that hot-load each new policy checkpoint, prompt-length checkers,
Prometheus dashboards, SageMaker) called routes lorakit did not have, and got 404s:

- ``POST /v1/load_lora_adapter`` / ``unload_lora_adapter``: a ``lora_name`` served from a ``lora_path`` with vLLM's
  status codes (200 "Success: ...", 400 already loaded without ``load_inplace``, 404 not found), then a ``model``
  of completions and listed by /v1/models; a path outside ``--adapters`` is a 403 naming
  ``--allow-any-lora-path`` (also for paths that do not exist: the server's disk cannot be probed) and loads with it;
- ``POST /tokenize`` / ``/detokenize``: a prompt or chat messages -> the ids the completion and chat routes send the
  model (their ``usage.prompt_tokens``), with an adapter's own tokenizer and template where it has one;
- ``GET /version``, ``GET|POST /ping``, ``GET /metrics`` (Prometheus text, lorakit_ names, counts that follow the
  requests served) open without the API key, while the others need it.
"""

from __future__ import annotations

import os
import re
import shutil
import threading

import httpx
import pytest

from conftest import tiny_llama
from test_serve_support import ServerProcess, make_adapter, make_tokenizer

KEY = "s3cret"
QUESTION = [{"role": "user", "content": "Capital of France?"}]
OTHER = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}>{% endif %}"


def _base_tokenizer():
    """The test tokenizer, adding <|endoftext|> before a plain text (as a BOS), so add_special_tokens shows."""
    from tokenizers.processors import TemplateProcessing

    tokenizer = make_tokenizer()
    first = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    tokenizer.backend_tokenizer.post_processor = TemplateProcessing(single="<|endoftext|> $A",
                                                                    special_tokens=[("<|endoftext|>", first)])
    return tokenizer


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vllm_routes")
    tokenizer = _base_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    adapters = root / "adapters"
    make_adapter(model, adapters / "plain", seed=1)
    own = make_adapter(model, adapters / "owntok", seed=2)
    other = make_tokenizer()
    other.chat_template = OTHER
    other.save_pretrained(own)
    # a training run's checkpoints inside the adapters folder, and their copies served by folder name (references)
    for step, seed in (("step1", 3), ("step2", 4)):
        make_adapter(model, adapters / "runs" / step, seed=seed)
        shutil.copytree(adapters / "runs" / step, adapters / f"ref-{step}")
    (adapters / "empty").mkdir()
    make_adapter(model, root / "outside" / "ckpt", seed=5)
    shutil.copytree(root / "outside" / "ckpt", adapters / "ref-outside")
    os.symlink(root / "outside" / "ckpt", adapters / "sneaky")  # a link in the adapters folder to a folder outside
    broken = root / "outside" / "broken"
    broken.mkdir()
    shutil.copy(adapters / "plain" / "adapter_config.json", broken / "adapter_config.json")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    started: dict[str, ServerProcess] = {}
    errors = []

    def start(key: str, *extra: str, api_key: str | None = None) -> None:
        try:
            started[key] = ServerProcess(root / "model", adapters, "--max-tokens", "8", "--max-loaded", "3", *extra,
                                         api_key=api_key, log=root / f"{key}.log")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=start, args=("keyed",), kwargs={"api_key": KEY}),
               threading.Thread(target=start, args=("anywhere", "--allow-any-lora-path"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    headers = {"Authorization": f"Bearer {KEY}"}
    clients = {"keyed": httpx.Client(base_url=started["keyed"].url, timeout=120, headers=headers)
               if "keyed" in started else None,
               "anywhere": httpx.Client(base_url=started["anywhere"].url, timeout=120)
               if "anywhere" in started else None}
    try:
        assert not errors, errors
        yield {"root": root, "adapters": adapters, "keyed": clients["keyed"], "anywhere": clients["anywhere"],
               "url": started["keyed"].url, "tokenizer": AutoTokenizer.from_pretrained(root / "model"),
               "own": other}
    finally:
        for client in clients.values():
            if client is not None:
                client.close()
        for process in started.values():
            if process.process.poll() is None:
                process.process.terminate()
        for process in started.values():
            process.stop()


def _load(client, name: str, path, status: int = 200, **extra) -> httpx.Response:
    response = client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": str(path), **extra})
    assert response.status_code == status, response.text[:500]
    return response


def _error(response: httpx.Response) -> str:
    message = response.json()["error"]["message"]
    assert "\n" not in message and len(message) < 400, message
    return message


def _logprobs(client, model: str) -> list[float]:
    """The greedy completion's token logprobs under ``model``: equal for equal weights, not for others."""
    response = client.post("/v1/completions", json={"model": model, "prompt": "Paris is the", "max_tokens": 4,
                                                    "temperature": 0, "logprobs": 1})
    assert response.status_code == 200, response.text[:500]
    return response.json()["choices"][0]["logprobs"]["token_logprobs"]


def _ids(client) -> set[str]:
    return {card["id"] for card in client.get("/v1/models").json()["data"]}


def test_load_by_path_serves_lists_reloads_in_place_and_unloads(setup):
    client, adapters = setup["keyed"], setup["adapters"]
    answer = _load(client, "policy", adapters / "runs" / "step1")
    assert answer.text == "Success: LoRA adapter 'policy' added successfully."
    assert "policy" in _ids(client) and client.get("/v1/models/policy").json()["id"] == "policy"
    assert _logprobs(client, "policy") == _logprobs(client, "ref-step1") != _logprobs(client, "base")
    chat = client.post("/v1/chat/completions", json={"model": "policy", "messages": QUESTION, "max_tokens": 2})
    assert chat.status_code == 200 and chat.json()["model"] == "policy"
    # vLLM's rule: a name loaded already is a 400 that says how to replace it
    message = _error(_load(client, "policy", adapters / "runs" / "step2", status=400))
    assert "already been loaded" in message and "load_inplace" in message
    assert _logprobs(client, "policy") == _logprobs(client, "ref-step1")
    _load(client, "policy", adapters / "runs" / "step2", load_inplace=True)  # the next checkpoint, same name
    assert _logprobs(client, "policy") == _logprobs(client, "ref-step2")
    # a failed reload in place changes nothing: the last version still serves
    message = _error(_load(client, "policy", adapters / "empty", status=404, load_inplace=True))
    assert "adapter_config.json" in message
    assert _logprobs(client, "policy") == _logprobs(client, "ref-step2")
    removed = client.post("/v1/unload_lora_adapter", json={"lora_name": "policy"})
    assert removed.status_code == 200 and removed.text == "Success: LoRA adapter 'policy' removed successfully."
    assert "policy" not in _ids(client)
    gone = client.post("/v1/completions", json={"model": "policy", "prompt": "x", "max_tokens": 1})
    assert gone.status_code == 404
    again = client.post("/v1/unload_lora_adapter", json={"lora_name": "policy", "lora_int_id": 1})
    assert again.status_code == 404 and "cannot be found" in _error(again)


def test_an_adapters_own_folder_loads_by_its_path_and_stays_servable_after_unload(setup):
    client, adapters = setup["keyed"], setup["adapters"]
    client.post("/v1/unload_lora_adapter", json={"lora_name": "plain"})  # whatever an earlier test left loaded
    _load(client, "plain", adapters / "plain")
    assert any(a["name"] == "plain" for a in client.get("/v1/adapters").json()["data"])
    assert _error(_load(client, "plain", adapters / "plain", status=400)).startswith("the LoRA adapter 'plain'")
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "plain"}).status_code == 200
    assert not any(a["name"] == "plain" for a in client.get("/v1/adapters").json()["data"])
    assert "plain" in _ids(client)  # a folder of --adapters: still served by name, loaded again on demand
    # another folder's name may not be taken over by a path
    message = _error(_load(client, "plain", adapters / "runs" / "step1", status=400))
    assert "already the adapter folder 'plain'" in message


def test_paths_outside_the_adapters_folder_need_the_operators_flag(setup):
    client, root, adapters = setup["keyed"], setup["root"], setup["adapters"]
    for path in (root / "outside" / "ckpt", root / "outside" / "no-such-folder", "/etc", adapters / ".." / "outside",
                 adapters / "sneaky"):
        response = _load(client, "elsewhere", path, status=403)
        message = _error(response)
        assert "--allow-any-lora-path" in message and response.json()["error"]["code"] == "lora_path_forbidden"
        assert str(root) not in message.replace(str(path), "")  # nothing of the server's disk but what was sent
    assert "elsewhere" not in _ids(client)
    # the operator's opt-in: any folder the server can read
    other = setup["anywhere"]
    _load(other, "elsewhere", root / "outside" / "ckpt")
    assert "elsewhere" in _ids(other)
    assert _logprobs(other, "elsewhere") == _logprobs(other, "ref-outside")
    # a path that is not there is a 404 then; a refused adapter a 400, and its name is not left behind
    assert "no such folder" in _error(_load(other, "missing", root / "outside" / "no-such-folder", status=404))
    assert "too long" in _error(_load(other, "missing", "/" + "a" * 5000, status=404))
    message = _error(_load(other, "broken", root / "outside" / "broken", status=400))
    assert "'broken' refused" in message
    assert "broken" not in _ids(other)
    assert other.post("/v1/unload_lora_adapter", json={"lora_name": "elsewhere"}).status_code == 200


def test_bad_load_requests_get_one_line_4xx(setup):
    client, adapters = setup["keyed"], setup["adapters"]
    path = str(adapters / "runs" / "step1")
    cases = [({"lora_name": "a/b", "lora_path": path}, "lora_name 'a/b' is not allowed"),
             ({"lora_name": "base", "lora_path": path}, "base model"),
             ({"lora_name": "", "lora_path": path}, "must be provided"),
             ({"lora_name": "x", "lora_path": ""}, "must be provided"),
             ({"lora_name": "x"}, "missing required field 'lora_path'"),
             ({"lora_name": "x", "lora_path": path, "lora_int_id": 3}, "unknown field 'lora_int_id'"),
             ({"lora_name": "x", "lora_path": path + "\x00"}, "holds a NUL character")]
    for body, expected in cases:
        response = client.post("/v1/load_lora_adapter", json=body)
        assert response.status_code == 400, (body, response.text)
        assert expected in _error(response), (body, response.text)
    assert _error(_load(client, "nothing", adapters / "empty", status=404)).startswith("no adapter at lora_path")
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "base"}).status_code == 400


def test_tokenize_gives_the_ids_the_completion_and_chat_routes_send(setup):
    client, tokenizer = setup["keyed"], setup["tokenizer"]
    text = "Paris is the capital of France."
    answer = client.post("/tokenize", json={"prompt": text}).json()
    assert answer["tokens"] == tokenizer(text)["input_ids"] and answer["tokens"][0] == 0  # the BOS
    assert answer["count"] == len(answer["tokens"]) and answer["max_model_len"] == 512 and answer["token_strs"] is None
    completion = client.post("/v1/completions", json={"model": "base", "prompt": text, "max_tokens": 1}).json()
    assert completion["usage"]["prompt_tokens"] == answer["count"]
    bare = client.post("/tokenize", json={"model": "base", "prompt": text, "add_special_tokens": False,
                                          "return_token_strs": True}).json()
    assert bare["tokens"] == answer["tokens"][1:]
    assert bare["token_strs"] == tokenizer.convert_ids_to_tokens(bare["tokens"])
    # chat messages through the template, as /v1/chat/completions renders them
    chat = client.post("/tokenize", json={"model": "base", "messages": QUESTION}).json()
    rendered = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat["tokens"] == list(rendered)
    served = client.post("/v1/chat/completions", json={"model": "base", "messages": QUESTION, "max_tokens": 1})
    assert served.json()["usage"]["prompt_tokens"] == chat["count"]
    without = client.post("/tokenize", json={"messages": QUESTION, "add_generation_prompt": False}).json()
    assert without["count"] < chat["count"]
    special = client.post("/tokenize", json={"messages": QUESTION, "add_special_tokens": True}).json()
    assert special["tokens"] == [0] + chat["tokens"]
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    # tools this template never writes: refused as the chat route refuses them, in the same words
    with_tools = client.post("/tokenize", json={"messages": QUESTION, "tools": tools})
    chat_tools = client.post("/v1/chat/completions", json={"model": "base", "messages": QUESTION, "tools": tools,
                                                           "tool_choice": "none", "max_tokens": 1})
    assert with_tools.status_code == chat_tools.status_code == 400
    assert _error(with_tools) == _error(chat_tools) and "'lookup' is not in the prompt" in _error(with_tools)
    # an adapter with a tokenizer of its own: its template
    own = client.post("/tokenize", json={"model": "owntok", "messages": QUESTION}).json()
    assert own["tokens"] == list(setup["own"].apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                                                 return_dict=False)) != chat["tokens"]
    # detokenize: ids back to the text
    assert client.post("/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": text}
    assert client.post("/detokenize", json={"model": "owntok", "tokens": bare["tokens"]}).json()["prompt"] == text


def test_tokenize_refusals(setup):
    client = setup["keyed"]
    cases = [("/tokenize", {"model": "nope", "prompt": "x"}, 404, "no adapter named 'nope'"),
             ("/tokenize", {"prompt": "x", "stream": True}, 400, "unknown field 'stream'"),
             ("/tokenize", {"messages": QUESTION, "max_tokens": 3}, 400, "unknown field 'max_tokens'"),
             ("/tokenize", {"messages": []}, 400, "messages"),
             ("/tokenize", {"messages": QUESTION, "chat_template": "{{ 1 }}"}, 400, "--trust-request-chat-template"),
             ("/detokenize", {"tokens": [1, 10**6]}, 400, "token id 1000000 is out of range"),
             ("/detokenize", {"tokens": ["a"]}, 400, "tokens.0")]
    for route, body, status, expected in cases:
        response = client.post(route, json=body)
        assert response.status_code == status, (body, response.text)
        assert expected in _error(response), (body, response.text)


def test_open_routes_and_the_api_key(setup):
    url = setup["url"]
    with httpx.Client(base_url=url, timeout=60) as anonymous:
        for method, route in (("GET", "/health"), ("GET", "/ping"), ("POST", "/ping"), ("GET", "/version"),
                              ("GET", "/metrics")):
            assert anonymous.request(method, route).status_code == 200, route
        assert anonymous.get("/ping").json()["status"] == "ok"
        import lorakit

        assert anonymous.get("/version").json() == {"version": lorakit.__version__}
        for route, body in (("/tokenize", {"prompt": "x"}), ("/detokenize", {"tokens": [1]}),
                            ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "y"}),
                            ("/v1/unload_lora_adapter", {"lora_name": "plain"})):
            response = anonymous.post(route, json=body)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key", route
        # a web page may not load adapters through a visitor's browser (no --cors-origin)
        refused = anonymous.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"},
                                 headers={"Origin": "https://evil.example", "Authorization": f"Bearer {KEY}"})
        assert refused.status_code == 403 and refused.json()["error"]["code"] == "cors_refused"


def _scrape(client) -> dict[str, float]:
    """/metrics parsed strictly (test_followups_17_metrics' parser: every line a HELP, a TYPE or a sample of the
    family declared last, label values escaped, histograms cumulative); samples by ``name{label="value",...}``."""
    from test_followups_17_metrics import parse_exposition

    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    types, samples = parse_exposition(response.text)
    assert all(re.fullmatch(r"(lorakit_|vllm:)[a-z0-9_]+", name) for name in types), types
    return {name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""): value
            for (name, labels), value in samples.items()}


def test_metrics_follow_the_requests_served(setup):
    client = setup["keyed"]
    before = _scrape(client)
    for _ in range(3):
        answer = client.post("/v1/completions", json={"model": "ref-step1", "prompt": "Paris is", "max_tokens": 5,
                                                      "temperature": 0, "ignore_eos": True})
        assert answer.status_code == 200
    after = _scrape(client)
    grew = {key: after[key] - before.get(key, 0) for key in after}
    assert grew['lorakit_requests_finished_total{finish_reason="length"}'] == 3
    assert grew["lorakit_generation_tokens_total"] == 15
    assert grew["lorakit_prompt_tokens_total"] == 3 * answer.json()["usage"]["prompt_tokens"]
    assert grew["lorakit_decode_steps_total"] >= 4 and grew["lorakit_prefill_requests_total"] == 3
    for histogram in ("lorakit_request_duration_seconds", "lorakit_time_to_first_token_seconds"):
        buckets = [value for key, value in after.items() if key.startswith(histogram + "_bucket")]
        assert buckets == sorted(buckets) and buckets[-1] == after[histogram + "_count"]
        assert after[f'{histogram}_bucket{{le="+Inf"}}'] == after[histogram + "_count"] >= 3
        assert grew[histogram + "_count"] == 3 and grew[histogram + "_sum"] > 0
    assert after["lorakit_requests_running"] == 0 and after["lorakit_requests_waiting"] == 0
    loaded = len(client.get("/v1/adapters").json()["data"])
    assert after["lorakit_adapters_loaded"] == loaded >= 1 and after["lorakit_adapters_max_loaded"] == 3


def test_histogram_buckets_are_prometheus_le():
    from lorakit.serve.metrics import Histogram

    histogram = Histogram((0.1, 1.0))
    for value in (0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    assert histogram.lines("x") == ['x_bucket{le="0.1"} 1', 'x_bucket{le="1"} 3', 'x_bucket{le="+Inf"} 4',
                                    "x_sum 8.6", "x_count 4"]


def test_unknown_route_names_the_new_ones(setup):
    response = setup["keyed"].get("/v1/tokenize")
    assert response.status_code == 404
    message = response.json()["error"]["message"]
    assert "/tokenize" in message and "/v1/load_lora_adapter" in message and "/metrics" in message


# -- the pool's registered names, directly ------------------------------------------------------------------------
@pytest.fixture
def pool_setup(tmp_path):
    from lorakit.serve.pool import AdapterPool

    model = tiny_llama()
    make_adapter(model, tmp_path / "adapters" / "a", seed=1)
    make_adapter(model, tmp_path / "adapters" / "runs" / "step1", seed=2)
    make_adapter(model, tmp_path / "outside" / "ckpt", seed=3)

    def build(**kwargs):
        return AdapterPool(model, tmp_path / "adapters", threading.RLock(), max_loaded=1, **kwargs)

    return tmp_path, build


def test_the_pool_refuses_an_outside_path_before_looking_at_it(pool_setup, monkeypatch):
    from lorakit.serve.pool import PathForbidden

    root, build = pool_setup
    pool = build()
    looked = []
    real_isdir = os.path.isdir

    def isdir(path):
        looked.append(str(path))
        return real_isdir(path)

    monkeypatch.setattr(os.path, "isdir", isdir)
    for path in (root / "outside" / "ckpt", root / "outside" / "nothing-here"):
        with pytest.raises(PathForbidden, match="--allow-any-lora-path"):
            pool.register("x", path)
    assert not any("outside" in path for path in looked), looked
    assert pool.registered("x") is None and "x" not in pool.available()


def test_registered_names_evict_reload_stay_while_in_use_and_go_with_their_folder(pool_setup):
    from lorakit.serve.paths import UnknownAdapterError
    from lorakit.serve.pool import AdapterBusy, AdapterRemoved

    root, build = pool_setup
    pool = build(any_path=True)
    assert pool.register("far", root / "outside" / "ckpt") is None
    assert pool.register("near", root / "adapters" / "runs" / "step1") is None
    assert pool.available() == ["a", "far", "near"]
    first = pool.acquire("far")
    with pytest.raises(AdapterBusy):  # in use: it stays registered and loaded
        pool.unregister("far")
    assert pool.registered("far") is not None and pool.is_loaded("far")
    pool.release("far")
    pool.acquire("near")  # max_loaded 1: "far" is evicted, and comes back from its own folder when named again
    pool.release("near")
    assert not pool.is_loaded("far")
    assert pool.acquire("far") != first
    pool.release("far")
    pool.unregister("far")
    assert "far" not in pool.available() and not pool.is_loaded("far")
    with pytest.raises(UnknownAdapterError, match="no adapter named .far."):
        pool.acquire("far")
    # a registered folder removed while loaded: refused with what happened, and unloaded
    pool.acquire("near")
    pool.release("near")
    shutil.rmtree(root / "adapters" / "runs" / "step1")
    with pytest.raises(AdapterRemoved, match="the folder it was loaded from was removed"):
        pool.acquire("near")
    assert not pool.is_loaded("near") and "near" not in pool.available()
