"""Fifteenth session, the lead's: the serving engine's penalties run over the whole batch at once (a history row per
request on the device) instead of a few small launches and host copies per row, which made a step of 32 sampled
rows with penalties cost 2.8x a greedy one on an H200 (bench/sampling_overhead.py). The results must stay those of
the per-row definitions: transformers' repetition penalty, OpenAI's presence / frequency penalties, logit_bias.
And peft's lora_bias in the static decoder (it refused such rows; the engine said to use --decoder transformers)."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from lorakit.generation import SamplingParams
from lorakit.serve.engine import Engine, Request
from lorakit.serve.sampling import PROMPT_MARK, RowOptions, new_history, penalize_rows


def _reference(logits: torch.Tensor, prompt: list[int], answer: list[int], repetition: float, presence: float,
               frequency: float, bias: dict[int, float]) -> torch.Tensor:
    """One row's logits (V,) as the definitions say, token by token: logit_bias, then transformers' repetition
    penalty over prompt + answer, then presence + frequency x count over the answer."""
    row = logits.clone()
    for token, value in bias.items():
        row[token] += value
    if repetition != 1.0:
        row = RepetitionPenaltyLogitsProcessor(repetition)(torch.tensor([prompt + answer]), row.unsqueeze(0))[0]
    for token in set(answer):
        row[token] -= presence + frequency * answer.count(token)
    return row


def test_history_rows_mark_the_prompt_and_count_the_answer():
    history = new_history([4, 4, 9], [9, 2, 2, 2], 12, torch.device("cpu"))
    assert history[4] == PROMPT_MARK and history[9] == PROMPT_MARK + 1 and history[2] == 3
    assert int((history != 0).sum()) == 3


def test_penalize_rows_equals_each_rows_definition_on_awkward_rows():
    generator = torch.Generator().manual_seed(1)
    vocab = 97
    logits = torch.randn(6, vocab, generator=generator) * 4
    logits[0, :5] = 0.0  # zero logits stay zero under the repetition penalty
    logits[1, 10:20] = float("-inf")  # refused tokens stay refused
    prompts = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (5, 0, 40, 1, 97, 3)]
    answers = [torch.randint(0, vocab, (n,), generator=generator).tolist() for n in (3, 7, 0, 60, 2, 1)]
    settings = [(1.3, 0.0, 0.0), (0.7, 0.5, 0.25), (1.0, 0.0, 0.0), (1.0, 1.5, -0.5), (2.5, -0.3, 0.1), (1.0, 0.0, 0.0)]
    history = torch.stack([new_history(p, a, vocab, logits.device) for p, a in zip(prompts, answers)])
    out = penalize_rows(logits.clone(), history, torch.tensor(settings, dtype=torch.float32))
    for row in range(6):
        expected = _reference(logits[row], prompts[row], answers[row], *settings[row], {})
        assert torch.allclose(out[row], expected, rtol=0, atol=1e-6), row
    assert torch.equal(out[2], logits[2]) and torch.equal(out[5], logits[5])  # penalties off: untouched


def _request(prompt: list[int], temperature: float = 0.0, presence: float = 0.0, frequency: float = 0.0,
             repetition: float = 1.0, bias: dict[int, float] | None = None, seed: int | None = None) -> Request:
    job = Request(prompt, None, SamplingParams(temperature=temperature, seed=seed, max_new_tokens=64),
                  lambda *a: True, lambda r: None, presence=presence, frequency=frequency,
                  options=RowOptions(repetition_penalty=repetition) if repetition != 1.0 else RowOptions())
    if bias:
        job.bias = (torch.tensor(list(bias)), torch.tensor(list(bias.values())))
    job.generator = job.params.generator(torch.device("cpu"))
    return job


def test_choose_over_many_steps_equals_the_definitions_recomputed_each_step():
    """A mixed batch decoded for 24 steps through Engine._choose (greedy rows, so each token is the argmax of the
    processed logits): each row's token equals the argmax of its logits processed from scratch by the definitions
    with its prompt and answer so far; rows join and leave the batch (a row's history follows its request, not
    its position), and the model's logits are never changed."""
    generator = torch.Generator().manual_seed(2)
    vocab = 50
    specs = [dict(repetition=1.8), dict(presence=0.9, frequency=0.6), dict(), dict(repetition=0.6, presence=0.4,
             bias={3: 2.0, 7: -1.0}), dict(bias={1: 5.0}), dict(frequency=1.2, repetition=1.4)]
    requests = [_request(torch.randint(0, vocab, (n,), generator=generator).tolist(), **spec)
                for n, spec in zip((6, 1, 3, 12, 2, 30), specs)]
    for step in range(24):
        batch = [r for k, r in enumerate(requests) if not (k == 2 and 8 <= step < 14) and not (k == 4 and step < 5)]
        logits = torch.randn(len(batch), vocab, generator=generator) * 2
        model = logits.clone()
        tokens, errors = Engine._choose(batch, logits)
        assert torch.equal(logits, model) and errors == [None] * len(batch)
        for request, token, row in zip(batch, tokens, logits):
            spec = specs[requests.index(request)]
            expected = _reference(row, request.prompt, request.tokens, spec.get("repetition", 1.0),
                                  spec.get("presence", 0.0), spec.get("frequency", 0.0), spec.get("bias", {}))
            assert token == int(expected.argmax()), (step, requests.index(request))
            request.tokens.append(token)
    assert any(len(set(r.tokens)) > 1 for r in requests)


