"""The fused LoRA linear (LoraLinearFunction) against the reference, outputs and every gradient, element by element."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from lorakit.kernels.lora_linear import LoraLinearFunction, lora_linear, lora_linear_reference


def _inputs(dtype, lead=(3, 7), n_in=37, n_out=29, rank=5, bias=True, base_grad=False):
    """Awkward sizes on purpose; B is non-zero so every term of the backward is exercised."""
    x = torch.randn(*lead, n_in, dtype=dtype, requires_grad=True)
    weight = (torch.randn(n_out, n_in, dtype=dtype) / n_in**0.5).requires_grad_(base_grad)
    b = (torch.randn(n_out, dtype=dtype) * 0.1).requires_grad_(base_grad) if bias else None
    lora_A = (torch.randn(rank, n_in) / n_in**0.5).requires_grad_(True)  # adapters stay float32
    lora_B = (torch.randn(n_out, rank) / rank**0.5).requires_grad_(True)
    return x, weight, b, lora_A, lora_B


def _run(fn, tensors, scaling, dy):
    x, weight, b, lora_A, lora_B = tensors
    y = fn(x, weight, b, lora_A, lora_B, scaling)
    y.backward(dy)
    grads = [t.grad.clone() if t is not None and t.grad is not None else None for t in tensors]
    for t in tensors:
        if t is not None:
            t.grad = None
    return y.detach(), grads


def _clone(tensors):
    return [t.detach().clone().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias", [True, False])
def test_matches_reference(dtype, bias):
    tensors = _inputs(dtype, bias=bias)
    # gradients of unit scale, which is what the tolerance table's atol assumes (dA sums 21 rows of s dY B x)
    dy = torch.randn(3, 7, 29, dtype=dtype) * 0.05
    y, grads = _run(lora_linear, tensors, 1.75, dy)
    # the reference evaluated in float64 is the truth for both dtypes
    ref_inputs = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in tensors]
    y_ref, grads_ref = _run(lora_linear_reference, ref_inputs, 1.75, dy.double())
    assert y.dtype == dtype
    assert_close(y, y_ref, dtype)
    names = ["x", "weight", "bias", "lora_A", "lora_B"]
    for name, g, g_ref, t in zip(names, grads, grads_ref, tensors):
        if t is None or not t.requires_grad:
            assert g is None, name
            continue
        assert g.dtype == t.dtype, name  # float32 grads for the float32 adapters
        assert_close(g, g_ref, dtype, msg=f"grad of {name}")


def test_base_gradients_when_unfrozen():
    """If someone unfreezes the base, its gradients are right too (the usual case skips them)."""
    tensors = _inputs(torch.float32, base_grad=True)
    dy = torch.randn(3, 7, 29)
    _, grads = _run(lora_linear, tensors, 0.5, dy)
    _, grads_ref = _run(lora_linear_reference, _clone(tensors), 0.5, dy)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref)


def test_autocast_runs_in_bf16_and_returns_float32_adapter_grads():
    x, weight, b, lora_A, lora_B = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, weight, b, lora_A, lora_B, 2.0)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32 and lora_A.grad.dtype == torch.float32 and lora_B.grad.dtype == torch.float32
    ref = _clone([x, weight, b, lora_A, lora_B])
    y_ref = lora_linear_reference(*ref, 2.0)
    y_ref.sum().backward()
    assert_close(y, y_ref, torch.bfloat16)
    assert_close(lora_B.grad, ref[4].grad, torch.bfloat16)
    assert_close(lora_A.grad, ref[3].grad, torch.bfloat16)


def test_saves_only_x_and_xa():
    """The memory claim: the activations saved are x and x A^T (r columns), nothing of size (N, out); besides them
    only the weight itself and the compute-dtype copies of A and s B (adapter-sized, so backward need not cast)."""
    x, weight, b, lora_A, lora_B = _inputs(torch.float32, n_out=64)
    y = LoraLinearFunction.apply(x, weight, b, lora_A, lora_B, 1.0, torch.float32)
    saved = y.grad_fn.saved_tensors
    activation_sizes = sorted(t.numel() for t in saved if t.data_ptr() != weight.data_ptr())
    assert activation_sizes == sorted([21 * 5, 21 * 37, 5 * 37, 64 * 5])
    assert not any(t.shape[0] == 21 and t.shape[-1] == 64 for t in saved)


def _made_by_function(y) -> bool:
    """Whether y is LoraLinearFunction's output or a view of it (3-D inputs are reshaped outside the Function)."""
    fn = y.grad_fn
    while fn is not None and type(fn).__name__ == "ViewBackward0":
        fn = fn.next_functions[0][0]
    return isinstance(fn, LoraLinearFunction._backward_cls)


def test_disable_switch_uses_reference(monkeypatch):
    x, weight, b, lora_A, lora_B = _inputs(torch.float32)
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")
    y = lora_linear(x, weight, b, lora_A, lora_B, 1.0)
    assert not _made_by_function(y)
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "0")
    y2 = lora_linear(x, weight, b, lora_A, lora_B, 1.0)
    assert _made_by_function(y2)
    assert_close(y2, y)


