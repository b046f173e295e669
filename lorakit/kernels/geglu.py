"""GeGLU with the tanh GELU: ``h = gelu_tanh(gate) * up``, the Gemma / Gemma 2 / Gemma 3 MLP's activation.

``geglu_reference`` is the spec, as transformers computes it (``F.gelu(gate, approximate="tanh") * up``, the
``gelu_pytorch_tanh`` activation). ``geglu_packed`` is the static decoder's inference op over the output of one
GEMM with fused gate/up weights: one Triton kernel (``kernels/triton/geglu.py``) when ``triton_usable``, else the
reference. The kernel rounds once (float32 math); the reference rounds the activation, then the product, so in
16-bit dtypes the two may differ by one ulp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.errors import LorakitError
from lorakit.kernels._triton import interpreter_on, triton_usable


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) -> (..., I)."""
    return F.gelu(gate, approximate="tanh") * up


def geglu_packed(gate_up: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up (T, 2F), gate in columns :F, up in F: -> gelu_tanh(gate) * up (T, F). Inference only (no autograd).

    delta: None, or (T, 2F) added to gate_up first (rounded to gate_up's dtype, as ``gate_up + delta`` would be),
    read in the same pass (the static decoder's LoRA deltas, computed beside the GEMM).
    """
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise LorakitError(f"geglu_packed takes (T, 2F), got shape {tuple(gate_up.shape)}")
    if delta is not None and delta.shape != gate_up.shape:
        raise LorakitError(f"geglu_packed's delta must have gate_up's shape {tuple(gate_up.shape)}, got {tuple(delta.shape)}")
    usable = (
        gate_up.stride(1) == 1
        and (delta is None or (delta.stride(1) == 1 and delta.device == gate_up.device))
        and triton_usable(gate_up)
        and gate_up.dtype in (torch.float32, torch.float16, torch.bfloat16)
        and not (gate_up.device.type == "cpu" and interpreter_on() and gate_up.dtype == torch.bfloat16)
        and not (torch.is_grad_enabled() and gate_up.requires_grad)
    )
    width = gate_up.shape[1] // 2
    if usable:
        from lorakit.kernels.triton.geglu import geglu_packed_forward

        return geglu_packed_forward(gate_up, delta)
    if delta is not None:
        gate_up = gate_up + delta.to(gate_up.dtype)
    return geglu_reference(gate_up[:, :width], gate_up[:, width:])
