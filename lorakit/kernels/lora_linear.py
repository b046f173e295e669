"""The LoRA linear op: ``y = x W^T + b + s (x A^T) B^T`` (plain LoRA / rsLoRA, no dropout).

Two implementations behind one signature:

* ``lora_linear_reference``: the spec, plain PyTorch autograd (what PEFT does: the adapter path in the adapter's
  dtype, float32, then added to the base output).
* ``LoraLinearFunction``: a hand-written autograd.Function, picked by ``lora_linear`` unless
  ``LORAKIT_DISABLE_TRITON=1`` asks for the references everywhere.

Why the Function is faster (Llama-3.1-8B shape, batch 1 x 2048, H200; PEFT's step is 230 ms of GPU time):

* every matmul runs in the compute dtype (bf16 under autocast or with bf16 inputs) on tensor cores; PEFT runs the
  adapter GEMMs in float32 on FFMA units (~30 ms) and casts x to float32 for each adapter (~36 ms of dtype copies);
* the low-rank term is computed first and the base GEMM accumulates onto it in its epilogue (``addmm``, beta=1),
  forward and backward, so there is no separate ``* scaling`` pass and no ``+`` pass over the (tokens, out) output;
* only ``x`` and ``x A^T`` (r columns, compute dtype) are saved: PEFT also keeps a float32 copy of x per adapter.

Derivation (x: (N, in), dY: (N, out), s = scaling, Bs = s B (out, r)):

    Y  = x W^T + b + (x A^T) Bs^T
    g  = dY Bs                      (N, r)        = s dY B
    dX = dY W + g A                 (N, in)       g A first, then one GEMM with beta=1 onto it
    dA = g^T x                      (r, in)
    dB = s dY^T (x A^T)             (out, r)
    dW = dY^T x, db = sum_rows dY   only if the frozen base asks for them (normally it does not)

A and B stay float32 parameters; their gradients come back in their own dtype (float32), computed from
compute-dtype GEMMs that accumulate in float32 inside cuBLAS.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def lora_linear_reference(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """The spec. x (..., in), weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r) -> (..., out)."""
    result = F.linear(x, weight, bias)
    low_rank = F.linear(F.linear(x.to(lora_A.dtype), lora_A), lora_B)
    return result + (low_rank * scaling).to(result.dtype)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's when it is on for x's device, else x's own."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


# (device type, input dtype, output dtype) -> whether ``torch.mm(..., out_dtype=)`` runs there. cuBLAS writes a
# float32 product of bf16/fp16 inputs directly (one launch, no bf16 rounding of dA/dB); other backends lack the
# overload (torch 2.13 CPU: "Could not run 'aten::mm.dtype' with arguments from the 'CPU' backend").
_MM_OUT_DTYPE: dict[tuple, bool] = {}


def _mm_into(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """``(a @ b) * scale`` returned in ``out_dtype``; a (m, k), b (k, n) in the compute dtype.

    One launch when the backend writes ``out_dtype`` from the GEMM itself, else the GEMM and one cast-and-scale pass
    (the old path was GEMM, cast, scale: three launches).
    """
    if torch.compiler.is_compiling():  # inductor fuses the scale and cast into one pass; no probing in a trace
        product = torch.mm(a, b)
        return (product * scale).to(out_dtype) if scale != 1.0 else product.to(out_dtype)
    if a.dtype != out_dtype:
        key = (a.device.type, a.dtype, out_dtype)
        if _MM_OUT_DTYPE.get(key, a.device.type == "cuda"):
            try:
                product = torch.mm(a, b, out_dtype=out_dtype)
                _MM_OUT_DTYPE[key] = True
                return product.mul_(scale) if scale != 1.0 else product
            except (RuntimeError, TypeError, NotImplementedError):  # an older torch or a backend without it
                _MM_OUT_DTYPE[key] = False
        product = torch.mm(a, b)
        return torch.mul(product, scale, out=torch.empty(product.shape, dtype=out_dtype, device=product.device))
    product = torch.mm(a, b)
    return product.mul_(scale) if scale != 1.0 else product


def _scaled_copy(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """``(t * scale).to(dtype)`` in one pass (the product is rounded once, straight to ``dtype``)."""
    if torch.compiler.is_compiling():  # out= is eager-only plumbing; inductor fuses the two ops anyway
        return (t * scale).to(dtype)
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))


class LoraLinearFunction(torch.autograd.Function):
    """Fused forward/backward of ``x W^T + b + s (x A^T) B^T``; see the module docstring for the derivation.

    Launches per call (no bias, bf16 activations, float32 adapters): forward 5 (cast A, scale+cast B, x A^T,
    (x A^T) Bs^T, base GEMM with beta=1); backward 6 on CUDA (g = dY Bs, g A, base GEMM onto it, dA and dB written
    in float32 by the GEMMs, scale dB). The compute-dtype A and Bs are saved for backward rather than cast again
    (r x (in + out) elements each). They are not cached across calls: each adapter runs once per step between
    optimizer updates, and a cache keyed on ``Parameter._version`` would go stale under optimizers that write
    through ``p.data`` (bitsandbytes' 8-bit optimizers do), which do not bump the version counter.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dtype):
        if torch.is_autocast_enabled(x.device.type):  # every dtype below is explicit; entering costs ~25 us
            with torch.autocast(x.device.type, enabled=False):
                return LoraLinearFunction._forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dtype)
        return LoraLinearFunction._forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dtype)

    @staticmethod
    def _forward(ctx, x, weight, bias, lora_A, lora_B, scaling, dtype):
        in_features = weight.shape[1]
        x2 = x.reshape(-1, in_features) if x.dim() != 2 else x  # (N, in); a view
        if x2.dtype != dtype:
            x2 = x2.to(dtype)
        w = weight if weight.dtype == dtype else weight.to(dtype)
        a = lora_A if lora_A.dtype == dtype else lora_A.to(dtype)  # (r, in)
        b_scaled = _scaled_copy(lora_B, scaling, dtype)  # (out, r): folding s here costs out*r, not N*out
        xa = torch.mm(x2, a.t())  # (N, r)
        # the low-rank term (plus bias) first, then the base GEMM accumulates onto it in its epilogue (beta=1):
        # one write + one read of (N, out) instead of a separate add pass, and a single rounding
        if bias is not None:
            low = torch.addmm(bias if bias.dtype == dtype else bias.to(dtype), xa, b_scaled.t())
        else:
            low = torch.mm(xa, b_scaled.t())
        y = low.addmm_(x2, w.t())  # (N, out)
        ctx.save_for_backward(x2, xa, weight, a, b_scaled)
        ctx.scaling = scaling
        ctx.dtype = dtype
        ctx.x_dtype = x.dtype
        ctx.x_shape = x.shape
        ctx.adapter_dtypes = (lora_A.dtype, lora_B.dtype)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        # (N, out) always: a view made inside a custom Function may not be modified in place by the caller
        # (Falcon adds its attention output into the MLP's output with +=), one made outside may
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_autocast_enabled(dy.device.type):
            with torch.autocast(dy.device.type, enabled=False):
                return LoraLinearFunction._backward(ctx, dy)
        return LoraLinearFunction._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x2, xa, weight, a, b_scaled = ctx.saved_tensors
        dtype, s = ctx.dtype, ctx.scaling
        need_x, need_w, need_b, need_a, need_bb = ctx.needs_input_grad[:5]
        dx = dw = db = da = dbb = None
        dy2 = dy.reshape(-1, weight.shape[0]) if dy.dim() != 2 else dy  # (N, out)
        if dy2.dtype != dtype:
            dy2 = dy2.to(dtype)
        if need_x or need_a:
            g = torch.mm(dy2, b_scaled)  # (N, r) = s dY B
        if need_x:
            w = weight if weight.dtype == dtype else weight.to(dtype)
            dx = torch.mm(g, a).addmm_(dy2, w)  # (N, in): dY W accumulated onto s (dY B) A
            if len(ctx.x_shape) != 2:
                dx = dx.view(ctx.x_shape)
            if dx.dtype != ctx.x_dtype:
                dx = dx.to(ctx.x_dtype)
        if need_a:
            da = _mm_into(g.t(), x2, ctx.adapter_dtypes[0])  # (r, in)
        if need_bb:
            dbb = _mm_into(dy2.t(), xa, ctx.adapter_dtypes[1], s)  # (out, r)
        if need_w:
            dw = torch.mm(dy2.t(), x2).to(weight.dtype)
        if need_b and ctx.bias_dtype is not None:
            db = dy2.sum(0, dtype=torch.float32).to(ctx.bias_dtype)
        return dx, dw, db, da, dbb, None, None


def lora_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float
) -> torch.Tensor:
    """x (..., in), weight (out, in), bias (out,) or None, lora_A (r, in), lora_B (out, r) -> (..., out).

    The output is in the compute dtype (autocast's, else x's); gradients come back in each input's own dtype.
    ``LORAKIT_DISABLE_TRITON=1`` switches to :func:`lora_linear_reference` (read per call, for A/B checks).
    """
    if os.environ.get("LORAKIT_DISABLE_TRITON", "0") == "1" or torch.compiler.is_compiling():
        # under torch.compile, plain ops: AOTAutograd derives their backward and inductor fuses them anyway, while
        # the traced Function's gradients came back as zeros on CUDA (torch 2.11, inductor and aot_eager, with and
        # without checkpointing: bench/compile_grad_probe.py), which trained nothing through --compile-layers
        return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling)
    y = LoraLinearFunction.apply(x, weight, bias, lora_A, lora_B, float(scaling), _compute_dtype(x))  # (N, out)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], y.shape[-1])
