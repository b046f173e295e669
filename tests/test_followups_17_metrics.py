"""``GET /metrics`` per adapter and per route (lorakit/serve/metrics.py, http_metrics.py), over a real socket.

Users serving many adapters (S-LoRA / vLLM style) could read only whole-server figures from /metrics. Now:

- vLLM's families, names and labels (``vllm:request_success_total{finished_reason}``, ``vllm:prompt_tokens_total``,
  ``vllm:generation_tokens_total``, ``vllm:time_to_first_token_seconds``, ``vllm:e2e_request_latency_seconds``,
  ``vllm:lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}``), the counters and
  histograms split by ``lora_name`` (the adapter a request named; none for the base) beside vLLM's ``model_name``
  (the base's served name); ``vllm:num_requests_running`` / ``_waiting`` one series each as vLLM's (a gateway reads
  one sample as the queue), with ``lorakit_lora_requests_running`` / ``_waiting`` per adapter;
- ``lorakit_http_requests_total{method, route, status}``: every answer, 401s, 400s, 404s and 500s too, with routes
  as their templates and every unknown path as ``route="unmatched"`` (one series, whatever clients try);
- label values escaped as the text format says: the base's ``--name`` here holds a quote, a backslash and a
  newline, and every line still parses.

The exposition is read by a strict parser written below (prometheus_client is not a dependency): every line a
HELP, a TYPE or a sample of the family declared last; label values with only the format's escapes; no series twice;
histograms cumulative with +Inf equal to _count.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time

import httpx
import pytest

from conftest import tiny_llama
from test_serve_support import ServerProcess, make_adapter, make_tokenizer

KEY = "metrics-key"
NAME = 'tiny "base" \\ v1\nsecond line'  # the base's --name: every character the text format must escape
PROMPT = "Paris is"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_VALUE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]Inf|NaN")
_SUFFIXES = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("",), "gauge": ("",)}


def _labels(text: str, start: int) -> tuple[dict[str, str], int]:
    """The label set opening at ``text[start] == "{"``: ``(labels, index after the "}")``; strict: only ``\\\\``,
    ``\\"`` and ``\\n`` escapes, no label twice, no reserved ``__`` names."""
    labels, i = {}, start + 1
    while text[i] != "}":
        match = _LABEL_NAME.match(text, i)
        assert match, f"bad label name at {i}: {text!r}"
        name = match.group()
        assert not name.startswith("__") and name not in labels, text
        i = match.end()
        assert text[i:i + 2] == '="', text
        i += 2
        value = []
        while text[i] != '"':
            if text[i] == "\\":
                escaped = {"\\": "\\", '"': '"', "n": "\n"}.get(text[i + 1])
                assert escaped is not None, f"invalid escape in {text!r}"
                value.append(escaped)
                i += 2
            else:
                value.append(text[i])
                i += 1
        labels[name] = "".join(value)
        i += 1
        if text[i] == ",":
            i += 1
        else:
            assert text[i] == "}", text
    return labels, i + 1


def parse_exposition(text: str) -> tuple[dict[str, str], dict[tuple, float]]:
    """Prometheus text format 0.0.4, strictly: ``(family -> type, (sample name, sorted label pairs) -> value)``."""
    assert text.endswith("\n") and "\n\n" not in text
    types, helps, samples, current = {}, set(), {}, None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert _METRIC_NAME.fullmatch(name) and name not in helps, line
            assert re.fullmatch(r"(?:[^\\]|\\\\|\\n)*", help_text), line
            helps.add(name)
            continue
        if line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert _METRIC_NAME.fullmatch(name) and name not in types and kind in _SUFFIXES, line
            assert name.endswith("_total") == (kind == "counter"), line  # as prometheus_client writes 0.0.4
            types[name] = current = kind, name
            continue
        assert not line.startswith("#"), line
        match = _METRIC_NAME.match(line)
        assert match and current is not None, line
        name, end = match.group(), match.end()
        kind, family = current
        assert name in {family + suffix for suffix in _SUFFIXES[kind]}, f"{name} outside its family {family}"
        labels = {}
        if line[end] == "{":
            labels, end = _labels(line, end)
        assert line[end] == " " and _VALUE.fullmatch(line[end + 1:]), line  # one value, no timestamp
        value = float(line[end + 1:])
        if kind == "counter" or name.endswith(("_bucket", "_count")):
            assert value >= 0 and not math.isnan(value), line
        assert ("le" in labels) == name.endswith("_bucket"), line
        key = (name, tuple(sorted(labels.items())))
        assert key not in samples, f"series twice: {line}"
        samples[key] = value
    for kind, family in types.values():
        if kind == "histogram":
            _check_histogram(family, samples)
    return {family: kind for kind, family in types.values()}, samples


