"""Fused RMSNorm (Triton, run by the interpreter on CPU) against the reference: outputs and gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from lorakit.kernels.rmsnorm import FusedRMSNorm, RMSNormFunction, rms_norm, rms_norm_reference


def _grads(fn, x, weight, dy, **kw):
    x = x.detach().clone().requires_grad_(True)
    weight = weight.detach().clone().requires_grad_(weight.requires_grad)
    y = fn(x, weight, 1e-6, **kw)
    y.backward(dy)
    return y.detach(), x.grad, weight.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", [dict(offset=0.0, cast_before_weight=True), dict(offset=1.0, cast_before_weight=False)],
                         ids=["llama", "gemma"])
@pytest.mark.parametrize("weight_grad", [False, True])
def test_matches_reference(dtype, mode, weight_grad):
    rows, width = (3, 11), 45  # odd: 33 rows, 45 columns in a 64-wide block
    x = torch.randn(*rows, width, dtype=dtype)
    weight = (1 + 0.3 * torch.randn(width, dtype=dtype)).requires_grad_(weight_grad)
    y = RMSNormFunction.apply(x, weight, 1e-6, mode["offset"], mode["cast_before_weight"])
    assert y.dtype == dtype
    dy = torch.randn_like(x)
    y, dx, dw = _grads(lambda *a, **k: RMSNormFunction.apply(*a, k["offset"], k["cast_before_weight"]), x, weight, dy, **mode)
    to64 = lambda t: t.double()  # noqa: E731  the float64 reference is the truth
    y_ref, dx_ref, dw_ref = _grads(rms_norm_reference, to64(x), to64(weight).requires_grad_(weight_grad), to64(dy), **mode)
    assert_close(y, y_ref, dtype)
    assert_close(dx, dx_ref, dtype)
    if weight_grad:
        # dw sums 33 rows of dy * x_hat: compare at the scale of that sum
        assert_close(dw / 33**0.5, dw_ref / 33**0.5, dtype)
    else:
        assert dw is None


def test_dispatch_and_module():
    x = torch.randn(5, 17)
    weight = torch.nn.Parameter(torch.rand(17) + 0.5, requires_grad=False)
    module = FusedRMSNorm(weight, 1e-5)
    y = module(x.requires_grad_(True))
    assert isinstance(y.grad_fn, RMSNormFunction._backward_cls)  # the Triton path ran (interpreter)
    assert module.weight is weight and set(module.state_dict()) == {"weight"}
    assert_close(y, rms_norm_reference(x, weight, 1e-5))


def test_bf16_on_interpreter_falls_back_to_reference():
    x = torch.randn(4, 8, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.ones(8, dtype=torch.bfloat16)
    y = rms_norm(x, weight, 1e-6)
    assert not isinstance(y.grad_fn, RMSNormFunction._backward_cls)
    assert_close(y, rms_norm_reference(x, weight, 1e-6))


def test_promotes_like_transformers():
    """Llama mode: float32 weight times bf16-normalised x gives float32, as ``weight * h.to(input_dtype)`` does."""
    x = torch.randn(3, 16, dtype=torch.float16)
    weight = torch.rand(16)
    y = rms_norm(x, weight, 1e-6)
    assert y.dtype == torch.float32
    assert_close(y, rms_norm_reference(x, weight, 1e-6), torch.float16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", [dict(offset=0.0, cast_before_weight=True), dict(offset=1.0, cast_before_weight=False)],
                         ids=["llama", "gemma"])
def test_add_rms_norm_updates_the_residual_and_normalises_it(dtype, mode, monkeypatch):
    """add_rms_norm_(x, delta): x becomes x + delta rounded to x's dtype (bit-identical to an in-place add) and the
    result is rms_norm of that, through one kernel on strided rows; mismatched shapes are refused."""
    from lorakit.errors import LorakitError
    from lorakit.kernels import rmsnorm as rn
    from lorakit.kernels.triton import rmsnorm as triton_rmsnorm

    calls = []
    real = triton_rmsnorm.add_rmsnorm_forward_
    monkeypatch.setattr(triton_rmsnorm, "add_rmsnorm_forward_", lambda *a: calls.append(1) or real(*a))
    width = 45
    x = torch.randn(7, width + 3).to(dtype)[:, 2:2 + width]  # row stride 48
    delta = torch.randn(7, width).to(dtype)
    weight = (1 + 0.3 * torch.randn(width)).to(dtype)
    expected_x = x + delta
    with torch.no_grad():
        y = rn.add_rms_norm_(x, delta, weight, 1e-6, **mode)
    assert calls == [1]
    assert torch.equal(x, expected_x)
    assert_close(y, rms_norm_reference(expected_x.double(), weight.double(), 1e-6, **mode), dtype)
    with pytest.raises(LorakitError, match="same shape"):
        rn.add_rms_norm_(x, delta[:, :5], weight, 1e-6)
