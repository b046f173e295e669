"""SwiGLU: ``h = silu(gate) * up`` (the Llama / Qwen / Mistral MLP's activation), forward and backward.

``swiglu_reference`` is the spec (``F.silu(gate) * up``, as transformers computes it). ``swiglu`` dispatches to the
Triton kernels (``kernels/triton/swiglu.py``) when ``triton_usable``: one pass forward, one backward, saving only
gate and up (the reference also keeps silu(gate)).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LorakitError
from lorakit.kernels._triton import interpreter_on, triton_usable


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) -> (..., I)."""
    return F.silu(gate) * up


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        from lorakit.kernels.triton.swiglu import swiglu_forward

        dtype = torch.promote_types(gate.dtype, up.dtype)
        gate, up = gate.to(dtype).contiguous(), up.to(dtype).contiguous()
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dh):
        from lorakit.kernels.triton.swiglu import swiglu_backward

        gate, up = ctx.saved_tensors
        dg, du = swiglu_backward(dh.to(gate.dtype).contiguous(), gate, up)
        return dg, du


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) of the same shape -> silu(gate) * up; fused when it can run, else the reference."""
    usable = (
        gate.shape == up.shape
        and triton_usable(gate, up)
        and {gate.dtype, up.dtype} <= {torch.float32, torch.float16, torch.bfloat16}
        and not (gate.device.type == "cpu" and interpreter_on() and torch.bfloat16 in {gate.dtype, up.dtype})
    )
    if usable:
        return SwiGLUFunction.apply(gate, up)
    return swiglu_reference(gate, up)


def swiglu_packed(gate_up: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up (T, 2F), the output of one GEMM over fused gate/up weights (gate in columns :F, up in F:) ->
    silu(gate) * up (T, F). Inference only (no autograd): one Triton kernel reading each row once, instead of the
    two copies that making the two column halves contiguous for ``swiglu`` would cost; else the reference.

    delta: None, or (T, 2F) added to gate_up first (rounded to gate_up's dtype, as ``gate_up + delta`` would be;
    the static decoder's LoRA deltas, computed beside the GEMM), read in the same pass.
    """
    return gated_packed("swiglu_packed", swiglu_reference, False, gate_up, delta)


def gated_packed(name: str, reference, gelu_tanh: bool, gate_up: torch.Tensor, delta: torch.Tensor | None):
    """The packed gated activations' shared body: checks, then the Triton kernel where it runs (silu, or the tanh
    GELU with ``gelu_tanh``), else ``reference(gate, up)`` on gate_up (+ delta). ``name``: the op, for errors."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise LorakitError(f"{name} takes (T, 2F), got shape {tuple(gate_up.shape)}")
    if delta is not None and delta.shape != gate_up.shape:
        raise LorakitError(f"{name}'s delta must have gate_up's shape {tuple(gate_up.shape)}, got {tuple(delta.shape)}")
    usable = (
        gate_up.stride(1) == 1
        and (delta is None or (delta.stride(1) == 1 and delta.device == gate_up.device))
        and triton_usable(gate_up)
        and gate_up.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and not (gate_up.device.type == "cpu" and interpreter_on() and gate_up.dtype == torch.bfloat16)
        and not (torch.is_grad_enabled() and gate_up.requires_grad)
    )
    F = gate_up.shape[1] // 2
    if usable:
        from lorakit.kernels.triton.swiglu import gated_packed_forward

        return gated_packed_forward(gate_up, delta, gelu_tanh)
    if delta is not None:
        gate_up = gate_up + delta.to(gate_up.dtype)
    return reference(gate_up[:, :F], gate_up[:, F:])


class FusedSwiGLUMLP(nn.Module):
    """``down_proj(silu(gate_proj(x)) * up_proj(x))`` with the fused activation.

    Takes over the three projection modules of a transformers MLP as they are (LoRA-wrapped or not), under the
    same names, so state-dict keys and adapter paths do not change.
    """

    def __init__(self, gate_proj: nn.Module, up_proj: nn.Module, down_proj: nn.Module):
        super().__init__()
        self.gate_proj = gate_proj
        self.up_proj = up_proj
        self.down_proj = down_proj

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
