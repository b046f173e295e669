"""Fused projection weights for decode: q/k/v in one matrix, gate/up in one, so a step runs one GEMM for each.

``fuse_projections`` concatenates the weights of projections that read the same input into one contiguous
``(sum of outs, in)`` tensor and points each module's ``weight`` at its row block of it (a view): the model keeps
working exactly as before (same values, same state-dict keys), no memory is duplicated, and in-place writes
through either side (a merge, a ``load_state_dict`` copy) are seen by both. Replacing a module's weight tensor
breaks the link; ``FusedWeight.is_current`` notices, and the decoder fuses again.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.decoding.architecture import base_linear
from lorakit.errors import LorakitError


@dataclass
class FusedWeight:
    """weight (N, K) with N = sum(splits); bias (N,) or None (zeros for members without a bias); the members."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    splits: tuple[int, ...]
    members: tuple[nn.Linear, ...]

    def is_current(self) -> bool:
        """Every member's weight is still the view this fusion made (same storage, same offset)."""
        offset = 0
        base = self.weight.data_ptr()
        step = self.weight.stride(0) * self.weight.element_size()
        for linear, rows in zip(self.members, self.splits):
            if linear.weight.data_ptr() != base + offset * step or linear.weight.shape[0] != rows:
                return False
            offset += rows
        return True


def fuse_projections(modules: list[nn.Module]) -> FusedWeight:
    """Fuse the base linears of ``modules`` (same input size, dtype and device) into one weight; see the module doc."""
    linears = [base_linear(m) for m in modules]
    first = linears[0].weight
    if any(lin.weight.shape[1] != first.shape[1] or lin.weight.dtype != first.dtype or lin.weight.device != first.device
           for lin in linears):
        raise LorakitError("projections fused for decoding must share input size, dtype and device")
    splits = tuple(lin.weight.shape[0] for lin in linears)
    if len(linears) == 1:  # nothing to fuse: read the weight in place
        lin = linears[0]
        return FusedWeight(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), splits, (lin,))
    with torch.no_grad():
        fused = torch.cat([lin.weight.detach() for lin in linears], dim=0)
        bias = None
        if any(lin.bias is not None for lin in linears):
            bias = torch.cat([lin.bias.detach() if lin.bias is not None else first.new_zeros(lin.weight.shape[0])
                              for lin in linears])
        offset = 0
        for lin, rows in zip(linears, splits):
            requires_grad = lin.weight.requires_grad
            lin.weight = nn.Parameter(fused[offset:offset + rows], requires_grad=requires_grad)
            offset += rows
    return FusedWeight(fused, bias, splits, tuple(linears))
