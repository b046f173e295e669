"""Triton RMSNorm, forward and backward. One program per row (forward); a block of rows per program (backward),
so that the weight gradient, when wanted, is a per-program partial sum instead of an atomic per row.

The launchers take 2-D contiguous row-major tensors; the autograd wiring lives in ``lorakit/kernels/rmsnorm.py``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorakit.kernels._triton import pdl_launch, pdl_on
from lorakit.kernels.triton.pdl import pdl_enter


@triton.jit
def _rmsnorm_fwd(X, W, Y, RSTD, stride_x, stride_y, n_cols, eps, offset,
                 CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset  # a weight: read before the wait
    pdl_enter(PDL)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = _normalize_store(x, w, Y + row * stride_y + cols, mask, n_cols, eps, X.dtype.element_ty, CAST_BEFORE_WEIGHT)
    tl.store(RSTD + row, rstd)


@triton.jit
def _normalize_store(x, w, y_ptrs, mask, n_cols, eps, x_dtype: tl.constexpr, CAST_BEFORE_WEIGHT: tl.constexpr):
    """Store rmsnorm(x) * w (x, w float32 rows) at y_ptrs; returns the row's 1 / rms."""
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    x_hat = x * rstd
    if CAST_BEFORE_WEIGHT:  # Llama/Qwen/Mistral round the normalised x to the input dtype before the weight
        x_hat = x_hat.to(x_dtype).to(tl.float32)
    tl.store(y_ptrs, (x_hat * w).to(y_ptrs.dtype.element_ty), mask=mask)
    return rstd


@triton.jit
def _add_rmsnorm_fwd(X, D, W, Y, stride_x, stride_d, stride_y, n_cols, eps, offset,
                     CAST_BEFORE_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """x <- x + d (rounded to x's dtype, stored back: the residual stream), y = rmsnorm(x)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32) + offset  # a weight: read before the wait
    pdl_enter(PDL)
    s = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    s += tl.load(D + row * stride_d + cols, mask=mask, other=0.0).to(tl.float32)
    s = s.to(X.dtype.element_ty)
    tl.store(X + row * stride_x + cols, s, mask=mask)
    _normalize_store(s.to(tl.float32), w, Y + row * stride_y + cols, mask, n_cols, eps, X.dtype.element_ty,
                     CAST_BEFORE_WEIGHT)


@triton.jit
def _rmsnorm_bwd(DY, X, W, RSTD, DX, DW_PARTIAL, stride_dy, stride_x, stride_dx, n_rows, n_cols, offset,
                 rows_per_program, COMPUTE_DW: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_mask = cols < n_cols
    w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32) + offset
    dw_acc = tl.zeros([BLOCK], dtype=tl.float32)
    row_start = pid * rows_per_program
    for i in range(0, rows_per_program):
        row = (row_start + i).to(tl.int64)
        mask = col_mask & ((cols * 0 + row) < n_rows)  # rows past the end load zeros and store nothing
        dy = tl.load(DY + row * stride_dy + cols, mask=mask, other=0.0).to(tl.float32)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + tl.minimum(row, n_rows - 1))  # past the end: x and dy are zeros anyway
        x_hat = x * rstd
        wdy = dy * w
        # d/dx of x * rstd(x): rstd * (wdy - x_hat * mean(wdy * x_hat))
        dx = rstd * (wdy - x_hat * (tl.sum(wdy * x_hat, axis=0) / n_cols))
        tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += dy * x_hat
    if COMPUTE_DW:
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw_acc, mask=col_mask)


def _launch_config(n_cols: int) -> tuple[int, int]:
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block <= 2048 else 8 if block <= 8192 else 16
    return block, num_warps


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float, cast_before_weight: bool,
                    out_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x (rows, H) contiguous, weight (H,) -> (y (rows, H) in out_dtype, rstd (rows,) float32)."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    if n_rows == 0:
        return y, rstd
    block, num_warps = _launch_config(n_cols)
    pdl = pdl_on(x)
    _rmsnorm_fwd[(n_rows,)](x, weight, y, rstd, x.stride(0), y.stride(0), n_cols, eps, offset,
                            CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK=block, PDL=pdl, num_warps=num_warps,
                            **pdl_launch(pdl))
    return y, rstd


def add_rmsnorm_forward_(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float, offset: float,
                         cast_before_weight: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """x (rows, H) and delta (rows, H), unit column stride; x <- x + delta in place; returns rmsnorm(x) (rows, H)."""
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    if n_rows:
        block, num_warps = _launch_config(n_cols)
        pdl = pdl_on(x)
        _add_rmsnorm_fwd[(n_rows,)](x, delta, weight, y, x.stride(0), delta.stride(0), y.stride(0), n_cols, eps, offset,
                                    CAST_BEFORE_WEIGHT=cast_before_weight, BLOCK=block, PDL=pdl, num_warps=num_warps,
                                    **pdl_launch(pdl))
    return y


def _num_programs(x: torch.Tensor, n_rows: int) -> int:
    if x.device.type == "cuda":
        return min(n_rows, 4 * torch.cuda.get_device_properties(x.device).multi_processor_count)
    return min(n_rows, 4)  # the CPU interpreter: few programs, each a Python loop


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor, offset: float,
                     compute_dw: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dy, x (rows, H) contiguous -> (dx (rows, H) in x.dtype, dweight (H,) float32 or None)."""
    n_rows, n_cols = x.shape
    dx = torch.empty_like(x)
    if n_rows == 0:
        return dx, (torch.zeros(n_cols, dtype=torch.float32, device=x.device) if compute_dw else None)
    block, num_warps = _launch_config(n_cols)
    programs = _num_programs(x, n_rows) if compute_dw else n_rows
    rows_per_program = triton.cdiv(n_rows, programs)
    programs = triton.cdiv(n_rows, rows_per_program)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x.device) if compute_dw else rstd
    _rmsnorm_bwd[(programs,)](dy, x, weight, rstd, dx, dw_partial, dy.stride(0), x.stride(0), dx.stride(0),
                              n_rows, n_cols, offset, rows_per_program, COMPUTE_DW=compute_dw, BLOCK=block,
                              num_warps=num_warps)
    return dx, (dw_partial.sum(0) if compute_dw else None)
