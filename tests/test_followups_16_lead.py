"""Follow-ups of the sixteenth session (lead): the serving engine's sampled rows without a seed share one draw."""

from __future__ import annotations

import torch


def test_unseeded_rows_share_one_exponential_call(monkeypatch):
    """A step's rows without a generator draw their exponential race in one call on torch's default stream;
    each seeded row still draws from its own generator, so its token is the one it gets alone."""
    from lorakit.serve.sampling import sample_rows

    calls = []
    original = torch.Tensor.exponential_

    def counted(self, *args, **kwargs):
        calls.append(kwargs.get("generator"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "exponential_", counted)
    logits = torch.randn(7, 300, generator=torch.Generator().manual_seed(3)) * 3
    seeded = {1: 11, 4: 44}
    generators = [torch.Generator().manual_seed(seeded[i]) if i in seeded else None for i in range(7)]
    tokens, ok = sample_rows(logits, [0.9] * 7, [1.0, 0.8, 1.0, 1.0, 0.9, 1.0, 1.0], [0, 0, 5, 0, 0, 0, 0],
                             generators)
    assert ok.all()
    assert len(calls) == 1 + len(seeded)  # one call for the five unseeded rows, one per seeded row
    assert sum(generator is None for generator in calls) == 1
    for i, seed in seeded.items():
        alone, _ = sample_rows(logits[i:i + 1], [0.9], [[1.0, 0.8, 1.0, 1.0, 0.9][i]], [0],
                               [torch.Generator().manual_seed(seed)])
        assert int(alone[0]) == int(tokens[i])
    # with no unseeded row, no shared call is made
    calls.clear()
    sample_rows(logits[:2], [1.0, 1.0], [1.0, 1.0], [0, 0], [torch.Generator().manual_seed(0)] * 2)
    assert len(calls) == 2 and all(generator is not None for generator in calls)


def test_engine_gives_generators_to_seeded_requests_only():
    """Only a seeded sampled request gets a stream of its own (its answer must not depend on its neighbours)."""
    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Engine, Request
    from lorakit.serve.metrics import EngineMetrics

    class Idle(Engine):  # submit's bookkeeping without a model or an engine thread
        def __init__(self):
            import threading

            self.device = torch.device("cpu")
            self._wake = threading.Condition()
            self._waiting = []
            self.metrics = EngineMetrics()  # submit names each request's /metrics series
            self.failure = None  # a live loop (submit fails its jobs at once once the loop's thread has ended)

    engine = Idle()
    made = {}
    for name, params in {"greedy": SamplingParams(max_new_tokens=4),
                         "unseeded": SamplingParams(max_new_tokens=4, temperature=0.7),
                         "seeded": SamplingParams(max_new_tokens=4, temperature=0.7, seed=5)}.items():
        made[name] = Request([1, 2], None, params, lambda token, info: True, lambda reason: None)
        engine.submit(made[name])
    assert made["greedy"].generator is None and made["unseeded"].generator is None
    seeded = made["seeded"].generator
    assert isinstance(seeded, torch.Generator)
    assert torch.equal(torch.rand(4, generator=seeded), torch.rand(4, generator=torch.Generator().manual_seed(5)))


def test_lorakit_progress_0_silences_library_progress(capsys, monkeypatch):
    """Library work (here quantizing to NF4) counts itself on stderr once slow; a program that calls lorakit and keeps
    its own stderr clean sets LORAKIT_PROGRESS=0."""
    import lorakit._progress
    from conftest import tiny_llama
    from lorakit.quant.quantize import quantize

    monkeypatch.setattr(lorakit._progress, "SLOW_WORK_S", 0.0)  # any work counts as slow
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("LORAKIT_PROGRESS", raising=False)
    quantize(tiny_llama())
    assert "quantizing to NF4" in capsys.readouterr().err
    for value in ("0", "off", "False"):
        monkeypatch.setenv("LORAKIT_PROGRESS", value)
        quantize(tiny_llama())
        assert capsys.readouterr().err == ""


def test_penalty_history_block_is_reused_while_the_batch_holds_and_rebuilt_when_it_changes():
    """Engine._penalize keeps one stacked history block while the same requests are penalised in the same order
    (no restack, no copy of the penalties), and restacks when a request joins, leaves or the order changes; at every
    step each row's penalised logits equal those from a history built afresh from its prompt and answer."""
    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Engine, Request
    from lorakit.serve.sampling import RowOptions, new_history, penalize_rows

    vocab = 50
    generator = torch.Generator().manual_seed(7)
    pool = []
    for i in range(5):
        prompt = torch.randint(0, vocab, (6 + i,), generator=generator).tolist()
        fields = [dict(options=RowOptions(repetition_penalty=1.3)), dict(presence=0.5), dict(frequency=0.25),
                  dict(presence=0.2, frequency=0.1, options=RowOptions(repetition_penalty=0.8)),
                  dict(options=RowOptions(repetition_penalty=1.1))][i]
        pool.append(Request(prompt, None, SamplingParams(max_new_tokens=99), lambda t, info: True,
                            lambda reason: None, **fields))
    # the step's batch: steady, one joins, steady, one leaves, the order changes, two tokens at once for one row
    batches = [[0, 1, 2], [0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3], [1, 2, 3], [3, 1, 2, 4], [3, 1, 2, 4], [3, 1, 2, 4]]
    blocks = []
    for step, members in enumerate(batches):
        requests = [pool[m] for m in members]
        logits = torch.randn(len(requests), vocab, generator=generator) * 4
        expected = []
        for r, row in zip(requests, logits):  # the reference: a fresh history of all the request's tokens
            penalties = torch.tensor([[r.options.repetition_penalty, r.presence, r.frequency]])
            fresh = new_history(r.prompt, r.tokens, vocab, torch.device("cpu")).unsqueeze(0)
            expected.append(penalize_rows(row.unsqueeze(0).clone(), fresh, penalties)[0])
        got = logits.clone()
        Engine._penalize(requests, list(range(len(requests))), got)
        torch.testing.assert_close(got, torch.stack(expected), rtol=0, atol=0)
        blocks.append(requests[0].block)
        for r in requests:  # the answers grow; one request gains two tokens in one step
            r.tokens += torch.randint(0, vocab, (2 if step == 5 and r is pool[4] else 1,), generator=generator).tolist()
    assert blocks[1] is blocks[0] and blocks[3] is blocks[2] and blocks[6] is blocks[5] and blocks[7] is blocks[5]
    assert len({id(b) for b in blocks}) == 4  # rebuilt at the join, the leave and the new order only
