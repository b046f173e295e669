"""Structured outputs on ``lorakit serve``, second part: batched sampling of a step's rows.

- Sampling: ``serve.sampling.sample_rows`` draws every sampled row of a step in one call; on the CPU a row without
  top-p gets the very token ``torch.multinomial`` (``lorakit.generation.sample``) gives, and no row's token depends
  on the other rows. In the engine (a tiny Llama, the test tokenizer, a real llguidance grammar) the plain rows'
  tokens are the same with and without formatted rows beside them, and the step's rows are drawn together.
"""

from __future__ import annotations

import json
import threading

import torch

from conftest import tiny_llama
from test_serve_structured import SCHEMA, valid
from test_serve_support import make_tokenizer


# -- batched sampling ------------------------------------------------------------------------------------------------
def test_sample_rows_is_multinomial_and_row_independent():
    from lorakit.generation import SamplingParams, sample
    from lorakit.serve.sampling import sample_rows

    generator = torch.Generator().manual_seed(0)
    temperature = [1.0, 0.7, 1.3, 1e-30, 0.5, 2.0]
    top_p = [1.0, 1.0, 0.9, 1.0, 0.5, 0.95]
    top_k = [0, 5, 0, 0, 40, 0]
    for trial in range(8):
        logits = torch.randn(6, 3000, generator=generator) * 3
        logits[1, 100:] = float("-inf")  # a format's mask
        seeds = [100 * trial + i for i in range(6)]
        tokens, ok = sample_rows(logits, temperature, top_p, top_k, [torch.Generator().manual_seed(s) for s in seeds])
        assert ok.all() and tokens.dtype == torch.int64
        for i in range(6):
            alone, _ = sample_rows(logits[i:i + 1], temperature[i:i + 1], top_p[i:i + 1], top_k[i:i + 1],
                                   [torch.Generator().manual_seed(seeds[i])])
            assert int(alone[0]) == int(tokens[i])  # the neighbours change nothing
            assert torch.isfinite(logits[i, int(tokens[i])])  # never a masked token
            if top_k[i] == 0 and top_p[i] == 1.0:  # torch.multinomial's own draw, token for token
                params = SamplingParams(temperature=temperature[i], seed=seeds[i])
                assert int(tokens[i]) == sample(logits[i], params, torch.Generator().manual_seed(seeds[i]))
        assert int(tokens[3]) == int(logits[3].argmax())  # a tiny temperature is greedy
        assert int(tokens[1]) in torch.topk(logits[1], 5).indices.tolist()
    # the draw follows the distribution: 4000 rows of two tokens at p = 0.2 / 0.8
    many = torch.log(torch.tensor([[0.2, 0.8]])).repeat(4000, 1)
    tokens, _ = sample_rows(many, [1.0] * 4000, [1.0] * 4000, [0] * 4000, [None] * 4000)
    assert 0.77 < tokens.float().mean() < 0.83
    bad = torch.randn(3, 10)
    bad[1] = float("-inf")
    bad[2, 4] = float("nan")
    assert sample_rows(bad, [1.0] * 3, [1.0, 0.5, 1.0], [0] * 3, [None] * 3)[1].tolist() == [True, False, False]


def _run(engine, specs: list[dict]) -> list[tuple[list[int], str]]:
    """Submit requests (``specs``: SamplingParams fields plus ``constraint``), wait: (tokens, reason) of each."""
    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Request

    results, finished = [None] * len(specs), threading.Semaphore(0)
    jobs = []
    for i, spec in enumerate(specs):
        spec = dict(spec)
        constraint = spec.pop("constraint", None)

        def on_finish(reason, i=i):
            results[i] = reason
            finished.release()

        jobs.append(Request([1, 2, 3], None, SamplingParams(**spec), lambda token, info: True, on_finish,
                            constraint=constraint))
    for job in jobs:
        engine.submit(job)
    for _ in jobs:
        assert finished.acquire(timeout=60)
    return [(job.tokens, reason) for job, reason in zip(jobs, results)]


def test_engine_plain_rows_unchanged_beside_formatted_rows(monkeypatch):
    """Plain rows (greedy, seeded sampling with top-p, top-k) give the same tokens alone and beside formatted rows;
    the formatted rows are valid JSON; every step's sampled rows are drawn in one sample_rows call."""
    from lorakit.serve import engine as engine_module
    from lorakit.serve.structured import compile_format

    tokenizer = make_tokenizer()
    end = tokenizer.eos_token_id
    model = tiny_llama(vocab_size=len(tokenizer), max_position_embeddings=256)
    grammar = compile_format(tokenizer, len(tokenizer), (end,), SCHEMA, "person")
    calls: list[int] = []
    original = engine_module.sample_rows

    def counted(logits, *args):
        calls.append(logits.shape[0])
        return original(logits, *args)

    monkeypatch.setattr(engine_module, "sample_rows", counted)
    engine = engine_module.Engine(model, threading.RLock(), max_batch=8, pad_id=tokenizer.pad_token_id)
    try:
        plain = [dict(max_new_tokens=24, stop_token_ids=(end,)),
                 dict(max_new_tokens=24, temperature=1.0, top_p=0.8, seed=3, stop_token_ids=(end,)),
                 dict(max_new_tokens=24, temperature=0.9, top_k=7, seed=4, stop_token_ids=(end,)),
                 dict(max_new_tokens=24, temperature=1.2, seed=5, stop_token_ids=(end,))]
        alone = _run(engine, plain)
        formatted = [dict(max_new_tokens=150, temperature=1.0, seed=s, stop_token_ids=(end,),
                          constraint=grammar.constraint()) for s in range(3)]
        calls.clear()
        beside = _run(engine, formatted + plain)
    finally:
        engine.close()
    assert beside[3:] == alone
    assert len({tuple(tokens) for tokens, _ in alone[1:]}) == 3  # sampled rows differ
    for tokens, reason in beside[:3]:
        assert reason == "stop"
        valid(json.loads(tokenizer.decode(tokens[:-1] if tokens[-1] == end else tokens)), SCHEMA)
    assert max(calls) == 6  # the 3 formatted and 3 sampled plain rows of a step drawn together


def test_choose_fails_a_nan_row_alone():
    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Engine, Request

    requests = [Request([1], None, SamplingParams(temperature=t, seed=1), lambda *a: True, lambda r: None)
                for t in (1.0, 1.0, 0.0)]
    for request in requests:
        request.generator = request.params.generator(torch.device("cpu"))
    logits = torch.randn(3, 50)
    logits[0, 7] = float("nan")
    tokens, errors = Engine._choose(requests, logits)
    assert errors[0] is not None and "sampling failed" in errors[0]
    assert errors[1] is None and errors[2] is None and tokens[2] == int(logits[2].argmax())
