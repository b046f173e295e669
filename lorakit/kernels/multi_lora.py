"""Many LoRA adapters in one batch: each row (token) of ``x`` uses its own adapter slot of a stacked pool.

    delta[i] = scaling[s_i] * (x[i] @ A[s_i, :rank[s_i]].T) @ B[s_i, :, :rank[s_i]].T      if s_i >= 0
    delta[i] = 0                                                                              if s_i == -1

Shapes: x (T, in); A_stack (slots, r_max, in); B_stack (slots, out, r_max); scalings (slots,); slot_of_row (T,)
int; ranks (slots,) int or None (None: all r_max rows count; padded rows of A / columns of B are zero anyway).

This file holds the spec (``multi_lora_delta_reference``, plain PyTorch: group rows by slot, loop), the row plan
the Triton kernels consume (``RowPlan``: rows sorted by slot, cut into tiles of one slot each), and the dispatcher
(``multi_lora_delta`` / ``multi_lora_add_``) that picks the Triton SGMV kernels (``kernels/triton/sgmv.py``) at
call time via ``triton_usable``. The dispatcher is inference-only: when autograd would need gradients it uses the
reference, which autograd differentiates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from lorakit.errors import LorakitError
from lorakit.kernels._triton import triton_usable

__all__ = ["RowPlan", "plan_rows", "plan_rows_device", "multi_lora_delta", "multi_lora_add_", "multi_lora_delta_reference", "check_stack_args"]


def check_stack_args(x, A_stack, B_stack, scalings, slot_of_row=None, ranks=None) -> None:
    """Raise LorakitError (one line) when the shapes do not fit together."""
    if x.dim() != 2:
        raise LorakitError(f"multi-LoRA input must be 2-D (tokens, in_features), got shape {tuple(x.shape)}; flatten the batch first")
    if A_stack.dim() != 3 or B_stack.dim() != 3:
        raise LorakitError(
            f"A_stack must be (slots, r_max, in) and B_stack (slots, out, r_max); got {tuple(A_stack.shape)} and {tuple(B_stack.shape)}"
        )
    slots, r_max, d_in = A_stack.shape
    if x.shape[1] != d_in:
        raise LorakitError(f"input has {x.shape[1]} features but A_stack expects in_features={d_in} (shape {tuple(A_stack.shape)})")
    if B_stack.shape[0] != slots or B_stack.shape[2] != r_max:
        raise LorakitError(f"B_stack shape {tuple(B_stack.shape)} does not match A_stack {tuple(A_stack.shape)}: expected ({slots}, out, {r_max})")
    if scalings.shape != (slots,):
        raise LorakitError(f"scalings must have shape ({slots},), got {tuple(scalings.shape)}")
    if ranks is not None and ranks.shape != (slots,):
        raise LorakitError(f"ranks must have shape ({slots},), got {tuple(ranks.shape)}")
    if slot_of_row is not None and slot_of_row.shape != (x.shape[0],):
        raise LorakitError(f"slot_of_row must have shape ({x.shape[0]},) (one slot per row), got {tuple(slot_of_row.shape)}")


def multi_lora_delta_reference(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    scalings: torch.Tensor,
    slot_of_row: torch.Tensor,
    ranks: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec. x (T, in) -> delta (T, out) in x's dtype; math in the stack's dtype, as PEFT does it.

    Rows whose slot is -1 get exactly zero. Each slot's rows are gathered, run through ``(x A^T) B^T * scaling``
    and scattered back, so autograd differentiates it (with respect to x and the stacks).
    """
    check_stack_args(x, A_stack, B_stack, scalings, slot_of_row, ranks)
    slots = A_stack.shape[0]
    slot_cpu = slot_of_row.detach().to("cpu", torch.long)
    if slot_cpu.numel() and (int(slot_cpu.max()) >= slots or int(slot_cpu.min()) < -1):
        raise LorakitError(f"slot_of_row holds {int(slot_cpu.min())}..{int(slot_cpu.max())}; valid slots are -1 (no adapter) and 0..{slots - 1}")
    ranks_cpu = None if ranks is None else ranks.detach().to("cpu", torch.long)
    delta = x.new_zeros(x.shape[0], B_stack.shape[1])
    for slot in torch.unique(slot_cpu).tolist():
        if slot < 0:
            continue
        rows = (slot_cpu == slot).nonzero().squeeze(1).to(x.device)
        r = A_stack.shape[1] if ranks_cpu is None else int(ranks_cpu[slot])
        a, b = A_stack[slot, :r], B_stack[slot, :, :r]  # (r, in), (out, r)
        low = (x.index_select(0, rows).to(a.dtype) @ a.t()) @ b.t() * scalings[slot].to(a.dtype)
        delta = delta.index_copy(0, rows, low.to(delta.dtype))
    return delta


