"""Decode-shaped grouped multi-LoRA kernels: several projections that share one input, rows indexed by a slot table.

One shrink + one expand launch serve G (1..4) projections of one input (q,k,v -> 3 segments; gate,up -> 2; o or
down -> 1), every row with its own adapter slot (``slot_of_row[t]``, -1 = none), read straight from a device tensor:
no row plan, no host work that depends on the data, so a decode step is CUDA-graph safe.

    shrink  grid (T, SPLIT_K):  part[split, t, j] = x[t, k-chunk] . A[s, j, k-chunk]       j < G*R, float32
    expand  grid (T, cdiv(N, BLOCK_N)):
            low_g = scaling[s, g] * sum_split part[:, t, g*R : g*R + rank[s, g]]
            y[t, c] += low_{g(c)} . B[s, c, :rank[s, g(c)]]                                  in y's dtype
            (store mode, ACCUMULATE=False: y[t, c] = that delta, and rows without an adapter are set to zero)

Why no ``tl.dot``: with one row per adapter a program multiplies a vector by a (G*R, BLOCK_K) tile; tl.dot would pad
the row to 16 and compute 16x the FLOPs for nothing. Elementwise FMAs in float32 + one reduction keep every lane busy
loading adapter bytes, which is all decode is bound by (the SGMV kernels' 16-row tiles reached ~30% of the bound).
The partial sums go to a (SPLIT_K, T, G*R) float32 scratch from ``torch.empty`` (every split stores its plane, the
expand adds the planes): deterministic, no memset launch, no atomics.

Masking: rows of A beyond a segment's rank and columns of B beyond it are never loaded (masked loads, so NaN or
garbage padding cannot leak and the skipped bytes are not fetched); the summed low-rank vector is masked with
``tl.where`` as well, so an inf in x times a masked zero cannot become NaN. Rows whose slot is -1, or outside
0..slots-1 (memory safety: checking on the host would need a sync), exit at once and never touch y.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lorakit.kernels._triton import pdl_launch, pdl_on
from lorakit.kernels.triton.pdl import pdl_enter


@triton.jit
def _grouped_shrink_kernel(
    x_ptr, a_ptr, rank_ptr, slot_ptr, part_ptr,
    T, K, n_slots, k_per_split,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_rs, stride_ps, stride_pm,
    G: tl.constexpr, R: tl.constexpr, BLOCK_GR: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    row = tl.program_id(0)
    split = tl.program_id(1)
    pdl_enter(PDL)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    if (slot < 0) | (slot >= n_slots):  # no adapter on this row: its partial sums are never read
        return
    offs_j = tl.arange(0, BLOCK_GR)  # rows of A[s]: segment j // R, rank position j % R
    in_rows = offs_j < G * R
    rank_j = tl.load(rank_ptr + slot * stride_rs + offs_j // R, mask=in_rows, other=0)
    mask_j = in_rows & (offs_j % R < rank_j)  # rows beyond a segment's rank are never read

    a_base = a_ptr + slot * stride_as
    x_base = x_ptr + row.to(tl.int64) * stride_xm
    acc = tl.zeros((BLOCK_GR, BLOCK_K), dtype=tl.float32)  # reduced once at the end, not per chunk
    k_lo = split * k_per_split
    for k in range(k_lo, k_lo + k_per_split, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        a = tl.load(a_base + offs_j[:, None] * stride_ar + offs_k[None, :] * stride_ak,
                    mask=mask_j[:, None] & mask_k[None, :], other=0.0)
        xk = tl.load(x_base + offs_k * stride_xk, mask=mask_k, other=0.0)
        xk = xk.to(a.dtype).to(tl.float32)  # x rounded to the adapters' dtype, as the SGMV kernels and PEFT do
        acc += a.to(tl.float32) * xk[None, :]
    part = tl.sum(acc, axis=1)
    tl.store(part_ptr + split * stride_ps + row.to(tl.int64) * stride_pm + offs_j, part, mask=in_rows)


@triton.jit
def _segment_low(part_base, stride_ps, scaling_ptr, rank_ptr, slot, stride_ss, stride_rs, g,
                 R: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr):
    """Segment g's scaled low-rank vector (BLOCK_R,) float32 (zero beyond its rank) and its rank."""
    offs_r = tl.arange(0, BLOCK_R)
    rank_g = tl.minimum(tl.load(rank_ptr + slot * stride_rs + g).to(tl.int32), R)  # never past the segment
    mask_r = offs_r < rank_g
    low = tl.load(part_base + g * R + offs_r, mask=mask_r, other=0.0)
    for sp in tl.static_range(1, SPLIT):  # the shrink's split-K planes, added in a fixed order
        low += tl.load(part_base + sp * stride_ps + g * R + offs_r, mask=mask_r, other=0.0)
    return tl.where(mask_r, low * tl.load(scaling_ptr + slot * stride_ss + g).to(tl.float32), 0.0), rank_g


