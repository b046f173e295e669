"""vLLM's sampling fields on ``lorakit serve`` (session 15): ``repetition_penalty``, ``min_p``, ``min_tokens``,
``stop_token_ids``, ``ignore_eos``, ``include_stop_str_in_output``, ``skip_special_tokens``,
``spaces_between_special_tokens``, ``allowed_token_ids``, ``truncate_prompt_tokens``, ``best_of`` equal to ``n``,
and OpenAI's rule that ``stream_options`` needs ``stream: true``. Before, every vLLM field was a 400 "unknown
field", and ``stream_options`` without ``stream`` was silently ignored.

- The per-row processing against transformers' logits processors, element by element on random logits
  (``RepetitionPenaltyLogitsProcessor``, ``MinPLogitsWarper``, ``MinNewTokensLengthLogitsProcessor``), every row
  of a batch with its own values.
- The engine (a tiny random Llama): greedy answers with a repetition penalty or min_tokens equal transformers'
  ``generate`` with the same settings, token for token, alone and in one mixed batch.
- The text: stop strings kept by include_stop_str_in_output and not looked for before min_tokens; special tokens
  kept by skip_special_tokens false.
- Over a real socket, on /v1/completions, /v1/chat/completions and /v1/responses, streamed and not.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import tiny_llama
from http_helpers import post_json, sse_events
from test_serve_support import ServerProcess, make_tokenizer, never_ending, tiny_hf_folder


# -- the per-row processing, against transformers' processors ------------------------------------------------------
def test_repetition_penalty_is_transformers_row_by_row():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    from lorakit.serve.sampling import new_history, penalize_rows

    def penalize_repetition(logits, rows, seen, penalties):  # the rows' penalties at once, as the engine applies them
        history = torch.stack([new_history(ids.tolist(), [], logits.shape[1], logits.device) for ids in seen])
        off = torch.zeros(len(rows), 1)
        values = penalize_rows(logits[rows].float(), history, torch.cat([torch.tensor(penalties).unsqueeze(1), off, off], 1))
        logits[rows] = values.to(logits.dtype)

    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 300, generator=generator) * 4
    logits[0, :10] = 0.0  # a zero logit: divided or multiplied, it stays 0
    penalties = [1.3, 0.6, 2.5, 1.0001, 7.0]
    seen = [torch.randperm(300, generator=generator)[:k] for k in (10, 1, 120, 300, 37)]
    rows = [0, 2, 3, 4, 1]  # not in order: each row takes its own ids and penalty
    processed = logits.clone()
    penalize_repetition(processed, rows, [seen[r] for r in rows], [penalties[r] for r in rows])
    for row in range(5):
        expected = RepetitionPenaltyLogitsProcessor(penalties[row])(seen[row].unsqueeze(0), logits[row:row + 1].clone())
        assert torch.equal(processed[row], expected[0]), row
    assert not torch.equal(processed, logits)
    # bfloat16 logits (the GPU path's): the penalty is applied in float32, not as bfloat16's 1.296875
    half = logits[:1].to(torch.bfloat16)
    processed = half.clone()
    penalize_repetition(processed, [0], [seen[2]], [1.3])
    expected = RepetitionPenaltyLogitsProcessor(1.3)(seen[2].unsqueeze(0), half.float())[0].to(torch.bfloat16)
    assert torch.equal(processed[0], expected)


def test_min_p_is_transformers_row_by_row():
    """``min_p`` after the temperature drops exactly the tokens transformers' MinPLogitsWarper drops (whatever
    the neighbours' values), and the draw is the one from transformers' processed logits with the same seed."""
    from transformers.generation.logits_process import MinPLogitsWarper

    from lorakit.serve.sampling import sample_rows

    generator = torch.Generator().manual_seed(1)
    temperature = [1.0, 0.7, 1.5, 1.0, 0.9, 1.2]
    min_p = [0.1, 0.05, 0.3, 0.0, 1.0, 0.2]
    for trial in range(6):
        logits = torch.randn(6, 64, generator=generator) * 3
        kept = [torch.isfinite(MinPLogitsWarper(p)(None, logits[i:i + 1] / t)[0]) if p > 0 else
                torch.ones(64, dtype=torch.bool) for i, (t, p) in enumerate(zip(temperature, min_p))]
        draws = {i: set() for i in range(6)}
        for draw in range(40):
            seeds = [1000 * trial + 10 * draw + i for i in range(6)]
            tokens, ok = sample_rows(logits, temperature, [1.0] * 6, [0] * 6,
                                     [torch.Generator().manual_seed(s) for s in seeds], min_p)
            assert ok.all()
            for i in range(6):
                token = int(tokens[i])
                assert kept[i][token], (i, token)
                draws[i].add(token)
                # the same draw as from transformers' processed logits (their -inf tokens cannot win)
                reference = logits[i].clone()
                reference[~kept[i]] = float("-inf")
                alone, _ = sample_rows(reference.unsqueeze(0), temperature[i:i + 1], [1.0], [0],
                                       [torch.Generator().manual_seed(seeds[i])])
                assert int(alone[0]) == token
        assert draws[4] == {int(logits[4].argmax())}  # min_p 1: the most likely token alone
        assert all(int(kept[i].sum()) < 64 for i in (0, 1, 2, 5))  # min_p dropped tokens in every row with it


def test_min_p_comes_before_top_p_as_in_vllm():
    """vLLM applies min_p first, then the nucleus of what is left (renormalised): with probabilities 0.5, 0.3,
    0.15, 0.05 and min_p 0.2 the last token goes (0.05 < 0.1), the rest is 0.526 / 0.316 / 0.158; top_p 0.8 then
    keeps the first two (0.526 < 0.8, 0.842 >= 0.8). Without renormalising, the third would stay (0.8 not < 0.8)."""
    from lorakit.serve.sampling import sample_rows

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(3000, 1)
    tokens, ok = sample_rows(logits, [1.0] * 3000, [0.8] * 3000, [0] * 3000, [None] * 3000, [0.2] * 3000)
    counts = torch.bincount(tokens, minlength=4).tolist()
    assert ok.all() and counts[2] == 0 and counts[3] == 0
    assert 0.56 < counts[0] / 3000 < 0.69  # 0.5 / 0.8 = 0.625


def test_min_tokens_hold_and_allowed_ids_in_the_engine_rows():
    """``Engine._processed`` on a mixed batch: each row gets its own options (min_tokens as transformers'
    MinNewTokensLengthLogitsProcessor, allowed_token_ids, repetition penalty with its prompt), a row without any
    is untouched, and the caller's logits stay the model's."""
    from transformers.generation.logits_process import (MinNewTokensLengthLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor)

    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Engine, Request
    from lorakit.serve.sampling import RowOptions

    ends = (3, 9)

    def request(prompt, answer, options, stops=ends):
        job = Request(prompt, None, SamplingParams(stop_token_ids=stops), lambda *a: True, lambda r: None,
                      options=options)
        job.tokens = list(answer)
        return job

    requests = [request([5, 6, 7], [11, 12], RowOptions(min_tokens=4, ends=(3,)), stops=(3, 9, 40)),
                request([5, 6], [11, 12, 13, 14], RowOptions(min_tokens=4, ends=(3,))),  # long enough: nothing
                request([1, 2], [], OptionsOff := RowOptions()),
                request([8, 8, 2], [17], RowOptions(repetition_penalty=1.7, allowed=(2, 8, 17, 50))),
                request([20, 21], [22], RowOptions(repetition_penalty=0.5, min_tokens=3, ends=(3,)))]
    assert OptionsOff.masks() is False
    logits = torch.randn(5, 64, generator=torch.Generator().manual_seed(3)) * 3
    model = logits.clone()
    processed = Engine._processed(requests, logits)
    assert torch.equal(logits, model)  # the model's logits, for logprobs
    for row in (1, 2):
        assert torch.equal(processed[row], logits[row])
    for row, eos in ((0, [3, 9, 40]), (4, [3, 9])):
        job = requests[row]
        ids = torch.tensor([job.prompt + job.tokens])
        expected = MinNewTokensLengthLogitsProcessor(len(job.prompt), job.options.min_tokens, eos)(ids, logits[row:row + 1].clone())
        if job.options.repetition_penalty != 1.0:
            expected = RepetitionPenaltyLogitsProcessor(job.options.repetition_penalty)(ids, expected)
        assert torch.equal(processed[row], expected[0]), row
    allowed = torch.full((64,), float("-inf"))
    allowed[[2, 8, 17, 50]] = logits[3, [2, 8, 17, 50]]
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[8, 8, 2, 17]]), allowed.unsqueeze(0))[0]
    assert torch.equal(processed[3], expected)
    # the seen tokens grow with the answer: a second step penalises the new token too
    requests[3].tokens.append(50)
    again = Engine._processed(requests[3:4], logits[3:4])
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([[8, 8, 2, 17, 50]]), allowed.unsqueeze(0))[0]
    assert torch.equal(again[0], expected)


def test_a_greedy_row_left_nothing_fails_alone():
    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Engine, Request
    from lorakit.serve.sampling import RowOptions

    nothing = RowOptions(min_tokens=2, ends=(4,), allowed=(4,))  # the one allowed token is held back
    requests = [Request([1], None, SamplingParams(), lambda *a: True, lambda r: None, options=options)
                for options in (nothing, RowOptions(allowed=(4, 6)))]
    tokens, errors = Engine._choose(requests, torch.randn(2, 10))
    assert errors[0] is not None and "allowed_token_ids and min_tokens" in errors[0]
    assert errors[1] is None and tokens[1] in (4, 6)


# -- the engine against transformers' generate -----------------------------------------------------------------------
def _engine_answers(model, specs: list[tuple[list[int], dict]]) -> list[list[int]]:
    """Submit greedy requests together (``specs``: prompt, Request keywords with ``max_new_tokens`` and
    ``stop_token_ids``), wait: each one's tokens."""
    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Engine, Request

    engine = Engine(model, threading.RLock(), max_batch=8)
    finished = threading.Semaphore(0)
    try:
        jobs = []
        for prompt, extra in specs:
            extra = dict(extra)
            params = SamplingParams(max_new_tokens=extra.pop("max_new_tokens"),
                                    stop_token_ids=extra.pop("stop_token_ids", ()))
            jobs.append(Request(list(prompt), None, params, lambda token, info: True,
                                lambda reason: finished.release(), **extra))
        for job in jobs:
            engine.submit(job)
        for _ in jobs:
            assert finished.acquire(timeout=60)
    finally:
        engine.close()
    return [job.tokens for job in jobs]


