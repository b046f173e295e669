"""NF4 dequantization and the NF4 linear ops: pure-PyTorch references (the spec) and a dispatcher.

Storage (bitsandbytes' layout, ``quantize_4bit(..., quant_type="nf4", compress_statistics=True)``): the weight
``W (out, in)`` is flattened row-major to ``n = out * in`` values, cut into blocks of ``blocksize`` (64) consecutive
values (a block may straddle two rows), each stored as a 4-bit index into ``code`` (16 NF4 levels), two per byte,
element ``2i`` in the HIGH nibble of byte ``i``. The scale of block ``b`` is ``absmax[b]``; with double
quantization ``absmax`` holds 8-bit indices into ``nested_code`` (256 dynamic levels) and the scale is
``nested_code[absmax[b]] * nested_absmax[b // nested_blocksize] + offset``.

All arithmetic follows bitsandbytes bit for bit: value = ``code[q] * scale`` in float32, then one rounding to the
output dtype; ``nested_code[q] * nested_absmax`` then ``+ offset`` as two float32 roundings.

The dispatcher runs Triton (``lorakit/kernels/triton/nf4.py``) when ``triton_usable`` allows and the reference
otherwise. The forward/backward of the linear op dequantize to the compute dtype and call the BLAS matmul for
every row count by default: on an H200 (2026-11-29, bench/results/qlora_check.json) the Triton dequantize + cuBLAS
path took 0.14 ms for a 4096x14336 weight at 1 to 64 rows, while the fused dequantize-and-matmul kernel took 2.0 ms,
so the fused kernel is used only when asked for (``mode="fused"``) until it is tuned.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from lorakit.kernels._triton import triton_usable

# Row counts up to this use the fused kernel in "auto" mode. 0: never, as measured (see the module docstring).
FUSED_MAX_ROWS = 0


# ----------------------------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------------------------


def decode_absmax_reference(absmax: torch.Tensor, nested_absmax: torch.Tensor | None, offset: torch.Tensor | None,
                            nested_code: torch.Tensor | None, nested_blocksize: int = 256) -> torch.Tensor:
    """Per-block scales, float32 ``(n_blocks,)``.

    absmax: ``(n_blocks,)`` float32 scales, or uint8 indices into ``nested_code (256,)`` when ``nested_absmax
    (ceil(n_blocks / nested_blocksize),)`` float32 and ``offset ()`` float32 are given (double quantization).
    """
    if nested_absmax is None:
        return absmax.float()
    n_blocks = absmax.numel()
    n_nested = nested_absmax.numel()
    values = nested_code.index_select(0, absmax.int())
    padded = F.pad(values, (0, n_nested * nested_blocksize - n_blocks)).view(n_nested, nested_blocksize)
    scales = (padded * nested_absmax.view(-1, 1)).reshape(-1)[:n_blocks]  # float32 product, then
    return scales + offset  # the offset added as a second rounding, as bitsandbytes does


def unpack_nibbles(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """``packed (ceil(numel / 2),) uint8 -> (numel,) int64`` codes; element 2i is the high nibble of byte i."""
    packed = packed.reshape(-1)
    codes = torch.stack((packed >> 4, packed & 0xF), dim=1).reshape(-1)
    return codes[:numel].long()


def dequantize_nf4_reference(packed: torch.Tensor, scales: torch.Tensor, code: torch.Tensor,
                             shape: tuple[int, ...], blocksize: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight ``shape`` in ``dtype`` from ``packed (ceil(n/2),) uint8`` and float32 ``scales (n_blocks,)``."""
    numel = math.prod(shape)
    # byte b -> (code[b >> 4], code[b & 15]): one gather per byte instead of unpacking nibbles (10x faster on CPU)
    byte = torch.arange(256, device=code.device)
    pairs = torch.stack((code[byte >> 4], code[byte & 0xF]), dim=1)
    values = pairs.index_select(0, packed.reshape(-1).int()).reshape(-1)[:numel]
    n_blocks = scales.numel()
    padded = F.pad(values, (0, n_blocks * blocksize - numel)).view(n_blocks, blocksize)
    return (padded * scales.view(-1, 1)).reshape(-1)[:numel].to(dtype).reshape(shape)


def nf4_linear_reference(x: torch.Tensor, weight_dense: torch.Tensor) -> torch.Tensor:
    """``x (..., in) @ W^T`` with ``W (out, in)`` already dequantized to ``x.dtype``."""
    return F.linear(x, weight_dense)


# ----------------------------------------------------------------------------------------------------------------
# dispatcher
# ----------------------------------------------------------------------------------------------------------------


class NF4Weight:
    """The tensors of one NF4 weight, as plain references (no copies); what every op below takes.

    packed (ceil(n/2),) uint8; absmax (n_blocks,) uint8 (double quant) or float32; nested_absmax
    (n_nested,) float32 or None; offset () float32 or None; code (16,) float32; nested_code (256,) float32 or None;
    shape (out, in); blocksize (64 in bitsandbytes' default); nested_blocksize (256).
    """

    __slots__ = ("packed", "absmax", "nested_absmax", "offset", "code", "nested_code", "shape", "blocksize",
                 "nested_blocksize")

    def __init__(self, packed, absmax, nested_absmax, offset, code, nested_code, shape, blocksize, nested_blocksize=256):
        self.packed, self.absmax, self.nested_absmax, self.offset = packed, absmax, nested_absmax, offset
        self.code, self.nested_code = code, nested_code
        self.shape, self.blocksize, self.nested_blocksize = tuple(shape), int(blocksize), int(nested_blocksize)

    @property
    def nested(self) -> bool:
        return self.nested_absmax is not None

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return tuple(t for t in (self.packed, self.absmax, self.nested_absmax, self.offset, self.code,
                                 self.nested_code) if t is not None)


