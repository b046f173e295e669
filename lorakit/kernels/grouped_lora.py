"""Grouped multi-LoRA for decode: G projections that share one input (q,k,v; gate,up; o; down) in one call.

Every row t of the batch uses its own adapter slot s = slot_of_row[t] (-1: no adapter), and for each segment g
(one projection, output columns bounds[g] .. bounds[g+1]-1 of y) with r = rank[s, g]:

    y[t, bounds[g]:bounds[g+1]] += scaling[s, g] * (x[t] @ A[s, g*R : g*R+r].T) @ B[s, bounds[g]:bounds[g+1], :r].T

Shapes: x (T, K); y (T, N) with N = sum(out_splits) (any row stride, unit column stride: a view of a wider fused
output works); A (slots, G*R, K); B (slots, N, R); scaling (slots, G) float; rank (slots, G) int (0 = no adapter
on that segment); slot_of_row (T,) int. Rows of A / columns of B beyond a segment's rank are never read (they may
hold anything, NaN included). Rows with slot -1 are neither read nor written.

This file holds the spec (``grouped_lora_add_reference``, plain PyTorch, loops over segments and slots), the
dispatcher (``grouped_lora_add_``: the Triton kernels of ``kernels/triton/grouped_lora.py`` when
``triton_usable``, else the reference) and ``grouped_stack`` (builds the grouped buffers from per-projection
stacks such as ``lorakit.adapter_stack.LayerStack``'s). Inference only: nothing here is differentiable.
Triton is imported at call time only, so importing this module never compiles or launches a GPU kernel.

The Triton path is CUDA-graph safe: shapes and the split of the input dimension depend on (T, K, SM count) only,
the slot table and ranks are read on the device, nothing syncs the host. The reference syncs (it groups rows by
slot on the host), so a graph capture needs the Triton path.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch

from lorakit.errors import LorakitError
from lorakit.kernels._triton import triton_usable

__all__ = ["grouped_lora_add_", "grouped_lora_add_reference", "grouped_stack", "grouped_stack_from", "check_grouped_args",
           "grouped_shrink", "grouped_shrink_planes", "grouped_expand_", "grouped_shrink_reference", "grouped_expand_reference_"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_SEGMENTS = 4
MAX_TRITON_RANK = 128


def check_grouped_args(y, x, A, B, scaling, rank, slot_of_row, out_splits) -> list[int]:
    """Raise LorakitError (one line) when the shapes do not fit together; return the column bounds (G + 1 ints).

    Shapes only (no values: reading them would sync the host), since this runs 4x per layer per decode step.
    """
    G = len(out_splits)
    if not 1 <= G <= MAX_SEGMENTS:
        raise LorakitError(f"out_splits must list 1 to {MAX_SEGMENTS} output sizes (one per projection), got {len(out_splits)}")
    bounds = [0]
    for size in out_splits:
        bounds.append(bounds[-1] + int(size))
        if size <= 0:
            raise LorakitError(f"out_splits must hold positive output sizes, got {list(out_splits)}")
    if x.dim() != 2 or y.dim() != 2:
        raise LorakitError(f"x must be (T, K) and y (T, N); got x {tuple(x.shape)} and y {tuple(y.shape)}; flatten the batch first")
    T, K = x.shape
    N = bounds[-1]
    if y.shape != (T, N):
        raise LorakitError(f"y must have shape ({T}, {N}) (rows of x, sum of out_splits {list(out_splits)}), got {tuple(y.shape)}")
    if A.dim() != 3 or A.shape[2] != K or A.shape[1] % G:
        raise LorakitError(f"A must be (slots, G*R, K) = (slots, {G}*R, {K}), got {tuple(A.shape)}")
    slots, R = A.shape[0], A.shape[1] // G
    if B.shape != (slots, N, R):
        raise LorakitError(f"B must be (slots, N, R) = ({slots}, {N}, {R}) to match A {tuple(A.shape)} and out_splits, got {tuple(B.shape)}")
    if scaling.shape != (slots, G) or rank.shape != (slots, G):
        raise LorakitError(f"scaling and rank must be (slots, G) = ({slots}, {G}), got {tuple(scaling.shape)} and {tuple(rank.shape)}")
    if slot_of_row.shape != (T,):
        raise LorakitError(f"slot_of_row must have shape ({T},) (one slot per row of x), got {tuple(slot_of_row.shape)}")
    if not (x.is_floating_point() and y.is_floating_point() and A.is_floating_point() and B.is_floating_point()):
        raise LorakitError(f"x, y, A and B must be floating-point tensors, got x {x.dtype}, y {y.dtype}, A {A.dtype}, B {B.dtype}")
    if rank.dtype.is_floating_point or slot_of_row.dtype.is_floating_point:
        raise LorakitError(f"rank and slot_of_row must be integer tensors, got {rank.dtype} and {slot_of_row.dtype}")
    if y.shape[1] > 1 and y.stride(1) != 1:
        raise LorakitError(f"y must have unit column stride (a row-strided view is fine), got strides {tuple(y.stride())}")
    return bounds


def grouped_lora_add_reference(y, x, A, B, scaling, rank, slot_of_row, out_splits, *, accumulate: bool = True) -> torch.Tensor:
    """The spec, in place: y (T, N) += (or, accumulate=False, =) the grouped delta of x (T, K); returns y.
    Arguments as ``grouped_lora_add_``.

    Any floating dtypes (float64 too: a truth for checks). Math in the adapters' dtype, as PEFT and
    ``multi_lora_delta_reference`` do it (x cast to A's dtype; the low-rank product cast to B's dtype); only rows
    with a slot and segments with rank > 0 are touched. Groups rows by slot on the host (syncs), and raises
    LorakitError for a slot outside -1..slots-1 or a rank outside 0..R.
    """
    bounds = check_grouped_args(y, x, A, B, scaling, rank, slot_of_row, out_splits)
    G = len(bounds) - 1
    slots, R = A.shape[0], A.shape[1] // G
    slot_cpu = slot_of_row.detach().to("cpu", torch.long)
    if slot_cpu.numel() and (int(slot_cpu.max()) >= slots or int(slot_cpu.min()) < -1):
        raise LorakitError(f"slot_of_row holds {int(slot_cpu.min())}..{int(slot_cpu.max())}; valid slots are -1 (no adapter) and 0..{slots - 1}")
    rank_cpu = rank.detach().to("cpu", torch.long)
    if rank_cpu.numel() and (int(rank_cpu.max()) > R or int(rank_cpu.min()) < 0):
        raise LorakitError(f"rank holds {int(rank_cpu.min())}..{int(rank_cpu.max())}; each segment's rank must be 0..R={R}")
    with torch.no_grad():
        if not accumulate:
            y.zero_()
        for slot in torch.unique(slot_cpu).tolist():
            if slot < 0:
                continue
            rows = (slot_cpu == slot).nonzero().squeeze(1).to(x.device)
            xs = x.index_select(0, rows)
            for g in range(G):
                r = int(rank_cpu[slot, g])
                if r == 0:
                    continue
                c0, c1 = bounds[g], bounds[g + 1]
                a, b = A[slot, g * R : g * R + r], B[slot, c0:c1, :r]  # (r, K), (N_g, r): padding never read
                low = xs.to(a.dtype) @ a.t()  # (rows, r)
                delta = (low.to(b.dtype) @ b.t()) * scaling[slot, g].to(b.dtype)  # (rows, N_g)
                y[rows, c0:c1] += delta.to(y.dtype)
    return y


def grouped_lora_add_(y, x, A, B, scaling, rank, slot_of_row, out_splits, *, split_k: int | None = None,
                      accumulate: bool = True) -> torch.Tensor:
    """In place: y (T, N) += the grouped multi-LoRA delta of x (T, K); returns y. Inference only.

    Args:
        y: (T, N), N = sum(out_splits); any row stride (a view of a wider buffer), unit column stride.
        x: (T, K) input rows (one token per request in decode).
        A: (slots, G*R, K); segment g of slot s uses rows g*R .. g*R + rank[s, g] - 1.
        B: (slots, N, R); output column c of segment g uses B[s, c, :rank[s, g]].
        scaling: (slots, G) float32; rank: (slots, G) int32 (0 = no adapter on that segment).
        slot_of_row: (T,) int32 on x's device; -1 = no adapter (that row of y is not read or written).
        out_splits: the G (1..4) output sizes, e.g. [4096, 1024, 1024] for q, k, v.
        split_k: force the Triton shrink's number of input-dimension splits (tests; None = from T, K, SM count).
        accumulate: False stores the delta instead (y = delta; rows without an adapter get zeros), so y may come
            from ``torch.empty``: the decoder computes the LoRA side by side with the base GEMM this way.

    x, y, A and B may be float32, float16 or bfloat16 independently; x is cast to A's dtype for the products,
    which accumulate in float32 on the Triton path; y is updated in its own dtype. The Triton kernels run when
    ``triton_usable`` (R <= 128); they treat a slot outside 0..slots-1 as "no adapter" (checking would sync).
    """
    bounds = check_grouped_args(y, x, A, B, scaling, rank, slot_of_row, out_splits)
    if x.dtype not in _DTYPES or y.dtype not in _DTYPES or A.dtype not in _DTYPES or B.dtype not in _DTYPES:
        raise LorakitError(f"grouped LoRA takes float32/float16/bfloat16 tensors, got x {x.dtype}, y {y.dtype}, A {A.dtype}, B {B.dtype} "
                           "(float64 only through grouped_lora_add_reference)")
    if triton_usable(y, x, A, B, scaling, rank, slot_of_row):
        if A.shape[1] // (len(bounds) - 1) > MAX_TRITON_RANK:
            raise LorakitError(f"the grouped kernels support R <= {MAX_TRITON_RANK}, got A {tuple(A.shape)} with {len(bounds) - 1} segments; "
                               "use the reference (LORAKIT_DISABLE_TRITON=1)")
        from lorakit.kernels.triton.grouped_lora import grouped_lora_add_triton_

        # (slots, G) is tiny: contiguous() is a no-op when it already is, and the kernels index it as rows of G
        return grouped_lora_add_triton_(y, x, A, B, scaling.contiguous(), rank.contiguous(), slot_of_row, bounds, split_k,
                                        accumulate)
    return grouped_lora_add_reference(y, x, A, B, scaling, rank, slot_of_row, out_splits, accumulate=accumulate)


def grouped_shrink_reference(x, A, rank, slot_of_row, G: int) -> torch.Tensor:
    """The shrink half alone, as the spec: part (1, T, G*R) float32 with part[0, t, j] = x[t] . A[s, j] for rows
    with a slot s and j within its segment's rank (x rounded to A's dtype, products in float32), zero elsewhere."""
    T = x.shape[0]
    slots, GR, _ = A.shape
    R = GR // G
    part = torch.zeros(1, T, GR, dtype=torch.float32, device=x.device)
    for t, s in enumerate(slot_of_row.detach().to("cpu", torch.long).tolist()):
        if 0 <= s < slots:
            live = (torch.arange(GR, device=x.device) % R) < rank[s].to(x.device).repeat_interleave(R)
            low = A[s].float() @ x[t].to(A.dtype).float()
            part[0, t] = torch.where(live, low, 0.0)
    return part


def grouped_expand_reference_(y, part, B, scaling, rank, slot_of_row, out_splits, *, accumulate: bool = True):
    """The expand half alone, as the spec: y (T, N) += (or, accumulate=False, =) the deltas from the shrink's
    planes ``part`` (P, T, G*R) (summed over P), in float32, rounded to y's dtype once. Returns y."""
    G = len(out_splits)
    slots, N, R = B.shape
    low = part.sum(0)  # (T, G*R)
    bounds = [0, *itertools.accumulate(int(n) for n in out_splits)]
    with torch.no_grad():
        for t, s in enumerate(slot_of_row.detach().to("cpu", torch.long).tolist()):
            if not 0 <= s < slots:
                if not accumulate:
                    y[t].zero_()
                continue
            delta = torch.zeros(N, dtype=torch.float32, device=y.device)
            for g in range(G):
                r = int(rank[s, g])
                c0, c1 = bounds[g], bounds[g + 1]
                if r:
                    delta[c0:c1] = B[s, c0:c1, :r].float() @ (low[t, g * R:g * R + r] * float(scaling[s, g]))
            y[t] = (delta + (y[t].float() if accumulate else 0.0)).to(y.dtype)
    return y


