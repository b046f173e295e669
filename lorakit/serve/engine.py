"""Continuous batching: one scheduler thread runs every request through shared forward passes.

Each step (under the model lock, so adapters are never swapped mid-forward):

1. drop cancelled rows;
2. admit waiting requests (up to ``max_batch`` rows in all): prefill them together, one row per request, each
   through its own adapter (``lorakit.mixed_batch``), sample their first token and join the running batch;
3. decode one token for every running row in one forward pass over the shared ``KVBatch``;
4. rows that finished (end-of-turn token, ``max_new_tokens``, a stop string, or cancelled) leave the batch.

Requests join and leave only between steps. Padding never changes a row's logits (see ``lorakit.generation``),
so a request's output equals the same request served alone.

With a ``StaticDecoder`` (``lorakit.decoding``: CUDA, Llama-family models) steps 2. and 3. run there instead: each
request owns a row of its static KV cache from admission to the end, the decoder prefills newcomers straight into
their rows (``StaticDecoder.prefill``: its fused layers, a slot per token), and a decode step is one replay of a
captured CUDA graph over all rows. Its prefill is chunked (``prefill_chunk``): a step prefills at most that many
prompt tokens, first the rest of prompts already part way in, then newcomers', so a long prompt arriving costs the
rows decoding beside it one chunk's time per step instead of a pause for the whole prompt; a prompt joins the
decoding rows in the step its last chunk runs.

Callbacks that may take other locks (releasing an adapter pin) run after the model lock is released, so the adapter
pool and the engine cannot deadlock.
"""

from __future__ import annotations

import collections
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from lorakit.generation import KVBatch, SamplingParams, decode, prefill
from lorakit.serve.metrics import EngineMetrics
from lorakit.serve.sampling import (OFF, HistoryBlock, RowOptions, hold_back, keep_only, new_history, penalize_rows,
                                    sample_rows)


@dataclass
class TokenInfo:
    """The chosen token's log-probability and the ``top`` most likely tokens' (id, log-probability); ``rank``:
    the chosen token's place among the vocabulary's (1: the most likely), where it was counted (``Engine.score``)."""

    logprob: float
    top: list[tuple[int, float]]
    rank: int | None = None


# Newcomers with at most this many prompt tokens in all are prefilled by the static decoder itself; longer ones go
# through transformers' forward, whose segmented multi-LoRA kernels read each adapter once per 64-token tile where
# the decoder's row-wise grouped kernels read it once per token. Only with chunked prefill off (prefill_chunk=0).
STATIC_PREFILL_MAX_TOKENS = 2048

# the start of a job's finish reason where the request's own options (allowed_token_ids, bad_words, min_tokens, a
# format) left its row no token to draw: the client's 400 (answers.failure), not a failure of the server
NO_TOKEN = "no token allowed: "

# With the static decoder, prompt tokens prefilled per engine step at most (``Engine``'s prefill_chunk default)
PREFILL_CHUNK_TOKENS = 2048

# ``Engine.score`` keeps at most this many logits (float32) at once: 256 MiB, 1,365 prompt positions of a 49k
# vocabulary per forward; a longer prompt takes one forward per slice of positions
SCORE_LOGITS = 1 << 26


