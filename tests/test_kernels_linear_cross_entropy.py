"""Chunked linear cross-entropy against ``F.cross_entropy(hidden @ weight.T)``: loss and gradients, both paths
(Triton under the interpreter, and the PyTorch chunk path), odd sizes, chunks that do not divide the rows."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from lorakit.errors import LorakitError
from lorakit.kernels.linear_cross_entropy import linear_cross_entropy, linear_cross_entropy_reference

N, H, V = 37, 24, 203


def _case(dtype, weight_grad):
    hidden = torch.randn(N, H, dtype=dtype)
    weight = (torch.randn(V, H, dtype=dtype) / H**0.5).requires_grad_(weight_grad)
    labels = torch.randint(0, V, (N,))
    labels[::5] = -100  # some ignored rows, including the first
    return hidden, weight, labels


def _loss_and_grads(fn, hidden, weight, labels, **kw):
    h = hidden.detach().clone().requires_grad_(True)
    w = weight.detach().clone().requires_grad_(weight.requires_grad)
    loss = fn(h, w, labels, **kw)
    loss.backward(torch.tensor(1.7, dtype=loss.dtype))  # a non-unit incoming gradient
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("triton_path", [True, False], ids=["triton", "torch"])
def test_matches_reference(dtype, reduction, weight_grad, triton_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "0" if triton_path else "1")
    hidden, weight, labels = _case(dtype, weight_grad)
    loss, dh, dw = _loss_and_grads(linear_cross_entropy, hidden, weight, labels, reduction=reduction, chunk_rows=8)
    assert loss.dtype == torch.float32
    # truth: the reference on the same compute-dtype logits, evaluated in float64 from there
    ref_loss, ref_dh, ref_dw = _loss_and_grads(linear_cross_entropy_reference, hidden.double(), weight.double(),
                                               labels, reduction=reduction)
    n = N if reduction == "sum" else 1  # a sum of N row losses is compared at the scale of one row
    assert_close(loss / n, ref_loss.float() / n, dtype)
    assert_close(dh, ref_dh, dtype)
    if weight_grad:
        assert_close(dw, ref_dw, dtype)
    else:
        assert dw is None


def test_default_chunking_and_no_grad():
    hidden, weight, labels = _case(torch.float32, False)
    with torch.no_grad():
        loss = linear_cross_entropy(hidden, weight, labels)
    assert_close(loss, linear_cross_entropy_reference(hidden, weight, labels))


def test_autocast_bf16_matches_reference_under_autocast():
    hidden, weight, labels = _case(torch.float32, False)
    hidden.requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_rows=10)  # bf16 on CPU: the PyTorch chunk path
        ref = linear_cross_entropy_reference(hidden, weight, labels)
    (dh,) = torch.autograd.grad(loss, hidden)
    (ref_dh,) = torch.autograd.grad(ref, hidden)
    assert dh.dtype == torch.float32
    assert_close(loss, ref, torch.bfloat16)
    assert_close(dh, ref_dh, torch.bfloat16)


@pytest.mark.parametrize("bad, match", [
    (dict(labels=torch.tensor([0, 1, 500])), "outside the vocabulary"),
    (dict(labels=torch.tensor([0, 1])), "labels must have shape"),
    (dict(hidden=torch.randn(3, 5)), "expected hidden"),
    (dict(reduction="none"), "reduction"),
])
def test_user_mistakes_are_one_line_errors(bad, match):
    args = dict(hidden=torch.randn(3, H), weight=torch.randn(V, H), labels=torch.tensor([0, 1, 2]))
    args.update(bad)
    with pytest.raises(LorakitError, match=match):
        linear_cross_entropy(**args)