def grouped_shrink_planes(x, A) -> int:
    """The number of planes P that ``grouped_shrink(x, A, ...)`` returns (from the shapes and the SM count only),
    so that a caller can allocate ``out`` on the stream that will read it."""
    if triton_usable(x, A):
        from lorakit.kernels.triton.grouped_lora import shrink_blocks

        return shrink_blocks(x.shape[0], x.shape[1], A.shape[1], x.device, None)[1]
    return 1


def grouped_shrink(x, A, rank, slot_of_row, G: int, split_k: int | None = None, out=None) -> torch.Tensor:
    """The shrink half of ``grouped_lora_add_``: part (P, T, G*R) float32 planes whose sum over P is x . A[slot]
    per row with an adapter (planes of other rows: anything). The Triton kernel when ``triton_usable``, else the
    reference. Shapes as ``grouped_lora_add_`` (unchecked: the caller checked them once); split_k as there.
    out: optional (P, T, G*R) float32 to write into (P from ``grouped_shrink_planes``; split_k must be None)."""
    if triton_usable(x, A, rank, slot_of_row):
        from lorakit.kernels.triton.grouped_lora import grouped_shrink_triton

        return grouped_shrink_triton(x, A, rank, slot_of_row, G, split_k, out)
    part = grouped_shrink_reference(x, A, rank, slot_of_row, G)
    return part if out is None else out.copy_(part)


