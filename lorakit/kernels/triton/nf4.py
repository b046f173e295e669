"""Triton NF4 kernels: dequantize, and fused dequantize-and-matmul for the forward and the input gradient.

The layout and the arithmetic are those of ``lorakit/kernels/nf4.py`` (the reference): flat element ``i`` of
``W (N, K)`` lives in the high nibble of byte ``i // 2`` when ``i`` is even, the low nibble when odd; its block scale
is ``absmax[i // blocksize]`` (double quantization: ``nested_code[absmax[b]] * nested_absmax[b // 256] + offset``).
Blocks follow the flat index, so a block may straddle two rows: tiles compute the flat index per element.

Every launch passes ``enable_fp_fusion=False`` so that ``code * scale`` and the nested ``a * b + offset`` are
rounded separately, as bitsandbytes does, instead of contracted into one FMA (a 1-ulp difference otherwise).
fp32 ``tl.dot`` uses ``input_precision="ieee"`` (no TF32) so that float32 results match the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakit.kernels.nf4 import NF4Weight


@triton.jit
def _nf4_values(flat, mask, PACKED, ABSMAX, NESTED_ABSMAX, OFFSET, CODE, NESTED_CODE,
                BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr):
    """float32 dequantized values at flat indices ``flat`` (any shape, int64); 0 where ``mask`` is False."""
    byte = tl.load(PACKED + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where((flat % 2) == 0, byte >> 4, byte & 15)
    value = tl.load(CODE + nibble, mask=mask, other=0.0)
    block = flat // BLOCKSIZE
    if NESTED:
        q = tl.load(ABSMAX + block, mask=mask, other=0).to(tl.int32)
        scale = tl.load(NESTED_CODE + q, mask=mask, other=0.0) * tl.load(NESTED_ABSMAX + block // NESTED_BLOCKSIZE,
                                                                          mask=mask, other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + block, mask=mask, other=0.0)
    return value * scale


@triton.jit
def _nf4_dequantize_kernel(PACKED, ABSMAX, NESTED_ABSMAX, OFFSET, CODE, NESTED_CODE, OUT, numel, n_bytes,
                                 n_blocks, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                                 NESTED: tl.constexpr, BYTES: tl.constexpr, LUT: tl.constexpr):
    """Whole scale blocks per program, read a byte at a time: BYTES bytes (a multiple of BLOCKSIZE / 2) give
    2 * BYTES values, each byte read once, each block's scale decoded once (not per value), both nibbles looked up
    in the 16-level code (``LUT`` "gather": ``tl.gather`` from registers; "load": an L1-cached gather) and written
    interleaved back to flat order in one contiguous store."""
    GROUPS: tl.constexpr = BYTES // (BLOCKSIZE // 2)
    start = tl.program_id(0).to(tl.int64) * BYTES  # the first byte; its first value is 2 * start
    offs = start + tl.arange(0, BYTES)
    byte = tl.load(PACKED + offs, mask=offs < n_bytes, other=0).to(tl.int32)
    if LUT == "gather":
        table = tl.load(CODE + tl.arange(0, 16))
        high = tl.gather(table, byte >> 4, 0)
        low = tl.gather(table, byte & 15, 0)
    else:
        high = tl.load(CODE + (byte >> 4))
        low = tl.load(CODE + (byte & 15))
    block = (2 * start) // BLOCKSIZE + tl.arange(0, GROUPS)
    in_range = block < n_blocks
    if NESTED:
        q = tl.load(ABSMAX + block, mask=in_range, other=0).to(tl.int32)
        scale = tl.load(NESTED_CODE + q, mask=in_range, other=0.0) * tl.load(
            NESTED_ABSMAX + block // NESTED_BLOCKSIZE, mask=in_range, other=0.0)
        scale = scale + tl.load(OFFSET)
    else:
        scale = tl.load(ABSMAX + block, mask=in_range, other=0.0)
    high = tl.reshape(high, (GROUPS, BLOCKSIZE // 2)) * scale[:, None]
    low = tl.reshape(low, (GROUPS, BLOCKSIZE // 2)) * scale[:, None]
    value = tl.reshape(tl.interleave(high, low), (2 * BYTES,))  # flat order: high nibble first
    flat = 2 * start + tl.arange(0, 2 * BYTES)
    tl.store(OUT + flat, value.to(OUT.dtype.element_ty), mask=flat < numel)


# the dequantize kernel's code lookup: "gather" or "load" (bench/nf4_gemm_variants.py --dequantize times both)
DEQUANTIZE_LUT = "load"


@triton.jit
def _nf4_matmul_kernel(X, PACKED, ABSMAX, NESTED_ABSMAX, OFFSET, CODE, NESTED_CODE, Y, M, N, K, stride_xm, stride_ym,
                       BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr,
                       FP32_IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Y (M, N) = X (M, K) @ W^T, W (N, K) dequantized tile by tile to X's dtype (as the reference does)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(X + rows[:, None].to(tl.int64) * stride_xm + ks[None, :],
                    mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        # W^T tile (BLOCK_K, BLOCK_N): element (k, n) is flat n * K + k
        flat = cols[None, :].to(tl.int64) * K + ks[:, None]
        w_mask = (ks[:, None] < K) & (cols[None, :] < N)
        w = _nf4_values(flat, w_mask, PACKED, ABSMAX, NESTED_ABSMAX, OFFSET, CODE, NESTED_CODE,
                        BLOCKSIZE, NESTED_BLOCKSIZE, NESTED).to(X.dtype.element_ty)
        if FP32_IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    tl.store(Y + rows[:, None].to(tl.int64) * stride_ym + cols[None, :], acc.to(Y.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _nf4_matmul_grad_input_kernel(G, PACKED, ABSMAX, NESTED_ABSMAX, OFFSET, CODE, NESTED_CODE, DX, M, N, K,
                                  stride_gm, stride_dm, BLOCKSIZE: tl.constexpr, NESTED_BLOCKSIZE: tl.constexpr,
                                  NESTED: tl.constexpr, FP32_IEEE: tl.constexpr, BLOCK_M: tl.constexpr,
                                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """DX (M, K) = G (M, N) @ W, W (N, K) dequantized tile by tile to G's dtype."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(0, N, BLOCK_N):
        ns = n0 + tl.arange(0, BLOCK_N)
        g = tl.load(G + rows[:, None].to(tl.int64) * stride_gm + ns[None, :],
                    mask=(rows[:, None] < M) & (ns[None, :] < N), other=0.0)
        flat = ns[:, None].to(tl.int64) * K + ks[None, :]  # W tile (BLOCK_N, BLOCK_K)
        w_mask = (ns[:, None] < N) & (ks[None, :] < K)
        w = _nf4_values(flat, w_mask, PACKED, ABSMAX, NESTED_ABSMAX, OFFSET, CODE, NESTED_CODE,
                        BLOCKSIZE, NESTED_BLOCKSIZE, NESTED).to(G.dtype.element_ty)
        if FP32_IEEE:
            acc += tl.dot(g, w, input_precision="ieee")
        else:
            acc += tl.dot(g, w)
    tl.store(DX + rows[:, None].to(tl.int64) * stride_dm + ks[None, :], acc.to(DX.dtype.element_ty),
             mask=(rows[:, None] < M) & (ks[None, :] < K))


