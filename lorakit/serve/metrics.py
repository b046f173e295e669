"""The server's numbers for Prometheus: ``GET /metrics`` in the text exposition format (version 0.0.4).

Written here by hand (no client library). Three sources:

- what the engine and the adapter pool already keep (``Engine.stats``, ``Engine.timings``, ``AdapterPool.loads`` /
  ``evictions``, the static decoder's prefix cache's looked-up and found tokens), read as they stand (what a scrape
  between two steps sees anyway);
- :class:`EngineMetrics`, which adds up the engine's jobs as they finish: prompt and generated tokens, why they
  ended, two latency histograms (submit to first token, submit to the end), in all and per model (the base, or the
  adapter the request named). A job is one choice of a request (``n`` of 3: three jobs);
- ``serve.http_metrics.HTTPCounts``: every HTTP answer by method, route and status.

Two sets of names. ``lorakit_*``: the whole server (one series each, as before), plus
``lorakit_http_requests_total`` and the jobs running / waiting per adapter (``lorakit_lora_requests_*``).
``vllm:*``: vLLM's names, labels and meanings where vLLM has the figure, so its dashboards and gateways (the
Gateway API inference extension reads ``vllm:lora_requests_info``, ``vllm:num_requests_waiting``) work unchanged.
vLLM labels them ``model_name`` (the served base model); here the counters and histograms of adapter traffic also
carry ``lora_name`` (the adapter the request named), so ``sum by (lora_name)`` splits them per adapter while vLLM's
queries, which match on ``model_name``, still add them all up. Counters end in ``_total``, durations are in seconds.

Label values are escaped as the format says (``\\``, ``"``, newline), since ``--name`` is any string. Cardinality
is bounded: at most :data:`MAX_MODEL_SERIES` adapters get series of their own, the rest share
``lora_name="(other)"`` (no adapter name has parentheses); routes are their templates (``http_metrics``).
"""

from __future__ import annotations

import bisect
import threading
import time

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; a tiny CPU model answers in milliseconds, a 70B one on a busy GPU in minutes
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)  # a decode step's
FINISH_REASONS = ("stop", "length", "cancelled", "error")
VLLM_REASONS = {"stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}  # vLLM's finished_reason

# adapters with series of their own; an RL run that loads each checkpoint under a new name would otherwise add
# a dozen series per checkpoint for ever. Those past it are counted together under OTHER.
MAX_MODEL_SERIES = 256
OTHER = "(other)"


def escape(value: str) -> str:
    """``value`` as a label value between double quotes: backslash, double quote and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: dict[str, str]) -> str:
    """``{a="x",b="y"}`` (nothing for no pairs)."""
    return "{" + ",".join(f'{key}="{escape(str(value))}"' for key, value in pairs.items()) + "}" if pairs else ""


class Histogram:
    """Counts of observations per bucket (upper bounds ``bounds``, then +Inf), their sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last: above every bound
        self.sum = 0.0
        self.count = 0

    def copy(self) -> Histogram:
        twin = Histogram(self.bounds)
        twin.counts, twin.sum, twin.count = list(self.counts), self.sum, self.count
        return twin

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value: Prometheus' "le"
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: dict[str, str] | None = None) -> list[str]:
        """The bucket, sum and count samples of ``name``, each with ``labels`` (the buckets' ``le`` last)."""
        labels = labels or {}
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append(f"{name}_bucket{_labels({**labels, 'le': _number(bound)})} {running}")
        tail = _labels(labels)
        return out + [f"{name}_sum{tail} {_number(self.sum)}", f"{name}_count{tail} {self.count}"]


class JobFigures:
    """What a set of finished jobs adds up to: how many ended for each reason, their prompt and generated tokens,
    and their latency histograms: submission to end, to first token, to leaving the queue, and the mean time
    between output tokens of each job that made two or more."""

    def __init__(self):
        self.reasons = dict.fromkeys(FINISH_REASONS, 0)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.first_token = Histogram(FIRST_TOKEN_BUCKETS)
        self.queue = Histogram(FIRST_TOKEN_BUCKETS)
        self.per_token = Histogram(PER_TOKEN_BUCKETS)

    def copy(self) -> JobFigures:
        twin = JobFigures()
        twin.reasons, twin.prompt_tokens, twin.generation_tokens = dict(self.reasons), self.prompt_tokens, \
            self.generation_tokens
        twin.latency, twin.first_token = self.latency.copy(), self.first_token.copy()
        twin.queue, twin.per_token = self.queue.copy(), self.per_token.copy()
        return twin

    def add(self, request, key: str, now: float) -> None:
        self.reasons[key] += 1
        self.prompt_tokens += len(request.prompt)
        self.generation_tokens += len(request.tokens)
        self.latency.observe(max(0.0, now - request.created))
        if request.first_token is not None:
            self.first_token.observe(max(0.0, request.first_token - request.created))
            if len(request.tokens) > 1:
                self.per_token.observe(max(0.0, now - request.first_token) / (len(request.tokens) - 1))
        admitted = getattr(request, "admitted", None)
        if admitted is not None:
            self.queue.observe(max(0.0, admitted - request.created))


