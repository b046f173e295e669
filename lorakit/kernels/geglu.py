"""GeGLU with the tanh GELU: ``h = gelu_tanh(gate) * up``, the Gemma / Gemma 2 / Gemma 3 MLP's activation.

``geglu_reference`` is the spec, as transformers computes it (``F.gelu(gate, approximate="tanh") * up``, the
``gelu_pytorch_tanh`` activation). ``geglu_packed`` is the static decoder's inference op over the output of one
GEMM with fused gate/up weights: the packed gated-activation Triton kernel (``kernels/triton/swiglu.py``, the
tanh GELU selected at compile time) when ``triton_usable``, else the reference. The kernel rounds once (float32
math); the reference rounds the activation, then the product, so in 16-bit dtypes the two may differ by one ulp.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.kernels.swiglu import gated_packed


def geglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) -> (..., I)."""
    return F.gelu(gate, approximate="tanh") * up


def geglu_packed(gate_up: torch.Tensor, delta: torch.Tensor | None = None) -> torch.Tensor:
    """gate_up (T, 2F), gate in columns :F, up in F: -> gelu_tanh(gate) * up (T, F). Inference only (no autograd).

    delta: None, or (T, 2F) added to gate_up first (rounded to gate_up's dtype, as ``gate_up + delta`` would be),
    read in the same pass (the static decoder's LoRA deltas, computed beside the GEMM).
    """
    return gated_packed("geglu_packed", geglu_reference, True, gate_up, delta)