def _use_triton(w: NF4Weight, *tensors: torch.Tensor, force_reference: bool = False) -> bool:
    if force_reference or w.packed.numel() == 0:
        return False
    # the interpreter handles float32/float16 but not bf16 (see ARCHITECTURE.md); on CUDA every float dtype is fine
    if w.packed.device.type == "cpu" and any(t.dtype == torch.bfloat16 for t in tensors):
        return False
    return triton_usable(*w.tensors(), *tensors)


def decode_absmax(w: NF4Weight) -> torch.Tensor:
    """Per-block float32 scales ``(n_blocks,)`` (a few small torch ops; exact like bitsandbytes)."""
    return decode_absmax_reference(w.absmax, w.nested_absmax, w.offset, w.nested_code, w.nested_blocksize)


def dequantize_nf4(w: NF4Weight, dtype: torch.dtype = torch.float32, *, force_reference: bool = False,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense weight ``w.shape`` in ``dtype`` (bit-identical to bitsandbytes' ``dequantize_4bit``), written into
    ``out`` (contiguous, ``w.shape``, ``dtype``) when given: a fused group's members fill one weight, no copy."""
    probe = torch.empty(0, dtype=dtype, device=w.packed.device)
    if out is not None and (tuple(out.shape) != tuple(w.shape) or out.dtype != dtype or not out.is_contiguous()):
        raise ValueError(f"dequantize_nf4: out must be a contiguous {tuple(w.shape)} {dtype} tensor")
    if _use_triton(w, probe, force_reference=force_reference):
        from lorakit.kernels.triton.nf4 import dequantize_nf4_triton

        return dequantize_nf4_triton(w, dtype, out)
    dense = dequantize_nf4_reference(w.packed, decode_absmax(w), w.code, w.shape, w.blocksize, dtype)
    return dense if out is None else out.copy_(dense)


def nf4_matmul(x: torch.Tensor, w: NF4Weight, *, mode: str = "auto") -> torch.Tensor:
    """``x (..., in) -> x @ W^T (..., out)`` in ``x.dtype``, W dequantized to ``x.dtype`` first (no bias).

    mode: ``"auto"`` (fused kernel for few rows, else dequantize + BLAS), ``"fused"``, ``"dequantize"``,
    ``"reference"``.
    """
    out_features, in_features = w.shape
    rows = x.numel() // in_features if in_features else 0
    if mode != "reference" and _use_triton(w, x):
        if mode == "fused" or (mode == "auto" and rows <= FUSED_MAX_ROWS):
            from lorakit.kernels.triton.nf4 import nf4_matmul_triton

            return nf4_matmul_triton(x.reshape(-1, in_features), w).reshape(*x.shape[:-1], out_features)
    return F.linear(x, dequantize_nf4(w, x.dtype, force_reference=mode == "reference"))


def nf4_matmul_grad_input(grad: torch.Tensor, w: NF4Weight, *, mode: str = "auto") -> torch.Tensor:
    """``grad (..., out) -> grad @ W (..., in)`` in ``grad.dtype``: the input gradient of ``nf4_matmul``."""
    out_features, in_features = w.shape
    rows = grad.numel() // out_features if out_features else 0
    if mode != "reference" and _use_triton(w, grad):
        if mode == "fused" or (mode == "auto" and rows <= FUSED_MAX_ROWS):
            from lorakit.kernels.triton.nf4 import nf4_matmul_grad_input_triton

            return nf4_matmul_grad_input_triton(grad.reshape(-1, out_features), w).reshape(*grad.shape[:-1], in_features)
    return grad @ dequantize_nf4(w, grad.dtype, force_reference=mode == "reference")


class NF4MatmulFunction(torch.autograd.Function):
    """``y = x @ W^T`` over an NF4 weight; saves only the packed tensors (no dense copy of W) and dequantizes again
    for the input gradient. The weight is frozen: no gradient for it."""

    @staticmethod
    def forward(ctx, x, packed, absmax, nested_absmax, offset, code, nested_code, shape, blocksize, nested_blocksize, mode):
        w = NF4Weight(packed, absmax, nested_absmax, offset, code, nested_code, shape, blocksize, nested_blocksize)
        ctx.meta = (shape, blocksize, nested_blocksize, mode, nested_absmax is not None)
        ctx.save_for_backward(*w.tensors())
        return nf4_matmul(x, w, mode=mode)

    @staticmethod
    def backward(ctx, grad):
        shape, blocksize, nested_blocksize, mode, nested = ctx.meta
        if not ctx.needs_input_grad[0]:
            return (None,) * 11
        saved = ctx.saved_tensors
        if nested:
            packed, absmax, nested_absmax, offset, code, nested_code = saved
        else:
            (packed, absmax, code), nested_absmax, offset, nested_code = saved, None, None, None
        w = NF4Weight(packed, absmax, nested_absmax, offset, code, nested_code, shape, blocksize, nested_blocksize)
        return (nf4_matmul_grad_input(grad.contiguous(), w, mode=mode),) + (None,) * 10


def nf4_linear(x: torch.Tensor, w: NF4Weight, bias: torch.Tensor | None = None, *, mode: str = "auto") -> torch.Tensor:
    """``F.linear(x, dequantize(W).to(x.dtype), bias)`` with a memory-lean autograd (see ``NF4MatmulFunction``)."""
    y = NF4MatmulFunction.apply(x, w.packed, w.absmax, w.nested_absmax, w.offset, w.code, w.nested_code, w.shape,
                                w.blocksize, w.nested_blocksize, mode)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y
