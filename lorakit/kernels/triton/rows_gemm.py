"""A weight-streaming GEMM for a decode step's few rows: y = (residual +) x W^T, x (M <= 64, K), W (N, K).

At decode batch sizes a projection is bound by reading W once; one program streams BLOCK_N rows of W over all of K
while the M rows of x (a few KiB) come from L2. On its own it only matches cuBLAS (bench/skinny_gemm_probe.py); it
exists so that the step's GEMMs launch with PDL like its other kernels: each program asks the L2 for its first
chunk of W before the PDL wait, while the previous kernel drains (bench/pdl_probe.py measured the chain).

    grid (cdiv(N, BLOCK_N),): acc (BLOCK_M, BLOCK_N) float32 += x[:, k-chunk] . W[n-block, k-chunk]^T
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lorakit.kernels._triton import pdl_launch, pdl_on
from lorakit.kernels.triton.pdl import l2_prefetch, pdl_enter

# load the first W chunk before the PDL wait (True) or after it. Off: on the H200 the early load (which costs a
# pipeline stage of shared memory) made the 8B step slower, 7.28 against 6.39 ms without it and 6.75 without PDL
# (bench/results/multi_adapter_8b_pdl_v1.json); kept for A/B runs of the benchmarks
PREFETCH = False
# chunks of W each program asks the L2 for before the PDL wait (0: none). A prefetch holds no shared memory or
# registers, unlike PREFETCH, so the weight's first DRAM reads overlap the previous kernel's tail. On the H200 one
# chunk took the GEMM chain 1.6% (8B) and 2.6% (1B) faster and two or more made it slower
# (bench/results/pdl_probe_{8b,1b}_l2.json); whole 8B steps, two interleaved rounds, 0.4-2.1% faster
# (multi_adapter_8b_l2_v1.json)
L2_PREFETCH_CHUNKS = 1


@triton.jit
def _rows_gemm(x_ptr, w_ptr, r_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_rm, stride_ym,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
               HAS_RESIDUAL: tl.constexpr, PRECISION: tl.constexpr, PREFETCH: tl.constexpr, PDL: tl.constexpr,
               L2_CHUNKS: tl.constexpr = 0, LINE: tl.constexpr = 64):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = 0
    if L2_CHUNKS > 0:  # one pointer per 128-byte line (LINE elements) of the program's first L2_CHUNKS chunks
        lines = tl.arange(0, BLOCK_K // LINE) * LINE
        rows_n = tl.minimum(offs_n, N - 1).to(tl.int64) * stride_wn
        for c in tl.static_range(L2_CHUNKS):
            l2_prefetch(w_ptr + rows_n[:, None] + tl.minimum(c * BLOCK_K + lines, K - 1)[None, :])
    if PREFETCH:  # no kernel of a step writes W: its first chunk is read while the previous kernel drains
        w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k[None, :] < K), other=0.0)
        pdl_enter(PDL)
        x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
        start = 1
    else:
        pdl_enter(PDL)
    for k in range(start, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            rest = K - k * BLOCK_K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < rest), other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k[None, :] < rest), other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    mask = mask_m[:, None] & mask_n[None, :]
    if HAS_RESIDUAL:  # as addmm's epilogue: the residual added to the float32 product, one rounding
        acc += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def rows_gemm_config(N: int, K: int, sm_count: int, prefetch: bool) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages) from the shapes. The widest column block that still gives 70% of
    the SMs a program, 128-wide chunks for 64-column blocks and 256-wide otherwise, one stage fewer for very wide
    outputs: bench/skinny_gemm_probe.py's best tiles for every Llama-3.1-8B and -3.2-1B projection on the H200
    (bench/results/skinny_gemm_probe_h200.json). The prefetched chunk costs one pipeline stage of shared memory."""
    block_n = 16
    for candidate in (64, 32):
        if N // candidate >= (7 * sm_count) // 10:
            block_n = candidate
            break
    block_k = min(128 if block_n == 64 else 256, max(16, triton.next_power_of_2(K)))
    stages = (3 if N >= 16384 else 4) - (1 if prefetch else 0)
    return block_n, block_k, 4, stages


def rows_gemm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None, *,
              out: torch.Tensor | None = None, config: tuple[int, int, int, int] | None = None,
              pdl: bool | None = None, prefetch: bool | None = None, l2_chunks: int | None = None) -> torch.Tensor:
    """(residual +) x @ weight^T: x (M <= 64, K), weight (N, K), residual (M, N) or None, unit column strides, one
    dtype (checked by the caller) -> (M, N) in x's dtype: ``out`` (unit column stride) or a new tensor.

    The benchmarks set the rest: ``config`` (BLOCK_N, BLOCK_K, warps, stages; default ``rows_gemm_config``),
    ``pdl`` (default ``pdl_on(x)``), ``prefetch`` (default ``PREFETCH`` when PDL is on), ``l2_chunks`` (default
    ``L2_PREFETCH_CHUNKS`` when PDL is on; never on the CPU, whose interpreter cannot run the PTX).
    """
    M, K = x.shape
    N = weight.shape[0]
    y = torch.empty(M, N, dtype=x.dtype, device=x.device) if out is None else out
    if M == 0 or N == 0:
        return y
    sm = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device()) \
        if x.device.type == "cuda" else 8
    pdl = pdl_on(x) if pdl is None else pdl
    prefetch = (PREFETCH and pdl) if prefetch is None else prefetch  # without PDL the early load buys nothing
    l2_chunks = (L2_PREFETCH_CHUNKS if pdl else 0) if l2_chunks is None else l2_chunks
    block_n, block_k, warps, stages = config or rows_gemm_config(N, K, sm, prefetch)
    line = 128 // x.element_size()
    l2_chunks = min(l2_chunks, triton.cdiv(K, block_k)) if x.device.type == "cuda" and block_k >= line else 0
    r = y if residual is None else residual
    _rows_gemm[(triton.cdiv(N, block_n),)](
        x, weight, r, y, M, N, K, x.stride(0), weight.stride(0), r.stride(0), y.stride(0),
        BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=K % block_k == 0,
        HAS_RESIDUAL=residual is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PREFETCH=prefetch, PDL=pdl, L2_CHUNKS=l2_chunks, LINE=line, num_warps=warps, num_stages=stages, **pdl_launch(pdl))
    return y