class EngineMetrics:
    """What the engine's finished jobs add up to, in all and per model. ``finished`` is called once per job, on the
    engine thread; ``series`` names a request's model (on any thread); a scrape reads a ``snapshot``."""

    def __init__(self, max_series: int = MAX_MODEL_SERIES):
        self.lock = threading.Lock()
        self.total = JobFigures()
        self.models: dict[str | None, JobFigures] = {None: JobFigures()}  # None: the base model
        self.max_series = max_series

    # the whole server's figures, as these names read before the per-model ones came
    @property
    def reasons(self) -> dict[str, int]:
        return self.total.reasons

    @property
    def prompt_tokens(self) -> int:
        return self.total.prompt_tokens

    @property
    def generation_tokens(self) -> int:
        return self.total.generation_tokens

    def snapshot(self) -> tuple[JobFigures, dict[str | None, JobFigures]]:
        """Copies of the whole server's figures and each model's, taken at one moment (a scrape formats them
        without the lock, which ``series`` takes on the event loop)."""
        with self.lock:
            return self.total.copy(), {model: figures.copy() for model, figures in self.models.items()}

    def series(self, model: str | None) -> str | None:
        """The label under which jobs of adapter ``model`` (None: the base) are counted: its name, or
        :data:`OTHER` once ``max_series`` adapters have series of their own."""
        with self.lock:
            if model in self.models:
                return model
            if len(self.models) > self.max_series:  # the base's entry is not one of the adapters'
                model = OTHER
            self.models.setdefault(model, JobFigures())
            return model

    def finished(self, request, reason: str, now: float | None = None) -> None:
        """Count ``request`` (an ``engine.Request``: ``prompt``, ``tokens``, ``created``, ``first_token``,
        ``series``), which ended for ``reason`` ("stop", "length", "cancelled" or "error: ...")."""
        now = time.monotonic() if now is None else now
        key = "error" if reason.startswith("error") else reason if reason in self.total.reasons else "stop"
        series = getattr(request, "series", None)
        with self.lock:
            self.total.add(request, key, now)
            figures = self.models.get(series)
            if figures is None:  # a request submitted without a series (engine used directly): its own now
                figures = self.models[series] = JobFigures()
            figures.add(request, key, now)


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def _metric(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    help_text = help_text.replace("\\", "\\\\").replace("\n", "\\n")
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def exposition(engine, pool, http=None, model_name: str = "") -> str:
    """The Prometheus text of ``engine`` (``serve.engine.Engine``), ``pool`` (``serve.pool.AdapterPool``) and
    ``http`` (``serve.http_metrics.HTTPCounts``; None: no HTTP figures); ``model_name``: the base's served name."""
    stats = engine.stats()
    timings = engine.timings
    metrics: EngineMetrics = engine.metrics
    running, waiting = engine.queued()
    total, models = metrics.snapshot()
    reasons = total.reasons
    prompt, generated = total.prompt_tokens, total.generation_tokens
    latency = total.latency.lines("lorakit_request_duration_seconds")
    first = total.first_token.lines("lorakit_time_to_first_token_seconds")
    per_model = _per_model(models, model_name, [r.series for r in running], [r.series for r in waiting])
    loaded = len(pool.loaded_names()) if pool is not None else 0
    lines = [
        *_metric("lorakit_requests_running", "gauge", "Engine jobs decoding now (one per choice of a request).",
                 [f"lorakit_requests_running {stats['running']}"]),
        *_metric("lorakit_requests_waiting", "gauge", "Engine jobs waiting for a row of the batch.",
                 [f"lorakit_requests_waiting {stats['waiting']}"]),
        *_metric("lorakit_max_batch", "gauge", "Rows the engine decodes together at most (--max-batch).",
                 [f"lorakit_max_batch {engine.max_batch}"]),
        *_metric("lorakit_requests_finished_total", "counter", "Engine jobs finished, by why they ended.",
                 [f'lorakit_requests_finished_total{{finish_reason="{key}"}} {count}' for key, count in reasons.items()]),
        *_metric("lorakit_prompt_tokens_total", "counter", "Prompt tokens of the finished engine jobs.",
                 [f"lorakit_prompt_tokens_total {prompt}"]),
        *_metric("lorakit_generation_tokens_total", "counter", "Tokens generated by the finished engine jobs.",
                 [f"lorakit_generation_tokens_total {generated}"]),
        *_metric("lorakit_engine_steps_total", "counter", "Steps of the engine loop (admission and one decode).",
                 [f"lorakit_engine_steps_total {stats['steps']}"]),
        *_metric("lorakit_decode_steps_total", "counter", "Decode steps (one token for every running row).",
                 [f"lorakit_decode_steps_total {timings['decode_steps']}"]),
        *_metric("lorakit_decode_seconds_total", "counter", "Wall-clock seconds spent in decode steps.",
                 [f"lorakit_decode_seconds_total {_number(timings['decode_s'])}"]),
        *_metric("lorakit_prefill_calls_total", "counter", "Prefill passes (newcomers admitted together).",
                 [f"lorakit_prefill_calls_total {timings['prefill_calls']}"]),
        *_metric("lorakit_prefill_requests_total", "counter", "Engine jobs prefilled.",
                 [f"lorakit_prefill_requests_total {timings['prefill_rows']}"]),
        *_metric("lorakit_prefill_seconds_total", "counter", "Wall-clock seconds spent prefilling newcomers.",
                 [f"lorakit_prefill_seconds_total {_number(timings['prefill_s'])}"]),
        *_metric("lorakit_time_to_first_token_seconds", "histogram",
                 "Seconds from an engine job's submission to its first token.", first),
        *_metric("lorakit_request_duration_seconds", "histogram",
                 "Seconds from an engine job's submission to its end.", latency),
        *_metric("lorakit_adapters_loaded", "gauge", "Adapters in memory now.", [f"lorakit_adapters_loaded {loaded}"]),
        *_metric("lorakit_adapters_max_loaded", "gauge", "Adapters kept in memory at most (--max-loaded).",
                 [f"lorakit_adapters_max_loaded {pool.max_loaded if pool is not None else 0}"]),
        *_metric("lorakit_adapter_loads_total", "counter", "Adapters read from disk into memory (loads and reloads).",
                 [f"lorakit_adapter_loads_total {pool.loads if pool is not None else 0}"]),
        *_metric("lorakit_adapter_evictions_total", "counter",
                 "Idle adapters dropped from memory to make room for another.",
                 [f"lorakit_adapter_evictions_total {pool.evictions if pool is not None else 0}"]),
    ]
    if http is not None:
        lines += _metric("lorakit_http_requests_total", "counter",
                         "HTTP requests answered, by method, route (its template; unmatched: no route) and status.",
                         [f"lorakit_http_requests_total{_labels({'method': m, 'route': r, 'status': str(s)})} {c}"
                          for (m, r, s), c in sorted(http.snapshot().items())])
    lines += per_model
    if "prefix_cache_query_tokens" in stats:  # the static decoder's prefix cache (lorakit.decoding.prefix_cache)
        tail = _labels({"model_name": model_name})
        lines += _metric("vllm:prefix_cache_queries_total", "counter", "Prompt tokens looked up in the prefix cache.",
                         [f"vllm:prefix_cache_queries_total{tail} {stats['prefix_cache_query_tokens']}"])
        lines += _metric("vllm:prefix_cache_hits_total", "counter",
                         "Prompt tokens found in the prefix cache (their K/V copied, not computed).",
                         [f"vllm:prefix_cache_hits_total{tail} {stats['prefix_cache_hit_tokens']}"])
    lines += _metric("vllm:lora_requests_info", "gauge",
                     "Running stats on lora requests: adapters with jobs running / waiting (comma-separated), the "
                     "adapters kept in memory at most; the value is the scrape's Unix time.",
                     [f"vllm:lora_requests_info{_labels(_lora_info(pool, running, waiting))} {_number(time.time())}"])
    return "\n".join(lines) + "\n"


def _per_model(models: dict[str | None, JobFigures], model_name: str, running: list, waiting: list) -> list[str]:
    """vLLM's per-request families, one series per model of ``models`` (``EngineMetrics.snapshot``'s; the base
    first). ``running`` / ``waiting``: the series (``EngineMetrics.series``) of the jobs decoding / waiting now.

    vLLM's running / waiting gauges stay one series each, the whole server's: a gateway reads one sample of
    ``vllm:num_requests_waiting`` as the server's queue (the Gateway API inference extension takes the family's
    last), so a split would hide every other adapter's. Their split per adapter is ``lorakit_lora_requests_*``."""
    families = {name: [] for name in ("running", "waiting", "success", "prompt", "generation", "first", "e2e",
                                      "queue", "per_token")}
    for series, figures in sorted(models.items(), key=lambda item: (item[0] is not None, item[0] or "")):
        labels = {"model_name": model_name} if series is None else {"model_name": model_name, "lora_name": series}
        tail = _labels(labels)
        if series is not None:
            families["running"].append(f"lorakit_lora_requests_running{_labels({'lora_name': series})} "
                                       f"{running.count(series)}")
            families["waiting"].append(f"lorakit_lora_requests_waiting{_labels({'lora_name': series})} "
                                       f"{waiting.count(series)}")
        families["success"] += [f"vllm:request_success_total{_labels({**labels, 'finished_reason': VLLM_REASONS[key]})}"
                                f" {count}" for key, count in figures.reasons.items()]
        families["prompt"].append(f"vllm:prompt_tokens_total{tail} {figures.prompt_tokens}")
        families["generation"].append(f"vllm:generation_tokens_total{tail} {figures.generation_tokens}")
        families["first"] += figures.first_token.lines("vllm:time_to_first_token_seconds", labels)
        families["e2e"] += figures.latency.lines("vllm:e2e_request_latency_seconds", labels)
        families["queue"] += figures.queue.lines("vllm:request_queue_time_seconds", labels)
        families["per_token"] += figures.per_token.lines("vllm:request_time_per_output_token_seconds", labels)
    whole = _labels({"model_name": model_name})
    return [
        *_metric("vllm:num_requests_running", "gauge", "Engine jobs decoding now.",
                 [f"vllm:num_requests_running{whole} {len(running)}"]),
        *_metric("vllm:num_requests_waiting", "gauge", "Engine jobs waiting for a row of the batch.",
                 [f"vllm:num_requests_waiting{whole} {len(waiting)}"]),
        *_metric("lorakit_lora_requests_running", "gauge", "Engine jobs decoding now, per adapter.", families["running"]),
        *_metric("lorakit_lora_requests_waiting", "gauge", "Engine jobs waiting for a row, per adapter.",
                 families["waiting"]),
        *_metric("vllm:request_success_total", "counter",
                 "Engine jobs finished, per model and finished_reason (stop, length, abort: cancelled, error).",
                 families["success"]),
        *_metric("vllm:prompt_tokens_total", "counter", "Prompt tokens of finished engine jobs, per model.",
                 families["prompt"]),
        *_metric("vllm:generation_tokens_total", "counter", "Tokens generated by finished engine jobs, per model.",
                 families["generation"]),
        *_metric("vllm:time_to_first_token_seconds", "histogram",
                 "Seconds from an engine job's submission to its first token, per model.", families["first"]),
        *_metric("vllm:e2e_request_latency_seconds", "histogram",
                 "Seconds from an engine job's submission to its end, per model.", families["e2e"]),
        *_metric("vllm:request_queue_time_seconds", "histogram",
                 "Seconds an engine job waited for a row of the batch, per model.", families["queue"]),
        *_metric("vllm:request_time_per_output_token_seconds", "histogram",
                 "Mean seconds between the output tokens of an engine job (from its first to its end), per model.",
                 families["per_token"]),
    ]


def _lora_info(pool, running: list, waiting: list) -> dict[str, str]:
    """vLLM's labels of ``vllm:lora_requests_info``: the adapters of the jobs (``engine.Request``) running and
    waiting, each once, comma-separated and sorted, by their own names (a gateway routes a request for an adapter to
    the server that runs it), and ``max_lora``: how many adapters can be in memory (so in one batch) at once."""
    def names(requests: list) -> str:
        return ",".join(sorted({r.model for r in requests if r.model is not None}))

    return {"max_lora": str(pool.max_loaded if pool is not None else 0), "running_lora_adapters": names(running),
            "waiting_lora_adapters": names(waiting)}