def grouped_expand_(y, part, B, scaling, rank, slot_of_row, out_splits, *, accumulate: bool = True) -> torch.Tensor:
    """The expand half of ``grouped_lora_add_`` from a shrink's planes (P, T, G*R) (``grouped_shrink``); y (T, N).
    Returns y."""
    if triton_usable(y, part, B, scaling, rank, slot_of_row):
        from lorakit.kernels.triton.grouped_lora import grouped_expand_triton_

        bounds = [0, *itertools.accumulate(int(n) for n in out_splits)]
        return grouped_expand_triton_(y, part, B, scaling.contiguous(), rank.contiguous(), slot_of_row, bounds, accumulate)
    return grouped_expand_reference_(y, part, B, scaling, rank, slot_of_row, out_splits, accumulate=accumulate)


def grouped_stack(
    As: Sequence[torch.Tensor],
    Bs: Sequence[torch.Tensor],
    scalings: Sequence[torch.Tensor],
    ranks: Sequence[torch.Tensor],
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grouped buffers of G projections that share one input, from their per-projection stacks.

    Args:
        As: G tensors (slots, R_g, K) (e.g. ``LayerStack.lora_A`` of q, k, v).
        Bs: G tensors (slots, N_g, R_g).
        scalings: G tensors (slots,); ranks: G tensors (slots,) int.
        out: optional (A, B, scaling, rank) of the right shapes to fill in place (keeps the addresses a captured
            CUDA graph reads, e.g. after loading an adapter into a slot).
    Returns:
        A (slots, G*R, K), B (slots, N, R), scaling (slots, G) float32, rank (slots, G) int32 with R = max R_g and
        N = sum N_g, in As[0]'s dtype and device; ranks are padded with zeros up to R (never read: rank masks them).
        out_splits for ``grouped_lora_add_`` is ``[b.shape[1] for b in Bs]``.
    """
    G = len(As)
    if not 1 <= G <= MAX_SEGMENTS or not len(Bs) == len(scalings) == len(ranks) == G:
        raise LorakitError(f"grouped_stack needs 1 to {MAX_SEGMENTS} projections with one A, B, scaling and rank each, "
                           f"got {len(As)} A, {len(Bs)} B, {len(scalings)} scalings, {len(ranks)} ranks")
    slots, _, K = As[0].shape
    for g, (a, b, s, r) in enumerate(zip(As, Bs, scalings, ranks)):
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != slots or a.shape[2] != K or b.shape[0] != slots or b.shape[2] != a.shape[1]:
            raise LorakitError(f"projection {g}: A {tuple(a.shape)} / B {tuple(b.shape)} do not fit: expected ({slots}, r, {K}) / ({slots}, out, r)")
        if s.shape != (slots,) or r.shape != (slots,):
            raise LorakitError(f"projection {g}: scaling {tuple(s.shape)} and rank {tuple(r.shape)} must both be ({slots},)")
    R = max(a.shape[1] for a in As)
    N = sum(b.shape[1] for b in Bs)
    dtype, device = As[0].dtype, As[0].device
    shapes = [(slots, G * R, K), (slots, N, R), (slots, G), (slots, G)]
    if out is None:
        out = (torch.empty(shapes[0], dtype=dtype, device=device), torch.empty(shapes[1], dtype=dtype, device=device),
               torch.empty(shapes[2], dtype=torch.float32, device=device), torch.empty(shapes[3], dtype=torch.int32, device=device))
    elif [tuple(t.shape) for t in out] != shapes:
        raise LorakitError(f"out buffers have shapes {[tuple(t.shape) for t in out]}, expected {shapes}")
    A, B, scaling, rank = out
    with torch.no_grad():
        A.zero_()
        B.zero_()
        col = 0
        for g, (a, b) in enumerate(zip(As, Bs)):
            A[:, g * R : g * R + a.shape[1]].copy_(a)
            B[:, col : col + b.shape[1], : b.shape[2]].copy_(b)
            col += b.shape[1]
        scaling.copy_(torch.stack([s.to(device) for s in scalings], dim=1))
        rank.copy_(torch.stack([r.to(device) for r in ranks], dim=1))
    return A, B, scaling, rank


def grouped_stack_from(layers: Sequence, out=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """``grouped_stack`` over objects with ``lora_A``, ``lora_B``, ``scaling`` and ``rank`` (e.g. the q, k, v
    ``lorakit.adapter_stack.LayerStack``s of one layer, in output order); also returns out_splits."""
    A, B, scaling, rank = grouped_stack([l.lora_A for l in layers], [l.lora_B for l in layers],
                                        [l.scaling for l in layers], [l.rank for l in layers], out=out)
    return A, B, scaling, rank, [l.lora_B.shape[1] for l in layers]
