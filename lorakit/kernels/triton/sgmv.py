"""Segmented gather matrix-vector (SGMV) kernels for many LoRA adapters in one batch (S-LoRA / Punica style).

Two launches per layer, both driven by a ``RowPlan`` (rows grouped by adapter slot, cut into tiles of one slot):

    shrink:  low[i, :]  = scaling[s] * x[i, :] @ A[s, :rank[s], :]^T        low (T, r_max) float32
    expand:  y[i, :]   += low[i, :rank[s]] @ B[s, :, :rank[s]]^T              in place, y (T, out)

Each program owns one tile (<= BLOCK_M rows of one slot), so it reads that slot's A or B once for the whole tile:
prefill (long segments) becomes a small GEMM per segment, decode (one row per request) a gather-GEMV where the
adapter reads dominate. Rows with slot -1 are not in the plan, so they are never read or written. The rank of each
slot masks the rank axis, so padded rows (zeros or not) contribute exactly nothing.

Why the intermediate is float32: it is tiny (T x r_max) and keeps the scaling and the rank-axis sum exact before the
expand; the expand then runs its dot in the adapters' dtype (tensor cores for bf16/fp16) with float32 accumulation.
float32 stacks use IEEE dots (no TF32), so float32 results match the reference to float32 tolerance.

Decode has few tiles (one per distinct adapter), so the shrink splits the input dimension (SPLIT_K) across programs,
to keep all SMs reading adapter weights; each split stores its own partial-sum plane and the expand adds the planes
(deterministic, and no zero-fill launch: one decode layer is exactly two launches, which a CUDA graph replays).
Empty tiles (``end <= start``, from a plan built on the device with a fixed tile count) exit at once.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from lorakit.errors import LorakitError


# The tile and split counts change with every batch's mix of adapters: as plain (unspecialised) integers they do
# not make Triton compile a new variant per value (on the H200 each new one cost 0.5-2.4 s inside a server's
# prefill call, bench/results/prefill_mixed_probe_h200_1b.json).
@triton.jit(do_not_specialize=["n_tiles", "SPLIT_K"])
def _shrink_kernel(
    x_ptr, a_ptr, scaling_ptr, rank_ptr, low_ptr, rows_ptr, tiles_ptr,
    n_tiles, K, R, SPLIT_K,
    stride_xm, stride_xk, stride_as, stride_ar, stride_ak, stride_ls, stride_lm, stride_lr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr, ATOMIC: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    start = tl.load(tiles_ptr + tile)
    end = tl.load(tiles_ptr + n_tiles + tile)
    if end <= start:  # an empty tile of a device-built plan (fixed tile count): nothing to do
        return
    slot = tl.load(tiles_ptr + 2 * n_tiles + tile).to(tl.int64)
    rank = tl.load(rank_ptr + slot)

    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank  # padded rank rows are masked: exactly zero, whatever the buffer holds

    a_base = a_ptr + slot * stride_as
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    k_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = split * k_per_split
    for k in range(k_lo, k_lo + k_per_split, BLOCK_K):
        offs_k = k + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        x_tile = tl.load(x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                         mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        a_tile = tl.load(a_base + offs_r[None, :] * stride_ar + offs_k[:, None] * stride_ak,
                         mask=mask_k[:, None] & mask_r[None, :], other=0.0)  # (BLOCK_K, BLOCK_R) = A^T
        x_tile = x_tile.to(a_tile.dtype)
        if IEEE:
            acc += tl.dot(x_tile, a_tile, input_precision="ieee")
        else:
            acc += tl.dot(x_tile, a_tile)
    acc = acc * tl.load(scaling_ptr + slot).to(tl.float32)
    low_ptrs = low_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr
    store_mask = mask_m[:, None] & (offs_r[None, :] < R)
    if ATOMIC:  # one (T, r_max) result: splits add up in place (needs a zeroed buffer)
        tl.atomic_add(low_ptrs, acc, mask=store_mask)
    else:  # partial sums, one plane per split (every split stores, even an empty k-range): the expand adds them
        tl.store(low_ptrs + split * stride_ls, acc, mask=store_mask)


@triton.jit(do_not_specialize=["n_tiles", "SPLIT"])
def _expand_kernel(
    low_ptr, b_ptr, rank_ptr, y_ptr, rows_ptr, tiles_ptr,
    n_tiles, N, SPLIT,
    stride_ls, stride_lm, stride_lr, stride_bs, stride_bn, stride_br, stride_ym, stride_yn,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, IEEE: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(tiles_ptr + tile)
    end = tl.load(tiles_ptr + n_tiles + tile)
    if end <= start:
        return
    slot = tl.load(tiles_ptr + 2 * n_tiles + tile).to(tl.int64)
    rank = tl.load(rank_ptr + slot)

    offs_m = start + tl.arange(0, BLOCK_M)
    mask_m = offs_m < end
    rows = tl.load(rows_ptr + offs_m, mask=mask_m, other=0).to(tl.int64)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = offs_r < rank
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N

    low_ptrs = low_ptr + rows[:, None] * stride_lm + offs_r[None, :] * stride_lr
    low_mask = mask_m[:, None] & mask_r[None, :]
    low = tl.load(low_ptrs, mask=low_mask, other=0.0)  # (BLOCK_M, BLOCK_R) float32
    for sp in range(1, SPLIT):  # the shrink's split-K partial sums
        low += tl.load(low_ptrs + sp * stride_ls, mask=low_mask, other=0.0)
    b_tile = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + offs_r[:, None] * stride_br,
                     mask=mask_r[:, None] & mask_n[None, :], other=0.0)  # (BLOCK_R, BLOCK_N) = B^T
    if IEEE:
        delta = tl.dot(low.to(b_tile.dtype), b_tile, input_precision="ieee")
    else:
        delta = tl.dot(low.to(b_tile.dtype), b_tile)
    y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :] * stride_yn
    y_mask = mask_m[:, None] & mask_n[None, :]
    if ACCUMULATE:
        y = tl.load(y_ptrs, mask=y_mask, other=0.0)
        tl.store(y_ptrs, (y.to(tl.float32) + delta).to(y.dtype), mask=y_mask)
    else:  # write the delta only (prefill: the base GEMM then adds itself onto it, beta=1)
        tl.store(y_ptrs, delta.to(y_ptr.dtype.element_ty), mask=y_mask)


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


# Tile sizes per kind of plan: "prefill" (64-row tiles, long segments) and "decode" (16-row tiles, ~1 row each).
# Decode moves only adapter bytes, so its tiles are wide (more bytes in flight per program) and the shrink splits
# the input dimension until ~``programs_per_sm`` programs per SM read A. bench/multi_adapter.py sweeps these on
# the GPU (``--sweep``) and reports the fastest; the first H200 run used prefill (64, 64, 4) and was 0.842x base.
# Tile sizes chosen by bench/multi_adapter.py's sweep on an H200 (2026-11-29, Llama-3.2-1B shape, 64 adapters, r=16;
# bench/results/multi_adapter_1b_v2.json): prefill kept its default (1,091 us for the seven projections), decode
# 87.5 us with these against 93.7 us with the former default (256, 256, 4 warps, 4 programs per SM).
CONFIGS = {
    "prefill": dict(block_k=64, block_n=128, num_warps=4, programs_per_sm=0),
    "decode": dict(block_k=64, block_n=128, num_warps=4, programs_per_sm=2),
}


def _config(plan) -> dict:
    return CONFIGS["decode" if plan.block_m <= 16 else "prefill"]


def _block_r(r_max: int) -> int:
    return max(16, triton.next_power_of_2(r_max))  # tl.dot needs every dimension >= 16


def _check_dtypes(x: torch.Tensor, stack: torch.Tensor) -> None:
    ok = (torch.float32, torch.float16, torch.bfloat16)
    if x.dtype not in ok or stack.dtype not in ok:
        raise LorakitError(f"the SGMV kernels take float32/float16/bfloat16, got input {x.dtype} and adapters {stack.dtype}")


def _split_k(x: torch.Tensor, n_k_blocks: int, plan, cfg: dict, split_k: int | None) -> int:
    if split_k is not None:
        return max(1, min(split_k, n_k_blocks))
    if x.device.type != "cuda" or not cfg["programs_per_sm"]:
        return 1
    # few tiles (decode): split the input dimension so that enough programs read the adapters at once
    want = cfg["programs_per_sm"] * _sm_count(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return max(1, min(n_k_blocks, want // max(plan.n_tiles, 1)))


def sgmv_shrink(
    x: torch.Tensor, A_stack: torch.Tensor, scalings: torch.Tensor, ranks: torch.Tensor, plan, split_k: int | None = None,
    partials: bool = False,
) -> torch.Tensor:
    """x (T, in), A_stack (slots, r_max, in), scalings (slots,), ranks (slots,) int -> low (T, r_max) float32.

    Rows outside the plan are left as zeros (never computed). ``split_k`` overrides the heuristic (tests use it).
    ``partials=True`` returns the split-K partial sums instead, (split_k, T, r_max) float32 from ``torch.empty``
    (rows outside the plan hold garbage): ``sgmv_expand_add_`` adds the planes, so no memset and no atomics run.
    """
    _check_dtypes(x, A_stack)
    T, K = x.shape
    r_max = A_stack.shape[1]
    block_r = _block_r(r_max)
    if block_r > 128:
        raise LorakitError(f"the SGMV kernels support ranks up to 128, got r_max={r_max}; use the reference (LORAKIT_DISABLE_TRITON=1)")
    cfg = _config(plan)
    block_k = cfg["block_k"] if block_r <= 32 else min(cfg["block_k"], 32)
    split_k = _split_k(x, triton.cdiv(K, block_k), plan, cfg, split_k)
    if partials:
        low = torch.empty(split_k, T, r_max, dtype=torch.float32, device=x.device)
    else:
        low = torch.zeros(1, T, r_max, dtype=torch.float32, device=x.device)
    grid = (plan.n_tiles, split_k)
    _shrink_kernel[grid](
        x, A_stack, scalings, ranks, low, plan.row_order, plan.tiles,
        plan.n_tiles, K, r_max, split_k,
        x.stride(0), x.stride(1), A_stack.stride(0), A_stack.stride(1), A_stack.stride(2),
        low.stride(0), low.stride(1), low.stride(2),
        BLOCK_M=plan.block_m, BLOCK_R=block_r, BLOCK_K=block_k,
        IEEE=A_stack.dtype == torch.float32, ATOMIC=not partials and split_k > 1, num_warps=cfg["num_warps"],
    )
    return low if partials else low[0]


def sgmv_expand_add_(y: torch.Tensor, low: torch.Tensor, B_stack: torch.Tensor, ranks: torch.Tensor, plan,
                     accumulate: bool = True) -> torch.Tensor:
    """In place: y (T, out) += low @ B[slot]^T per planned row; B_stack (slots, out, r_max). Returns y.

    low: (T, r_max) float32, or (split, T, r_max) split-K partial sums from ``sgmv_shrink(..., partials=True)``.
    ``accumulate=False`` overwrites the planned rows with the delta instead (y is not read).
    """
    _check_dtypes(y, B_stack)
    T, N = y.shape
    low3 = low if low.dim() == 3 else low.unsqueeze(0)
    r_max = B_stack.shape[2]
    block_r = _block_r(r_max)
    cfg = _config(plan)
    block_n = min(cfg["block_n"], max(16, triton.next_power_of_2(N)))
    grid = (plan.n_tiles, triton.cdiv(N, block_n))
    _expand_kernel[grid](
        low3, B_stack, ranks, y, plan.row_order, plan.tiles,
        plan.n_tiles, N, low3.shape[0],
        low3.stride(0), low3.stride(1), low3.stride(2), B_stack.stride(0), B_stack.stride(1), B_stack.stride(2),
        y.stride(0), y.stride(1),
        BLOCK_M=plan.block_m, BLOCK_R=block_r, BLOCK_N=block_n, IEEE=B_stack.dtype == torch.float32,
        ACCUMULATE=accumulate, num_warps=cfg["num_warps"],
    )
    return y
