"""use_fast_kernels(compile="layers"): regional torch.compile of the decoder layers, on tiny Llamas on the CPU.

The layer-stack tests use dynamo + AOTAutograd with the eager backend ("aot_eager"): that is the part lorakit's
code goes through (the LoRA autograd.Function traced into the graph, guards shared by the layers, checkpointing,
no KV cache), in seconds. Inductor itself is exercised on one LoRA linear (it compiles C++ on the CPU, ~80 s for
a whole decoder layer on 2 cores, too slow for CI).
"""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close, tiny_llama
from lorakit.errors import LorakitError
from lorakit.kernels.lora_linear import lora_linear, lora_linear_reference
from lorakit.kernels.rmsnorm import FusedRMSNorm
from lorakit.models.fast import disable_fast_kernels, use_fast_kernels

from test_fast_model import _lora_model  # the same adapted tiny model


def _model(layers=3):
    return _lora_model(tiny_llama(num_hidden_layers=layers))


def _loss_and_grads(model, ids, labels):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture
def dynamo_counters():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters

    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.mark.parametrize("checkpointing", [False, True])
def test_compiled_layers_match_eager_and_compile_once(checkpointing, dynamo_counters):
    model = _model(layers=4)
    ids = torch.randint(0, 128, (2, 13))
    labels = ids.clone()
    labels[0, :4] = -100
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels)
    report = use_fast_kernels(model, require_cuda=False, compile="layers", compile_backend="aot_eager")
    assert report.applied and report.compiled_layers == 4 and report.fused_loss, str(report)
    assert report.rms_norms == 0 and report.mlps == 0  # left to the compiler
    for step in range(2):  # the second step runs from the cache: no new graphs
        loss, grads = _loss_and_grads(model, ids, labels)
        assert_close(loss, ref_loss)
        assert grads.keys() == ref_grads.keys() and len(grads) == 4 * 7 * 2
        for name in grads:
            assert_close(grads[name], ref_grads[name], msg=f"step {step} {name}")
    assert dict(dynamo_counters["graph_break"]) == {}
    # one graph for the layers whose input needs a gradient, one for the first layer (embedding output, no grad):
    # never one per layer
    assert dynamo_counters["stats"]["unique_graphs"] <= 2, dict(dynamo_counters["stats"])


def test_compiled_layers_with_input_grads_compile_one_graph(dynamo_counters):
    model = _model(layers=3)
    model.enable_input_require_grads()
    ids = torch.randint(0, 128, (1, 9))
    use_fast_kernels(model, require_cuda=False, compile="layers", compile_backend="aot_eager")
    _loss_and_grads(model, ids, ids)
    assert dynamo_counters["stats"]["unique_graphs"] == 1, dict(dynamo_counters["stats"])


def test_no_cache_in_training_only(dynamo_counters):
    model = _model(layers=2)
    ids = torch.randint(0, 128, (1, 9))
    use_fast_kernels(model, require_cuda=False, compile="layers", compile_backend="aot_eager")
    out = model(input_ids=ids, labels=ids)
    assert out.past_key_values is None
    with torch.no_grad():  # evaluation/generation keeps its cache and logits
        out = model(input_ids=ids, use_cache=True)
    assert out.past_key_values is not None and out.logits is not None


def test_compile_undo_and_earlier_swaps(dynamo_counters):
    model = _model(layers=2)
    use_fast_kernels(model, require_cuda=False)  # Triton modules first ...
    assert any(isinstance(m, FusedRMSNorm) for m in model.modules())
    use_fast_kernels(model, require_cuda=False, compile="layers", compile_backend="aot_eager")  # ... then compile
    assert not any(isinstance(m, FusedRMSNorm) for m in model.modules())
    assert all(layer._compiled_call_impl is not None for layer in model.model.layers)
    disable_fast_kernels(model)
    assert all(layer._compiled_call_impl is None for layer in model.model.layers)
    ids = torch.randint(0, 128, (1, 9))
    assert model(input_ids=ids, labels=ids).logits is not None


def test_bad_compile_option():
    with pytest.raises(LorakitError, match="compile must be"):
        use_fast_kernels(_model(layers=1), require_cuda=False, compile="model")


def test_lora_linear_under_inductor(dynamo_counters):
    """The hand-written Function through inductor: outputs and every gradient vs the reference (fp32, odd sizes)."""
    pytest.importorskip("torch._inductor")
    x = torch.randn(3, 7, 37, requires_grad=True)
    weight = torch.randn(29, 37) / 37**0.5
    bias = torch.randn(29) * 0.1
    lora_A = (torch.randn(5, 37) / 37**0.5).requires_grad_(True)
    lora_B = (torch.randn(29, 5) / 5**0.5).requires_grad_(True)
    dy = torch.randn(3, 7, 29)
    compiled = torch.compile(lambda *t: lora_linear(*t, 1.75), backend="inductor", fullgraph=True)
    y = compiled(x, weight, bias, lora_A, lora_B)
    y.backward(dy)
    got = [y.detach(), x.grad, lora_A.grad, lora_B.grad]
    ref = [t.detach().clone().requires_grad_(t.requires_grad) for t in (x, weight, bias, lora_A, lora_B)]
    y_ref = lora_linear_reference(*ref, 1.75)
    y_ref.backward(dy)
    for name, g, r in zip(["y", "dx", "dA", "dB"], got, [y_ref.detach(), ref[0].grad, ref[3].grad, ref[4].grad]):
        assert_close(g, r, msg=name)