def _state_args(w: NF4Weight):
    nested = w.nested
    absmax = w.absmax
    # unused pointers still need a tensor argument; the NESTED constexpr removes every load from them
    nested_absmax = w.nested_absmax if nested else absmax
    offset = w.offset if nested else absmax
    nested_code = w.nested_code if nested else w.code
    return (w.packed, absmax, nested_absmax, offset, w.code, nested_code), nested


def dequantize_nf4_triton(w: NF4Weight, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """Dense ``w.shape`` weight in ``dtype`` (into ``out``, contiguous, when given); bit-identical to the reference."""
    numel = w.shape[0] * w.shape[1]
    out = torch.empty(w.shape, dtype=dtype, device=w.packed.device) if out is None else out
    args, nested = _state_args(w)
    if w.blocksize < 2 or w.blocksize & (w.blocksize - 1):  # every bitsandbytes blocksize is a power of two
        raise ValueError(f"NF4 dequantize: blocksize {w.blocksize} is not a power of two")
    n_bytes = (numel + 1) // 2
    per_program = max(1024, w.blocksize // 2)
    _nf4_dequantize_kernel[(triton.cdiv(n_bytes, per_program),)](
        *args, out, numel, n_bytes, triton.cdiv(numel, w.blocksize), BLOCKSIZE=w.blocksize,
        NESTED_BLOCKSIZE=w.nested_blocksize, NESTED=nested, BYTES=per_program, LUT=DEQUANTIZE_LUT, num_warps=4,
        enable_fp_fusion=False)
    return out


def _tiles(rows: int, cols: int, inner: int) -> tuple[int, int, int]:
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    return block_m, 64, 64


def nf4_matmul_triton(x: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """x (M, K) -> x @ W^T (M, N) in x.dtype, the weight dequantized inside the kernel (never stored densely)."""
    x = x.contiguous()
    n_out, k_in = w.shape
    m = x.shape[0]
    y = torch.empty((m, n_out), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    args, nested = _state_args(w)
    block_m, block_n, block_k = _tiles(m, n_out, k_in)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n_out, block_n))
    _nf4_matmul_kernel[grid](x, *args, y, m, n_out, k_in, x.stride(0), y.stride(0), BLOCKSIZE=w.blocksize,
                             NESTED_BLOCKSIZE=w.nested_blocksize, NESTED=nested, FP32_IEEE=x.dtype == torch.float32,
                             BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, enable_fp_fusion=False)
    return y


def nf4_matmul_grad_input_triton(grad: torch.Tensor, w: NF4Weight) -> torch.Tensor:
    """grad (M, N) -> grad @ W (M, K) in grad.dtype."""
    grad = grad.contiguous()
    n_out, k_in = w.shape
    m = grad.shape[0]
    dx = torch.empty((m, k_in), dtype=grad.dtype, device=grad.device)
    if m == 0:
        return dx
    args, nested = _state_args(w)
    block_m, block_n, block_k = _tiles(m, n_out, k_in)
    grid = (triton.cdiv(m, block_m), triton.cdiv(k_in, block_k))
    _nf4_matmul_grad_input_kernel[grid](grad, *args, dx, m, n_out, k_in, grad.stride(0), dx.stride(0),
                                        BLOCKSIZE=w.blocksize, NESTED_BLOCKSIZE=w.nested_blocksize, NESTED=nested,
                                        FP32_IEEE=grad.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
                                        BLOCK_K=block_k, num_warps=4, enable_fp_fusion=False)
    return dx
