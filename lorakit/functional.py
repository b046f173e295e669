"""Pure LoRA math with no state. Shapes: x (..., in), A (r, in), B (out, r), W (out, in)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def scaling(variant: str, rank: int, alpha: float) -> float:
    """alpha / r, or alpha / sqrt(r) for rsLoRA."""
    return alpha / math.sqrt(rank) if variant == "rslora" else alpha / rank


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """``s * B @ A`` as float32 ``(out, in)``, whatever the adapter dtype (merging is always done in float32)."""
    return (lora_B.detach().float() @ lora_A.detach().float()) * scaling


def lora_delta_output(x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float, out_dtype: torch.dtype,
                      lora_bias: torch.Tensor | None = None) -> torch.Tensor:
    """``s * (x A^T B^T + b)`` computed in the adapter's dtype (float32 by default), returned in ``out_dtype``;
    ``lora_bias`` ``b (out,)`` is B's bias (PEFT's ``lora_bias``), None for none.

    x (..., in) -> (..., out). The low-rank path goes first through A (r columns), so it costs
    ``r * (in + out)`` multiply-adds per row instead of ``in * out``.
    """
    low_rank = F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B, lora_bias)
    return (low_rank * scaling).to(out_dtype)
