"""Chunked prefill: the static decoder takes a prompt over several ``prefill(..., upto=)`` calls, and the engine
spreads long prompts over its steps so the rows decoding beside them keep streaming.

A prompt prefilled in chunks must give the logits of the same prompt prefilled whole (float32 tolerance of the
shared table), then decode the same, on every attention path (decode kernels, per-prompt attention after the
row's earlier chunks, a sliding window, Gemma 2's soft-capping), with mixed adapters, with rows continuing and rows
starting in one call, and with the prefix cache copying a first chunk's head. The engine must answer exactly as
offline greedy generation for any chunk size, free every row, and let a running row decode while a long prompt
arrives (the point of it).
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from conftest import assert_close, tiny_llama
from lorakit.decoding import StaticDecoder
from lorakit.errors import LorakitError
from lorakit.generation import SamplingParams, generate
from lorakit.serve.engine import PREFILL_CHUNK_TOKENS, Engine, Request
from model_helpers import with_lora_and_dora


@pytest.fixture(autouse=True)
def _references(monkeypatch):
    # the kernels' PyTorch references (tested against the kernels elsewhere): this file checks which positions a
    # chunk computes and reads, and interpreted Triton kernels would take minutes on the CPU
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")


def _family(family):
    torch.manual_seed(0)
    if family == "llama":
        return tiny_llama(max_position_embeddings=256)
    if family == "mistral_window":
        from transformers import MistralConfig, MistralForCausalLM

        return MistralForCausalLM(MistralConfig(
            vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, sliding_window=12)).eval()
    from transformers import Gemma2Config, Gemma2ForCausalLM

    return Gemma2ForCausalLM(Gemma2Config(
        vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=12,
        attn_logit_softcapping=5.0, final_logit_softcapping=10.0)).eval()


def _prompts(vocab, lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def _whole(model, prompts, names, steps=2):
    """Reference: each prompt prefilled whole in its own row, then greedy steps; logits (steps + 1, V) each."""
    decoder = StaticDecoder(model, max_batch=len(prompts), max_len=64, prefix_cache=0)
    rows = list(range(len(prompts)))
    out = [decoder.prefill(rows, prompts, names)]
    for _ in range(steps):
        out.append(decoder.step(rows, out[-1].argmax(-1).tolist(), names))
    return torch.stack(out, 1)


@pytest.mark.parametrize("family", ["llama", "mistral_window", "gemma2_softcap"])
@pytest.mark.parametrize("attention", ["kernels", "per-prompt"])
def test_a_prompt_prefilled_in_chunks_gives_the_whole_prompts_logits(family, attention, monkeypatch):
    from lorakit.decoding import decoder as decoder_module

    if attention == "per-prompt":  # chunks past this run per-prompt attention after the row's earlier chunks
        monkeypatch.setattr(decoder_module, "PREFILL_KERNEL_MAX_PROMPT", 4)
    model = with_lora_and_dora(_family(family))
    names = ["a", None, "d"]
    prompts = _prompts(model.config.vocab_size, [29, 7, 18])
    expected = _whole(model, prompts, names)
    decoder = StaticDecoder(model, max_batch=4, max_len=64, prefix_cache=0)
    rows = [3, 0, 1]
    # the rows start in different calls and continue in calls shared with others: 29 = 5 + 9 + 15 (past the
    # 12-token window), 7 = 7 (whole, joins the second call), 18 = 1 + 17
    calls = [([3, 1], [5, 1]), ([3, 0, 1], [14, 7, 18]), ([3], [29])]
    final = {}
    for call_rows, ends in calls:
        j = [rows.index(r) for r in call_rows]
        logits = decoder.prefill(call_rows, [prompts[i] for i in j], [names[i] for i in j], upto=ends)
        for k, (i, end) in enumerate(zip(j, ends)):
            assert decoder.lengths[rows[i]] == end
            assert decoder.filling[rows[i]] == (end < len(prompts[i]))
            if end == len(prompts[i]):
                final[i] = logits[k]
    got = [torch.stack([final[i] for i in range(3)])]
    for _ in range(2):
        got.append(decoder.step(rows, got[-1].argmax(-1).tolist(), names))
    assert_close(torch.stack(got, 1), expected, torch.float32)


def test_the_prefix_cache_serves_a_first_chunk_and_keeps_each_chunks_blocks():
    model = with_lora_and_dora(tiny_llama(max_position_embeddings=256))
    head, = _prompts(model.config.vocab_size, [40])
    prompt = head + [5, 6, 7]
    expected = _whole(model, [prompt], ["a"])
    decoder = StaticDecoder(model, max_batch=2, max_len=64, prefix_cache=256)
    decoder.prefill([0], [prompt], ["a"], upto=[20])  # keeps the first full block (16 tokens) at once
    assert decoder.cached_tokens(prompt, "a", None) == 16
    logits = decoder.prefill([0], [prompt], ["a"], upto=[len(prompt)])
    got = [logits]
    for _ in range(2):
        got.append(decoder.step([0], got[-1].argmax(-1).tolist(), ["a"]))
    assert_close(torch.stack(got, 1), expected, torch.float32)
    assert decoder.cached_tokens(prompt, "a", None) == 32  # both full blocks of 43 tokens, kept chunk by chunk
    assert decoder.cached_tokens(prompt, None, None) == 0  # never across adapters
    # a second request with the same head: its first chunk copies 32 tokens and computes from there
    decoder.prefill([1], [prompt], ["a"], upto=[36])
    assert decoder.reused[1] == 32 and decoder.lengths[1] == 36 and decoder.filling[1]
    logits = decoder.prefill([1], [prompt], ["a"])
    assert_close(logits, expected[:, 0], torch.float32)


def test_chunked_prefill_refuses_bad_calls_with_one_line_reasons():
    model = tiny_llama(seed=3)
    decoder = StaticDecoder(model, max_batch=2, max_len=12, prefix_cache=0)
    decoder.prefill([0], [[1, 2, 3, 4, 5]], [None], upto=[2])
    assert decoder.free_rows() == [1] and decoder.filling[0]
    cases = [
        (lambda: decoder.step([0], [1], [None]), "holds only part of its prompt; prefill the rest first"),
        (lambda: decoder.prefill([0], [[1, 2, 3, 4, 5]], [None], upto=[2]), "upto must be in 3..5, got 2"),
        (lambda: decoder.prefill([0], [[1, 2, 3, 4, 5]], [None], upto=[6]), "upto must be in 3..5, got 6"),
        (lambda: decoder.prefill([1], [[1, 2]], [None], upto=[0]), "upto must be in 1..2, got 0"),
        (lambda: decoder.prefill([1], [[1, 2]], [None], upto=[1, 2]), "one token count per row"),
    ]
    for call, message in cases:
        with pytest.raises(LorakitError, match=message) as error:
            call()
        assert "\n" not in str(error.value)
    decoder.release([0])
    assert decoder.free_rows() == [0, 1] and not decoder.filling[0]
    decoder.prefill([0], [[7, 8]], [None])  # a released row starts afresh
    assert decoder.lengths[0] == 2 and not decoder.filling[0]


PROMPTS = [[5, 9, 2, 7, 1, 4, 4, 6, 2, 9, 3], [3, 4], [8, 8, 1, 2, 3, 4, 5], [11, 12, 13, 1, 2, 3, 4, 5, 6], [2, 3]]
NAMES = ["a", None, "d", "a", "d"]
NEW = [4, 3, 1, 4, 2]  # the third request ends with its first token


def _serve(model, chunk, max_batch=3):
    decoder = StaticDecoder(model, max_batch=max_batch, max_len=24)
    engine = Engine(model, threading.RLock(), max_batch=max_batch, decoder=decoder, prefill_chunk=chunk)
    results, finished = {i: [] for i in range(len(PROMPTS))}, threading.Semaphore(0)
    try:
        for i, (prompt, name, new) in enumerate(zip(PROMPTS, NAMES, NEW)):
            engine.submit(Request(prompt=list(prompt), adapter=name, params=SamplingParams(max_new_tokens=new),
                                  on_token=lambda token, info, i=i: results[i].append(token) or True,
                                  on_finish=lambda reason: finished.release()))
        for _ in PROMPTS:
            assert finished.acquire(timeout=120)
    finally:
        engine.close()
    return results, decoder, engine


@pytest.mark.parametrize("chunk", [1, 3, 8, PREFILL_CHUNK_TOKENS])
def test_the_engine_answers_as_offline_generation_for_any_chunk_size(chunk):
    model = with_lora_and_dora(tiny_llama(seed=4))
    expected = generate(model, PROMPTS, NAMES, [SamplingParams(max_new_tokens=n) for n in NEW])
    results, decoder, engine = _serve(model, chunk)  # 5 requests over 3 rows: rows are reused
    assert [results[i] for i in range(len(PROMPTS))] == [g.tokens for g in expected]
    assert decoder.free_rows() == [0, 1, 2] and not any(decoder.filling)
    # a step prefills at most ``chunk`` tokens: the 42 prompt tokens take at least 42 / chunk prefill calls
    assert engine.timings["prefill_calls"] >= -(-sum(map(len, PROMPTS)) // chunk)
    assert engine.stats()["prefilling"] == 0


def _timeline(chunk):
    """A short request decoding when a long prompt arrives: the short one's tokens that came between the long
    one's submission and its first token."""
    model = tiny_llama(seed=5, max_position_embeddings=256)
    decoder = StaticDecoder(model, max_batch=2, max_len=128)
    engine = Engine(model, threading.RLock(), max_batch=2, decoder=decoder, prefill_chunk=chunk)
    events, started, finished = [], threading.Event(), threading.Semaphore(0)

    def request(name, prompt, new):
        def on_token(token, info):
            events.append(name)
            started.set()
            return True

        return Request(prompt=prompt, adapter=None, params=SamplingParams(max_new_tokens=new), on_token=on_token,
                       on_finish=lambda reason: finished.release())

    try:
        engine.submit(request("short", [1, 2, 3], 60))
        assert started.wait(60)
        events.append("submitted")
        engine.submit(request("long", list(range(4, 100)), 2))
        for _ in range(2):
            assert finished.acquire(timeout=120)
    finally:
        engine.close()
    after = events[events.index("submitted"):]
    return after[:after.index("long")].count("short")


