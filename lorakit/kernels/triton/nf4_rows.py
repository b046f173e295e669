"""A weight-streaming NF4 GEMM for a decode step's few rows: y = (residual +) x W^T, W (N, K) in NF4.

The sibling of ``rows_gemm`` (same grid, same epilogue, same PDL entry) for a 4-bit weight: one program streams
BLOCK_N rows of the packed weight over all of K, so W's bytes (K/2 per row, ~3.6x fewer than bf16 with the scales)
are read once per step while the M rows of x come from L2.

Layout (``lorakit/kernels/nf4.py``): flat element ``n*K + k`` is nibble ``k % 2`` (high first) of byte
``(n*K + k) // 2``; its scale is ``scales[(n*K + k) // blocksize]``. The kernel needs ``K % blocksize == 0`` (the
caller checks): row n's bytes are then ``packed[n*K/2 : (n+1)*K/2]`` and its scales ``scales[n*K/bs : (n+1)*K/bs]``.

Per step of CHUNK columns: the (BLOCK_N, CHUNK/2) bytes are split into their two nibbles and interleaved back to
the (BLOCK_N, CHUNK) codes in column order, so x is read as a contiguous (BLOCK_M, CHUNK) tile and one ``tl.dot``
takes the whole step. The 16-level code is looked up without touching memory in the loop, which is what made the
first version of this kernel 20-30x slower than a bf16 GEMM (a global-memory gather per byte): ``LUT="gather"``
is ``tl.gather`` from the code held in registers (warp shuffles / shared memory, the compiler's choice),
``LUT="select"`` a 4-level tree of 15 selects on the code's bits. Each value is ``code * scale`` in float32, then
rounded to x's dtype: the reference's order, bit for bit; the product accumulates in float32.

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

LUTS = ("gather", "select")


@triton.jit
def _select16(q, code_ptr):
    """code[q] for q in [0, 16) as a tree of selects on q's bits: 15 selects per value, no memory access."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    b3 = (q & 8) != 0
    c0 = tl.load(code_ptr + 0)
    c1 = tl.load(code_ptr + 1)
    c2 = tl.load(code_ptr + 2)
    c3 = tl.load(code_ptr + 3)
    c4 = tl.load(code_ptr + 4)
    c5 = tl.load(code_ptr + 5)
    c6 = tl.load(code_ptr + 6)
    c7 = tl.load(code_ptr + 7)
    c8 = tl.load(code_ptr + 8)
    c9 = tl.load(code_ptr + 9)
    c10 = tl.load(code_ptr + 10)
    c11 = tl.load(code_ptr + 11)
    c12 = tl.load(code_ptr + 12)
    c13 = tl.load(code_ptr + 13)
    c14 = tl.load(code_ptr + 14)
    c15 = tl.load(code_ptr + 15)
    low = tl.where(b2, tl.where(b1, tl.where(b0, c7, c6), tl.where(b0, c5, c4)),
                   tl.where(b1, tl.where(b0, c3, c2), tl.where(b0, c1, c0)))
    high = tl.where(b2, tl.where(b1, tl.where(b0, c15, c14), tl.where(b0, c13, c12)),
                    tl.where(b1, tl.where(b0, c11, c10), tl.where(b0, c9, c8)))
    return tl.where(b3, high, low)