def test_engine_greedy_answers_equal_transformers_generate():
    """Repetition penalties (with the prompt's tokens), min_tokens beside a logit_bias that makes the model end at
    once (transformers: min_new_tokens and sequence_bias), each alone and all in one batch: token for token."""
    from lorakit.serve.sampling import RowOptions

    model = tiny_llama(seed=5, vocab_size=96, initializer_range=0.3)
    end = 7
    prompts = [[5, 9, 11, 5, 9, 11, 5], [40, 41, 42], [3, 3, 3, 3], [60, 61, 62, 63, 64]]
    cases = [
        (prompts[0], dict(options=RowOptions(repetition_penalty=1.8)), dict(repetition_penalty=1.8)),
        (prompts[1], dict(options=RowOptions(repetition_penalty=0.6)), dict(repetition_penalty=0.6)),
        (prompts[2], dict(options=RowOptions(min_tokens=6, ends=(end,)),
                          bias=(torch.tensor([end]), torch.tensor([100.0]))),
         dict(min_new_tokens=6, sequence_bias={(end,): 100.0})),
        (prompts[3], dict(options=RowOptions(repetition_penalty=1.4, min_tokens=3, ends=(end,))),
         dict(repetition_penalty=1.4, min_new_tokens=3)),
        (prompts[0], {}, {}),  # the same prompt without the penalty: a different answer
    ]
    expected = []
    for prompt, _, hf in cases:
        out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=end,
                             pad_token_id=0, **hf)
        tokens = out[0, len(prompt):].tolist()
        expected.append(tokens)
    assert expected[0] != expected[4]
    assert expected[2][:6] != [end] * 6 and expected[2][6] == end  # held back 6 tokens, then the biased end
    specs = [(prompt, dict(max_new_tokens=12, stop_token_ids=(end,), **ours)) for prompt, ours, _ in cases]
    alone = [_engine_answers(model, [spec])[0] for spec in specs]
    together = _engine_answers(model, specs)
    assert alone == expected
    assert together == expected


