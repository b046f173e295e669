"""Fused SwiGLU (Triton, interpreter on CPU) against ``F.silu(gate) * up``: outputs and both gradients."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from lorakit.kernels.swiglu import FusedSwiGLUMLP, SwiGLUFunction, swiglu, swiglu_reference


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference(dtype):
    shape = (3, 5, 419)  # 6285 elements: not a multiple of the 1024 block
    gate = (torch.randn(shape, dtype=dtype) * 3).requires_grad_(True)  # wide range: both tails of the sigmoid
    up = torch.randn(shape, dtype=dtype, requires_grad=True)
    h = swiglu(gate, up)
    assert isinstance(h.grad_fn, SwiGLUFunction._backward_cls) and h.dtype == dtype
    dh = torch.randn(shape, dtype=dtype)
    h.backward(dh)
    g64, u64 = gate.detach().double().requires_grad_(True), up.detach().double().requires_grad_(True)
    h_ref = swiglu_reference(g64, u64)
    h_ref.backward(dh.double())
    assert_close(h, h_ref, dtype)
    assert_close(gate.grad, g64.grad, dtype)
    assert_close(up.grad, u64.grad, dtype)


def test_mlp_module_keeps_names_and_matches():
    torch.manual_seed(1)
    gate, up, down = torch.nn.Linear(12, 20), torch.nn.Linear(12, 20), torch.nn.Linear(20, 12)
    mlp = FusedSwiGLUMLP(gate, up, down)
    assert set(mlp.state_dict()) == {f"{n}.{p}" for n in ("gate_proj", "up_proj", "down_proj") for p in ("weight", "bias")}
    x = torch.randn(2, 7, 12)
    assert_close(mlp(x), down(torch.nn.functional.silu(gate(x)) * up(x)))


def test_shape_mismatch_uses_reference_broadcasting():
    gate, up = torch.randn(4, 6), torch.randn(1, 6)
    assert_close(swiglu(gate, up), swiglu_reference(gate, up))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_packed_gate_up_matches_reference_on_a_strided_view(dtype, monkeypatch):
    from lorakit.kernels.swiglu import swiglu_packed
    from lorakit.kernels.triton import swiglu as triton_swiglu

    calls = []
    real = triton_swiglu.gated_packed_forward
    monkeypatch.setattr(triton_swiglu, "gated_packed_forward", lambda *a: calls.append(a[2]) or real(*a))
    F = 1100  # not a multiple of the 1024 block
    wide = torch.randn(5, 2 * F + 7, dtype=dtype) * 3
    gate_up = wide[:, 3:3 + 2 * F]  # a view with a row stride wider than 2F, as a slice of a bigger buffer
    with torch.no_grad():
        h = swiglu_packed(gate_up)
    assert calls == [False] and h.shape == (5, F) and h.dtype == dtype
    assert_close(h, swiglu_reference(gate_up[:, :F].double(), gate_up[:, F:].double()), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_swiglu_packed_adds_a_delta_in_the_same_pass(dtype, monkeypatch):
    """swiglu_packed(gate_up, delta) == swiglu of (gate_up + delta) rounded to gate_up's dtype (what an in-place
    add would leave), on strided views of both, through the kernel; a delta of another shape is refused."""
    from lorakit.errors import LorakitError
    from lorakit.kernels.swiglu import swiglu_packed
    from lorakit.kernels.triton import swiglu as triton_swiglu

    calls = []
    real = triton_swiglu.gated_packed_forward
    monkeypatch.setattr(triton_swiglu, "gated_packed_forward", lambda *a: calls.append(a[2]) or real(*a))
    F = 1100
    gate_up = (torch.randn(5, 2 * F + 7) * 3).to(dtype)[:, 3:3 + 2 * F]
    delta = torch.randn(5, 2 * F + 2).to(dtype)[:, 1:1 + 2 * F]
    with torch.no_grad():
        h = swiglu_packed(gate_up, delta)
    assert calls == [False]
    summed = gate_up + delta  # in dtype: the rounding the fused kernel reproduces
    assert_close(h, swiglu_reference(summed[:, :F].double(), summed[:, F:].double()), dtype)
    assert not torch.equal(h, swiglu_packed(gate_up))  # the delta is really added
    with pytest.raises(LorakitError, match="delta must have gate_up's shape"):
        swiglu_packed(gate_up, delta[:, :F])
