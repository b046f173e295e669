"""(residual +) x W^T for a decode step's few rows, with the step's other kernels under PDL.

``rows_linear`` runs the Triton weight-streaming GEMM (``lorakit.kernels.triton.rows_gemm``) where it pays: under
``programmatic_launches`` on a GPU with PDL (it launches early and reads its first chunk of W while the previous
kernel drains), and on the CPU under the Triton interpreter (tests). Everywhere else, and for more than
``MAX_TRITON_ROWS`` rows, it is ``torch.addmm`` / ``torch.mm`` (cuBLAS on CUDA), which is also the reference.
"""

from __future__ import annotations

import torch

from lorakit.kernels._triton import pdl_on, triton_usable

MAX_TRITON_ROWS = 64  # one (BLOCK_M <= 64, BLOCK_N) accumulator per program; prefill-sized inputs go to cuBLAS
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def rows_linear_reference(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """x (T, K), weight (N, K), residual None or (T, N) -> (T, N): ``addmm(residual, x, weight^T)`` or ``x weight^T``."""
    return x @ weight.t() if residual is None else torch.addmm(residual, x, weight.t())


def rows_linear(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """(residual +) x @ weight^T as a new (T, N) tensor; x (T, K), weight (N, K), residual None or (T, N).

    The Triton kernel takes T <= 64 rows, one dtype for all three tensors and unit column strides; it accumulates
    in float32 and adds the residual before its one rounding, as addmm's epilogue does."""
    fits = (0 < x.shape[0] <= MAX_TRITON_ROWS and x.dim() == weight.dim() == 2 and x.shape[1] == weight.shape[1]
            and x.dtype == weight.dtype and x.dtype in _DTYPES and x.stride(1) == 1 and weight.stride(1) == 1
            and (residual is None or (residual.dtype == x.dtype and residual.shape == (x.shape[0], weight.shape[0])
                                      and residual.stride(1) == 1)))
    if fits and triton_usable(x, weight) and (x.device.type != "cuda" or pdl_on(x)):
        from lorakit.kernels.triton.rows_gemm import rows_gemm

        return rows_gemm(x, weight, residual)
    return rows_linear_reference(x, weight, residual)
