"""Triton cross-entropy over one chunk of logits rows, gradient written in place.

For each row: logsumexp by an online max/sum over the vocabulary in blocks, the loss ``lse - logit[label]``
(0 for ``ignore_index`` rows), and, when asked, ``softmax - onehot`` written over the logits (0 for ignored rows),
so the gradient of a chunk costs no memory beyond its logits. Two reads and one write of each logit; the PyTorch
path (a float32 copy, log-softmax, softmax, subtract, cast) makes about five.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _ce_rows(LOGITS, LABELS, LOSS, stride, n_cols, ignore_index, WRITE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    ptr = LOGITS + row * stride
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    safe_label = tl.where(valid, label, 0)
    target = tl.load(ptr + safe_label).to(tl.float32)  # read before the gradient overwrites the row
    m = float("-inf")
    s = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(ptr + cols, mask=cols < n_cols, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
        m = m_new
    lse = m + tl.log(s)
    tl.store(LOSS + row, tl.where(valid, lse - target, 0.0))
    if WRITE_GRAD:
        keep = tl.where(valid, 1.0, 0.0)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < n_cols
            x = tl.load(ptr + cols, mask=mask, other=0.0).to(tl.float32)
            grad = (tl.exp(x - lse) - tl.where(cols == safe_label, 1.0, 0.0)) * keep
            tl.store(ptr + cols, grad.to(LOGITS.dtype.element_ty), mask=mask)


def cross_entropy_rows_(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int, write_grad: bool) -> torch.Tensor:
    """logits (rows, V) contiguous, labels (rows,) int -> per-row loss (rows,) float32.

    With ``write_grad`` the logits are overwritten by d(loss_row)/d(logits) = softmax - onehot (zero rows for
    ignored labels). Labels must already be checked to lie in [0, V) or equal ``ignore_index``.
    """
    rows, n_cols = logits.shape
    loss = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        block = min(BLOCK, triton.next_power_of_2(n_cols))
        _ce_rows[(rows,)](logits, labels, loss, logits.stride(0), n_cols, ignore_index, WRITE_GRAD=write_grad,
                          BLOCK=block, num_warps=8 if block >= 2048 else 4)
    return loss
