"""RMSNorm: ``y = (x / sqrt(mean(x^2) + eps)) * (weight + offset)``, normalised over the last dimension.

``rms_norm_reference`` is the spec, written exactly as transformers writes it:

* Llama / Qwen2 / Qwen3 / Mistral (``offset=0``, ``cast_before_weight=True``): normalise in float32, round to the
  input dtype, multiply by the weight; output dtype = promote(weight, input) (bf16 for a bf16 model).
* Gemma (``offset=1``, ``cast_before_weight=False``): multiply by ``1 + weight`` in float32, output in the input dtype.

``rms_norm`` dispatches to the Triton kernels (``kernels/triton/rmsnorm.py``) when ``triton_usable``, else to the
reference. The fused version reads x once and writes y once forward (the reference makes ~6 passes, in float32)
and saves only x and one float32 per row.
"""

from __future__ import annotations

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.kernels._triton import interpreter_on, triton_usable

_MAX_FUSED_WIDTH = 65536  # one row must fit one Triton block


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                       cast_before_weight: bool = True) -> torch.Tensor:
    """x (..., H), weight (H,) -> (..., H)."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if cast_before_weight:
        return (weight + offset) * h.to(input_dtype) if offset else weight * h.to(input_dtype)
    return (h * (offset + weight.float())).to(input_dtype)


class RMSNormFunction(torch.autograd.Function):
    """Triton forward/backward; saves x and rstd (one float32 per row)."""

    @staticmethod
    def forward(ctx, x, weight, eps, offset, cast_before_weight):
        from lorakit.kernels.triton.rmsnorm import rmsnorm_forward

        out_dtype = torch.promote_types(weight.dtype, x.dtype) if cast_before_weight else x.dtype
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (rows, H)
        y, rstd = rmsnorm_forward(x2, weight.contiguous(), eps, offset, cast_before_weight, out_dtype)
        ctx.save_for_backward(x2, weight, rstd)
        ctx.offset = offset
        ctx.x_shape = x.shape
        return y.reshape(x.shape)

    @staticmethod
    def backward(ctx, dy):
        from lorakit.kernels.triton.rmsnorm import rmsnorm_backward

        x2, weight, rstd = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).contiguous()
        dx, dw = rmsnorm_backward(dy2, x2, weight.contiguous(), rstd, ctx.offset, ctx.needs_input_grad[1])
        return dx.reshape(ctx.x_shape), (dw.to(weight.dtype) if dw is not None else None), None, None, None


def _fusable(x: torch.Tensor, weight: torch.Tensor) -> bool:
    if not triton_usable(x, weight) or x.shape[-1] > _MAX_FUSED_WIDTH or x.shape[-1] != weight.shape[-1]:
        return False
    dtypes = {x.dtype, weight.dtype}
    if not dtypes <= {torch.float32, torch.float16, torch.bfloat16}:
        return False
    return not (x.device.type == "cpu" and interpreter_on() and torch.bfloat16 in dtypes)  # interpreter lacks bf16


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
             cast_before_weight: bool = True) -> torch.Tensor:
    """x (..., H), weight (H,) -> (..., H); the fused kernel when it can run, else the reference."""
    if _fusable(x, weight):
        return RMSNormFunction.apply(x, weight, float(eps), float(offset), bool(cast_before_weight))
    return rms_norm_reference(x, weight, eps, offset, cast_before_weight)


def add_rms_norm_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, offset: float = 0.0,
                  cast_before_weight: bool = True) -> torch.Tensor:
    """In place x (T, H) <- x + delta (rounded to x's dtype); returns rms_norm(x) (T, H). Inference only: one
    Triton kernel reads x and delta once (the static decoder adds a LoRA delta, computed beside the GEMM, into the
    residual stream and normalises it for the next projection), else the reference."""
    if x.dim() != 2 or delta.shape != x.shape:
        raise LorakitError(f"add_rms_norm_ takes x (T, H) and delta of the same shape, got {tuple(x.shape)} and {tuple(delta.shape)}")
    if (_fusable(x, weight) and triton_usable(delta) and delta.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and not (delta.device.type == "cpu" and interpreter_on() and delta.dtype == torch.bfloat16)
            and x.stride(1) == 1 and delta.stride(1) == 1 and not (torch.is_grad_enabled() and x.requires_grad)):
        from lorakit.kernels.triton.rmsnorm import add_rmsnorm_forward_

        out_dtype = torch.promote_types(weight.dtype, x.dtype) if cast_before_weight else x.dtype
        return add_rmsnorm_forward_(x, delta, weight, float(eps), float(offset), bool(cast_before_weight), out_dtype)
    x.add_(delta.to(x.dtype))
    return rms_norm_reference(x, weight, eps, offset, cast_before_weight)


class FusedRMSNorm(nn.Module):
    """Drop-in for a transformers ``*RMSNorm`` module; shares (does not copy) the original weight Parameter.

    Keeps the attribute names transformers uses (``weight``, ``variance_epsilon``) so state dicts and code that
    reads them are unchanged.
    """

    def __init__(self, weight: nn.Parameter, eps: float, offset: float = 0.0, cast_before_weight: bool = True):
        super().__init__()
        self.weight = weight
        self.variance_epsilon = eps
        self.offset = offset
        self.cast_before_weight = cast_before_weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.variance_epsilon, self.offset, self.cast_before_weight)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, offset={self.offset}"