def test_empty_batch():
    x, weight, b, lora_A, lora_B = _inputs(torch.float32, lead=(0,))
    y = lora_linear(x, weight, b, lora_A, lora_B, 1.0)
    y.sum().backward()
    assert y.shape == (0, 29) and lora_A.grad.abs().sum() == 0


def test_2d_input_and_backward_under_autocast():
    """The 2-D fast path (no reshape) and a backward run inside an autocast region (its own branch)."""
    x = torch.randn(11, 37, requires_grad=True)
    weight = torch.randn(29, 37) / 37**0.5
    lora_A = (torch.randn(5, 37) / 37**0.5).requires_grad_(True)
    lora_B = (torch.randn(29, 5) / 5**0.5).requires_grad_(True)
    dy = torch.randn(11, 29) * 0.05
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = lora_linear(x, weight, None, lora_A, lora_B, 0.5)
        y.backward(dy.to(y.dtype))
    ref = _clone([x, weight, None, lora_A, lora_B])
    y_ref = lora_linear_reference(*ref, 0.5)
    y_ref.backward(dy)
    assert y.shape == (11, 29) and x.grad.shape == (11, 37)
    assert_close(y, y_ref, torch.bfloat16)
    for got, want, name in ((x.grad, ref[0].grad, "x"), (lora_A.grad, ref[3].grad, "A"), (lora_B.grad, ref[4].grad, "B")):
        assert got.dtype == torch.float32, name
        assert_close(got, want, torch.bfloat16, msg=name)


def test_scaling_zero_and_half_precision_adapters():
    """s = 0 (alpha 0) gives the base output and zero adapter gradients; fp16 adapters get fp16 gradients."""
    x, weight, b, lora_A, lora_B = _inputs(torch.float16)
    y = lora_linear(x, weight, b, lora_A.detach().half().requires_grad_(True), lora_B, 0.0)
    assert_close(y, torch.nn.functional.linear(x, weight, b))
    A16 = lora_A.detach().half().requires_grad_(True)
    dy = torch.randn(3, 7, 29, dtype=torch.float16) * 0.05
    _, grads = _run(lora_linear, [x, weight, b, A16, lora_B], 1.5, dy)
    ref = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (x, weight, b, A16, lora_B)]
    _, grads_ref = _run(lora_linear_reference, ref, 1.5, dy.double())
    assert grads[3].dtype == torch.float16 and grads[4].dtype == torch.float32
    for g, g_ref, name in zip(grads, grads_ref, ["x", "weight", "bias", "A", "B"]):
        if g is not None:
            assert_close(g, g_ref, torch.float16, msg=name)


def test_output_can_be_modified_in_place():
    """Falcon adds its attention output into the MLP's with ``+=``: the output of a 3-D input must allow it, and the
    gradients must still equal the reference's."""
    tensors = _inputs(torch.float32)
    other = torch.randn(3, 7, 29)

    def plus_in_place(fn):
        def run(x, weight, b, lora_A, lora_B, scaling):
            y = fn(x, weight, b, lora_A, lora_B, scaling)
            y += other
            return y
        return run

    dy = torch.randn(3, 7, 29)
    y_fast, g_fast = _run(plus_in_place(lora_linear), tensors, 0.5, dy)
    y_ref, g_ref = _run(plus_in_place(lora_linear_reference), _clone(tensors), 0.5, dy)
    assert_close(y_fast, y_ref, torch.float32)
    for fast, ref in zip(g_fast, g_ref):
        if ref is not None:
            assert_close(fast, ref, torch.float32)


def test_under_torch_compile_the_plain_ops_run_and_gradients_match_eager(monkeypatch):
    """Inside a compiled region lora_linear is the reference's plain ops (on CUDA the traced Function's gradients
    came back as zeros: bench/compile_grad_probe.py); the compiled gradients equal eager ones."""
    torch._dynamo.reset()
    x = torch.randn(3, 5, 12, requires_grad=True)
    w, b = torch.randn(7, 12), torch.randn(7)
    a, bb = torch.randn(4, 12, requires_grad=True), torch.randn(7, 4, requires_grad=True)

    def loss(fn):
        out = fn(x, w, b, a, bb, 0.5)
        grads = torch.autograd.grad(out.square().sum(), (x, a, bb))
        return out.detach(), grads

    eager_out, eager_grads = loss(lora_linear)
    applied = []
    real_apply = LoraLinearFunction.apply
    monkeypatch.setattr(LoraLinearFunction, "apply", lambda *args: applied.append(1) or real_apply(*args))
    compiled_out, compiled_grads = loss(torch.compile(lora_linear, backend="aot_eager", fullgraph=True))
    assert applied == []  # not traced through the Function
    assert_close(compiled_out, eager_out)
    for got, want in zip(compiled_grads, eager_grads):
        assert got.abs().max() > 0
        assert_close(got, want)
    torch._dynamo.reset()