@dataclass(frozen=True)
class RowPlan:
    """Rows grouped by slot, cut into tiles of at most ``block_m`` rows that all use one slot.

    row_order (T_active,) int32: indices of the rows with an adapter, grouped by slot (rows with -1 are left out,
    so they cost nothing). tiles (3, n_tiles) int32: per tile, its start and end offsets into row_order and its slot.
    Built once per batch and reused by every layer whose slot table agrees (the plan does not depend on the layer).
    ``plan_rows_device`` builds the same live tiles on the device with a fixed count T (empty tiles have
    start = end, and its row_order (T,) lists the rows without adapter last); max_segment is -1 there (unknown).
    """

    num_rows: int
    row_order: torch.Tensor
    tiles: torch.Tensor
    block_m: int
    max_segment: int
    covers_all: bool = False  # every row has an adapter (known on the host; False when unknown)

    @property
    def n_tiles(self) -> int:
        return self.tiles.shape[1]


def _block_m_for(max_segment: int) -> int:
    # Decode (one row per request) gives segments of 1-8 rows: a 16-row tile (tl.dot's minimum) reads each adapter
    # once per segment. Prefill segments are long: 64-row tiles amortise the adapter reads over more tokens.
    return 16 if max_segment <= 16 else 64


def plan_rows(slot_of_row: torch.Tensor | Sequence[int], device: torch.device | str | None = None, block_m: int | None = None) -> RowPlan:
    """Group rows by slot (stable: rows keep their order inside a slot) and cut the groups into tiles.

    slot_of_row (T,) int (tensor or list); -1 marks a row without adapter. Computed on the CPU (a GPU tensor is
    copied to the host once), then moved to ``device`` (default: slot_of_row's device) in one copy.
    """
    if isinstance(slot_of_row, torch.Tensor):
        device = slot_of_row.device if device is None else device
        slots = slot_of_row.detach().to("cpu", torch.long)
    else:
        slots = torch.as_tensor(list(slot_of_row), dtype=torch.long)
    device = torch.device(device if device is not None else "cpu")
    if slots.dim() != 1:
        raise LorakitError(f"slot_of_row must be 1-D (one slot per row), got shape {tuple(slots.shape)}")
    if slots.numel() and int(slots.min()) < -1:
        raise LorakitError(f"slot_of_row holds {int(slots.min())}; slots are -1 (no adapter) or >= 0")
    active = (slots >= 0).nonzero().squeeze(1)
    order = active[torch.sort(slots[active], stable=True).indices]
    seg_slot, seg_len = torch.unique_consecutive(slots[order], return_counts=True)
    max_segment = int(seg_len.max()) if seg_len.numel() else 0
    bm = block_m or _block_m_for(max_segment)
    seg_start = torch.cumsum(seg_len, 0) - seg_len
    tiles_per_seg = (seg_len + bm - 1) // bm
    tile_seg = torch.repeat_interleave(torch.arange(seg_len.numel()), tiles_per_seg)
    first_tile = torch.cumsum(tiles_per_seg, 0) - tiles_per_seg
    tile_start = seg_start[tile_seg] + (torch.arange(tile_seg.numel()) - first_tile[tile_seg]) * bm
    tile_end = (seg_start + seg_len)[tile_seg]
    tiles = torch.stack([tile_start, tile_end, seg_slot[tile_seg]]).to(torch.int32)
    return RowPlan(
        num_rows=slots.numel(),
        row_order=order.to(torch.int32).to(device, non_blocking=True),
        tiles=tiles.to(device, non_blocking=True),
        block_m=bm,
        max_segment=max_segment,
        covers_all=order.numel() == slots.numel(),
    )


def plan_rows_device(slot_of_row: torch.Tensor, block_m: int = 16) -> RowPlan:
    """``plan_rows`` built with device ops only: no host sync, fixed shapes, so it may run inside a CUDA graph.

    slot_of_row (T,) int on any device; -1 marks a row without adapter. The plan always has T tiles (the host
    plan's count is data-dependent): tile j is live when sorted position j starts a block of ``block_m`` rows of
    one slot, and then equals the host plan's tile; the others are empty (start = end = 0, slot -1) and the
    kernels skip them. row_order (T,) holds the rows with an adapter grouped by slot (stable), as in the host
    plan, followed by the rows without. Meant for decode (T = batch, block_m 16): T tiles are cheap there; for
    prefill the host plan's few long tiles launch far fewer programs.
    """
    if slot_of_row.dim() != 1:
        raise LorakitError(f"slot_of_row must be 1-D (one slot per row), got shape {tuple(slot_of_row.shape)}")
    T = slot_of_row.numel()
    slots = slot_of_row.to(torch.long)
    none = torch.iinfo(torch.int32).max  # rows without adapter sort last
    key = torch.where(slots < 0, torch.full_like(slots, none), slots)
    sorted_key, order = torch.sort(key, stable=True)
    index = torch.arange(T, device=slots.device)
    seg_start = torch.searchsorted(sorted_key, sorted_key, right=False)
    seg_end = torch.searchsorted(sorted_key, sorted_key, right=True)
    live = ((index - seg_start) % block_m == 0) & (sorted_key != none)
    zero = torch.zeros_like(index)
    tiles = torch.stack([
        torch.where(live, index, zero),
        torch.where(live, seg_end, zero),  # the segment's end, as on the host: the kernels take block_m rows from start
        torch.where(live, sorted_key, zero - 1),
    ]).to(torch.int32)
    return RowPlan(num_rows=T, row_order=order.to(torch.int32), tiles=tiles, block_m=block_m, max_segment=-1)


