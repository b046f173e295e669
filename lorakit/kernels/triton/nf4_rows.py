"""A weight-streaming NF4 GEMM for a decode step's few rows: y = (residual +) x W^T, W (N, K) in NF4.

The sibling of ``rows_gemm`` (same grid, same epilogue, same PDL entry) for a 4-bit weight: one program streams
BLOCK_N rows of the packed weight over all of K, so W's bytes (K/2 per row, ~3.6x fewer than bf16 with the scales)
are read once per step while the M rows of x come from L2.

Layout (``lorakit/kernels/nf4.py``): flat element ``n*K + k`` is nibble ``k % 2`` (high first) of byte
``(n*K + k) // 2``; its scale is ``scales[(n*K + k) // blocksize]``. The kernel needs ``K % blocksize == 0`` (the
caller checks): row n's bytes are then ``packed[n*K/2 : (n+1)*K/2]`` and its scales ``scales[n*K/bs : (n+1)*K/bs]``.

Per step of CHUNK columns (one scale block or part of one): the (BLOCK_N, CHUNK/2) bytes give two tiles of codes,
the high nibbles (x's even columns) and the low ones (the odd columns); each is looked up with ``tl.gather`` in the
16-level code held in registers, multiplied by its row's scale in float32 and rounded to x's dtype (the
reference's order, bit for bit), then multiplied with x's even / odd columns (one contiguous x load, split in
registers): acc += x_even . W_even^T + x_odd . W_odd^T in float32.

Measured on an H200 (bench/nf4_gemm_variants.py, docs/PERFORMANCE.md): the lookup is most of the time, the GEMM
is 2-3x slower than bf16 cuBLAS on the same shape, and at 64 rows Triton dequantize + cuBLAS is as fast, which is
why ``nf4_rows_linear`` runs this kernel only up to ``MAX_FUSED_ROWS`` rows. Tried and slower: interleaving the
nibbles back to column order for one dot (10-35%), a 15-select tree instead of the gather, a global-memory gather
per byte (5-10x), splitting K over programs.

A fused group (q/k/v, gate/up) is 1 to 3 member weights, each in its own tensors (the model's buffers, not copied):
the grid covers each member's column blocks in turn and a program reads its member's pointers, so the group is
one launch writing one (M, sum N_i) output, as the dense decoder's fused GEMM.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakit.kernels._triton import pdl_launch, pdl_on
from lorakit.kernels.triton.pdl import pdl_enter


@triton.jit
def member_block(pid, packed0, scales0, code0, packed1, scales1, code1, packed2, scales2, code2, N0, N1, N2,
                 MEMBERS: tl.constexpr, BLOCK_N: tl.constexpr):
    """The program's member weight of a fused group (up to three: q/k/v) from its column block ``pid`` over all
    members: (its block within the member, packed, scales, code, the member's N, its first column of y). A column
    block never straddles two members."""
    zero = pid * 0  # N and col0 as int32 values in every branch (a size of 1 would be a constexpr otherwise)
    packed_ptr, scales_ptr, code_ptr, N, col0 = packed0, scales0, code0, zero + N0, zero
    if MEMBERS > 1:
        blocks0 = tl.cdiv(N0, BLOCK_N)
        if pid >= blocks0:
            pid -= blocks0
            packed_ptr, scales_ptr, code_ptr, N, col0 = packed1, scales1, code1, zero + N1, zero + N0
            if MEMBERS > 2:
                blocks1 = tl.cdiv(N1, BLOCK_N)
                if pid >= blocks1:
                    pid -= blocks1
                    packed_ptr, scales_ptr, code_ptr, N, col0 = packed2, scales2, code2, zero + N2, zero + N0 + N1
    return pid, packed_ptr, scales_ptr, code_ptr, N, col0


@triton.jit
def store_rows(acc, offs_m, offs_n, mask, r_ptr, stride_rm, y_ptr, stride_ym, HAS_RESIDUAL: tl.constexpr):
    """y[offs_m, offs_n] = acc (float32, (rows, columns)) (+ the residual at the same place), one rounding to y's
    dtype: addmm's epilogue, as the dense decoder's GEMM."""
    if HAS_RESIDUAL:
        acc += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _nf4_rows_gemm(x_ptr, packed0, scales0, code0, packed1, scales1, code1, packed2, scales2, code2, r_ptr, y_ptr,
                   M, N0, N1, N2, K, stride_xm, stride_rm, stride_ym, BLOCKSIZE: tl.constexpr, CHUNK: tl.constexpr,
                   UNROLL: tl.constexpr, MEMBERS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   HAS_RESIDUAL: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    HALF: tl.constexpr = CHUNK // 2
    pid, packed_ptr, scales_ptr, code_ptr, N, col0 = member_block(
        tl.program_id(0), packed0, scales0, code0, packed1, scales1, code1, packed2, scales2, code2, N0, N1, N2,
        MEMBERS, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows64 = offs_n.to(tl.int64)
    byte_ptrs = packed_ptr + rows64[:, None] * (K // 2) + tl.arange(0, HALF)[None, :]  # (BLOCK_N, HALF)
    scale_ptrs = scales_ptr + rows64 * (K // BLOCKSIZE)  # (BLOCK_N,)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, CHUNK)[None, :]  # (BLOCK_M, CHUNK)
    # the code, one copy per row of the tile (tl.gather wants the index's rank): looked up in registers, never in
    # memory (a global gather per byte made the first version of this kernel 20-30x slower than a bf16 GEMM)
    table = tl.load(code_ptr + tl.arange(0, 16)[None, :] + 0 * offs_n[:, None])  # (BLOCK_N, 16)
    pdl_enter(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, CHUNK * UNROLL):
        for u in tl.static_range(UNROLL):
            k = k0 + u * CHUNK
            byte = tl.load(byte_ptrs + k // 2, mask=mask_n[:, None], other=0).to(tl.int32)
            scale = tl.load(scale_ptrs + k // BLOCKSIZE, mask=mask_n, other=0.0)[:, None]  # one block per step
            # bitsandbytes' order: code * scale in float32, one rounding to x's dtype
            w_even = (tl.gather(table, byte >> 4, 1) * scale).to(x_ptr.dtype.element_ty)  # columns k + 2j
            w_odd = (tl.gather(table, byte & 15, 1) * scale).to(x_ptr.dtype.element_ty)  # columns k + 2j + 1
            x = tl.load(x_ptrs + k, mask=mask_m[:, None], other=0.0)
            x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))
            acc = tl.dot(x_even, tl.trans(w_even), acc, input_precision=PRECISION)
            acc = tl.dot(x_odd, tl.trans(w_odd), acc, input_precision=PRECISION)
    store_rows(acc, offs_m, offs_n + col0, mask_m[:, None] & mask_n[None, :], r_ptr, stride_rm, y_ptr, stride_ym,
               HAS_RESIDUAL)


# (N, K, blocksize, BLOCK_M) -> a config tuple, tried before ``nf4_rows_config``'s rule: bench/nf4_decode_check.py
# fills it with the best of its sweep on the GPU to time the step with tuned tiles (empty: the rule everywhere)
CONFIGS: dict = {}


def nf4_rows_config(N: int, K: int, blocksize: int, sm_count: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, CHUNK, UNROLL, num_warps, num_stages) from the shapes, as measured on an H200 (bench/
    nf4_gemm_variants.py): ``rows_gemm_config``'s rule for BLOCK_N (the widest column block that still gives 70%
    of the SMs a program), steps of one 64-column block (or the blocksize, when smaller), two steps per loop."""
    block_n = 16
    for candidate in (64, 32):
        if N // candidate >= (7 * sm_count) // 10:
            block_n = candidate
            break
    chunk = min(blocksize, 64)
    unroll = 2 if K % (2 * chunk) == 0 else 1
    return block_n, chunk, unroll, 4, 3


def check_tile(chunk: int, unroll: int, blocksize: int, K: int) -> None:
    """The kernel's tile rule: CHUNK a power of two >= 32 (``tl.dot`` takes K >= 16 per nibble half) dividing the
    blocksize (one scale per row per step), CHUNK * UNROLL dividing K."""
    if chunk < 32 or chunk & (chunk - 1) or blocksize % chunk or unroll < 1 or K % (chunk * unroll):
        raise ValueError(f"NF4 rows GEMM tile: CHUNK {chunk} x UNROLL {unroll} does not fit blocksize {blocksize}, K {K}")


def member_arguments(members, block_n: int) -> tuple[list, list, int]:
    """A fused group's launch arguments: the 3 x (packed, scales, code) pointers (unused slots repeat the first
    member: the MEMBERS constexpr removes their loads), the 3 sizes (0 for unused slots) and the grid's column blocks
    (``member_block``'s numbering)."""
    sizes = [m[3] for m in members]
    padded = list(members) + [members[0]] * (3 - len(members))
    return ([t for member in padded for t in member[:3]], sizes + [0] * (3 - len(sizes)),
            sum(triton.cdiv(n, block_n) for n in sizes))


def nf4_rows_gemm(x: torch.Tensor, members, blocksize: int, residual: torch.Tensor | None = None, *,
                  config: tuple | None = None, pdl: bool | None = None) -> torch.Tensor:
    """(residual +) x @ W^T: x (M <= 64, K) float32/float16/bfloat16 with unit column stride; W (N, K) the row-wise
    concatenation of 1 to 3 NF4 ``members``, each ``(packed (n_i*K/2,) uint8, scales (n_i*K/blocksize,) float32,
    code (16,) float32, n_i)``, K a multiple of ``blocksize`` (checked by the caller); residual None or (M, N) in
    x's dtype -> (M, N = sum n_i) in x's dtype. One launch for all members."""
    M, K = x.shape
    sizes = [m[3] for m in members]
    N = sum(sizes)
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return y
    if x.device.type == "cuda":
        from lorakit.kernels.triton.rows_gemm import _sm_count

        sm = _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    else:
        sm = 8
    pdl = pdl_on(x) if pdl is None else pdl
    block_m = max(16, triton.next_power_of_2(M))
    block_n, chunk, unroll, warps, stages = (config or CONFIGS.get((N, K, blocksize, block_m))
                                             or nf4_rows_config(N, K, blocksize, sm))
    check_tile(chunk, unroll, blocksize, K)
    r = y if residual is None else residual
    pointers, sizes3, blocks = member_arguments(members, block_n)
    _nf4_rows_gemm[(blocks,)](
        x, *pointers, r, y, M, *sizes3, K, x.stride(0), r.stride(0), y.stride(0),
        BLOCKSIZE=blocksize, CHUNK=chunk, UNROLL=unroll, MEMBERS=len(members), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_RESIDUAL=residual is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PDL=pdl, num_warps=warps, num_stages=stages, enable_fp_fusion=False, **pdl_launch(pdl))
    return y