@triton.jit
def _grouped_expand_kernel(
    part_ptr, b_ptr, scaling_ptr, rank_ptr, slot_ptr, y_ptr,
    N, n_slots, C1, C2, C3,
    stride_ps, stride_pm, stride_bs, stride_bn, stride_br, stride_ss, stride_rs, stride_ym, stride_yn,
    G: tl.constexpr, R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT: tl.constexpr,
    ITERS: tl.constexpr, ACCUMULATE: tl.constexpr, PDL: tl.constexpr,
):
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.load(slot_ptr + row).to(tl.int64)
    has_adapter = (slot >= 0) & (slot < n_slots)
    offs_r = tl.arange(0, BLOCK_R)
    b_base = b_ptr + tl.where(has_adapter, slot, 0) * stride_bs
    # B's first column block before the PDL wait: no kernel of a step writes B, and slot_of_row is an input of the
    # shrink just before this kernel, so it was written before the shrink launched. B's address does not depend on
    # the ranks: columns beyond R are never read and those beyond a segment's rank are zeroed below
    offs_n0 = pid_n * ITERS * BLOCK_N + tl.arange(0, BLOCK_N)
    b_first = tl.load(b_base + offs_n0[:, None] * stride_bn + offs_r[None, :] * stride_br,
                      mask=(offs_n0 < N)[:, None] & (offs_r < tl.where(has_adapter, R, 0))[None, :], other=0.0)
    pdl_enter(PDL)
    if (slot < 0) | (slot >= n_slots):  # no adapter on this row
        if not ACCUMULATE:  # store mode: y = delta, which is zero for a row without an adapter
            y_row = y_ptr + row.to(tl.int64) * stride_ym
            for it in range(ITERS):
                offs_z = (pid_n * ITERS + it) * BLOCK_N + tl.arange(0, BLOCK_N)
                tl.store(y_row + offs_z * stride_yn, tl.zeros((BLOCK_N,), dtype=tl.float32).to(y_ptr.dtype.element_ty),
                         mask=offs_z < N)
        return  # add mode: y's row is neither read nor written
    part_base = part_ptr + row.to(tl.int64) * stride_pm
    # the G low-rank vectors once per program (G <= 4), then ITERS column blocks: the chain slot -> rank -> partial
    # sums is paid once for ITERS x BLOCK_N columns instead of once per block (it dominated 8 KiB programs)
    low0, rank0 = _segment_low(part_base, stride_ps, scaling_ptr, rank_ptr, slot, stride_ss, stride_rs, 0, R, BLOCK_R, SPLIT)
    low1, rank1 = low0, rank0
    low2, rank2 = low0, rank0
    low3, rank3 = low0, rank0
    if G > 1:
        low1, rank1 = _segment_low(part_base, stride_ps, scaling_ptr, rank_ptr, slot, stride_ss, stride_rs, 1, R, BLOCK_R, SPLIT)
    if G > 2:
        low2, rank2 = _segment_low(part_base, stride_ps, scaling_ptr, rank_ptr, slot, stride_ss, stride_rs, 2, R, BLOCK_R, SPLIT)
    if G > 3:
        low3, rank3 = _segment_low(part_base, stride_ps, scaling_ptr, rank_ptr, slot, stride_ss, stride_rs, 3, R, BLOCK_R, SPLIT)
    y_base = y_ptr + row.to(tl.int64) * stride_ym
    for it in tl.static_range(ITERS):
        offs_n = (pid_n * ITERS + it) * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        if it == 0:
            b = b_first  # (BLOCK_N, BLOCK_R)
        else:
            b = tl.load(b_base + offs_n[:, None] * stride_bn + offs_r[None, :] * stride_br,
                        mask=mask_n[:, None] & (offs_r[None, :] < R), other=0.0)
        y_ptrs = y_base + offs_n * stride_yn
        if ACCUMULATE:
            y = tl.load(y_ptrs, mask=mask_n, other=0.0).to(tl.float32)
        else:
            y = tl.zeros((BLOCK_N,), dtype=tl.float32)
        seg = (offs_n >= C1).to(tl.int32) + (offs_n >= C2).to(tl.int32) + (offs_n >= C3).to(tl.int32)
        low = tl.where((seg == 0)[:, None], low0[None, :], low1[None, :])
        rank_n = tl.where(seg == 0, rank0, rank1)
        if G > 2:
            low = tl.where((seg == 2)[:, None], low2[None, :], low)
            rank_n = tl.where(seg == 2, rank2, rank_n)
        if G > 3:
            low = tl.where((seg == 3)[:, None], low3[None, :], low)
            rank_n = tl.where(seg == 3, rank3, rank_n)
        b = tl.where(offs_r[None, :] < rank_n[:, None], b.to(tl.float32), 0.0)
        delta = tl.sum(b * low, axis=1)
        tl.store(y_ptrs, (y + delta).to(y_ptr.dtype.element_ty), mask=mask_n)