def _check_histogram(family: str, samples: dict) -> None:
    """Each series of histogram ``family``: increasing bounds, cumulative counts, +Inf == _count, a _sum."""
    series: dict[tuple, list[tuple[float, float]]] = {}
    for (name, labels), value in samples.items():
        if name == family + "_bucket":
            rest = tuple(pair for pair in labels if pair[0] != "le")
            series.setdefault(rest, []).append((float(dict(labels)["le"]), value))
    for rest, buckets in series.items():
        bounds = [bound for bound, _ in buckets]
        counts = [count for _, count in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == math.inf, (family, rest)
        assert counts == sorted(counts), (family, rest, counts)
        assert samples[(family + "_count", rest)] == counts[-1] and (family + "_sum", rest) in samples


def _value(samples: dict, name: str, **labels: str) -> float:
    """The sample of ``name`` with exactly ``labels`` (0 where there is none yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def _sum(samples: dict, name: str, **labels: str) -> float:
    """All samples of ``name`` whose labels include ``labels`` (PromQL's sum over a selector)."""
    return sum(value for (n, pairs), value in samples.items() if n == name and labels.items() <= dict(pairs).items())


def _model(lora: str | None) -> dict[str, str]:
    return {"model_name": NAME} if lora is None else {"model_name": NAME, "lora_name": lora}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Two servers, started together: the main one (transformers' decoder, two adapters, --max-loaded 1 so alpha and
    beta take turns in memory and loads and evictions move, a --name with every character the format escapes) and
    one with the static decoder's prefix cache (on the CPU: its PyTorch references)."""
    from test_serve_support import tiny_hf_folder

    root = tmp_path_factory.mktemp("metrics")
    tokenizer = make_tokenizer()
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    make_adapter(model, root / "adapters" / "alpha", seed=1)
    make_adapter(model, root / "adapters" / "beta", seed=2)
    tiny_hf_folder(root / "static_model", initializer_range=0.5)
    (root / "no_adapters").mkdir()
    specs = {"main": (root / "model", root / "adapters", "--max-loaded", "1", "--max-tokens", "900", "--name", NAME),
             "static": (root / "static_model", root / "no_adapters", "--decoder", "static", "--max-context", "256",
                        "--max-batch", "2")}
    started, errors = {}, []

    def start(key: str) -> None:
        try:
            started[key] = ServerProcess(*specs[key], api_key=KEY if key == "main" else None,
                                         log=root / f"{key}.log")
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=start, args=(key,)) for key in specs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    clients = []
    try:
        assert not errors, errors
        clients = [httpx.Client(base_url=started["main"].url, timeout=120, headers={"Authorization": f"Bearer {KEY}"}),
                   httpx.Client(base_url=started["static"].url, timeout=120)]
        yield {"client": clients[0], "url": started["main"].url, "static": clients[1],
               "eos": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    finally:
        for client in clients:
            client.close()
        for process in started.values():
            process.stop()


def _scrape(client: httpx.Client) -> tuple[str, dict[str, str], dict]:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return (response.text, *parse_exposition(response.text))


def _complete(client: httpx.Client, model: str, tokens: int, status: int = 200, **extra) -> dict:
    response = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": tokens,
                                                    "temperature": 0, "ignore_eos": True, **extra})
    assert response.status_code == status, response.text[:300]
    return response.json()


