"""The server's numbers for Prometheus: ``GET /metrics`` in the text exposition format (version 0.0.4).

Written here by hand (no client library): a handful of gauges and counters read from what the engine and the adapter
pool already keep (``Engine.stats``, ``Engine.timings``, ``AdapterPool.loads`` / ``evictions``), plus what
:class:`EngineMetrics` adds up as the engine's jobs finish: their prompt and generated tokens, why they ended, and two
latency histograms (submit to first token, submit to the end). A job is one choice of a request (``n`` of 3: three
jobs). Every name starts with ``lorakit_``; counters end in ``_total``, durations are in seconds.

Only the engine thread writes to :class:`EngineMetrics` (under its own lock, so a scrape reads each histogram whole);
the rest is read as it stands, which is what a scrape between two steps sees anyway.
"""

from __future__ import annotations

import bisect
import threading
import time

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# seconds; a tiny CPU model answers in milliseconds, a 70B one on a busy GPU in minutes
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class Histogram:
    """Counts of observations per bucket (upper bounds ``bounds``, then +Inf), their sum and count."""

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last: above every bound
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # the first bound >= value: Prometheus' "le"
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts):
            running += count
            out.append(f'{name}_bucket{{le="{_number(bound)}"}} {running}')
        return out + [f"{name}_sum {_number(self.sum)}", f"{name}_count {self.count}"]


class EngineMetrics:
    """What the engine's finished jobs add up to; ``finished`` is called once per job, on the engine thread."""

    def __init__(self):
        self.lock = threading.Lock()
        self.reasons = dict.fromkeys(FINISH_REASONS, 0)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.latency = Histogram(LATENCY_BUCKETS)
        self.first_token = Histogram(FIRST_TOKEN_BUCKETS)

    def finished(self, request, reason: str, now: float | None = None) -> None:
        """Count ``request`` (an ``engine.Request``: ``prompt``, ``tokens``, ``created``, ``first_token``), which
        ended for ``reason`` ("stop", "length", "cancelled" or "error: ...")."""
        now = time.monotonic() if now is None else now
        key = "error" if reason.startswith("error") else reason if reason in self.reasons else "stop"
        with self.lock:
            self.reasons[key] += 1
            self.prompt_tokens += len(request.prompt)
            self.generation_tokens += len(request.tokens)
            self.latency.observe(max(0.0, now - request.created))
            if request.first_token is not None:
                self.first_token.observe(max(0.0, request.first_token - request.created))


def _number(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else repr(float(value))


def _metric(name: str, kind: str, help_text: str, samples: list[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *samples]


def exposition(engine, pool) -> str:
    """The Prometheus text of ``engine`` (``serve.engine.Engine``) and ``pool`` (``serve.pool.AdapterPool``)."""
    stats = engine.stats()
    timings = engine.timings
    metrics: EngineMetrics = engine.metrics
    with metrics.lock:
        reasons = dict(metrics.reasons)
        prompt, generated = metrics.prompt_tokens, metrics.generation_tokens
        latency = metrics.latency.lines("lorakit_request_duration_seconds")
        first = metrics.first_token.lines("lorakit_time_to_first_token_seconds")
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
    return "\n".join(lines) + "\n"