@triton.jit
def live_segment_low(part_row, stride_ps, scaling_ptr, rank_ptr, live, seg, R: tl.constexpr, BLOCK_R: tl.constexpr,
                     SPLIT: tl.constexpr):
    """Segment ``seg``'s scaled low-rank vector (BLOCK_R,) float32, zero beyond its rank, and that rank (0 when
    the row has no adapter, ``live`` false: nothing of ``part`` is read then). part_row: the row's plane-0 entries;
    scaling_ptr / rank_ptr: the slot's rows of scaling and rank (any slot when not live: they are still read)."""
    offs_r = tl.arange(0, BLOCK_R)
    rank = tl.where(live, tl.minimum(tl.load(rank_ptr + seg).to(tl.int32), R), 0)
    mask_r = offs_r < rank
    low = tl.load(part_row + seg * R + offs_r, mask=mask_r, other=0.0)
    for sp in tl.static_range(1, SPLIT):
        low += tl.load(part_row + sp * stride_ps + seg * R + offs_r, mask=mask_r, other=0.0)
    scale = tl.load(scaling_ptr + seg).to(tl.float32)
    return tl.where(mask_r, low * scale, 0.0), rank


# Tile sizes. bench/grouped_lora_speed.py sweeps candidates on the GPU and prints the fastest; programs_per_sm sets
# SPLIT_K so that about that many shrink programs per SM read A at once (decode has only T rows). max_tile bounds
# the shrink's (G*R, BLOCK_K) float32 accumulator (registers), so block_k shrinks when G*R is large.
# Chosen by that sweep on an H200 (2026-11-29, Llama-3.1-8B groups, 64 rows with 64 adapters, r=16, bf16;
# bench/results/grouped_lora_speed_h200.json): shrink 81.9 us for the four groups with these against 93.3-165 us
# for the other candidates; expand 82.0 us against 88-103 us. The wide shrink tile (48 x 512 float32 over 8 warps,
# 2 programs per SM) keeps more adapter bytes in flight per program than more, smaller programs do. Second sweep
# (bench/results/grouped_lora_speed_h200_v2.json, B loaded before the ranks): expand 69.4 us at 256 columns and one
# block a program, against 70.9-81.0 us for programs looping over 2-8 blocks (``iters``), so that stays at 1.
# Third sweep (bench/static_decode_profile.py --sweep; bench/results/static_decode_profile_h200_{8b,1b}_64_v2.json):
# timed as the whole graph step, now that the pair runs on a second stream beside the base GEMMs, one program per SM
# and a 1024-wide chunk (capped by max_tile: 512 for q/k/v) gave 8.41 ms against 8.93 ms at the old 2 per SM (8B,
# 64 adapters; 1B 2.36 against 2.44 ms): fewer shrink programs leave the GEMM its SMs. The expand stayed best at
# 256 columns over 4 warps on the 8B shape (the 1B differences were within the run-to-run spread of ~0.1 ms).
# Fourth sweep, with the step's kernels under PDL (three interleaved rounds, medians;
# bench/results/static_decode_profile_h200_{8b,1b}_64_pdl_sweep.json): 512-wide chunks, still one program per SM,
# 8.42 ms against 8.87 for 1024 (8B) and 2.26 against 2.35 (1B); the expand's best stayed within noise of 256/4.
CONFIGS = {
    "shrink": dict(block_k=512, num_warps=8, programs_per_sm=1, max_tile=32768),
    "expand": dict(block_n=256, num_warps=4, iters=1),
}


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def shrink_blocks(T: int, K: int, GR: int, device: torch.device, split_k: int | None) -> tuple[int, int, int]:
    """(BLOCK_K, SPLIT_K, k_per_split) from the shapes and the SM count only (no data, so graph replays agree).

    Each split covers a whole number of BLOCK_K chunks and none is empty (the split count is recomputed from the
    chunks per split), so every plane the expand adds was written.
    """
    cfg = CONFIGS["shrink"]
    block_gr = triton.next_power_of_2(GR)
    block_k = max(16, min(cfg["block_k"], cfg["max_tile"] // block_gr, triton.next_power_of_2(K)))
    n_chunks = triton.cdiv(K, block_k)
    if split_k is None:
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            split_k = (cfg["programs_per_sm"] * _sm_count(index)) // max(T, 1)
        else:
            split_k = 1  # the interpreter: one program per row is the fastest
    split_k = max(1, min(int(split_k), n_chunks))
    chunks_per_split = triton.cdiv(n_chunks, split_k)
    split_k = triton.cdiv(n_chunks, chunks_per_split)
    return block_k, split_k, chunks_per_split * block_k


def grouped_shrink_triton(x, A, rank, slot_of_row, G, split_k=None, out=None):
    """The shrink launch: returns ``part`` (SPLIT_K, T, G*R) float32, the split-K partial sums of x . A[slot]
    (planes of rows without an adapter are left unwritten; the expand never reads them). out: that tensor, given."""
    T, K = x.shape
    slots, GR, _ = A.shape
    block_k, split, k_per_split = shrink_blocks(T, K, GR, x.device, split_k)
    part = torch.empty(split, T, GR, dtype=torch.float32, device=x.device) if out is None else out  # no memset
    if part.shape != (split, T, GR) or part.dtype != torch.float32 or not part.is_contiguous():
        raise ValueError(f"out must be a contiguous float32 {(split, T, GR)}, got {tuple(part.shape)} {part.dtype}")
    pdl = pdl_on(x)
    _grouped_shrink_kernel[(T, split)](
        x, A, rank, slot_of_row, part,
        T, K, slots, k_per_split,
        x.stride(0), x.stride(1), A.stride(0), A.stride(1), A.stride(2), rank.stride(0), part.stride(0), part.stride(1),
        G=G, R=GR // G, BLOCK_GR=triton.next_power_of_2(GR), BLOCK_K=block_k, PDL=pdl,
        num_warps=CONFIGS["shrink"]["num_warps"], **pdl_launch(pdl),
    )
    return part


def grouped_expand_triton_(y, part, B, scaling, rank, slot_of_row, bounds, accumulate=True):
    """The expand launch: y += (accumulate) or y = (store; rows without an adapter get zeros) the grouped delta
    from the shrink's ``part``. bounds: the cumulative column bounds of the segments (G + 1 ints, 0 .. N)."""
    T, N = y.shape
    slots, _, R = B.shape
    G = len(bounds) - 1
    cuts = list(bounds[1:-1]) + [N] * (4 - G)  # unused bounds at N: no column reaches them
    block_n = max(16, min(CONFIGS["expand"]["block_n"], triton.next_power_of_2(N)))
    iters = max(1, min(CONFIGS["expand"].get("iters", 1), triton.cdiv(N, block_n)))
    pdl = pdl_on(y)
    _grouped_expand_kernel[(T, triton.cdiv(N, block_n * iters))](
        part, B, scaling, rank, slot_of_row, y,
        N, slots, cuts[0], cuts[1], cuts[2],
        part.stride(0), part.stride(1), B.stride(0), B.stride(1), B.stride(2), scaling.stride(0), rank.stride(0),
        y.stride(0), y.stride(1),
        G=G, R=R, BLOCK_R=triton.next_power_of_2(R), BLOCK_N=block_n, SPLIT=part.shape[0], ITERS=iters,
        ACCUMULATE=bool(accumulate), PDL=pdl, num_warps=CONFIGS["expand"]["num_warps"], **pdl_launch(pdl),
    )
    return y


def grouped_lora_add_triton_(y, x, A, B, scaling, rank, slot_of_row, bounds, split_k=None, accumulate=True):
    """The two launches; arguments as ``lorakit.kernels.grouped_lora.grouped_lora_add_`` (already validated).

    bounds: the cumulative column bounds of the segments (len G + 1, starting at 0, ending at N).
    """
    part = grouped_shrink_triton(x, A, rank, slot_of_row, len(bounds) - 1, split_k)
    return grouped_expand_triton_(y, part, B, scaling, rank, slot_of_row, bounds, accumulate)