@triton.jit
def _nf4_rows_gemm(x_ptr, packed0, scales0, code0, packed1, scales1, code1, packed2, scales2, code2, r_ptr, y_ptr,
                   part_ptr, count_ptr, M, N0, N1, N2, K, stride_xm, stride_rm, stride_ym, BLOCKSIZE: tl.constexpr,
                   CHUNK: tl.constexpr, LUT: tl.constexpr, SPLIT: tl.constexpr, MEMBERS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PRECISION: tl.constexpr,
                   PDL: tl.constexpr):
    HALF: tl.constexpr = CHUNK // 2
    GROUPS: tl.constexpr = CHUNK // BLOCKSIZE if CHUNK > BLOCKSIZE else 1  # scales per row per step
    SUB: tl.constexpr = CHUNK // GROUPS  # columns per scale within a step
    # the program's member weight (up to three: q/k/v) and its first column of y; a column block never straddles two
    block = tl.program_id(0)  # the column block over all members (the split-K partials' slot)
    split = tl.program_id(1)  # which K / SPLIT slice this program sums
    pid = block
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
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows64 = offs_n.to(tl.int64)
    byte_ptrs = packed_ptr + rows64[:, None] * (K // 2) + tl.arange(0, HALF)[None, :]  # (BLOCK_N, HALF)
    scale_ptrs = scales_ptr + rows64[:, None] * (K // BLOCKSIZE) + tl.arange(0, GROUPS)[None, :]  # (BLOCK_N, GROUPS)
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + tl.arange(0, CHUNK)[None, :]  # (BLOCK_M, CHUNK)
    if LUT == "gather":  # the code, one copy per row of the tile: tl.gather wants the index's rank
        table = tl.load(code_ptr + tl.arange(0, 16)[None, :] + 0 * offs_n[:, None])  # (BLOCK_N, 16)
    pdl_enter(PDL)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_len = K // SPLIT  # a multiple of CHUNK (the wrapper checks)
    for k in range(split * k_len, (split + 1) * k_len, CHUNK):
        byte = tl.load(byte_ptrs + k // 2, mask=mask_n[:, None], other=0).to(tl.int32)
        q = tl.interleave(byte >> 4, byte & 15)  # (BLOCK_N, CHUNK): column 2j the high nibble of byte j
        if LUT == "gather":
            value = tl.gather(table, q, 1)
        else:
            value = _select16(q, code_ptr)
        scale = tl.load(scale_ptrs + k // BLOCKSIZE, mask=mask_n[:, None], other=0.0)  # (BLOCK_N, GROUPS)
        value = tl.reshape(value, (BLOCK_N, GROUPS, SUB)) * scale[:, :, None]
        w = tl.reshape(value, (BLOCK_N, CHUNK)).to(x_ptr.dtype.element_ty)
        x = tl.load(x_ptrs + k, mask=mask_m[:, None], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
    offs_n += col0
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT > 1:
        # each slice writes its partial sum; the last slice of the block to arrive adds the SPLIT partials in slice
        # order (deterministic, unlike atomic adds), then resets the block's counter for the next call (no memset)
        tile = offs_m[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # (BLOCK_M, BLOCK_N) in the block's slots
        slot = part_ptr + block.to(tl.int64) * (SPLIT * BLOCK_M * BLOCK_N)
        tl.store(slot + split * (BLOCK_M * BLOCK_N) + tile, acc)
        arrived = tl.atomic_add(count_ptr + block, 1, sem="acq_rel")  # release this slice, acquire the others
        last = arrived == SPLIT - 1
        if last:  # L2 reads (.cg): this SM's L1 may hold a slot from an earlier call
            acc = tl.load(slot + tile, cache_modifier=".cg")
            for other in tl.static_range(1, SPLIT):
                acc += tl.load(slot + other * (BLOCK_M * BLOCK_N) + tile, cache_modifier=".cg")
            tl.store(count_ptr + block, 0)
        mask = mask & ((offs_m[:, None] * 0 + arrived) == SPLIT - 1)  # the other slices store nothing
    if HAS_RESIDUAL:  # as addmm's epilogue: the residual added to the float32 product, one rounding
        acc += tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


# (N, K, blocksize, BLOCK_M) -> a config tuple, tried before ``nf4_rows_config``'s rule: bench/nf4_decode_check.py
# fills it with the best of its sweep on the GPU to time the step with tuned tiles (empty: the rule everywhere)
CONFIGS: dict = {}


def nf4_rows_config(N: int, K: int, blocksize: int, sm_count: int) -> tuple[int, int, str, int, int, int]:
    """(BLOCK_N, CHUNK, LUT, num_warps, num_stages, SPLIT) from the shapes: ``rows_gemm_config``'s rule for BLOCK_N
    (the widest column block that still gives 70% of the SMs a program), 128 columns of K per step (fewer when K
    or the blocksize asks), the register lookup, 3 stages, no split of K."""
    block_n = 16
    for candidate in (64, 32):
        if N // candidate >= (7 * sm_count) // 10:
            block_n = candidate
            break
    chunk = 128
    while chunk > 32 and (K % chunk or (chunk > blocksize and chunk % blocksize) or (chunk < blocksize and blocksize % chunk)):
        chunk //= 2
    return block_n, chunk, "gather", 4, 3, 1


def check_tile(chunk: int, split: int, blocksize: int, K: int) -> None:
    """The kernel's tile rule: CHUNK a power of two >= 32 (``tl.dot`` needs K >= 16 per nibble half) dividing
    K / SPLIT, and either a multiple of the blocksize or a divisor of it (whole scale groups per step)."""
    if (chunk < 32 or chunk & (chunk - 1) or split < 1 or K % (chunk * split)
            or (chunk > blocksize and chunk % blocksize) or (chunk < blocksize and blocksize % chunk)):
        raise ValueError(f"NF4 rows GEMM tile: CHUNK {chunk} x SPLIT {split} does not fit blocksize {blocksize}, K {K}")


# (device, blocks, SPLIT * BLOCK_M * BLOCK_N) -> (partials float32, counters int32): kept for the process, so that
# a CUDA graph captured over the kernel keeps its buffers; the kernel leaves the counters at zero after each call
_SPLIT_BUFFERS: dict = {}


def _split_buffers(device: torch.device, blocks: int, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), blocks, slot)
    if key not in _SPLIT_BUFFERS:
        _SPLIT_BUFFERS[key] = (torch.empty(blocks * slot, dtype=torch.float32, device=device),
                               torch.zeros(blocks, dtype=torch.int32, device=device))
    return _SPLIT_BUFFERS[key]


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
    block_n, chunk, lut, warps, stages, split = (config or CONFIGS.get((N, K, blocksize, block_m))
                                                 or nf4_rows_config(N, K, blocksize, sm))
    check_tile(chunk, split, blocksize, K)
    if lut not in LUTS:
        raise ValueError(f"NF4 rows GEMM lookup {lut!r}: one of {LUTS}")
    r = y if residual is None else residual
    padded = list(members) + [members[0]] * (3 - len(members))  # unused pointer slots: MEMBERS removes their loads
    pointers = [t for member in padded for t in member[:3]]
    sizes3 = sizes + [0] * (3 - len(sizes))
    blocks = sum(triton.cdiv(n, block_n) for n in sizes)
    parts, counts = _split_buffers(x.device, blocks, split * block_m * block_n) if split > 1 else (y, y)
    _nf4_rows_gemm[(blocks, split)](
        x, *pointers, r, y, parts, counts, M, *sizes3, K, x.stride(0), r.stride(0), y.stride(0),
        BLOCKSIZE=blocksize, CHUNK=chunk, LUT=lut, SPLIT=split, MEMBERS=len(members), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_RESIDUAL=residual is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        PDL=pdl, num_warps=warps, num_stages=stages, enable_fp_fusion=False, **pdl_launch(pdl))
    return y
