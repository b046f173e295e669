"""An NF4 matrix-vector kernel for a decode step of 1 to 4 rows: y = (residual +) x W^T, W (N, K) in NF4.

With one to four rows there is too little work for ``tl.dot`` to pay for itself (``nf4_rows``' tensor-core path
spends most of its time moving the dequantized tile into the MMA's layout). Here each program streams BLOCK_N rows
of the packed weight over all of K in the layout they have in memory. A step reads BYTES bytes per weight row
(2 * BYTES columns), looks both nibbles up in the 16-level code, applies the row's block scale (float32, then one
rounding to x's dtype: the reference's value, bit for bit) and multiplies with x's even / odd columns on the CUDA
cores. A (ROWS, BLOCK_N, BYTES) float32 accumulator is summed over its last axis at the end. Layout, scales and
fused groups (``member_block``) are as in ``lorakit.kernels.triton.nf4_rows``.

``LUT`` picks the lookup: "load" (an L1-cached gather from the 64-byte code, the faster one in the dequantize
kernel) or "gather" (``tl.gather`` from registers); bench/nf4_gemm_variants.py times both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakit.kernels._triton import pdl_launch, pdl_on
from lorakit.kernels.triton.nf4_rows import member_arguments, member_block, store_rows
from lorakit.kernels.triton.pdl import pdl_enter

MAX_ROWS = 4  # the accumulator holds ROWS x BLOCK_N x BYTES values: more rows belong to the dot kernel
LUTS = ("load", "gather")


@triton.jit
def _nf4_gemv(x_ptr, packed0, scales0, code0, packed1, scales1, code1, packed2, scales2, code2, r_ptr, y_ptr,
              M, N0, N1, N2, K, stride_xm, stride_rm, stride_ym, BLOCKSIZE: tl.constexpr, BYTES: tl.constexpr,
              LUT: tl.constexpr, ROWS: tl.constexpr, MEMBERS: tl.constexpr, BLOCK_N: tl.constexpr,
              HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    COLS: tl.constexpr = 2 * BYTES  # columns of K per step
    GROUPS: tl.constexpr = COLS // BLOCKSIZE if COLS > BLOCKSIZE else 1  # scale blocks per row per step
    SUB: tl.constexpr = BYTES // GROUPS  # bytes per scale block within a step
    pid, packed_ptr, scales_ptr, code_ptr, N, col0 = member_block(
        tl.program_id(0), packed0, scales0, code0, packed1, scales1, code1, packed2, scales2, code2, N0, N1, N2,
        MEMBERS, BLOCK_N)
    offs_r = tl.arange(0, ROWS)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_r = offs_r < M
    mask_n = offs_n < N
    rows64 = offs_n.to(tl.int64)
    byte_ptrs = packed_ptr + rows64[:, None] * (K // 2) + tl.arange(0, BYTES)[None, :]  # (BLOCK_N, BYTES)
    scale_ptrs = scales_ptr + rows64[:, None] * (K // BLOCKSIZE) + tl.arange(0, GROUPS)[None, :]  # (BLOCK_N, GROUPS)
    x_ptrs = x_ptr + offs_r[:, None] * stride_xm + tl.arange(0, COLS)[None, :]  # (ROWS, COLS)
    if LUT == "gather":
        table = tl.load(code_ptr + tl.arange(0, 16)[None, :] + 0 * offs_n[:, None])  # (BLOCK_N, 16)
    pdl_enter(PDL)
    acc = tl.zeros((ROWS, BLOCK_N, BYTES), dtype=tl.float32)
    for k in range(0, K, COLS):
        byte = tl.load(byte_ptrs + k // 2, mask=mask_n[:, None], other=0).to(tl.int32)
        if LUT == "gather":
            high = tl.gather(table, byte >> 4, 1)
            low = tl.gather(table, byte & 15, 1)
        else:
            high = tl.load(code_ptr + (byte >> 4))
            low = tl.load(code_ptr + (byte & 15))
        scale = tl.load(scale_ptrs + k // BLOCKSIZE, mask=mask_n[:, None], other=0.0)[:, :, None]
        # bitsandbytes' value: code * scale in float32, one rounding to x's dtype; the products in float32
        high = tl.reshape(tl.reshape(high, (BLOCK_N, GROUPS, SUB)) * scale, (BLOCK_N, BYTES))
        low = tl.reshape(tl.reshape(low, (BLOCK_N, GROUPS, SUB)) * scale, (BLOCK_N, BYTES))
        high = high.to(x_ptr.dtype.element_ty).to(tl.float32)
        low = low.to(x_ptr.dtype.element_ty).to(tl.float32)
        x = tl.load(x_ptrs + k, mask=mask_r[:, None], other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x, (ROWS, BYTES, 2)))  # columns k + 2j and k + 2j + 1
        acc += high[None, :, :] * x_even[:, None, :] + low[None, :, :] * x_odd[:, None, :]
    store_rows(tl.sum(acc, axis=2), offs_r, offs_n + col0, mask_r[:, None] & mask_n[None, :], r_ptr, stride_rm, y_ptr,
               stride_ym, HAS_RESIDUAL)


# (N, K, blocksize, ROWS) -> a config tuple, tried before ``nf4_gemv_config``'s rule (bench/nf4_decode_check.py fills
# it with the best of its sweep to time the step with tuned tiles; empty: the rule everywhere)
CONFIGS: dict = {}


def nf4_gemv_config(N: int, K: int, blocksize: int) -> tuple[int, int, str, int, int]:
    """(BLOCK_N, BYTES, LUT, num_warps, num_stages), the best of bench/nf4_gemm_variants.py --gemv's sweep on an H200
    (8B groups, 1 row): 16 weight rows a program and 128 bytes (256 columns) a step with the L1 lookup for N up to
    a few thousand (qkv, o, down: 23, 19, 62 us); for wide outputs (gate/up, N = 28672: 84 us against 112 with
    that tile) 32 rows and 32-byte steps with ``tl.gather``. Fewer columns a step when K asks."""
    block_n, cols, lut = (32, 64, "gather") if N >= 16384 else (16, 256, "load")
    while cols > 16 and K % cols:
        cols //= 2
    return block_n, cols // 2, lut, 4, 3


def check_gemv_tile(nbytes: int, blocksize: int, K: int) -> None:
    """BYTES a power of two whose 2 * BYTES columns divide K and are a multiple or a divisor of the blocksize."""
    cols = 2 * nbytes
    if (nbytes < 1 or nbytes & (nbytes - 1) or K % cols or (cols > blocksize and cols % blocksize)
            or (cols < blocksize and blocksize % cols)):
        raise ValueError(f"NF4 GEMV tile: BYTES {nbytes} does not fit blocksize {blocksize}, K {K}")


def nf4_gemv(x: torch.Tensor, members, blocksize: int, residual: torch.Tensor | None = None, *,
             config: tuple | None = None, pdl: bool | None = None) -> torch.Tensor:
    """(residual +) x @ W^T: x (M <= 4, K) float32/float16/bfloat16 with unit column stride; ``members`` as
    ``nf4_rows_gemm`` takes them (1 to 3 ``(packed, scales, code, n_i)``), K a multiple of ``blocksize`` (checked by
    the caller); residual None or (M, N) in x's dtype -> (M, N = sum n_i) in x's dtype. One launch."""
    M, K = x.shape
    if M > MAX_ROWS:
        raise ValueError(f"nf4_gemv takes at most {MAX_ROWS} rows, got {M}")
    sizes = [m[3] for m in members]
    N = sum(sizes)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    rows = triton.next_power_of_2(M)
    block_n, nbytes, lut, warps, stages = (config or CONFIGS.get((N, K, blocksize, rows))
                                           or nf4_gemv_config(N, K, blocksize))
    check_gemv_tile(nbytes, blocksize, K)
    if lut not in LUTS:
        raise ValueError(f"NF4 GEMV lookup {lut!r}: one of {LUTS}")
    pdl = pdl_on(x) if pdl is None else pdl
    r = y if residual is None else residual
    pointers, sizes3, blocks = member_arguments(members, block_n)
    _nf4_gemv[(blocks,)](
        x, *pointers, r, y, M, *sizes3, K, x.stride(0), r.stride(0), y.stride(0), BLOCKSIZE=blocksize, BYTES=nbytes,
        LUT=lut, ROWS=rows, MEMBERS=len(members), BLOCK_N=block_n, HAS_RESIDUAL=residual is not None, PDL=pdl,
        num_warps=warps, num_stages=stages, **pdl_launch(pdl))
    return y