# -- the answer's text -------------------------------------------------------------------------------------------------
def _assembled(tokenizer, ids, stops=(), **options) -> tuple[str, bool]:
    from lorakit.serve.text import TextAssembler

    assembler = TextAssembler(tokenizer, list(stops), (tokenizer.eos_token_id,), **options)
    pieces = []
    for token in ids:
        pieces.append(assembler.add(token))
        if assembler.stopped:
            break
    pieces.append(assembler.finish())
    return "".join(pieces), assembler.stopped


def test_text_options():
    tokenizer = make_tokenizer()
    ids = tokenizer("Paris is the capital of France. Berlin is", add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids)
    assert _assembled(tokenizer, ids, ["capital"]) == ("Paris is the ", True)
    assert _assembled(tokenizer, ids, ["capital"], include_stop=True) == ("Paris is the capital", True)
    assert _assembled(tokenizer, ids, [" is"], include_stop=True) == ("Paris is", True)
    # min_tokens: a stop string ending within the first min_tokens tokens' text is not looked for ("Par", "is",
    # " is", ..., " is")
    assert _assembled(tokenizer, ids, [" is"], min_tokens=3) == ("Paris is the capital of France. Berlin", True)
    assert _assembled(tokenizer, ids, [" is"], min_tokens=2) == ("Paris", True)  # " is" ends after the guard
    assert _assembled(tokenizer, ids, ["is"], min_tokens=1) == ("Par", True)  # "is" straddles it: found
    assert _assembled(tokenizer, ids, ["is"], min_tokens=len(ids)) == (text, False)
    # special tokens: dropped by default, kept with skip_special false (the end of turn is a stop token: never)
    special = [tokenizer.bos_token_id] + ids[:2] + [tokenizer.pad_token_id]
    assert _assembled(tokenizer, special) == (tokenizer.decode(ids[:2]), False)
    kept = _assembled(tokenizer, special, skip_special=False)[0]
    assert kept == "<|im_start|>" + tokenizer.decode(ids[:2]) + "<|endoftext|>"
    assert _assembled(tokenizer, special, skip_special=False, spaces=False)[0] == kept  # a fast tokenizer: no spaces