def test_sampled_penalised_rows_are_reproducible_with_a_seed_whatever_their_neighbours():
    """A seeded sampled row with penalties draws the same answer alone and beside other rows."""
    generator = torch.Generator().manual_seed(3)
    steps = [torch.randn(3, 40, generator=generator) for _ in range(10)]

    def answer(batch_rows: list[int]) -> list[int]:
        jobs = [_request([1, 2, 3], temperature=0.9, presence=0.5, repetition=1.3, seed=11),
                _request([5], temperature=1.2, frequency=0.8, seed=4), _request([6, 6], presence=2.0)]
        batch = [jobs[i] for i in batch_rows]
        for logits in steps:
            tokens, _ = Engine._choose(batch, logits[batch_rows])
            for job, token in zip(batch, tokens):
                job.tokens.append(token)
        return jobs[0].tokens

    assert answer([0]) == answer([0, 1, 2]) == answer([2, 0])


# -- peft's lora_bias in the static decoder ------------------------------------------------------------------------
def _biased_model():
    """tiny Llama with a lora_bias adapter on every projection, a plain one on some and a DoRA one, random B and b."""
    import warnings

    import lorakit
    from tests.conftest import tiny_llama

    model = tiny_llama(seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's (and lorakit's) warning: the base layers have no bias of their own
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, lora_bias=True), adapter="b")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=3, target_modules=["q_proj", "down_proj"]), adapter="p")
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=6, variant="dora"), adapter="d")
    generator = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, parameter in lorakit.lora_parameters(model):
            if name.endswith(("lora_B", "magnitude", "lora_bias")):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


@pytest.mark.parametrize("overlap", ["off", "lora"])
def test_static_decoder_adds_each_rows_lora_bias(overlap):
    """Rows on a lora_bias adapter, beside rows on a plain one, a DoRA one and none, decode in the static decoder
    (its own prefill, then steps) with the logits of lorakit's layers through transformers, at the float32
    tolerance of tests/test_static_decoder.py; without the bias the logits differ by far more."""
    import lorakit
    from lorakit.decoding import StaticDecoder
    from lorakit.generation import decode, prefill

    model = _biased_model()
    prompts, names = [[5, 9, 2, 7, 1], [3, 4], [8, 8, 1, 2, 3], [11, 12, 13]], ["b", None, "d", "b"]
    expected_logits, batch = prefill(model, prompts, names)
    decoder = StaticDecoder(model, max_batch=6, max_len=16, lora_overlap=overlap)
    rows = [4, 0, 2, 5]
    got_logits = decoder.prefill(rows, prompts, names)
    assert decoder.adapters.has_lora_bias and decoder._graph_kind() == (True, True, True)
    assert torch.allclose(got_logits, expected_logits, atol=1e-5, rtol=1e-5)
    for _ in range(3):
        tokens = expected_logits.argmax(dim=-1).tolist()
        expected_logits = decode(model, batch, tokens, names)
        got_logits = decoder.step(rows, tokens, names)
        assert torch.allclose(got_logits, expected_logits, atol=1e-5, rtol=1e-5), \
            f"max diff {(got_logits - expected_logits).abs().max():.2e}"
    with torch.no_grad():  # the bias matters: zeroed, the reference moves far beyond the tolerance
        for name, parameter in lorakit.lora_parameters(model, "b"):
            if name.endswith("lora_bias"):
                parameter.zero_()
    unbiased, _ = prefill(model, prompts[:1], ["b"])
    biased, _ = prefill(_biased_model(), prompts[:1], ["b"])
    assert (unbiased - biased).abs().max() > 100 * 1e-5
    decoder.adapters.evict("b")
    assert not decoder.adapters.has_lora_bias


def test_a_lossy_bf16_merge_says_what_the_share_measures_and_how_to_check_the_answers(tmp_path):
    """The share the warning gives is of the update to the weights (rounding noise at the base's scale), not of
    the answers: the line says so and names the eval that checks the merged folder (it read as if the merge lost
    that much of the adapter, where the demo's answers were unchanged)."""
    import warnings

    import lorakit
    from lorakit.export import export_merged
    from tests.conftest import tiny_llama

    model = tiny_llama(seed=5)
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2), adapter="tiny")
    with torch.no_grad():  # an update far below bfloat16's step at the weights' scale
        for name, parameter in lorakit.lora_parameters(model, "tiny"):
            if name.endswith("lora_B"):
                parameter.fill_(1e-4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, report = export_merged(model, None, "tiny", tmp_path / "merged", dtype=torch.bfloat16)
    said = [str(w.message) for w in caught if "rounds away" in str(w.message)]
    assert report.lost_share > 0.25 and len(said) == 1
    assert "to the weights" in said[0] and f"lorakit eval --model {tmp_path / 'merged'}" in said[0]
    assert "--dtype fp32" in said[0] and "\n" not in said[0]
