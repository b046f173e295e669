"""The static decoder's full warm-up (fourteenth session, lead).

A server's first batch of a new shape waited up to 1.4 s on an H200 while Triton compiled that shape's kernels and
the decoder captured its graph (docs/PERFORMANCE.md). ``StaticDecoder.warm_up`` now runs every prefill bucket,
the eager and long-prompt passes, and all of them again through a zero placeholder adapter, at start. These tests
check, on the CPU (kernels under TRITON_INTERPRET=1), that it covers the shapes it says, runs the LoRA kernels,
and leaves nothing behind: the same outputs, free rows, no placeholder slot. They run the kernels' PyTorch
references (LORAKIT_DISABLE_TRITON=1): what is checked is which passes run, not the kernels (their own tests cover
them), and the interpreter would take minutes over the warm-up's passes.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.decoding import StaticDecoder
from lorakit.decoding.decoder import PREFILL_GRAPH_MAX_TOKENS, PREFILL_KERNEL_MAX_PROMPT, WARM_UP_ADAPTER
from lorakit.generation import prefill
from tests.conftest import tiny_llama

PROMPTS = [[5, 9, 2, 7, 1], [3, 4], [8, 8, 1, 2, 3, 4, 5]]


@pytest.fixture(autouse=True)
def _references(monkeypatch):
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")


def _model(seed=7):
    model = tiny_llama(seed=seed)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=2, target_modules=["q_proj", "down_proj"]), adapter="b")
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(model):
            if name.endswith("lora_B"):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _serve(decoder, model, names):
    """Prefill PROMPTS on rows 0..2 through the decoder, then two steps; the logits of each."""
    out = [decoder.prefill([0, 1, 2], PROMPTS, names)]
    for _ in range(2):
        out.append(decoder.step([0, 1, 2], out[-1].argmax(-1).tolist(), names))
    decoder.release([0, 1, 2])
    return out


def test_warm_up_prompts_fill_each_bucket_then_the_eager_and_long_passes():
    model = _model()
    big = StaticDecoder(model, max_batch=3, max_len=300)
    passes = big._warm_up_prompts(3)
    totals = [sum(p) for p in passes]
    buckets = [16 << k for k in range((PREFILL_GRAPH_MAX_TOKENS // 16).bit_length())]
    assert totals[:len(buckets)] == buckets  # exactly each graph bucket's token count
    assert totals[len(buckets)] > PREFILL_GRAPH_MAX_TOKENS  # then an eager pass
    assert passes[-1] == [PREFILL_KERNEL_MAX_PROMPT + 1]  # and one prompt past the decode kernels' attention
    assert all(max(p) <= PREFILL_KERNEL_MAX_PROMPT for p in passes[:-1])
    # rows and max_len bound what is tried: 3 rows of 11 tokens hold buckets 16 and 32 only, no long prompt
    small = StaticDecoder(model, max_batch=3, max_len=12)
    assert [sum(p) for p in small._warm_up_prompts(3)] == [16, 32]
    assert all(len(p) <= 3 and max(p) <= 11 for p in small._warm_up_prompts(3))


def test_full_warm_up_runs_the_lora_kernels_and_leaves_no_trace(monkeypatch):
    model = _model()
    names = ["a", None, "b"]
    expected = _serve(StaticDecoder(model, max_batch=3, max_len=12), model, names)

    decoder = StaticDecoder(model, max_batch=3, max_len=12)
    from lorakit.kernels import grouped_lora

    calls = []
    for kernel in ("grouped_lora_add_", "grouped_shrink"):
        real = getattr(grouped_lora, kernel)
        monkeypatch.setattr(grouped_lora, kernel, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    decoder.warm_up(full=True)  # (the default on CUDA)
    assert calls, "the placeholder adapter did not run the grouped LoRA kernels"
    assert decoder.free_rows() == [0, 1, 2] and decoder.lengths == [0] * 3
    assert WARM_UP_ADAPTER not in decoder.adapters and not decoder.adapters.slot_of
    assert lorakit.adapter_names(model) == ["a", "b"]  # the placeholder never entered the model
    got = _serve(decoder, model, names)
    for step, (e, g) in enumerate(zip(expected, got)):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-5), f"step {step}: max diff {(g - e).abs().max():.2e}"


def test_the_placeholder_adapter_computes_the_base_model():
    model = _model(seed=8)
    decoder = StaticDecoder(model, max_batch=4, max_len=16)
    base = decoder.prefill([0, 1, 2], PROMPTS, [None] * 3)
    decoder.release([0, 1, 2])
    slot = decoder.adapters.hold(WARM_UP_ADAPTER)
    assert all(int(stack.rank[slot].min()) == decoder.adapters.r_max for layer in decoder.adapters.layers
               for stack in layer.values())
    held = decoder.prefill([0, 1, 2], PROMPTS, [WARM_UP_ADAPTER] * 3)
    assert torch.allclose(held, base, atol=1e-6, rtol=0)
    reference, _ = prefill(model, PROMPTS, [None] * 3)  # transformers' forward without adapters
    assert torch.allclose(held, reference, atol=1e-5, rtol=1e-5)


def test_graphs_of_both_kinds_are_kept_until_the_stacks_are_reallocated():
    decoder = StaticDecoder(_model(seed=9), max_batch=2, max_len=16)
    decoder._graphs = {(False, False, False): "base graph", (True, False, False): "adapter graph"}
    decoder._prefill_graphs = {((False, False, False), 16): "prefill graph"}
    assert decoder._graph_kind() == (False, False, False) and len(decoder._graphs) == 2  # no adapter loaded: kept
    decoder.adapters.load("a")
    assert decoder._graph_kind() == (True, False, False) and len(decoder._graphs) == 2  # a slot written in place: kept
    decoder.adapters.grow(decoder.adapters.capacity * 2, decoder.adapters.r_max)  # new buffers: every graph goes
    assert decoder._graph_kind() == (True, False, False)
    assert decoder._graphs == {} and decoder._prefill_graphs == {}


class _ReplayedForward:
    """A stand-in for a CUDA graph on the CPU: capture runs ``forward`` once (as the real capture's warm-up runs
    do), replay runs it again on the same buffers."""

    captures = 0

    def __init__(self, forward):
        _ReplayedForward.captures += 1
        self.forward = forward
        forward()

    def replay(self):
        self.forward()


def test_graphed_prefill_captures_a_small_bucket_after_a_large_one(monkeypatch):
    """The capture's runs read the previous call's row indices: after a 32-token bucket they pointed past a new
    16-token bucket's tokens (on CUDA: a device-side assert that killed a server whose first short request came
    after longer batches). Graph replays are stood in for by reruns of the captured pass."""
    monkeypatch.setattr(StaticDecoder, "_capture_graph", staticmethod(lambda forward, pool=None: _ReplayedForward(forward)))
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    model = _model(seed=10)
    decoder = StaticDecoder(model, max_batch=4, max_len=16, graph=True)
    eager = StaticDecoder(model, max_batch=4, max_len=16, graph=False)
    long_prompts, names = [PROMPTS[2] * 2, PROMPTS[0] * 2, PROMPTS[2] * 2], ["a", None, "b"]  # 34 tokens: bucket 64
    for prompts, rows in ((long_prompts, [0, 1, 2]), ([PROMPTS[1]], [3])):
        got = decoder.prefill(rows, prompts, names[:len(rows)])
        want = eager.prefill(rows, prompts, names[:len(rows)])
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
    # graphs without and with adapters loaded are both kept: the adapter graph of bucket 16 is reused after the
    # stack was emptied (a base-only graph captured meanwhile) and an adapter loaded again into its slot
    _ReplayedForward.captures = 0
    decoder.release([0, 1, 2, 3])
    decoder.adapters.evict("a")
    decoder.adapters.evict("b")
    decoder.prefill([0], [PROMPTS[1]], [None])
    decoder.prefill([1], [PROMPTS[1]], ["a"])
    decoder.prefill([2], [PROMPTS[1]], [None])
    assert _ReplayedForward.captures == 1  # the base-only graph of bucket 16, once


def test_full_warm_up_on_a_4_bit_base_leaves_its_outputs_alone():
    from tests.test_static_decoder_nf4 import _qlora_llama

    model = _qlora_llama(seed=11).eval()
    names = ["a", None, "b"]
    expected = _serve(StaticDecoder(model, max_batch=3, max_len=12), model, names)
    decoder = StaticDecoder(model, max_batch=3, max_len=12)
    decoder.warm_up(full=True)  # (the default on CUDA)
    assert not decoder.adapters.slot_of and decoder.free_rows() == [0, 1, 2]
    for step, (e, g) in enumerate(zip(expected, _serve(decoder, model, names))):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-5), f"step {step}: max diff {(g - e).abs().max():.2e}"


def test_default_warm_up_off_cuda_is_the_short_pass(monkeypatch):
    """Off CUDA nothing is compiled or captured ahead, so the default warm-up is the one-token pass (under Triton's
    interpreter the full one took minutes of a CPU test); full=True still runs every pass there."""
    model = _model()
    decoder = StaticDecoder(model, max_batch=3, max_len=40)
    lengths = []
    real = decoder.prefill
    monkeypatch.setattr(decoder, "prefill", lambda rows, prompts, names, **kw: lengths.append(
        [len(p) for p in prompts]) or real(rows, prompts, names, **kw))
    decoder.warm_up()
    assert lengths == [[1]] and decoder.free_rows() == [0, 1, 2]
    decoder.warm_up(full=True)
    assert len(lengths) == 1 + 2 * (1 + len(decoder._warm_up_prompts(3)))