def test_a_long_prompt_arriving_does_not_pause_the_rows_decoding_beside_it():
    # 96 prompt tokens in chunks of 8: twelve steps of prefill, in each of which the short row decodes a token
    assert _timeline(8) >= 10
    # unchunked, the long prompt is one step: the short row gets at most the token of the step it arrived in
    assert _timeline(0) <= 2


def test_a_request_cancelled_while_its_prompt_is_part_way_in_frees_its_row():
    model = tiny_llama(seed=6, max_position_embeddings=256)
    decoder = StaticDecoder(model, max_batch=1, max_len=128)
    lock = threading.RLock()
    engine = Engine(model, lock, max_batch=1, decoder=decoder, prefill_chunk=4)
    reasons = []
    try:
        with lock:  # hold the scheduler between steps: each _step below is one engine step
            long = Request(prompt=list(range(1, 40)), adapter=None, params=SamplingParams(max_new_tokens=3),
                           on_token=lambda token, info: True, on_finish=reasons.append)
            engine._step([long], done := [])
            assert decoder.filling[long.row] and decoder.lengths[long.row] == 4 and engine.stats()["prefilling"] == 1
            engine._step([], done)
            assert decoder.lengths[long.row] == 8
            long.cancelled = True
            engine._step([], done)
            assert done == [(long, "cancelled")] and decoder.free_rows() == [0] and not engine._filling
    finally:
        engine.close()


def test_serve_prefill_chunk_tokens_option(capsys, tmp_path):
    import argparse

    from cli_helpers import cli_error
    from lorakit.cli import main
    from lorakit.serve.cli import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert f"default: {PREFILL_CHUNK_TOKENS};" in " ".join(parser.format_help().split())
    assert parser.parse_args(["--adapters", "x", "--prefill-chunk-tokens", "512"]).prefill_chunk_tokens == 512
    for flag in ("--prefill-chunk-tokens", "--prefix-cache-tokens"):  # refused before a model is loaded
        code = main(["serve", "--adapters", str(tmp_path), flag, "-3"])
        assert cli_error(capsys, code).endswith(f"{flag} must be 0 (off) or more, got -3")
