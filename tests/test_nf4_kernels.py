"""Triton NF4 kernels (run by the interpreter on the CPU) against the pure-PyTorch reference, element by element."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_close
from lorakit.kernels import nf4 as kernels
from lorakit.kernels.nf4 import dequantize_nf4, nf4_linear, nf4_matmul, nf4_matmul_grad_input
from lorakit.quant.nf4 import quantize_nf4

SHAPES = [(3, 7), (65, 129), (70, 33)]  # partial blocks, odd numel, rows straddling blocks
DTYPES = [torch.float32, torch.float16]  # the interpreter has no bf16 (bench/qlora.py checks bf16 on the GPU)


def _weight(shape, double_quant=True, blocksize=64):
    return quantize_nf4(torch.randn(shape) * 0.05, double_quant=double_quant, blocksize=blocksize)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dequantize_triton_bit_identical(shape, double_quant, dtype):
    w = _weight(shape, double_quant)
    assert kernels._use_triton(w, torch.empty(0, dtype=dtype))
    assert torch.equal(dequantize_nf4(w, dtype), dequantize_nf4(w, dtype, force_reference=True))


@pytest.mark.parametrize("lut", ["load", "gather"])
def test_dequantize_triton_other_blocksize_and_many_nested_groups(lut, monkeypatch):
    from lorakit.kernels.triton import nf4 as triton_nf4

    monkeypatch.setattr(triton_nf4, "DEQUANTIZE_LUT", lut)
    w = _weight((300, 230), blocksize=128)  # 540 blocks: three nested groups, the last one partial
    assert torch.equal(dequantize_nf4(w, torch.float32), dequantize_nf4(w, torch.float32, force_reference=True))
    for shape, blocksize, double_quant in (((3, 7), 32, True), ((33, 70), 4096, False), ((41, 257), 2048, True)):
        w = _weight(shape, double_quant, blocksize)  # programs of 1024 bytes and of one block; an odd last byte
        for dtype in DTYPES:
            assert torch.equal(dequantize_nf4(w, dtype), dequantize_nf4(w, dtype, force_reference=True))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 40])
def test_fused_matmul_forward_and_grad_input(shape, dtype, rows):
    w = _weight(shape)
    out_features, in_features = shape
    x = torch.randn(rows, in_features).to(dtype)
    grad = torch.randn(rows, out_features).to(dtype)
    assert_close(nf4_matmul(x, w, mode="fused"), nf4_matmul(x, w, mode="reference"))
    assert_close(nf4_matmul_grad_input(grad, w, mode="fused"), nf4_matmul_grad_input(grad, w, mode="reference"))
    # the dequantize-then-BLAS path (what many rows take) agrees too
    assert_close(nf4_matmul(x, w, mode="dequantize"), nf4_matmul(x, w, mode="reference"))


@pytest.mark.parametrize("mode", ["fused", "dequantize"])
def test_autograd_through_triton_matches_reference(mode):
    w = _weight((45, 77), double_quant=False)
    bias = torch.randn(45)
    x = torch.randn(2, 3, 77, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = nf4_linear(x, w, bias, mode=mode), nf4_linear(x_ref, w, bias, mode="reference")
    assert_close(y, y_ref)
    grad = torch.randn_like(y)
    y.backward(grad)
    y_ref.backward(grad)
    assert_close(x.grad, x_ref.grad)


def test_dispatcher_rules(monkeypatch):
    w = _weight((8, 16))
    assert kernels._use_triton(w, torch.empty(0))
    assert not kernels._use_triton(w, torch.empty(0, dtype=torch.bfloat16))  # no bf16 in the interpreter
    monkeypatch.setenv("LORAKIT_DISABLE_TRITON", "1")
    assert not kernels._use_triton(w, torch.empty(0))
    x = torch.randn(3, 16)
    assert_close(nf4_matmul(x, w), nf4_matmul(x, w, mode="reference"))


def test_empty_batch():
    w = _weight((8, 16))
    assert nf4_matmul(torch.randn(0, 16), w, mode="fused").shape == (0, 8)
    assert nf4_matmul_grad_input(torch.randn(0, 8), w, mode="fused").shape == (0, 16)
