"""Triton SwiGLU, forward and backward, elementwise over the flattened tensors: h = silu(g) * u; and the
inference-only gated activation over a packed gate/up row (SwiGLU, or Gemma's GeGLU with the tanh GELU).

One read of g and u and one write of h forward; one read of dh, g, u and one write of dg, du backward (the
unfused PyTorch version makes three passes forward and five backward and keeps silu(g) as an extra activation).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakit.kernels._triton import pdl_launch, pdl_on
from lorakit.kernels.triton.pdl import pdl_enter

BLOCK = 1024


@triton.jit
def _swiglu_fwd(G, U, H, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    h = g * tl.sigmoid(g) * u
    tl.store(H + offs, h.to(H.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd(DH, G, U, DG, DU, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dh = tl.load(DH + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    silu = g * sig
    # d silu(g)/dg = sig * (1 + g * (1 - sig))
    tl.store(DG + offs, (dh * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dh * silu).to(DU.dtype.element_ty), mask=mask)


@triton.jit
def _gated_packed_fwd(GU, D, H, F, stride_gu, stride_d, stride_h, GELU_TANH: tl.constexpr, HAS_DELTA: tl.constexpr,
                      BLOCK: tl.constexpr, PDL: tl.constexpr):
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
    if GELU_TANH:
        # gelu_tanh(g) = 0.5 g (1 + tanh(z)), z = sqrt(2/pi) (g + 0.044715 g^3); 0.5 (1 + tanh(z)) = sigmoid(2z)
        # exactly, so no tanh (which the CPU interpreter lacks in libdevice) and no cancellation near 0
        act = g * tl.sigmoid(2.0 * (0.7978845608028654 * (g + 0.044715 * g * g * g)))
    else:
        act = g * tl.sigmoid(g)
    tl.store(H + row * stride_h + offs, (act * u).to(H.dtype.element_ty), mask=mask)


def gated_packed_forward(gate_up: torch.Tensor, delta: torch.Tensor | None = None,
                         gelu_tanh: bool = False) -> torch.Tensor:
    """gate_up (T, 2F), unit column stride (and delta, same shape, unit column stride, or None) -> act(g) * u
    (T, F) in gate_up's dtype, where g, u are the column halves of gate_up (+ delta, rounded to gate_up's dtype)
    and act is silu, or the tanh GELU with ``gelu_tanh``. One read of each row, float32 math, rounded once."""
    T, F = gate_up.shape[0], gate_up.shape[1] // 2
    h = torch.empty((T, F), dtype=gate_up.dtype, device=gate_up.device)
    if h.numel():
        d = gate_up if delta is None else delta
        pdl = pdl_on(gate_up)
        _gated_packed_fwd[(T, triton.cdiv(F, BLOCK))](gate_up, d, h, F, gate_up.stride(0), d.stride(0), h.stride(0),
                                                      GELU_TANH=gelu_tanh, HAS_DELTA=delta is not None, BLOCK=BLOCK,
                                                      PDL=pdl, num_warps=4, **pdl_launch(pdl))
    return h


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """g, u contiguous, same shape and dtype -> silu(g) * u, same shape and dtype."""
    h = torch.empty_like(g)
    n = g.numel()
    if n:
        _swiglu_fwd[(triton.cdiv(n, BLOCK),)](g, u, h, n, BLOCK=BLOCK, num_warps=4)
    return h


def swiglu_backward(dh: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """dh, g, u contiguous, same shape -> (dg, du) in g's dtype."""
    dg, du = torch.empty_like(g), torch.empty_like(u)
    n = g.numel()
    if n:
        _swiglu_bwd[(triton.cdiv(n, BLOCK),)](dh, g, u, dg, du, n, BLOCK=BLOCK, num_warps=4)
    return dg, du