@dataclass
class Request:
    """One generation request as the engine sees it.

    ``on_token(token_id, info) -> bool`` runs on the engine thread for every new token (``info`` is None unless
    ``logprobs`` is set); returning False finishes the request with reason ``"stop"`` (a stop string matched).
    ``on_finish(reason)`` runs once at the end, outside the model lock; reason is ``"stop"``, ``"length"``,
    ``"cancelled"`` or ``"error: ..."``.
    """

    prompt: list[int]
    adapter: str | None
    params: SamplingParams
    on_token: Callable[[int, TokenInfo | None], bool]
    on_finish: Callable[[str], None]
    logprobs: int | None = None
    tokens: list[int] = field(default_factory=list)
    cancelled: bool = False
    finished: bool = False
    generator: torch.Generator | None = None
    created: float = field(default_factory=time.monotonic)
    first_token: float | None = None  # time.monotonic() of its first token (GET /metrics' time to first token)
    admitted: float | None = None  # time.monotonic() when it left the queue for a row (GET /metrics' queue time)
    # the adapter as clients name it (None: the base; ``adapter`` is the pool's internal name), and the label
    # GET /metrics counts the job under (``EngineMetrics.series``: that name, or "(other)" past the cap)
    model: str | None = None
    series: str | None = None
    row: int = -1  # its row of the static decoder's cache (-1: none); the prompt may be in it only in part
    salt: str | None = None  # vLLM's cache_salt: the static decoder's prefix cache shares K/V only under one salt
    cached: int | None = None  # prompt tokens the prefix cache gave its prefill (None: no prefix cache)
    top_k: int = 0  # sample among the k most likely tokens only (0: all); vLLM's extension of the OpenAI API
    # a response_format's matcher (lorakit.serve.structured.Constraint): the row draws only tokens its grammar
    # allows and ends once the answer is complete; None (most rows): no per-step host work at all
    constraint: object | None = None
    # steering (lorakit.serve.steering: thinking_token_budget, allowed_tools' names): ``allowed()`` (None: any
    # token) and ``refused()`` before each token, ``take(token)`` after it; None (most rows): nothing asked
    steer: object | None = None
    # OpenAI's logit_bias: (token ids (k,), biases (k,)) added to the row's logits before its token is chosen (the
    # logprobs it reports are the model's, unbiased); None: nothing added
    bias: tuple[torch.Tensor, torch.Tensor] | None = None
    # OpenAI's presence / frequency penalties: each token this answer holds has presence + frequency x its count
    # taken off its logit; the logprobs stay the model's
    presence: float = 0.0
    frequency: float = 0.0
    # vLLM's repetition_penalty, min_p, min_tokens, allowed_token_ids and bad_words (lorakit.serve.sampling.RowOptions)
    options: RowOptions = OFF
    # with any of the three penalties: the prompt's tokens and the answer's counts on the logits' device
    # (lorakit.serve.sampling.new_history), holding ``tokens[:counted]``; the engine adds the rest at each step
    history: torch.Tensor | None = None
    counted: int = 0
    # the step's stacked history rows this request's ``history`` is row ``block_row`` of (sampling.HistoryBlock):
    # while a step penalises the same requests in the same order, the block is used as it is
    block: HistoryBlock | None = None
    block_row: int = -1
    devices: dict[str, torch.Tensor] = field(default_factory=dict)  # options' token ids, copied once to the device

    def penalized(self) -> bool:
        """Whether a repetition, presence or frequency penalty applies to this request's logits."""
        return bool(self.presence or self.frequency) or self.options.repetition_penalty != 1.0


