"""The decode MLP's middle in one kernel: gate/up LoRA expand + SwiGLU + the down projection's LoRA shrink.

Without it, a decode step's MLP runs, besides its two GEMMs, a grouped expand for gate/up (writing a delta), the
SwiGLU (reading it back) and a grouped shrink for down (reading the activation back): three launches, each a
small memory-bound kernel that pays its own ramp-up and drain. Here one program per (row t, column block c):

    low_g, low_u = scaling * sum_split part_gu[:, t, seg*R : seg*R + rank]      (the gate/up shrink's output)
    g = gu[t, c] + round(B_gu[s, c] . low_g);  u = gu[t, F + c] + round(B_gu[s, F + c] . low_u)   (rounded)
    act[t, c] = silu(g) * u                                                    (rounded to gu's dtype)
    part_d[block c, t, :] = A_d[s, :rank_d, c] . act[t, c]                     float32: the down shrink, split by
                                                                               the same column blocks

so the down expand (``grouped_expand_triton_``) adds the planes of ``part_d`` as it adds a shrink's split-K
planes. Rows without an adapter (slot -1, or outside 0..slots-1) compute the plain SwiGLU and leave their planes
unwritten (the expand never reads them). The roundings are those of the unfused path (delta stored in gu's dtype,
added in float32, rounded), so the two agree to float32 summation order.

Adapter tiles (B_gu's two column blocks, A_d's block) are loaded before the PDL wait: no kernel of a step writes them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakit.kernels._triton import pdl_launch, pdl_on
from lorakit.kernels.triton.grouped_lora import live_segment_low
from lorakit.kernels.triton.pdl import pdl_enter

# column block and warps: 256 columns keep the (256, R) B tiles, the (R_d, 256) A tile and their float32 products
# in registers at R = 16 over 4 warps (bench/static_decode_profile.py times the whole step)
CONFIG = dict(block=256, num_warps=4)


@triton.jit
def _swiglu_lora_kernel(
    GU, PART_GU, B_GU, SCALE_GU, RANK_GU, A_D, RANK_D, SLOTS, H, PART_D,
    F, n_slots,
    stride_gum, stride_pgs, stride_pgm, stride_bs, stride_bn, stride_br, stride_ss, stride_rs,
    stride_as, stride_ar, stride_ak, stride_rds, stride_hm, stride_pds, stride_pdm,
    R: tl.constexpr, BLOCK_R: tl.constexpr, SPLIT: tl.constexpr, RD: tl.constexpr, BLOCK_RD: tl.constexpr,
    BLOCK: tl.constexpr, PDL: tl.constexpr,
):
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < F
    slot = tl.load(SLOTS + row).to(tl.int64)
    live = (slot >= 0) & (slot < n_slots)
    s = tl.where(live, slot, 0)
    offs_r = tl.arange(0, BLOCK_R)
    offs_j = tl.arange(0, BLOCK_RD)
    # adapter tiles first (never written by a step's kernels): B_gu's gate and up blocks and A_d's block
    b_mask = mask[:, None] & (offs_r[None, :] < tl.where(live, R, 0))
    b_row = B_GU + s * stride_bs + offs[:, None] * stride_bn + offs_r[None, :] * stride_br
    b_gate = tl.load(b_row, mask=b_mask, other=0.0)
    b_up = tl.load(b_row + F * stride_bn, mask=b_mask, other=0.0)
    rank_d = tl.where(live, tl.minimum(tl.load(RANK_D + s * stride_rds).to(tl.int32), RD), 0)
    a_mask = (offs_j < rank_d)[:, None] & mask[None, :]
    a = tl.load(A_D + s * stride_as + offs_j[:, None] * stride_ar + offs[None, :] * stride_ak, mask=a_mask, other=0.0)
    pdl_enter(PDL)

    gu_row = GU + row.to(tl.int64) * stride_gum
    g = tl.load(gu_row + offs, mask=mask, other=0.0)
    u = tl.load(gu_row + F + offs, mask=mask, other=0.0)
    part_row = PART_GU + row.to(tl.int64) * stride_pgm
    scale_row, rank_row = SCALE_GU + s * stride_ss, RANK_GU + s * stride_rs
    low_g, rank_g = live_segment_low(part_row, stride_pgs, scale_row, rank_row, live, 0, R, BLOCK_R, SPLIT)
    low_u, rank_u = live_segment_low(part_row, stride_pgs, scale_row, rank_row, live, 1, R, BLOCK_R, SPLIT)
    # columns of B beyond a segment's rank may hold anything (NaN): zeroed, as the grouped expand does
    d_gate = tl.sum(tl.where(offs_r[None, :] < rank_g, b_gate.to(tl.float32), 0.0) * low_g[None, :], axis=1)
    d_up = tl.sum(tl.where(offs_r[None, :] < rank_u, b_up.to(tl.float32), 0.0) * low_u[None, :], axis=1)
    dtype = GU.dtype.element_ty
    # as the unfused path: the delta stored in gu's dtype, then added in float32 and rounded
    g = (g.to(tl.float32) + d_gate.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    u = (u.to(tl.float32) + d_up.to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
    act = (g * tl.sigmoid(g) * u).to(H.dtype.element_ty)
    tl.store(H + row.to(tl.int64) * stride_hm + offs, act, mask=mask)

    # the down shrink over this column block: act rounded to the adapters' dtype, products in float32
    x = act.to(A_D.dtype.element_ty).to(tl.float32)
    part = tl.sum(tl.where(a_mask, a.to(tl.float32), 0.0) * x[None, :], axis=1)
    tl.store(PART_D + blk * stride_pds + row.to(tl.int64) * stride_pdm + offs_j, part, mask=offs_j < tl.where(live, RD, 0))


def swiglu_lora_blocks(F: int) -> tuple[int, int]:
    """(BLOCK, number of column blocks) for an MLP width F: the split count of the down planes."""
    block = max(16, min(CONFIG["block"], triton.next_power_of_2(F)))
    return block, triton.cdiv(F, block)


def swiglu_lora_triton(gate_up, part_gu, B_gu, scaling_gu, rank_gu, A_d, rank_d, slot_of_row):
    """Shapes as ``lorakit.kernels.swiglu_lora.swiglu_lora`` (already validated); returns (act, part_d)."""
    T, F = gate_up.shape[0], gate_up.shape[1] // 2
    slots, _, R = B_gu.shape
    RD = A_d.shape[1]
    block, n_blocks = swiglu_lora_blocks(F)
    act = torch.empty(T, F, dtype=gate_up.dtype, device=gate_up.device)
    part_d = torch.empty(n_blocks, T, RD, dtype=torch.float32, device=gate_up.device)  # planes of live rows stored
    if T == 0:
        return act, part_d
    pdl = pdl_on(gate_up)
    _swiglu_lora_kernel[(T, n_blocks)](
        gate_up, part_gu, B_gu, scaling_gu, rank_gu, A_d, rank_d, slot_of_row, act, part_d,
        F, slots,
        gate_up.stride(0), part_gu.stride(0), part_gu.stride(1), B_gu.stride(0), B_gu.stride(1), B_gu.stride(2),
        scaling_gu.stride(0), rank_gu.stride(0), A_d.stride(0), A_d.stride(1), A_d.stride(2), rank_d.stride(0),
        act.stride(0), part_d.stride(0), part_d.stride(1),
        R=R, BLOCK_R=triton.next_power_of_2(R), SPLIT=part_gu.shape[0], RD=RD, BLOCK_RD=triton.next_power_of_2(RD),
        BLOCK=block, PDL=pdl, num_warps=CONFIG["num_warps"], **pdl_launch(pdl),
    )
    return act, part_d
