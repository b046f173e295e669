"""A decode step's MLP middle with its LoRA: gate/up expand + SwiGLU + down shrink, for rows with adapter slots.

In a static decode step (``lorakit.decoding.StaticDecoder``) the MLP is

    gu = x W_gu^T                       (T, 2F)  one GEMM; beside it the gate/up shrink -> part_gu
    act = silu(g) * u                   (T, F)   g, u = the halves of gu + the gate/up LoRA delta
    h += act W_d^T + down LoRA delta             one GEMM; beside it the down expand from part_d

``swiglu_lora`` is the middle line together with the gate/up expand before it and the down shrink after it:
one kernel instead of three (``kernels/triton/swiglu_lora.py``). Inference only.

Shapes (slots S, ranks R, R_d; planes P, P_d):
    gate_up (T, 2F)                 unit column stride; gate in columns :F, up in F:
    part_gu (P, T, 2R) float32      the gate/up shrink's planes (``grouped_shrink``), summed over P
    B_gu (S, 2F, R), scaling_gu (S, 2) float, rank_gu (S, 2) int     the gate/up ``GroupStack``'s B, scaling, rank
    A_d (S, R_d, F), rank_d (S, 1) int                              the down ``GroupStack``'s A and rank
    slot_of_row (T,) int            -1 (or outside 0..S-1): no adapter on that row
Returns act (T, F) in gate_up's dtype and part_d (P_d, T, R_d) float32, the down shrink's planes (rows with an
adapter; the others' planes hold anything), for ``grouped_expand_`` with the down stack.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.errors import LorakitError
from lorakit.kernels._triton import interpreter_on, triton_usable
from lorakit.kernels.grouped_lora import MAX_TRITON_RANK, grouped_expand_reference_, grouped_shrink_reference

__all__ = ["swiglu_lora", "swiglu_lora_reference"]


def _check(gate_up, part_gu, B_gu, scaling_gu, rank_gu, A_d, rank_d, slot_of_row) -> None:
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise LorakitError(f"swiglu_lora's gate_up must be (T, 2F), got {tuple(gate_up.shape)}")
    T, F2 = gate_up.shape
    S, N, R = B_gu.shape
    if N != F2 or part_gu.dim() != 3 or part_gu.shape[1:] != (T, 2 * R):
        raise LorakitError(f"swiglu_lora: B_gu {tuple(B_gu.shape)} and part_gu {tuple(part_gu.shape)} do not fit gate_up "
                           f"{tuple(gate_up.shape)} (expected (S, {F2}, R) and (P, {T}, 2R))")
    if scaling_gu.shape != (S, 2) or rank_gu.shape != (S, 2):
        raise LorakitError(f"swiglu_lora: scaling_gu and rank_gu must be ({S}, 2), got {tuple(scaling_gu.shape)} and "
                           f"{tuple(rank_gu.shape)}")
    if A_d.dim() != 3 or A_d.shape[0] != S or A_d.shape[2] != F2 // 2 or rank_d.shape != (S, 1):
        raise LorakitError(f"swiglu_lora: A_d must be ({S}, R_d, {F2 // 2}) and rank_d ({S}, 1), got {tuple(A_d.shape)} "
                           f"and {tuple(rank_d.shape)}")
    if slot_of_row.shape != (T,):
        raise LorakitError(f"swiglu_lora: slot_of_row must be ({T},), got {tuple(slot_of_row.shape)}")


def swiglu_lora_reference(gate_up, part_gu, B_gu, scaling_gu, rank_gu, A_d, rank_d, slot_of_row):
    """The spec, as the unfused decode path computes it: the gate/up delta stored in gate_up's dtype and added,
    SwiGLU in float32 rounded to gate_up's dtype, then the down shrink of that (one plane)."""
    _check(gate_up, part_gu, B_gu, scaling_gu, rank_gu, A_d, rank_d, slot_of_row)
    half = gate_up.shape[1] // 2
    delta = torch.empty_like(gate_up)
    grouped_expand_reference_(delta, part_gu, B_gu, scaling_gu, rank_gu, slot_of_row, [half, half], accumulate=False)
    gu = (gate_up.float() + delta.float()).to(gate_up.dtype).float()
    act = (F.silu(gu[:, :half]) * gu[:, half:]).to(gate_up.dtype)
    return act, grouped_shrink_reference(act, A_d, rank_d, slot_of_row, 1)


def swiglu_lora(gate_up, part_gu, B_gu, scaling_gu, rank_gu, A_d, rank_d, slot_of_row):
    """(act, part_d) of the module docstring: one Triton kernel when ``triton_usable`` (float32/float16/bfloat16;
    not bf16 under the interpreter; ranks <= 128), else the reference."""
    _check(gate_up, part_gu, B_gu, scaling_gu, rank_gu, A_d, rank_d, slot_of_row)
    usable = (
        gate_up.stride(1) == 1
        and triton_usable(gate_up, part_gu, B_gu, scaling_gu, rank_gu, A_d, rank_d, slot_of_row)
        and {gate_up.dtype, B_gu.dtype, A_d.dtype} <= {torch.float32, torch.float16, torch.bfloat16}
        and not (interpreter_on() and torch.bfloat16 in {gate_up.dtype, B_gu.dtype, A_d.dtype})
        and max(B_gu.shape[2], A_d.shape[1]) <= MAX_TRITON_RANK
    )
    if not usable:
        return swiglu_lora_reference(gate_up, part_gu, B_gu, scaling_gu, rank_gu, A_d, rank_d, slot_of_row)
    from lorakit.kernels.triton.swiglu_lora import swiglu_lora_triton

    return swiglu_lora_triton(gate_up, part_gu, B_gu, scaling_gu.contiguous(), rank_gu.contiguous(), A_d,
                              rank_d.contiguous(), slot_of_row)
