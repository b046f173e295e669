"""Cross-entropy of a linear head without materialising the full logits: ``CE(hidden @ weight.T, labels)``.

The reference, ``F.cross_entropy((hidden @ weight.T).float(), labels)``, holds (N, V) logits in the compute dtype,
a float32 copy and float32 gradients: for a 128,256-token vocabulary and N = 8,192 tokens that is 2 + 4 + 4 GiB.
``linear_cross_entropy`` walks the rows in chunks and, for each chunk, computes the logits (compute-dtype GEMM,
rounded like the reference's ``hidden @ weight.T``), the logsumexp and per-row loss, and, when a gradient is
needed, ``softmax - onehot`` in place of the logits, then ``d hidden = grad @ weight`` for the chunk (and
``d weight += grad^T @ hidden`` only if the weight requires grad). The gradients are computed during the forward
pass (the loss is a scalar, so backward only scales them by the incoming gradient): the lm_head GEMM is not
recomputed and only (N, H) is kept between forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorakit.errors import LorakitError
from lorakit.kernels._triton import interpreter_on, triton_usable

_CHUNK_BYTES = 256 * 2**20  # logits of one chunk; 1,024 rows of a 128k vocabulary in bf16


def linear_cross_entropy_reference(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                                   ignore_index: int = -100, reduction: str = "mean") -> torch.Tensor:
    """The spec. hidden (N, H), weight (V, H), labels (N,) -> float32 scalar."""
    return F.cross_entropy((hidden @ weight.t()).float(), labels, ignore_index=ignore_index, reduction=reduction)


def _rows_torch_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """The same contract as the Triton ``cross_entropy_rows_``, in PyTorch (used where Triton cannot run)."""
    logits_f = logits.float()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels)).unsqueeze(1)
    lse = torch.logsumexp(logits_f, dim=-1)
    loss = torch.where(valid, lse - logits_f.gather(1, safe).squeeze(1), torch.zeros_like(lse))
    if write_grad:
        grad = torch.exp(logits_f - lse.unsqueeze(1))
        grad.scatter_add_(1, safe, -torch.ones_like(safe, dtype=grad.dtype))
        grad.mul_(valid.unsqueeze(1))
        logits.copy_(grad)
    return loss


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    device_type = hidden.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else hidden.dtype


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, ignore_index, reduction, chunk_rows, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        write_grad = need_h or need_w
        n_rows = hidden.shape[0]
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(dtype)
            w = weight.to(dtype)
            use_triton = triton_usable(h, w) and not (h.device.type == "cpu" and interpreter_on() and dtype == torch.bfloat16)
            if use_triton:
                from lorakit.kernels.triton.cross_entropy import cross_entropy_rows_ as rows_fn
            else:
                rows_fn = _rows_torch_
            losses = torch.empty(n_rows, dtype=torch.float32, device=h.device)
            dh = torch.empty_like(h) if need_h else None
            dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if need_w else None
            for start in range(0, n_rows, chunk_rows):
                end = min(start + chunk_rows, n_rows)
                logits = h[start:end] @ w.t()  # (rows, V) in the compute dtype, as the reference rounds them
                losses[start:end] = rows_fn(logits, labels[start:end], ignore_index, write_grad)
                if need_h:
                    torch.mm(logits, w, out=dh[start:end])  # (rows, H)
                if need_w:
                    dw.add_(logits.t() @ h[start:end])
                del logits
            total = losses.sum()
            n_valid = (labels != ignore_index).sum()
        ctx.save_for_backward(dh, dw, n_valid)
        ctx.reduction = reduction
        ctx.hidden_dtype, ctx.weight_dtype = hidden.dtype, weight.dtype
        return total / n_valid if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_loss):
        dh, dw, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid if ctx.reduction == "mean" else grad_loss
        grad_h = (dh * scale).to(ctx.hidden_dtype) if dh is not None else None
        grad_w = (dw * scale).to(ctx.weight_dtype) if dw is not None else None
        return grad_h, grad_w, None, None, None, None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                         reduction: str = "mean", chunk_rows: int | None = None) -> torch.Tensor:
    """Cross-entropy of ``hidden @ weight.T`` against ``labels``, chunked over rows; returns a float32 scalar.

    hidden (N, H), weight (V, H), labels (N,) integer in [0, V) or ``ignore_index``. ``reduction`` is "mean" (over
    the non-ignored rows, as ``F.cross_entropy``) or "sum". ``chunk_rows`` defaults to about 256 MiB of logits.
    Gradients flow to hidden, and to weight only if it requires grad.
    """
    if reduction not in ("mean", "sum"):
        raise LorakitError(f"linear_cross_entropy: reduction must be 'mean' or 'sum', got {reduction!r}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise LorakitError(f"linear_cross_entropy: expected hidden (N, H) and weight (V, H), got "
                           f"{tuple(hidden.shape)} and {tuple(weight.shape)}; flatten hidden with .reshape(-1, H)")
    if labels.shape != (hidden.shape[0],):
        raise LorakitError(f"linear_cross_entropy: labels must have shape ({hidden.shape[0]},) to match hidden, "
                           f"got {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise LorakitError(f"linear_cross_entropy: labels must be an integer tensor, got {labels.dtype}")
    vocab = weight.shape[0]
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):  # one sync per call; an out-of-range label would otherwise read out of bounds
        raise LorakitError(f"linear_cross_entropy: label {int(labels[bad][0])} is outside the vocabulary [0, {vocab}) "
                           f"and is not ignore_index={ignore_index}; fix the labels or the vocabulary size")
    dtype = _compute_dtype(hidden)
    if chunk_rows is None:
        chunk_rows = max(1, _CHUNK_BYTES // (vocab * torch.finfo(dtype).bits // 8))
    return LinearCrossEntropyFunction.apply(hidden, weight, labels.contiguous(), int(ignore_index), reduction,
                                            int(chunk_rows), dtype)
