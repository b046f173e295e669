"""The serving engine on a StaticDecoder, in process, with chunked prefill off (tests/test_followups_18_chunked.py
has it on): newcomers prefilled by the decoder itself (short prompts) or by transformers + admit (over
STATIC_PREFILL_MAX_TOKENS), both giving the tokens of offline greedy generation, with
mixed adapters, a request that ends at its first token (its row is released at once) and rows reused."""

from __future__ import annotations

import threading

import pytest

from lorakit.adapter_stack import drop_stack_caches
from lorakit.decoding import StaticDecoder
from lorakit.generation import SamplingParams, generate
from lorakit.serve import engine as engine_module
from lorakit.serve.engine import Engine, Request
from model_helpers import with_lora_and_dora
from tests.conftest import tiny_llama

PROMPTS = [[5, 9, 2, 7, 1], [3, 4], [8, 8, 1, 2, 3, 4, 5], [11, 12, 13], [2, 3, 5, 7]]
NAMES = ["a", None, "d", "a", "d"]
NEW = [4, 3, 1, 4, 2]  # the third request ends with its first token


def _model():
    return with_lora_and_dora(tiny_llama(seed=4))


def _serve(model, max_batch, names=NAMES):
    decoder = StaticDecoder(model, max_batch=max_batch, max_len=16)
    engine = Engine(model, threading.RLock(), max_batch=max_batch, decoder=decoder, prefill_chunk=0)
    results, finished = {}, threading.Semaphore(0)
    try:
        for i, (prompt, name, new) in enumerate(zip(PROMPTS, names, NEW)):
            results[i] = []

            def on_token(token, info, i=i):
                results[i].append(token)
                return True

            engine.submit(Request(prompt=list(prompt), adapter=name, params=SamplingParams(max_new_tokens=new),
                                  on_token=on_token, on_finish=lambda reason: finished.release()))
        for _ in PROMPTS:
            assert finished.acquire(timeout=120)
    finally:
        engine.close()
    return results, decoder, engine


@pytest.mark.parametrize("static_prefill", [True, False], ids=["decoder-prefill", "transformers-prefill"])
def test_engine_on_the_static_decoder_matches_offline_generation(static_prefill, monkeypatch):
    if not static_prefill:
        monkeypatch.setattr(engine_module, "STATIC_PREFILL_MAX_TOKENS", 0)
    model = _model()
    expected = generate(model, PROMPTS, NAMES, [SamplingParams(max_new_tokens=n) for n in NEW])
    results, decoder, engine = _serve(model, max_batch=3)  # 5 requests over 3 rows: rows are reused
    for i, generation in enumerate(expected):
        assert results[i] == generation.tokens, f"request {i} ({NAMES[i]})"
    assert decoder.free_rows() == [0, 1, 2]  # every row released, the one-token request's at once
    assert engine.timings["prefill_rows"] == len(PROMPTS)


def test_a_long_prompts_mixed_prefill_leaves_no_second_copy_of_the_adapters(monkeypatch):
    """Prompts over STATIC_PREFILL_MAX_TOKENS go through transformers' forward, whose mixed batches stack the
    adapters for the segmented kernels; with a static decoder (whose slots hold them) the engine frees that copy."""
    monkeypatch.setattr(engine_module, "STATIC_PREFILL_MAX_TOKENS", 0)
    model = _model()
    names = ["a", None, "a", "a", None]  # plain LoRA only: DoRA rows take the per-adapter reference, no stack
    expected = generate(model, PROMPTS, names, [SamplingParams(max_new_tokens=n) for n in NEW])
    assert drop_stack_caches(model) > 0  # the offline mixed batches did stack "a" on every projection
    results, _, _ = _serve(model, max_batch=3, names=names)
    assert [results[i] for i in range(len(PROMPTS))] == [g.tokens for g in expected]
    assert not [name for name, m in model.named_modules() if "_lorakit_stack_cache" in m.__dict__]