def plan_batch(slot_of_sequence: Sequence[int], seq_len: int, device: torch.device | str) -> RowPlan:
    """Plan for a (batch, seq_len) input flattened to rows: sequence b's tokens all use slot_of_sequence[b]."""
    slots = torch.as_tensor(list(slot_of_sequence), dtype=torch.long).repeat_interleave(seq_len)
    return plan_rows(slots, device=device)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def multi_lora_add_(
    y: torch.Tensor,
    x: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    scalings: torch.Tensor,
    ranks: torch.Tensor,
    plan: RowPlan,
    accumulate: bool = True,
) -> torch.Tensor:
    """In place: y (T, out) += multi-LoRA delta of x (T, in), rows planned by ``plan``. Returns y.

    The fast path for inference (no autograd). Rows without adapter are never read or written. Uses the Triton
    SGMV kernels when ``triton_usable``, else the reference (rebuilding slot_of_row from the plan).
    ``accumulate=False``: the planned rows of y are overwritten with the delta (y is not read there).
    """
    check_stack_args(x, A_stack, B_stack, scalings, None, ranks)
    if y.shape != (x.shape[0], B_stack.shape[1]):
        raise LorakitError(f"output must have shape ({x.shape[0]}, {B_stack.shape[1]}), got {tuple(y.shape)}")
    if plan.num_rows != x.shape[0]:
        raise LorakitError(f"the row plan covers {plan.num_rows} rows but the input has {x.shape[0]}; build the plan for this batch")
    if plan.n_tiles == 0:
        return y
    if triton_usable(y, x, A_stack, B_stack, scalings, ranks, plan.row_order) and not _needs_grad(x, A_stack, B_stack, scalings):
        from lorakit.kernels.triton.sgmv import sgmv_expand_add_, sgmv_shrink

        low = sgmv_shrink(x, A_stack, scalings, ranks, plan, partials=True)  # (split, T, r_max): no memset
        sgmv_expand_add_(y, low, B_stack, ranks, plan, accumulate=accumulate)
        return y
    slot_of_row = slot_of_row_from_plan(plan, x.device)
    delta = multi_lora_delta_reference(x, A_stack, B_stack, scalings, slot_of_row, ranks).to(y.dtype)
    if accumulate:
        y += delta
    else:
        planned = slot_of_row >= 0
        y[planned] = delta[planned]
    return y


def slot_of_row_from_plan(plan: RowPlan, device: torch.device | str = "cpu") -> torch.Tensor:
    """Invert a plan: (T,) long, -1 for rows the plan leaves out."""
    tiles = plan.tiles.to("cpu", torch.long)
    order = plan.row_order.to("cpu", torch.long)
    slots = torch.full((plan.num_rows,), -1, dtype=torch.long)
    for start, end, slot in tiles.t().tolist():
        slots[order[start : min(end, start + plan.block_m)]] = slot
    return slots.to(device)


def multi_lora_delta(
    x: torch.Tensor,
    A_stack: torch.Tensor,
    B_stack: torch.Tensor,
    scalings: torch.Tensor,
    slot_of_row: torch.Tensor,
    ranks: torch.Tensor | None = None,
    plan: RowPlan | None = None,
) -> torch.Tensor:
    """x (T, in) -> delta (T, out) in x's dtype; the dispatcher over the Triton kernels and the reference.

    Gradients (autograd enabled and an input requires grad) go through the reference. ``plan`` (from
    ``plan_rows``) can be passed to skip grouping the rows again; it must describe ``slot_of_row``.
    """
    check_stack_args(x, A_stack, B_stack, scalings, slot_of_row, ranks)
    if _needs_grad(x, A_stack, B_stack, scalings) or not triton_usable(x, A_stack, B_stack, scalings, slot_of_row):
        return multi_lora_delta_reference(x, A_stack, B_stack, scalings, slot_of_row, ranks)
    if ranks is None:
        ranks = torch.full((A_stack.shape[0],), A_stack.shape[1], dtype=torch.int32, device=x.device)
    plan = plan or plan_rows(slot_of_row)
    if slot_of_row.numel() and int(slot_of_row.max()) >= A_stack.shape[0]:
        raise LorakitError(f"slot_of_row holds slot {int(slot_of_row.max())} but the stack has {A_stack.shape[0]} slots (0..{A_stack.shape[0] - 1})")
    y = x.new_zeros(x.shape[0], B_stack.shape[1])
    return multi_lora_add_(y, x, A_stack, B_stack, scalings, ranks, plan)