# -- the request fields ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fields, param, words", [
    ({"use_beam_search": True}, "use_beam_search", "no beam search"),
    ({"length_penalty": 0.5}, "length_penalty", "beam search"),
    ({"best_of": 3}, "best_of", "send n alone"),
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "not available when stream is true"),
    ({"min_tokens": 20, "max_tokens": 10}, None, "min_tokens (20) is over max_tokens (10)"),
    ({"min_tokens": 20}, None, "over max_tokens (16)"),  # completions' default 16
    ({"repetition_penalty": 0}, "repetition_penalty", "greater than 0"),
    ({"min_p": 1.5}, "min_p", "less than or equal to 1"),
    ({"stop_token_ids": [3, -1]}, "stop_token_ids", "token ids are 0 or more"),
    ({"allowed_token_ids": []}, "allowed_token_ids", "at least 1"),
    ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "send k >= 1"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
    ({"stream": False, "stream_options": {}}, "stream_options", "only allowed when stream is true"),
])
def test_refused_fields_say_what_to_send(fields, param, words):
    from lorakit.serve.protocol import APIError, CompletionRequest
    from lorakit.serve.transport import parse

    with pytest.raises(APIError) as caught:
        parse(CompletionRequest, {"model": "m", "prompt": "hi", **fields})
    error = caught.value
    assert error.status == 400 and words in error.message and "\n" not in error.message, error.message
    assert param is None or error.param == param


def test_accepted_fields():
    from lorakit.serve.protocol import ChatRequest, CompletionRequest, ResponsesRequest

    vllm = {"repetition_penalty": 1.2, "min_p": 0.05, "min_tokens": 2, "stop_token_ids": [5, 5, 7], "ignore_eos": True,
            "include_stop_str_in_output": True, "skip_special_tokens": False, "spaces_between_special_tokens": False,
            "allowed_token_ids": [1, 2, 3], "use_beam_search": False, "length_penalty": 1.0}
    chat = ChatRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}], **vllm,
                                       "truncate_prompt_tokens": -1, "stream": True, "stream_options": None})
    assert chat.stop_token_ids == [5, 7] and chat.answer_ends((2,), (9,)) == (9, 5, 7)  # ignore_eos: not 2
    options, shown = chat.served_options((2,), 100, None)
    assert (options.repetition_penalty, options.min_p, options.min_tokens, options.ends, options.allowed) == \
        (1.2, 0.05, 2, (2,), (1, 2, 3))
    assert shown == {"stop_token_ids": (), "include_stop": True, "skip_special": False, "spaces": False,
                     "min_tokens": 2}
    completion = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "n": 2, "best_of": 2,
                                                   "stop_token_ids": [4]})
    assert completion.served_options((2,), 100, None)[1]["stop_token_ids"] == (2, 4)
    assert completion.truncated([[1, 2, 3, 4]], 8, False) == [[1, 2, 3, 4]]
    responses = ResponsesRequest.model_validate({"model": "m", "input": "hi", "max_output_tokens": 16, **vllm})
    assert responses.served_options((2,), 100, None)[0].min_tokens == 2
    nulls = {key: None for key in vllm}  # null: the default, as for every optional field
    assert CompletionRequest.model_validate({"model": "m", "prompt": "hi", **nulls}).served_options((2,), 100, None)[0] \
        is __import__("lorakit.serve.sampling", fromlist=["OFF"]).OFF