def test_per_adapter_and_per_route_figures_follow_the_requests(server):
    client = server["client"]
    _, types, before = _scrape(client)
    assert types["vllm:request_success_total"] == "counter" and types["vllm:e2e_request_latency_seconds"] == "histogram"
    assert types["lorakit_http_requests_total"] == "counter" and types["vllm:lora_requests_info"] == "gauge"

    prompt_tokens = _complete(client, "alpha", 3)["usage"]["prompt_tokens"]
    _complete(client, "alpha", 3)
    _complete(client, "beta", 4)
    _complete(client, NAME, 2)  # the base, by its served name
    # a streamed chat on beta, read to its end
    chat = {"model": "beta", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=chat) as stream:
        assert stream.status_code == 200
        events = [line[6:] for line in stream.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chat_usage = json.loads(events[-2])["usage"]
    assert chat_usage["completion_tokens"] == 5
    # a job that fails in the engine (the one allowed token is held back by min_tokens), finished "error": since
    # session 23 the client's own options leaving no token are its 400, not the server's 500
    failed = client.post("/v1/completions", json={"model": "alpha", "prompt": PROMPT, "max_tokens": 4,
                                                  "temperature": 0, "allowed_token_ids": [server["eos"]],
                                                  "min_tokens": 2})
    assert failed.status_code == 400 and "left no token" in failed.text, failed.text[:300]
    # requests refused before the engine: bad body, unknown model, bad JSON, no API key, unknown routes
    assert client.post("/v1/completions", json={"model": "alpha", "prompt": "x", "bogus": 1}).status_code == 400
    assert client.post("/v1/completions", content=b"{not json").status_code == 400
    assert client.post("/v1/completions", json={"model": "gamma", "prompt": "x"}).status_code == 404
    assert httpx.post(server["url"] + "/v1/completions", json={"model": "alpha", "prompt": "x"}).status_code == 401
    for path in ("/nope/1", "/v1/nope", '/x"y\\z'):
        assert client.get(path).status_code == 404
    assert client.request("PROPFIND", "/v1/models").status_code == 405
    # an answer is counted just after its last byte is sent: the last one before the scrape is one not asserted
    assert client.get("/health").status_code == 200

    text, _, after = _scrape(client)
    grew = {key: after[key] - before.get(key, 0.0) for key in after}

    def delta(name: str, **labels: str) -> float:
        return grew.get((name, tuple(sorted(labels.items()))), 0.0)

    # per model: finished jobs by vLLM's finished_reason, tokens, and both histograms
    assert delta("vllm:request_success_total", **_model("alpha"), finished_reason="length") == 2
    assert delta("vllm:request_success_total", **_model("alpha"), finished_reason="error") == 1
    assert delta("vllm:request_success_total", **_model("beta"), finished_reason="length") == 2
    assert delta("vllm:request_success_total", **_model(None), finished_reason="length") == 1
    assert sum(value for (name, _), value in grew.items() if name == "vllm:request_success_total") == 6
    assert delta("vllm:prompt_tokens_total", **_model("alpha")) == 3 * prompt_tokens
    assert delta("vllm:prompt_tokens_total", **_model("beta")) == prompt_tokens + chat_usage["prompt_tokens"]
    assert delta("vllm:prompt_tokens_total", **_model(None)) == prompt_tokens
    assert delta("vllm:generation_tokens_total", **_model("alpha")) == 6  # the failed job made none
    assert delta("vllm:generation_tokens_total", **_model("beta")) == 9
    assert delta("vllm:generation_tokens_total", **_model(None)) == 2
    assert delta("vllm:e2e_request_latency_seconds_count", **_model("alpha")) == 3
    assert delta("vllm:time_to_first_token_seconds_count", **_model("alpha")) == 2  # no first token: not timed
    assert delta("vllm:e2e_request_latency_seconds_count", **_model("beta")) == 2
    assert delta("vllm:time_to_first_token_seconds_count", **_model(None)) == 1
    assert delta("vllm:e2e_request_latency_seconds_sum", **_model("beta")) > 0
    assert delta("vllm:time_to_first_token_seconds_bucket", **_model("beta"), le="+Inf") == 2
    # the per-model series add up to the whole server's lorakit_ figures
    assert _sum(after, "vllm:generation_tokens_total") == _value(after, "lorakit_generation_tokens_total")
    assert _sum(after, "vllm:prompt_tokens_total") == _value(after, "lorakit_prompt_tokens_total")
    assert _sum(after, "vllm:e2e_request_latency_seconds_count") == _value(after, "lorakit_request_duration_seconds_count")
    assert _sum(after, "vllm:request_success_total", finished_reason="error") == \
        _value(after, "lorakit_requests_finished_total", finish_reason="error")
    # every vLLM series names the base as --name gave it (quote, backslash, newline escaped and read back)
    assert {dict(pairs).get("model_name") for (name, pairs) in after if name.startswith("vllm:") and
            name != "vllm:lora_requests_info"} == {NAME}
    assert 'model_name="tiny \\"base\\" \\\\ v1\\nsecond line"' in text
    # gauges: nothing runs now; one adapter in memory of at most one; alpha, beta, alpha: three loads, two evictions
    assert _sum(after, "vllm:num_requests_running") == 0 == _sum(after, "vllm:num_requests_waiting")
    assert _sum(after, "lorakit_lora_requests_running") == 0 == _sum(after, "lorakit_lora_requests_waiting")
    assert {dict(pairs)["lora_name"] for (name, pairs) in after if name == "lorakit_lora_requests_waiting"} == \
        {"alpha", "beta"}
    assert _value(after, "lorakit_adapters_loaded") == 1 == _value(after, "lorakit_adapters_max_loaded")
    assert grew[("lorakit_adapter_loads_total", ())] == 3 and grew[("lorakit_adapter_evictions_total", ())] == 2
    info = [(dict(pairs), value) for (name, pairs), value in after.items() if name == "vllm:lora_requests_info"]
    assert len(info) == 1
    assert info[0][0] == {"max_lora": "1", "running_lora_adapters": "", "waiting_lora_adapters": ""}
    assert abs(info[0][1] - time.time()) < 60  # vLLM's value: the time of the update
    # per route, by status; unknown paths all in one series, and the method nobody routes as "other"
    http = "lorakit_http_requests_total"
    assert delta(http, method="POST", route="/v1/completions", status="200") == 4
    assert delta(http, method="POST", route="/v1/chat/completions", status="200") == 1
    assert delta(http, method="POST", route="/v1/completions", status="500") == 0
    assert delta(http, method="POST", route="/v1/completions", status="400") == 3
    assert delta(http, method="POST", route="/v1/completions", status="404") == 1
    assert delta(http, method="POST", route="/v1/completions", status="401") == 1
    assert delta(http, method="GET", route="unmatched", status="404") == 3
    assert delta(http, method="other", route="/v1/models", status="405") == 1
    assert delta(http, method="GET", route="/metrics", status="200") == 1  # the first scrape (this one: once sent)
    routes = {dict(pairs)["route"] for (name, pairs) in after if name == http}
    assert "nope" not in text and all(route == "unmatched" or route.startswith("/") for route in routes)
    # nothing else moved on the per-model families: no series for the unknown model
    assert not any(dict(pairs).get("lora_name") == "gamma" for (_, pairs) in after)


def test_a_running_adapter_shows_in_the_gauges_and_a_cancelled_job_is_an_abort(server):
    client = server["client"]
    _, _, before = _scrape(client)
    body = {"model": "beta", "prompt": PROMPT, "max_tokens": 900, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as stream:
        assert stream.status_code == 200
        # its first token came; ``lines`` stays referenced: a line iterator dropped closes the connection (httpcore)
        lines = stream.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        # the engine counts a job as running once its prefill step ends, a moment after the first token is sent
        deadline = time.monotonic() + 10
        while not _value(during := _scrape(client)[2], "lorakit_requests_running") and time.monotonic() < deadline:
            time.sleep(0.01)
    # the stream closed unread: the engine drops the job, counted as vLLM's "abort"
    deadline = time.monotonic() + 60
    while _value(after := _scrape(client)[2], "lorakit_requests_running") and time.monotonic() < deadline:
        time.sleep(0.05)
    # vLLM's gauge: one series, the whole server's (a gateway reads one sample as the queue); per adapter: lorakit's
    assert [key for key in during if key[0] == "vllm:num_requests_running"] == \
        [("vllm:num_requests_running", (("model_name", NAME),))]
    assert _value(during, "vllm:num_requests_running", model_name=NAME) == 1 == _value(during, "lorakit_requests_running")
    assert _value(during, "lorakit_lora_requests_running", lora_name="beta") == 1
    assert _value(during, "lorakit_lora_requests_running", lora_name="alpha") == 0
    assert _value(during, "vllm:num_requests_waiting", model_name=NAME) == 0
    info = next(dict(pairs) for (name, pairs) in during if name == "vllm:lora_requests_info")
    assert info["running_lora_adapters"] == "beta" and info["waiting_lora_adapters"] == ""
    aborted = ("vllm:request_success_total", tuple(sorted({**_model("beta"), "finished_reason": "abort"}.items())))
    assert after[aborted] - before.get(aborted, 0.0) == 1
    assert _value(after, "lorakit_lora_requests_running", lora_name="beta") == 0


def test_label_values_and_help_are_escaped_and_adapters_past_the_cap_share_one_series():
    from types import SimpleNamespace

    from lorakit.serve.metrics import OTHER, EngineMetrics, Histogram, escape

    assert escape('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    histogram = Histogram((0.1, 1.0))
    for value in (0.1, 0.5, 1.0, 7.0):
        histogram.observe(value)
    assert histogram.lines("x", {"lora_name": 'q"\\\n'}) == [
        'x_bucket{lora_name="q\\"\\\\\\n",le="0.1"} 1', 'x_bucket{lora_name="q\\"\\\\\\n",le="1"} 3',
        'x_bucket{lora_name="q\\"\\\\\\n",le="+Inf"} 4', 'x_sum{lora_name="q\\"\\\\\\n"} 8.6',
        'x_count{lora_name="q\\"\\\\\\n"} 4']
    metrics = EngineMetrics(max_series=2)
    assert [metrics.series(name) for name in (None, "a", "b", "c", "a", "d", None)] == \
        [None, "a", "b", OTHER, "a", OTHER, None]
    job = SimpleNamespace(prompt=[1, 2], tokens=[3], created=0.0, first_token=0.5, series=OTHER)
    metrics.finished(job, "length", now=1.0)
    assert metrics.models[OTHER].generation_tokens == 1 and metrics.total.reasons["length"] == 1
    assert set(metrics.models) == {None, "a", "b", OTHER}


GOOD = ('# HELP m_total Help with \\\\ and \\n.\n# TYPE m_total counter\nm_total{a="x\\"y"} 1\n'
        '# TYPE h histogram\nh_bucket{le="1"} 1\nh_bucket{le="+Inf"} 2\nh_sum 3.5\nh_count 2\n')


@pytest.mark.parametrize("bad", [
    GOOD.replace('x\\"y', 'x"y'),  # an unescaped quote
    GOOD.replace('x\\"y', "x\\ty"),  # an escape the format has not
    GOOD.replace('m_total{a="x\\"y"} 1\n', 'm_total{a="1"} 1\nm_total{a="1"} 2\n'),  # a series twice
    GOOD.replace('m_total{a="x\\"y"} 1\n', 'm_total{a="1",a="2"} 1\n'),  # a label twice
    GOOD.replace("h_count 2\n", "h_count 2\nm_total 4\n"),  # a sample after another family began
    GOOD.replace('h_bucket{le="+Inf"} 2', 'h_bucket{le="+Inf"} 0'),  # buckets not cumulative
    GOOD.replace("h_count 2", "h_count 3"),  # +Inf is not the count
    GOOD.replace("# TYPE m_total counter", "# TYPE m counter"),  # a counter's name without _total
    GOOD.replace('m_total{a="x\\"y"} 1', 'm_total{a="x\\"y"} 1 1700000000'),  # a timestamp
    GOOD.replace('m_total{a="x\\"y"} 1', 'm_total{a="x\nline"} 1'),  # a raw newline in a value
])
def test_the_parser_is_strict(bad):
    parse_exposition(GOOD)
    with pytest.raises((AssertionError, IndexError)):
        parse_exposition(bad)


def test_prefix_cache_tokens_are_vllms_counters(server):
    """The static decoder's prefix cache as vLLM's ``vllm:prefix_cache_queries_total`` / ``_hits_total``, equal to
    /health's counts; a server without one (the main one, on transformers' decoder) has neither family."""
    assert "vllm:prefix_cache_hits_total" not in _scrape(server["client"])[1]
    client = server["static"]
    messages = [{"role": "system", "content": "You are a terse assistant who answers in a few words. " * 3},
                {"role": "user", "content": "Name three colours of the rainbow, please."}]
    for _ in range(2):  # the second turn re-sends the first's prompt
        reply = client.post("/v1/chat/completions", json={"model": "base", "messages": messages, "max_tokens": 4,
                                                          "temperature": 0})
        assert reply.status_code == 200, reply.text
    health = client.get("/health").json()
    _, types, samples = _scrape(client)
    assert types["vllm:prefix_cache_hits_total"] == "counter"
    hits = _value(samples, "vllm:prefix_cache_hits_total", model_name="base")
    queries = _value(samples, "vllm:prefix_cache_queries_total", model_name="base")
    assert hits == health["prefix_cache_hit_tokens"] > 0 and queries == health["prefix_cache_query_tokens"] >= hits


def test_queue_time_and_time_per_output_token(server):
    """vLLM's ``vllm:request_queue_time_seconds`` (submission to leaving the queue for a row) and
    ``vllm:request_time_per_output_token_seconds`` (mean gap between a job's tokens after its first), per model:
    one observation per finished job (per-token: per job of two tokens or more), each within its job's latency."""
    client = server["client"]
    _, types, before = _scrape(client)
    assert types["vllm:request_queue_time_seconds"] == types["vllm:request_time_per_output_token_seconds"] == "histogram"
    _complete(client, "beta", 6)
    _complete(client, "beta", 1)  # one token: no gap to measure
    assert client.get("/health").status_code == 200  # the last answer is counted once its bytes are sent
    _, _, after = _scrape(client)
    beta = _model("beta")

    def grew(name: str) -> float:
        return _value(after, name, **beta) - _value(before, name, **beta)

    assert grew("vllm:request_queue_time_seconds_count") == 2
    assert grew("vllm:request_time_per_output_token_seconds_count") == 1
    e2e = grew("vllm:e2e_request_latency_seconds_sum")
    assert 0 <= grew("vllm:request_queue_time_seconds_sum") <= grew("vllm:time_to_first_token_seconds_sum") <= e2e
    assert 0 < 5 * grew("vllm:request_time_per_output_token_seconds_sum") <= e2e