class Engine:
    """The scheduler thread over one model. ``submit`` requests; ``cancel`` them; ``close`` to stop.

    ``prefill_chunk`` (with a static ``decoder``): prompt tokens prefilled per step at most (the module's
    docstring); 0: each step prefills its newcomers whole (the decoder when they hold up to
    ``STATIC_PREFILL_MAX_TOKENS`` tokens in all, transformers' forward for more)."""

    def __init__(self, model: nn.Module, model_lock: threading.RLock, max_batch: int = 32, pad_id: int = 0,
                 decoder=None, prefill_chunk: int = PREFILL_CHUNK_TOKENS):
        if decoder is not None and decoder.max_batch < max_batch:
            raise ValueError(f"the static decoder has {decoder.max_batch} rows, fewer than max_batch={max_batch}")
        if prefill_chunk < 0:
            raise ValueError(f"prefill_chunk is a number of tokens (0: off), got {prefill_chunk}")
        self.prefill_chunk = prefill_chunk if decoder is not None else 0
        self.model = model
        self.decoder = decoder  # a lorakit.decoding.StaticDecoder, or None: decode through transformers
        self.model_lock = model_lock
        self.max_batch = max_batch
        self.pad_id = pad_id
        self._waiting: collections.deque[Request] = collections.deque()
        self._running: list[Request] = []
        self._filling: list[Request] = []  # holding a decoder row part way through a chunked prefill, oldest first
        self._batch: KVBatch | None = None
        self._wake = threading.Condition()
        self._closing = False
        self.failure: str | None = None  # why the loop's thread ended other than by close() (GET /health: 503)
        self._in_hand: list[Request] = []  # the requests the loop took from the queue this step
        self.steps = 0
        # where the loop's time goes (seconds of wall clock; each phase ends in a device-to-host copy, so it includes
        # the GPU work): prefill + admission of newcomers, and decode steps; GET /health reports them
        self.timings = {"prefill_s": 0.0, "prefill_calls": 0, "prefill_rows": 0, "decode_s": 0.0, "decode_steps": 0}
        self.metrics = EngineMetrics()  # finished jobs' tokens, reasons and latencies (GET /metrics: serve.metrics)
        self.device = next(model.parameters()).device
        self._unservable: dict[str, str | None] = {}  # internal adapter name -> unservable()'s answer
        self._thread = threading.Thread(target=self._loop, name="lorakit-engine", daemon=True)
        self._thread.start()

    # -- public --------------------------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        # only a seeded request needs a stream of its own (its answer must not depend on its neighbours); the
        # others draw from torch's default one, all rows of a step in one call (sampling.sample_rows)
        request.generator = request.params.generator(self.device) if request.params.seed is not None else None
        request.series = self.metrics.series(request.model)
        with self._wake:
            if self.failure is None:
                self._waiting.append(request)
                self._wake.notify()
                return
        request.finished = True  # nothing would ever run it: its client waited for good
        request.on_finish(self._failed())

    def cancel(self, request: Request) -> None:
        request.cancelled = True
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout=10)

    def unservable(self, adapter: str | None) -> str | None:
        """Why rows on ``adapter`` (internal name) cannot decode here, in one line naming it as given, or None.
        Only the static decoder refuses some (adapters that also change the embedding or head, such as peft's
        trainable tokens); asked before a request is submitted, so the client gets a 400, not a failed job."""
        if self.decoder is None or adapter is None:
            return None
        if adapter not in self._unservable:  # an adapter's modules never change under one name (the pool loads
            with self.model_lock:  # each version under a new one): asked once, not between every step's lock
                self._unservable[adapter] = self.decoder.unservable(adapter)
        return self._unservable[adapter]

    def score(self, prompt: list[int], adapter: str | None, top: int) -> list[TokenInfo | None]:
        """Each prompt token's log-probability given the tokens before it (None for the first), and the ``top``
        most likely tokens there: what OpenAI's ``echo`` with ``logprobs`` returns, e.g. for lm-eval's
        loglikelihood tasks. One forward of the prompt through ``adapter`` (internal name; None: the base), under
        the model lock, between engine steps; the logits are kept ``SCORE_LOGITS`` at a time, never (L, V) whole.
        """
        from lorakit.generation import _attention_backends, _routing, takes_logits_to_keep

        infos: list[TokenInfo | None] = [None]
        targets = torch.tensor(prompt[1:], device=self.device)
        chunk = max(1, SCORE_LOGITS // self.model.get_output_embeddings().weight.shape[0])
        ids = torch.tensor([prompt], device=self.device)
        with self.model_lock, torch.inference_mode(), _routing(self.model, [adapter]), _attention_backends(self.device):
            # transformers 4.x's Bloom, OPT, GPT-J... take no logits_to_keep: their (L, V) logits, once
            whole = None if takes_logits_to_keep(self.model) else self.model(input_ids=ids, use_cache=False).logits[0]
            for start in range(0, len(prompt) - 1, chunk):
                keep = torch.arange(start, min(start + chunk, len(prompt) - 1), device=self.device)
                if whole is None:
                    logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=keep).logits[0]  # (k, V)
                else:
                    logits = whole[keep]
                logprobs = torch.log_softmax(logits.float(), dim=-1)
                chosen = logprobs.gather(1, targets[keep].unsqueeze(1))  # (k, 1)
                ranks = ((logprobs > chosen).sum(1) + 1).tolist()  # vLLM's prompt_logprobs rank: 1 + likelier ones
                best = torch.topk(logprobs, k=min(top, logprobs.shape[-1])) if top else None
                for j, value in enumerate(chosen[:, 0].tolist()):
                    pairs = [] if best is None else list(zip(best.indices[j].tolist(), best.values[j].tolist()))
                    infos.append(TokenInfo(value, pairs, ranks[j]))
        return infos

    def queued(self) -> tuple[list[Request], list[Request]]:
        """The requests decoding now and those waiting for a row (copies of the lists; GET /metrics per model)."""
        with self._wake:  # the deque changes only under it (a copy while it changes fails); a list's copy is one
            return list(self._running) + list(self._filling), list(self._waiting)  # step under the GIL

    def stats(self) -> dict:
        prefix = None if self.decoder is None else self.decoder.prefix
        cached = {} if prefix is None else {"prefix_cache_hit_tokens": prefix.hits,
                                            "prefix_cache_query_tokens": prefix.queries}
        return {"running": len(self._running) + len(self._filling), "prefilling": len(self._filling),
                "waiting": len(self._waiting), "steps": self.steps,
                "decoder": "static" if self.decoder is not None else "transformers", **cached,
                **{k: round(v, 4) if isinstance(v, float) else v for k, v in self.timings.items()}}

    def _failed(self) -> str:
        return f"error: the engine stopped ({self.failure}); restart the server"

    # -- the loop ------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        """``_serve_jobs``, and where it ends by an error of its own (a bug, not a failed batch: those fail their
        jobs and it goes on), every job it held finished as failed, and later ones at once (``submit``), with
        ``failure`` set for GET /health: they waited for good while /health said "ok"."""
        try:
            self._serve_jobs()
        except BaseException as error:
            with self._wake:
                self.failure = f"{type(error).__name__}: {error}"
                jobs = self._running + self._filling + list(self._waiting) + self._in_hand
                self._running, self._filling, self._waiting = [], [], collections.deque()
            _print_trace()
            for request in jobs:
                if not request.finished:
                    request.finished = True
                    try:
                        request.on_finish(self._failed())
                    except Exception:
                        _print_trace()

    def _serve_jobs(self) -> None:
        while True:
            with self._wake:
                while not self._closing and not self._waiting and not self._running and not self._filling:
                    self._wake.wait()
                if self._closing:
                    finished = self._running + self._filling + list(self._waiting)
                    self._running, self._filling, self._waiting = [], [], collections.deque()
                    for request in finished:
                        request.finished = True
                        request.on_finish("cancelled")
                    return
                # a queued request whose client left ends now, not once a row comes free (a long generation's
                # whole run): until on_finish it keeps its adapter pinned and counts as waiting
                left = [r for r in self._waiting if r.cancelled]
                if left:
                    self._waiting = collections.deque(r for r in self._waiting if not r.cancelled)
                room = max(0, self.max_batch - len(self._running) - len(self._filling))
                newcomers = [self._waiting.popleft() for _ in range(min(room, len(self._waiting)))]
                self._in_hand = newcomers  # out of the queue, not yet running: _loop fails them if this ends
            admitted = time.monotonic()
            for request in newcomers:
                request.admitted = admitted
            done: list[tuple[Request, str]] = [(r, "cancelled") for r in left]
            try:
                if newcomers or self._running or self._filling:
                    with self.model_lock:
                        self._step(newcomers, done)
                        self.steps += 1
            except Exception as error:  # a bug or an out-of-memory: fail this batch, keep serving
                _print_trace()
                message = f"error: {type(error).__name__}: {error}"
                with self._wake:  # newcomers a chunked prefill put back in the queue wait on: not this batch's
                    requeued = {id(r) for r in self._waiting}
                done += [(r, message) for r in self._running + self._filling + newcomers
                         if not r.finished and id(r) not in requeued]
                self._running, self._filling, self._batch = [], [], None
                if self.decoder is not None:
                    self.decoder.release([row for row in range(self.decoder.max_batch) if self.decoder.active[row]])
            for request, reason in done:  # outside the model lock: callbacks may take the pool's lock
                request.finished = True
                try:
                    self.metrics.finished(request, reason)
                except Exception:  # outside any handler, it ended the loop's thread (every request after waited)
                    _print_trace()
                try:
                    request.on_finish(reason)
                except Exception:
                    _print_trace()

    def _step(self, newcomers: list[Request], done: list[tuple[Request, str]]) -> None:
        self._drop([i for i, r in enumerate(self._running) if r.cancelled], done, "cancelled")
        done += [(r, "cancelled") for r in newcomers if r.cancelled]
        newcomers = [r for r in newcomers if not r.cancelled]
        if self.decoder is not None and newcomers:  # refused alone, so the other rows keep decoding
            reasons = [self.unservable(r.adapter) for r in newcomers]
            done += [(r, f"error: {why}") for r, why in zip(newcomers, reasons) if why is not None]
            newcomers = [r for r, why in zip(newcomers, reasons) if why is None]
        if self.prefill_chunk:
            self._prefill_chunk(newcomers, done)
        elif newcomers and self.decoder is not None and self.decoder.prefill_tokens(
                [r.prompt for r in newcomers], [r.adapter for r in newcomers],
                [r.salt for r in newcomers]) <= STATIC_PREFILL_MAX_TOKENS:
            # the decoder prefills into the rows itself (its fused layers; transformers' forward costs most of a
            # short prompt's time in Python and small kernels); rows of requests that end at once are released
            started = time.perf_counter()
            rows = self.decoder.free_rows()[:len(newcomers)]
            logits = self.decoder.prefill(rows, [r.prompt for r in newcomers], [r.adapter for r in newcomers],
                                          [r.salt for r in newcomers])
            tokens, errors = self._choose(newcomers, logits)
            prefix = self.decoder.prefix is not None
            for j, (row, request) in enumerate(zip(rows, newcomers)):
                request.row = row
                request.cached = self.decoder.reused[row] if prefix else None
                if self._accept(request, logits[j], tokens[j], errors[j], done):
                    self._running.append(request)
                else:
                    self.decoder.release([row])
            self._time_prefill(started, len(newcomers))
        elif newcomers:  # transformers' forward (segmented multi-LoRA kernels: long prompts, or no static decoder)
            started = time.perf_counter()
            logits, batch = prefill(self.model, [r.prompt for r in newcomers], [r.adapter for r in newcomers], self.pad_id)
            if self.decoder is not None:
                # the decoder's slots hold the adapters: free the copies this mixed prefill stacked (the next long
                # prefill copies only its own adapters again, far less work than the prefill itself)
                from lorakit.adapter_stack import drop_stack_caches

                drop_stack_caches(self.model)
            tokens, errors = self._choose(newcomers, logits)
            keep = [i for i, r in enumerate(newcomers) if self._accept(r, logits[i], tokens[i], errors[i], done)]
            if keep and self.decoder is not None:
                rows = self.decoder.free_rows()[:len(keep)]
                self.decoder.admit(rows, batch, members=keep)
                for row, i in zip(rows, keep):
                    newcomers[i].row = row
                    newcomers[i].cached = 0 if self.decoder.prefix is not None else None
                    self.decoder.remember(row, newcomers[i].prompt, newcomers[i].adapter, newcomers[i].salt)
                self._running += [newcomers[i] for i in keep]
            elif keep:
                if len(keep) < len(newcomers):
                    batch.keep(keep)
                if self._batch is None:
                    self._batch = batch
                else:
                    self._batch.extend(batch)
                self._running += [newcomers[i] for i in keep]
            self._time_prefill(started, len(newcomers))
        if not self._running:
            self._batch = None
            return
        started = time.perf_counter()
        tokens, adapters = [r.tokens[-1] for r in self._running], [r.adapter for r in self._running]
        if self.decoder is not None:
            logits = self.decoder.step([r.row for r in self._running], tokens, adapters)
        else:
            logits = decode(self.model, self._batch, tokens, adapters)
        tokens, errors = self._choose(self._running, logits)
        self.timings["decode_s"] += time.perf_counter() - started
        self.timings["decode_steps"] += 1
        finished = [i for i, r in enumerate(self._running)
                    if not self._accept(r, logits[i], tokens[i], errors[i], done)]
        self._drop(finished, done, None)

    def _prefill_chunk(self, newcomers: list[Request], done: list[tuple[Request, str]]) -> None:
        """This step's share of prefill, up to ``prefill_chunk`` prompt tokens through the static decoder: the next
        chunks of prompts already part way in (oldest first), then newcomers in arrival order (their tokens the
        prefix cache holds are copies, not counted); newcomers past the budget go back to the queue's front.
        Prompts whose last chunk ran sample their first token and join the decoding rows."""
        gone = [r for r in self._filling if r.cancelled]
        if gone:
            done += [(r, "cancelled") for r in gone]
            self.decoder.release([r.row for r in gone])
            self._filling = [r for r in self._filling if not r.cancelled]
        budget, chosen, ends = self.prefill_chunk, [], []
        for request in self._filling:
            if budget <= 0:
                break
            start = self.decoder.lengths[request.row]
            ends.append(min(len(request.prompt), start + budget))
            budget -= ends[-1] - start
            chosen.append(request)
        rows, later = iter(self.decoder.free_rows()), []
        for request in newcomers:
            if budget <= 0:
                later.append(request)
                continue
            start = self.decoder.cached_tokens(request.prompt, request.adapter, request.salt)
            ends.append(min(len(request.prompt), start + budget))
            budget -= ends[-1] - start
            request.row = next(rows)
            chosen.append(request)
        if later:
            with self._wake:
                self._waiting.extendleft(reversed(later))
        if not chosen:
            return
        started = time.perf_counter()
        logits = self.decoder.prefill([r.row for r in chosen], [r.prompt for r in chosen],
                                      [r.adapter for r in chosen], [r.salt for r in chosen], ends)
        complete = [j for j, (r, end) in enumerate(zip(chosen, ends)) if end == len(r.prompt)]
        finished, held = {id(chosen[j]) for j in complete}, {id(r) for r in self._filling}
        self._filling = [r for r in self._filling if id(r) not in finished] + \
            [r for r, end in zip(chosen, ends) if end < len(r.prompt) and id(r) not in held]
        if complete:
            group = [chosen[j] for j in complete]
            tokens, errors = self._choose(group, logits[complete])
            prefix = self.decoder.prefix is not None
            for j, request in enumerate(group):
                request.cached = self.decoder.reused[request.row] if prefix else None
                if self._accept(request, logits[complete[j]], tokens[j], errors[j], done):
                    self._running.append(request)
                else:
                    self.decoder.release([request.row])
        self._time_prefill(started, len(chosen))

    def _time_prefill(self, started: float, rows: int) -> None:
        self.timings["prefill_s"] += time.perf_counter() - started
        self.timings["prefill_calls"] += 1
        self.timings["prefill_rows"] += rows

    @staticmethod
    def _choose(requests: list[Request], logits: torch.Tensor) -> tuple[list[int], list[str | None]]:
        """The next token of each of ``requests`` from their ``logits (n, V)``, and per row None or why it failed,
        for the whole batch at once: each row's logits are first :meth:`_processed` (its format, vLLM's and
        OpenAI's options), greedy rows take the argmax, sampled rows are drawn together (``sampling.sample_rows``:
        each from its own generator, so no row depends on its neighbours), and the tokens come to the host in one
        copy."""
        model = logits  # as the model gave them: a row with nothing to draw from says whose fault that is
        processed = Engine._processed(requests, logits)
        logits = Engine._steered(requests, processed, processed is logits)
        tokens = logits.argmax(dim=-1)  # the greedy rows' tokens (and a placeholder for the others)
        masked = [i for i, r in enumerate(requests)
                  if r.params.temperature == 0 and (r.options.masks() or r.steer is not None)]
        if masked:  # allowed_token_ids / min_tokens may leave a greedy row nothing but -inf: no token, an error
            index = torch.tensor(masked, device=logits.device)
            best = logits[index, tokens[index]]  # k elements, not k rows
            tokens[index] = torch.where(best > float("-inf"), tokens[index], -1)
        drawn = [i for i, r in enumerate(requests) if r.params.temperature != 0]
        if drawn:
            whole = len(drawn) == len(requests)
            index = None if whole else torch.tensor(drawn, device=logits.device)
            picked, ok = sample_rows(logits if whole else logits[index],
                                     [requests[i].params.temperature for i in drawn],
                                     [requests[i].params.top_p for i in drawn],
                                     [requests[i].top_k or requests[i].params.top_k for i in drawn],
                                     [requests[i].generator for i in drawn],
                                     [requests[i].options.min_p for i in drawn])
            picked = torch.where(ok, picked, -1)  # -1: nothing to draw from (NaN or all -inf logits)
            if whole:
                tokens = picked
            else:
                tokens[index] = picked
        chosen = tokens.tolist()
        errors = [None if token >= 0 else Engine._no_token(requests[i], model[i]) for i, token in enumerate(chosen)]
        return chosen, errors

    @staticmethod
    def _no_token(request: Request, logits: torch.Tensor) -> str:
        """Why ``request``'s row had nothing to draw from, its ``logits (V,)`` as the model gave them: logits
        that are not finite are the server's failure; otherwise the request's own options refused every token
        (:data:`NO_TOKEN`, the client's 400). Such a request (``allowed_token_ids`` no JSON can start with beside a
        ``response_format``, ``bad_words`` banning a ``guided_choice``'s only word, ...) was a 500 "generation
        failed", which the openai package retries, failing the same way each time."""
        if bool(torch.isnan(logits).any()) or not bool(torch.isfinite(logits).any()):
            return "sampling failed: the model's logits are not finite (NaN or infinite)"
        options, constraint = request.options, request.constraint
        formatted = constraint is not None and constraint.active
        given = [name for name, on in (("allowed_token_ids", options.allowed is not None),
                                       ("bad_words", bool(options.banned)),
                                       ("min_tokens", len(request.tokens) < options.min_tokens),
                                       ("the format (response_format, structured_outputs, guided_* or a named "
                                        "tool's parameters)", formatted))
                 if on]
        if not given:  # the server's own steering (a thinking budget, allowed_tools) left nothing: a bug of its own
            return "sampling failed: no token was left to draw from"
        return (f"{NO_TOKEN}{' and '.join(given)} left no token to choose from at answer token "
                f"{len(request.tokens) + 1}; loosen them so that they allow a token together")

    @staticmethod
    def _processed(requests: list[Request], logits: torch.Tensor) -> torch.Tensor:
        """The logits ``(n, V)`` each row chooses from, in vLLM's order: a format's mask (every token its
        constraint refuses at -inf; all such rows in one pass: ``structured.mask_rows``), then
        ``allowed_token_ids``, ``min_tokens``' hold on the end tokens, ``bad_words``, ``logit_bias``,
        ``repetition_penalty``, presence / frequency penalties (none can allow what an earlier step refused). Rows
        without any of them cost nothing, and the caller's logits stay the model's (for logprobs): any change is
        made on a copy."""
        rows = [i for i, r in enumerate(requests) if r.constraint is not None and r.constraint.active]
        if rows:
            from lorakit.serve.structured import mask_rows

            constraints = [requests[i].constraint for i in rows]
            if len(rows) == len(requests):  # every row formatted: no gather / scatter of (n, V) logits
                logits = mask_rows(constraints, logits)
            else:
                index = torch.tensor(rows, device=logits.device)
                masked, logits = mask_rows(constraints, logits[index]), logits.clone()
                logits[index] = masked
        adjusted = [i for i, r in enumerate(requests) if r.bias is not None or r.penalized() or r.options is not OFF]
        if not adjusted:
            return logits
        if not rows:  # a format's mask made a new tensor already
            logits = logits.clone()
        Engine._restrict(requests, adjusted, logits)
        biased = [i for i in adjusted if requests[i].bias is not None]
        if biased:  # every row's logit_bias in one scatter (a row's ids are distinct: no element written twice)
            for i in biased:
                ids, values = requests[i].bias
                if ids.device != logits.device:
                    requests[i].bias = ids.to(logits.device), values.to(logits.device)
            where = torch.tensor([i for i in biased for _ in range(len(requests[i].bias[0]))], device=logits.device)
            ids = torch.cat([requests[i].bias[0] for i in biased])
            logits[where, ids] += torch.cat([requests[i].bias[1] for i in biased]).to(logits.dtype)
        penalized = [i for i in adjusted if requests[i].penalized()]
        if penalized:  # after the bias: vLLM's order
            Engine._penalize(requests, penalized, logits)
        return logits

    @staticmethod
    def _steered(requests: list[Request], logits: torch.Tensor, shared: bool) -> torch.Tensor:
        """``logits (n, V)`` with each steered row's tokens outside its steer's ``allowed()``, and those it
        ``refused()``, at -inf, last. One token allowed is forced: drawn whatever the row's options left of its
        logit (as vLLM forces a thinking budget's marker: a ban by bad_words or allowed_token_ids does not stop
        it); among several, the options still apply. ``shared``: the logits are the caller's (the model's, for
        logprobs), so a change is made on a copy."""
        width, steered = logits.shape[-1], []
        for i, request in enumerate(requests):
            if request.steer is not None:
                ids, refused = request.steer.allowed(), request.steer.refused()
                if ids is not None or refused:
                    steered.append((i, None if ids is None else [t for t in ids if t < width],
                                    [t for t in refused if t < width]))
        if not steered:
            return logits
        if shared:
            logits = logits.clone()
        for i, ids, refused in steered:
            if ids is not None and len(ids) == 1:
                logits[i] = float("-inf")
                logits[i, ids[0]] = 0.0
            elif ids is not None:
                keep_only(logits, i, torch.tensor(ids, dtype=torch.long, device=logits.device))
            if refused:
                hold_back(logits, i, torch.tensor(refused, dtype=torch.long, device=logits.device))
        return logits

    @staticmethod
    def _penalize(requests: list[Request], penalized: list[int], logits: torch.Tensor) -> None:
        """The repetition, presence and frequency penalties of rows ``penalized`` of ``logits (n, V)``, in place,
        for all those rows at once (lorakit.serve.sampling.penalize_rows): their history rows are one block
        (restacked only when the penalised requests change: a steady batch reuses it, with no copy), the answer
        tokens since the last step are counted in with one scatter, and each request's ``history`` is its row of
        the block."""
        device, width = logits.device, logits.shape[-1]
        block = requests[penalized[0]].block
        if (block is None or block.history.shape[0] != len(penalized) or block.history.device != device
                or block.history.shape[1] != width
                or any(requests[i].block is not block or requests[i].block_row != j for j, i in enumerate(penalized))):
            for i in penalized:
                request = requests[i]
                if request.history is None or request.history.device != device or request.history.shape[0] != width:
                    request.history, request.counted = new_history(request.prompt, request.tokens, width, device), \
                        len(request.tokens)
            block = HistoryBlock([requests[i].history for i in penalized],
                                 [(requests[i].options.repetition_penalty, requests[i].presence, requests[i].frequency)
                                  for i in penalized])
            for j, i in enumerate(penalized):  # a view: the block's updates are the request's
                requests[i].history, requests[i].block, requests[i].block_row = block.history[j], block, j
        new = []  # (row, token) of the answer tokens since the last step: one a step, as a rule
        for j, i in enumerate(penalized):
            request = requests[i]
            new += [(j, token) for token in request.tokens[request.counted:]]
            request.counted = len(request.tokens)
        block.count(new)
        if len(penalized) == len(requests):
            logits.copy_(penalize_rows(logits.float(), block.history, block.penalties))
        else:
            index = torch.tensor(penalized, device=device)
            logits[index] = penalize_rows(logits[index].float(), block.history, block.penalties).to(logits.dtype)

    @staticmethod
    def _restrict(requests: list[Request], adjusted: list[int], logits: torch.Tensor) -> None:
        """The rows' ``allowed_token_ids``, while their answers are shorter than ``min_tokens`` their end tokens
        at -inf, and the last tokens of their ``bad_words`` (in place: ``logits`` is already the step's own copy)."""
        for i in adjusted:
            request = requests[i]
            options = request.options
            if options.allowed is not None:
                keep_only(logits, i, Engine._ids(request, "allowed", options.allowed, logits.device))
            if len(request.tokens) < options.min_tokens:
                ends = tuple(dict.fromkeys(options.ends + request.params.stop_token_ids))
                if ends:
                    hold_back(logits, i, Engine._ids(request, "ends", ends, logits.device))
            if options.banned:  # bad_words: a host-side look at the answer's last tokens, then one small write
                refused = options.refused(request.tokens)
                if refused:
                    hold_back(logits, i, torch.tensor(refused, device=logits.device))

    @staticmethod
    def _ids(request: Request, key: str, ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """``ids`` as a tensor on ``device``, made once per request."""
        tensor = request.devices.get(key)
        if tensor is None or tensor.device != device:
            tensor = request.devices[key] = torch.tensor(ids, dtype=torch.long, device=device)
        return tensor

    def _accept(self, request: Request, logits: torch.Tensor, token: int, error: str | None, done: list) -> bool:
        """Take the request's next ``token`` (:meth:`_choose`'s, under the row's format; ``error``: why none could
        be drawn); ``logits`` (V,) as the model gave them, for logprobs. False (and a ``done`` entry) when it
        finished."""
        params = request.params
        constraint = request.constraint
        if constraint is not None and constraint.active and constraint.blocked:  # the grammar allows nothing
            done.append((request, f"error: structured output: {constraint.error or 'no token is allowed'}"))
            return False
        if error is not None:  # this request's sampling alone fails: the other rows keep decoding
            done.append((request, f"error: {error}"))
            return False
        if constraint is not None and constraint.active and token not in params.stop_token_ids \
                and not constraint.take(token):
            done.append((request, f"error: structured output: {constraint.error}"))
            return False
        info = None
        if request.logprobs is not None:
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            top = torch.topk(logprobs, k=min(max(request.logprobs, 1), logprobs.shape[-1])) if request.logprobs else None
            pairs = [] if top is None else list(zip(top.indices.tolist(), top.values.tolist()))
            info = TokenInfo(float(logprobs[token]), pairs)
        request.tokens.append(token)
        if request.steer is not None:
            request.steer.take(token)
        if request.first_token is None:
            request.first_token = time.monotonic()
        if request.cancelled:
            done.append((request, "cancelled"))
            return False
        if token in params.stop_token_ids:
            request.on_token(token, info)
            done.append((request, "stop"))
            return False
        if not request.on_token(token, info):
            done.append((request, "stop"))
            return False
        if constraint is not None and constraint.active and constraint.done:  # the answer is complete
            done.append((request, "stop"))
            return False
        if len(request.tokens) >= params.max_new_tokens:
            done.append((request, "length"))
            return False
        return True

    def _drop(self, rows: list[int], done: list, reason: str | None) -> None:
        """Remove running rows (``reason`` None: their done entries were already added)."""
        if not rows:
            return
        gone = set(rows)
        if reason is not None:
            done += [(self._running[i], reason) for i in rows]
        keep = [i for i in range(len(self._running)) if i not in gone]
        if self.decoder is not None:
            for i in rows:  # the next turn of a conversation re-sends this prompt and answer: keep their K/V
                request = self._running[i]
                self.decoder.remember(request.row, request.prompt + request.tokens, request.adapter, request.salt)
            self.decoder.release([self._running[i].row for i in rows])
            self._running = [self._running[i] for i in keep]
            return
        self._running = [self._running[i] for i in keep]
        if keep:
            self._batch.keep(keep)
        else:
            self._batch = None


def _print_trace() -> None:
    """The exception being handled, on stderr where stderr can still be written. The server's log pipe closed
    (``lorakit serve ... | tee log`` and tee gone) made ``traceback.print_exc`` raise BrokenPipeError inside the
    loop's handler of a failed batch, which ended the engine's thread: every request after it waited for good."""
    try:
        traceback.print_exc()
    except (OSError, ValueError):  # BrokenPipeError; ValueError: a closed sys.stderr
        pass