# -- over a real socket --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A tiny Llama that never ends a turn by itself (its end-of-turn rows zeroed), served on the CPU; the test
    keeps the same model and tokenizer to compute transformers' answers."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("sampling15")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.5)
    model = never_ending(model_dir).eval()
    (root / "adapters").mkdir()
    process = ServerProcess(model_dir, root / "adapters", log=root / "server.log")
    client = httpx.Client(base_url=process.url, timeout=120)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    try:
        yield {"url": process.url, "client": client, "model": model, "tokenizer": tokenizer,
               "end": tokenizer.convert_tokens_to_ids("<|im_end|>")}
    finally:
        client.close()
        process.stop()


def _completion(server, stream: bool = False, **body) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) of a /v1/completions request, streamed or not."""
    if not stream:
        choice = (answer := post_json(server, "/v1/completions", body))["choices"][0]
        return choice["text"], choice["finish_reason"], answer["usage"]["completion_tokens"]
    events = sse_events(server, "/v1/completions", {**body, "stream_options": {"include_usage": True}})
    chunks = [e["choices"][0] for e in events if e["choices"]]
    return "".join(c["text"] for c in chunks), chunks[-1]["finish_reason"], events[-1]["usage"]["completion_tokens"]


def _chat(server, stream: bool = False, **body) -> tuple[str, str]:
    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    if not stream:
        choice = post_json(server, "/v1/chat/completions", {"messages": messages, **body})["choices"][0]
        return choice["message"]["content"], choice["finish_reason"]
    chunks = [e["choices"][0] for e in sse_events(server, "/v1/chat/completions", {"messages": messages, **body})
              if e["choices"]]
    return "".join(c["delta"].get("content") or "" for c in chunks), chunks[-1]["finish_reason"]


def _generate(server, prompt: list[int], tokens: int, **settings) -> list[int]:
    """transformers' greedy answer on the served model."""
    with torch.no_grad():
        out = server["model"].generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=False,
                                       eos_token_id=server["end"], pad_token_id=0, **settings)
    return out[0, len(prompt):].tolist()


PROMPT = [50, 60, 70, 50, 60, 70, 50, 60]  # repeated tokens: a repetition penalty has something to act on


