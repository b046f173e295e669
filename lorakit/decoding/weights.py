"""Fused projection weights for decode: q/k/v in one matrix, gate/up in one, so a step runs one GEMM for each.

``fuse_projections`` concatenates the weights of projections that read the same input into one contiguous
``(sum of outs, in)`` tensor and points each module's ``weight`` at its row block of it (a view): the model keeps
working exactly as before (same values, same state-dict keys), no memory is duplicated, and in-place writes
through either side (a merge, a ``load_state_dict`` copy) are seen by both. Replacing a module's weight tensor
breaks the link; ``FusedWeight.is_current`` notices, and the decoder fuses again.

NF4 bases (lorakit ``NF4Linear``, QLoRA) are not concatenated: each member keeps its own packed buffer (read in
place, no copy) and the group's one ``lorakit.kernels.nf4_rows.nf4_rows_linear`` call covers all members. Each member's
double-quantized absmax is decoded to float32 block scales once here: 4 bytes per block of 64 weights (0.5 bit per
weight) instead of ~1.03 bytes (0.13 bit), i.e. about 9% of the 4-bit weights on top (~0.33 GB for Llama-3.1-8B),
so that the step's kernel reads one scale per block instead of decoding two levels of quantization per weight.
A member re-quantized since (new buffers, or in-place writes: their version counters) makes ``is_current`` false.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lorakit.decoding.architecture import base_linear
from lorakit.errors import LorakitError


@dataclass
class FusedWeight:
    """weight (N, K) with N = sum(splits) (None for an NF4 group); bias (N,) or None (zeros for members without a
    bias); the members (nn.Linear or NF4Linear); ``nf4``: per member its ``NF4Rows`` (NF4 groups, else None);
    ``in_features`` K; ``state``: the NF4 members' buffers (data pointer, version) at fusion."""

    weight: torch.Tensor | None
    bias: torch.Tensor | None
    splits: tuple[int, ...]
    members: tuple[nn.Module, ...]
    nf4: tuple | None = None
    in_features: int = 0
    state: tuple = ()

    def matmul(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """(residual +) x W^T (T, N) for x (T, K): the dense decoder's ``rows_linear`` or the NF4 rows GEMM."""
        if self.nf4 is None:
            from lorakit.kernels.rows_linear import rows_linear

            return rows_linear(x, self.weight, residual)
        from lorakit.kernels.nf4_rows import nf4_rows_linear

        return nf4_rows_linear(x, self.nf4, residual)

    def member_weight(self, segment: int, dtype: torch.dtype) -> torch.Tensor:
        """Member ``segment``'s dense (n, K) weight: a view (dense) or dequantized exactly to ``dtype`` (NF4)."""
        if self.nf4 is None:
            lo = sum(self.splits[:segment])
            return self.weight[lo:lo + self.splits[segment]]
        return self.nf4[segment].dequantize(self.in_features, dtype)

    def is_current(self) -> bool:
        """Every member's weight is still the view this fusion made (same storage, same offset); NF4: the members
        still hold the buffers read at fusion, unchanged."""
        if self.nf4 is not None:
            return _nf4_state(self.members) == self.state
        offset = 0
        base = self.weight.data_ptr()
        step = self.weight.stride(0) * self.weight.element_size()
        for linear, rows in zip(self.members, self.splits):
            if linear.weight.data_ptr() != base + offset * step or linear.weight.shape[0] != rows:
                return False
            offset += rows
        return True


def fuse_projections(modules: list[nn.Module], dtype: torch.dtype | None = None) -> FusedWeight:
    """Fuse the base linears of ``modules`` (same input size, dtype and device) into one weight; see the module doc.
    ``dtype``: the decoder's compute dtype, which NF4 members' biases are cast to (as ``NF4Linear.forward`` does)."""
    linears = [base_linear(m) for m in modules]
    if _is_nf4(linears[0]):
        return _fuse_nf4(linears, dtype)
    first = linears[0].weight
    if any(lin.weight.shape[1] != first.shape[1] or lin.weight.dtype != first.dtype or lin.weight.device != first.device
           for lin in linears):
        raise LorakitError("projections fused for decoding must share input size, dtype and device")
    splits = tuple(lin.weight.shape[0] for lin in linears)
    if len(linears) == 1:  # nothing to fuse: read the weight in place
        lin = linears[0]
        return FusedWeight(lin.weight.detach(), None if lin.bias is None else lin.bias.detach(), splits, (lin,),
                           in_features=lin.weight.shape[1])
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
    return FusedWeight(fused, bias, splits, tuple(linears), in_features=fused.shape[1])


def _is_nf4(module: nn.Module) -> bool:
    from lorakit.quant.nf4 import NF4Linear

    return isinstance(module, NF4Linear)


_NF4_BUFFERS = ("weight_packed", "absmax", "nested_absmax", "absmax_offset", "code", "nested_code")


def _nf4_state(members) -> tuple:
    """(data pointer, version counter) of every NF4 buffer of ``members``: any re-quantization changes one."""
    return tuple((t.data_ptr(), _version(t)) if t is not None else None
                 for m in members for t in (getattr(m, name, None) for name in _NF4_BUFFERS))


def _version(tensor: torch.Tensor) -> int | None:
    """The in-place write counter; None for tensors made under ``torch.inference_mode`` (they keep none, and
    cannot be written outside it)."""
    try:
        return tensor._version
    except RuntimeError:
        return None


def _fuse_nf4(linears: list[nn.Module], dtype: torch.dtype | None) -> FusedWeight:
    """An NF4 group: the members' packed buffers as they are, their block scales decoded to float32 (module doc)."""
    from lorakit.kernels.nf4 import decode_absmax
    from lorakit.kernels.nf4_rows import NF4Rows

    first = linears[0]
    if any(not _is_nf4(lin) or lin.in_features != first.in_features or lin.weight_packed.device != first.weight_packed.device
           for lin in linears):
        raise LorakitError("projections fused for decoding must all be NF4 (or all dense) with one input size and device")
    with torch.no_grad():
        rows = tuple(NF4Rows(lin.weight_packed, decode_absmax(lin.nf4_weight()), lin.code, lin.out_features,
                             lin.blocksize) for lin in linears)
        bias = None
        if any(lin.bias is not None for lin in linears):
            dtype = dtype or next(lin.bias.dtype for lin in linears if lin.bias is not None)
            bias = torch.cat([lin.bias.detach().to(dtype) if lin.bias is not None
                              else torch.zeros(lin.out_features, dtype=dtype, device=first.weight_packed.device)
                              for lin in linears])
    splits = tuple(lin.out_features for lin in linears)
    return FusedWeight(None, bias, splits, tuple(linears), nf4=rows, in_features=first.in_features,
                       state=_nf4_state(linears))
