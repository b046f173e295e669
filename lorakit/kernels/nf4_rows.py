"""(residual +) x W^T over an NF4 weight for a decode step's few rows: the static decoder's base GEMM on a QLoRA base.

The weight is given as the NF4 layout of ``lorakit/kernels/nf4.py`` with its block scales already decoded to
float32 (the static decoder decodes a double-quantized absmax once, at build): ``packed`` (ceil(N*K/2),) uint8,
``scales`` (ceil(N*K/blocksize),) float32, ``code`` (16,) float32. ``nf4_rows_linear`` runs a fused Triton kernel
(the packed bytes are read once, never stored dense) when K is a multiple of the blocksize (every real model: hidden
and MLP widths are multiples of 64): ``lorakit.kernels.triton.nf4_gemv`` up to ``MAX_GEMV_ROWS`` rows,
``lorakit.kernels.triton.nf4_rows`` (tensor cores) up to ``MAX_FUSED_ROWS``; more rows dequantize once (Triton)
and multiply with the BLAS; anything else runs the reference, which is the spec:
dequantize exactly as bitsandbytes (``code[q] * scale`` in float32, one rounding to x's dtype), then
``rows_linear_reference`` (addmm with the residual, as the dense decoder's epilogue).
"""

from __future__ import annotations

import torch

from lorakit.kernels._triton import triton_usable
from lorakit.kernels.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_reference
from lorakit.kernels.rows_linear import rows_linear_reference

KERNEL_MAX_ROWS = 64  # the fused kernel keeps one (BLOCK_M <= 64, BLOCK_N) accumulator per program, as rows_gemm
# Row counts up to this run the fused kernel; more run Triton dequantize + the BLAS. On an H200 (8B shapes,
# bench/nf4_decode_check.py times both per projection group) the kernel is 5-15% faster at 1-16 rows and Triton
# dequantize + cuBLAS 0-15% faster at 64.
MAX_FUSED_ROWS = 16
# Row counts up to this (at most lorakit.kernels.triton.nf4_gemv.MAX_ROWS) run the matrix-vector kernel instead: on
# an H200 (8B groups, bench/nf4_gemm_variants.py --gemv) it is 10-30% faster than the tensor-core kernel at 1-2
# rows and slower on three of the four groups at 4.
MAX_GEMV_ROWS = 2
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class NF4Rows:
    """One NF4 weight (N, K) as the decode GEMM reads it: ``packed`` (ceil(N*K/2),) uint8, ``scales``
    (ceil(N*K/blocksize),) float32 (decoded block scales), ``code`` (16,) float32, ``out_features`` N,
    ``blocksize``. References, no copies."""

    __slots__ = ("packed", "scales", "code", "out_features", "blocksize")

    def __init__(self, packed, scales, code, out_features: int, blocksize: int):
        self.packed, self.scales, self.code = packed.reshape(-1), scales.reshape(-1), code.float()
        self.out_features, self.blocksize = int(out_features), int(blocksize)

    def dequantize(self, in_features: int, dtype: torch.dtype) -> torch.Tensor:
        """The dense (N, in_features) weight in ``dtype``, exactly as bitsandbytes (the reference)."""
        return dequantize_nf4_reference(self.packed, self.scales, self.code, (self.out_features, in_features),
                                        self.blocksize, dtype)


def nf4_rows_linear_reference(x: torch.Tensor, members, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, K) -> (T, N): ``addmm(residual, x, W^T)`` (or ``x W^T``), W the row-wise concatenation of the NF4
    ``members`` (``NF4Rows``) dequantized to x's dtype."""
    weight = torch.cat([m.dequantize(x.shape[1], x.dtype) for m in members], dim=0)
    return rows_linear_reference(x, weight, residual)


def nf4_rows_linear(x: torch.Tensor, members, residual: torch.Tensor | None = None) -> torch.Tensor:
    """(residual +) x @ W^T as a new (T, N) tensor in x's dtype, W (N, K) the row-wise concatenation of 1 to 3
    ``NF4Rows`` members (a fused q/k/v or gate/up group runs as one launch); x (T, K), residual None or (T, N) in
    x's dtype. See the module doc for which path runs."""
    T, K = x.shape
    N = sum(m.out_features for m in members)
    blocksize = members[0].blocksize
    tensors = [t for m in members for t in (m.packed, m.scales, m.code)]
    usable = (triton_usable(x, *tensors) and x.dtype in _DTYPES
              and not (x.device.type == "cpu" and x.dtype == torch.bfloat16))  # the interpreter has no bf16
    residual_ok = residual is None or (residual.dtype == x.dtype and residual.shape == (T, N) and residual.stride(1) == 1)
    if (usable and 0 < T <= min(max(MAX_FUSED_ROWS, MAX_GEMV_ROWS), KERNEL_MAX_ROWS) and K % blocksize == 0
            and x.stride(1) == 1 and residual_ok and len(members) <= 3 and all(m.blocksize == blocksize for m in members)):
        from lorakit.kernels.triton.nf4_gemv import MAX_ROWS, nf4_gemv
        from lorakit.kernels.triton.nf4_rows import nf4_rows_gemm

        weights = [(m.packed, m.scales, m.code, m.out_features) for m in members]
        if T <= min(MAX_GEMV_ROWS, MAX_ROWS):
            return nf4_gemv(x, weights, blocksize, residual)
        return nf4_rows_gemm(x, weights, blocksize, residual)
    if usable and T > 0:  # prefill-sized (or a shape the kernel does not take): dequantize once (Triton), the BLAS
        weight = torch.empty(N, K, dtype=x.dtype, device=x.device)
        start = 0
        for m in members:  # each member into its rows of the one weight: no concatenation copy
            dequantize_nf4(NF4Weight(m.packed, m.scales, None, None, m.code, None, (m.out_features, K), m.blocksize),
                           x.dtype, out=weight[start:start + m.out_features])
            start += m.out_features
        return rows_linear_reference(x, weight, residual)
    return nf4_rows_linear_reference(x, members, residual)