@pytest.mark.parametrize("stream", [False, True])
def test_repetition_penalty_answers_as_transformers(server, stream):
    decode = server["tokenizer"].decode
    plain = _generate(server, PROMPT, 12)
    for penalty in (1.6, 0.5):
        expected = _generate(server, PROMPT, 12, repetition_penalty=penalty)
        assert expected != plain
        assert _completion(server, stream, prompt=PROMPT, max_tokens=12, repetition_penalty=penalty)[0] == \
            decode(expected)
    chat_ids = server["tokenizer"].apply_chat_template([{"role": "user", "content": "Hello, how are you today?"}],
                                                        add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = decode(_generate(server, list(chat_ids), 10, repetition_penalty=1.6))
    assert _chat(server, stream, max_tokens=10, repetition_penalty=1.6) == (expected, "length")
    assert _chat(server, stream, max_tokens=10)[0] != expected


def test_responses_take_the_vllm_fields(server):
    decode = server["tokenizer"].decode
    ids = list(server["tokenizer"].apply_chat_template([{"role": "user", "content": "Hi there"}],
                                                       add_generation_prompt=True, tokenize=True, return_dict=False))
    body = {"input": "Hi there", "max_output_tokens": 16, "repetition_penalty": 1.6}
    answer = post_json(server, "/v1/responses", body)
    assert answer["output"][-1]["content"][0]["text"] == decode(_generate(server, ids, 16, repetition_penalty=1.6))
    events = sse_events(server, "/v1/responses", body)
    assert events[-1]["response"]["output"][-1]["content"][0]["text"] == answer["output"][-1]["content"][0]["text"]
    # allowed only the end of turn and one token, the answer is that token, 16 times with min_tokens 16
    ended = post_json(server, "/v1/responses", {"input": "Hi there", "max_output_tokens": 16, "min_tokens": 16,
                                                "allowed_token_ids": [server["end"], 50]})
    assert ended["output"][-1]["content"][0]["text"] == decode([50] * 16)
    assert ended["usage"]["output_tokens"] == 16
    error = server["client"].post("/v1/responses", json={"model": "base", "input": "hi", "stream_options": {}})
    assert error.status_code == 400 and "stream_options is only allowed when stream is true" in error.text


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_ignore_eos_and_special_tokens(server, stream):
    """A model made to end at once (logit_bias +100 on its end of turn): min_tokens keeps it going exactly that
    long, ignore_eos to max_tokens, where skip_special_tokens false shows the end-of-turn tokens it wrote."""
    end = server["end"]
    ending = {"prompt": PROMPT, "max_tokens": 8, "logit_bias": {str(end): 100}}
    assert _completion(server, stream, **ending) == ("", "stop", 1)
    text, finish, tokens = _completion(server, stream, **ending, min_tokens=5)
    assert (finish, tokens) == ("stop", 6) and text == server["tokenizer"].decode(_generate(server, PROMPT, 5))
    assert _completion(server, stream, **ending, ignore_eos=True) == ("", "length", 8)
    assert _completion(server, stream, **ending, ignore_eos=True, skip_special_tokens=False) == \
        ("<|im_end|>" * 8, "length", 8)
    content, finish = _chat(server, stream, max_tokens=6, logit_bias={str(end): 100}, min_tokens=3)
    assert finish == "stop" and content == _chat(server, stream, max_tokens=3)[0]
    assert _chat(server, stream, max_tokens=4, logit_bias={str(end): 100}, ignore_eos=True) == ("", "length")


@pytest.mark.parametrize("stream", [False, True])
def test_stop_token_ids_and_stop_strings(server, stream):
    decode = server["tokenizer"].decode
    plain = _generate(server, PROMPT, 12)
    at = next(i for i in range(3, 12) if plain[i] not in plain[:i])  # a token whose first use ends the answer
    cut = {"prompt": PROMPT, "max_tokens": 12, "stop_token_ids": [plain[at]]}
    assert _completion(server, stream, **cut) == (decode(plain[:at]), "stop", at + 1)
    assert _completion(server, stream, **cut, include_stop_str_in_output=True) == \
        (decode(plain[:at + 1]), "stop", at + 1)
    assert _completion(server, stream, **cut, min_tokens=at + 1)[1:] != ("stop", at + 1)  # held back past it
    text = decode(plain)
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert _completion(server, stream, prompt=PROMPT, max_tokens=12, stop=[stop])[0] == text[:text.find(stop)]
    assert _completion(server, stream, prompt=PROMPT, max_tokens=12, stop=[stop], include_stop_str_in_output=True)[0] \
        == text[:text.find(stop) + len(stop)]


def test_min_p_allowed_tokens_and_truncation(server):
    decode = server["tokenizer"].decode
    greedy = _completion(server, prompt=PROMPT, max_tokens=10)[0]
    for seed in (1, 2):  # min_p 1 leaves the most likely token alone: sampling answers as greedy does
        assert _completion(server, prompt=PROMPT, max_tokens=10, temperature=1.5, seed=seed, min_p=1.0)[0] == greedy
    assert _completion(server, prompt=PROMPT, max_tokens=10, temperature=1.5, seed=1)[0] != greedy
    assert _completion(server, prompt=PROMPT, max_tokens=5, allowed_token_ids=[61])[0] == decode([61] * 5)
    long = [40, 41, 42, 43] + PROMPT
    answer = post_json(server, "/v1/completions", {"prompt": long, "max_tokens": 6,
                                                   "truncate_prompt_tokens": len(PROMPT)})
    assert answer["usage"]["prompt_tokens"] == len(PROMPT)
    assert answer["choices"][0]["text"] == _completion(server, prompt=PROMPT, max_tokens=6)[0]
    whole = post_json(server, "/v1/completions", {"prompt": long, "max_tokens": 6, "truncate_prompt_tokens": -1})
    assert whole["usage"]["prompt_tokens"] == len(long)  # -1: as many as the server takes, all of these
    chat = post_json(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello, how are you?"}],
                                                      "max_tokens": 4, "truncate_prompt_tokens": 5})
    assert chat["usage"]["prompt_tokens"] == 5
    both = post_json(server, "/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "n": 2, "best_of": 2})
    assert len(both["choices"]) == 2


@pytest.mark.parametrize("body, param, words", [
    ({"stop_token_ids": [100000]}, "stop_token_ids", "not in this model's vocabulary"),
    ({"allowed_token_ids": [5, 100000]}, "allowed_token_ids", "not in this model's vocabulary"),
    ({"min_tokens": 2, "response_format": {"type": "json_object"}}, "min_tokens", "cannot be combined with response_format"),
    ({"ignore_eos": True, "structured_outputs": {"choice": ["a", "b"]}}, "ignore_eos", "structured_outputs"),
    ({"truncate_prompt_tokens": 2, "echo": True}, "truncate_prompt_tokens", "cannot be combined with echo"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when stream is true"),
])
def test_refused_over_http(server, body, param, words):
    response = server["client"].post("/v1/completions", json={"model": "base", "prompt": "Hello", "max_tokens": 4,
                                                              **body})
    assert response.status_code == 400, response.text[:300]
    error = response.json()["error"]
    assert words in error["message"] and error["param"] == param, error


def test_rows_keep_their_own_options_in_one_batch(server):
    """Requests with different vLLM options decoding at once answer as each does alone (no option of one row
    reaches another)."""
    end = server["end"]
    bodies = [{"prompt": PROMPT, "max_tokens": 10, "repetition_penalty": 1.6},
              {"prompt": PROMPT, "max_tokens": 10, "logit_bias": {str(end): 100}, "min_tokens": 4},
              {"prompt": PROMPT, "max_tokens": 10, "logit_bias": {str(end): 100}, "ignore_eos": True,
               "skip_special_tokens": False},
              {"prompt": PROMPT, "max_tokens": 10, "temperature": 1.3, "seed": 4, "min_p": 0.2, "top_p": 0.9},
              {"prompt": PROMPT, "max_tokens": 10, "allowed_token_ids": [61, 62], "temperature": 1.0, "seed": 9},
              {"prompt": PROMPT, "max_tokens": 10}]
    alone = [_completion(server, **body) for body in bodies]
    with ThreadPoolExecutor(len(bodies) * 2) as pool:
        together = list(pool.map(lambda body: _completion(server, **body), bodies * 2))
    assert together == alone * 2
    assert len({text for text, _, _ in alone}) == len(alone)


# -- bad_words ---------------------------------------------------------------------------------------------------------
def test_bad_words_are_transformers_no_bad_words_on_the_answer():
    """vLLM's bad_words: each word's token sequence(s), the last token refused where the answer (not the prompt:
    vLLM looks at the output only) ends with the others: transformers' NoBadWordsLogitsProcessor given the
    answer's tokens, element by element."""
    from transformers.generation.logits_process import NoBadWordsLogitsProcessor

    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Engine, Request
    from lorakit.serve.protocol import CompletionRequest

    tokenizer = make_tokenizer()

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    body = CompletionRequest.model_validate({"model": "m", "prompt": "hi", "bad_words": ["capital", " is", "Paris"]})
    banned = body.banned_words(encode)
    # vLLM's rule: the word, and with a space where that is as many tokens ("is" and " is": one each; " capital" is
    # one token where "capital" is three, so it is not added)
    assert len(encode("capital")) == 3 and len(encode(" capital")) == 1 and len(encode(" is")) == 1
    assert set(banned) == {tuple(encode("capital")), tuple(encode("is")), tuple(encode(" is")), tuple(encode("Paris"))}
    options = body.served_options((2,), len(tokenizer), None, encode)[0]
    assert options.banned == banned and options.masks()
    answers = [[], encode("Paris is the"), encode("the"), encode("the capit"), encode("of France")]
    requests = [Request([7, 8], None, SamplingParams(), lambda *a: True, lambda r: None, options=options)
                for _ in answers]
    for request, answer in zip(requests, answers):
        request.tokens = list(answer)
    logits = torch.randn(len(answers), len(tokenizer), generator=torch.Generator().manual_seed(4))
    processed = Engine._processed(requests, logits)
    reference = NoBadWordsLogitsProcessor([list(words) for words in banned], eos_token_id=tokenizer.eos_token_id)
    for row, answer in enumerate(answers):
        expected = reference(torch.tensor([[tokenizer.bos_token_id] + answer]), logits[row:row + 1].clone())[0]
        if not answer:  # transformers looks at the prompt too: give it one that matches nothing
            expected = reference(torch.tensor([[tokenizer.bos_token_id]]), logits[row:row + 1].clone())[0]
        assert torch.equal(processed[row], expected), row
    assert encode("capital")[-1] in options.refused(encode("capital")[:-1])
    assert encode("capital")[-1] not in options.refused(encode("capital")[:1])


def test_bad_words_over_http(server):
    """A word the greedy answer writes is banned: the answer is transformers' generate with those token
    sequences banned (a prompt whose tail starts none of them, so looking at the prompt changes nothing)."""
    from lorakit.serve.protocol import CompletionRequest

    tokenizer = server["tokenizer"]
    plain = _generate(server, PROMPT, 12)

    def encode(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # a piece of the answer (two tokens, else one) whose text, leading spaces stripped, spells it back
    word = next(tokenizer.decode(plain[i:i + size]) for size in (2, 1) for i in range(1, 10)
                if tuple(encode(tokenizer.decode(plain[i:i + size]).lstrip())) == tuple(plain[i:i + size]))
    banned = CompletionRequest.model_validate({"model": "m", "prompt": "x", "bad_words": [word]}).banned_words(encode)
    assert all(words[0] != PROMPT[-1] for words in banned)
    expected = _generate(server, PROMPT, 12, bad_words_ids=[list(w) for w in banned])
    assert expected != plain
    expected = tokenizer.decode(expected)
    for stream in (False, True):
        assert _completion(server, stream, prompt=PROMPT, max_tokens=12, bad_words=[word])[0] == expected
    error = server["client"].post("/v1/completions", json={"model": "base", "prompt": "x", "bad_words": ["  "]})
    assert error.status_code == 400 and "non-blank" in error.json()["error"]["message"]


def test_responses_take_penalties_and_logit_bias_as_chat_does(server):
    """vLLM's Responses API takes presence_penalty, frequency_penalty and logit_bias (before: 400 unknown field):
    the answer is the chat answer to the same messages with the same settings."""
    # the bias makes token 61 the answer's (logits here are within +-9); the penalties then take it off again
    settings = [{}, {"logit_bias": {"61": 12}}, {"logit_bias": {"61": 12}, "frequency_penalty": 2.0,
                                                "presence_penalty": 1.0}]
    answers = []
    for fields in settings:
        answer = post_json(server, "/v1/responses", {"input": "Hello, how are you today?", "max_output_tokens": 16,
                                                     **fields})["output"][-1]["content"][0]["text"]
        assert answer == _chat(server, max_tokens=16, **fields)[0]
        answers.append(answer)
    assert len(set(answers)) == 3
    error = server["client"].post("/v1/responses", json={"model": "base", "input": "hi", "logit_bias": {"100000": 1}})
    assert error.status_code == 400 and "not in this model's vocabulary" in error.json()["error"]["message"]


def test_the_openai_package_sends_them_in_extra_body(server):
    """What a vLLM user writes: the openai package with ``extra_body``; and its stream_options without stream is
    the package's BadRequestError, as from OpenAI."""
    import openai

    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "Hello, how are you today?"}]
    reply = client.chat.completions.create(model="base", messages=messages, max_tokens=10, temperature=0,
                                           extra_body={"repetition_penalty": 1.6, "min_tokens": 2})
    assert reply.choices[0].message.content == _chat(server, max_tokens=10, repetition_penalty=1.6)[0]
    plain = _generate(server, PROMPT, 12)
    at = next(i for i in range(3, 12) if plain[i] not in plain[:i])
    stream = client.completions.create(model="base", prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       extra_body={"stop_token_ids": [plain[at]], "include_stop_str_in_output": True})
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == \
        server["tokenizer"].decode(plain[:at + 1])
    with pytest.raises(openai.BadRequestError, match="stream_options is only allowed when stream is true"):
        client.chat.completions.create(model="base", messages=messages, max_tokens=4,
                                       stream_options={"include_usage": True})
