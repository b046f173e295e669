"""Triton GeGLU over a packed gate/up row: h = gelu_tanh(g) * u, the Gemma MLP's activation, inference only.

gelu_tanh(g) = 0.5 g (1 + tanh(u)) with u = sqrt(2/pi) (g + 0.044715 g^3). Since 0.5 (1 + tanh(u)) = sigmoid(2u)
exactly, the kernel computes g * sigmoid(2u): no tanh (which the CPU interpreter lacks in libdevice) and no
cancellation near 0. One read of the row (and of the delta), one write, float32 math, rounded once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakit.kernels._triton import pdl_launch, pdl_on
from lorakit.kernels.triton.pdl import pdl_enter

BLOCK = 1024


@triton.jit
def _geglu_packed_fwd(GU, D, H, F, stride_gu, stride_d, stride_h, HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
                      PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    pdl_enter(PDL)
    g = tl.load(GU + row * stride_gu + offs, mask=mask, other=0.0)
    u = tl.load(GU + row * stride_gu + F + offs, mask=mask, other=0.0)
    if HAS_DELTA:  # gate_up + delta, rounded to gate_up's dtype as an in-place add would leave it
        g = (g.to(tl.float32) + tl.load(D + row * stride_d + offs, mask=mask, other=0.0).to(tl.float32)).to(GU.dtype.element_ty)
        u = (u.to(tl.float32) + tl.load(D + row * stride_d + F + offs, mask=mask, other=0.0).to(tl.float32)).to(GU.dtype.element_ty)
    g = g.to(tl.float32)
    u = u.to(tl.float32)
    inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)  # sqrt(2 / pi) (g + 0.044715 g^3)
    act = g * tl.sigmoid(2.0 * inner)
    tl.store(H + row * stride_h + offs, (act * u).to(H.dtype.element_ty), mask=mask)


def geglu_packed_forward(gate_up: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up (T, 2F), unit column stride (and delta, same shape, unit column stride, or None) -> gelu_tanh(g) * u
    (T, F) in gate_up's dtype, where g, u are the column halves of gate_up (+ delta, rounded to gate_up's dtype)."""
    T, F = gate_up.shape[0], gate_up.shape[1] // 2
    h = torch.empty((T, F), dtype=gate_up.dtype, device=gate_up.device)
    if h.numel():
        d = gate_up if delta is None else delta
        pdl = pdl_on(gate_up)
        _geglu_packed_fwd[(T, triton.cdiv(F, BLOCK))](gate_up, d, h, F, gate_up.stride(0), d.stride(0), h.stride(0),
                                                      HAS_DELTA=delta is not None, BLOCK=BLOCK, PDL=pdl, num_warps=4,
                                                      **pdl_launch(pdl))
    return h
