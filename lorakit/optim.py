"""Optimizer concerns: parameter groups (LoRA+), AdamW, and the learning-rate schedule.

LoRA+ (Hayou et al., 2024) trains ``lora_B`` with a larger learning rate than ``lora_A``: ``lr_B = ratio * lr_A``
(ratio ~16 in the paper). It lives here, in the optimizer, not in the layer (as PEFT does it). The grouping follows
PEFT's ``create_loraplus_optimizer``: ``lora_B`` and every 1-D trainable tensor (DoRA's ``magnitude``, biases of
modules-to-save) take ``ratio * lr``; everything else (``lora_A``, whole copied modules) takes ``lr``. 1-D tensors
get no weight decay (the usual rule for biases, norms and magnitudes).

Against peft 0.21 (tests/test_newuser_audit_14_variants.py): with ``weight_decay`` given as peft's
``loraplus_weight_decay`` (peft's groups override a plain ``weight_decay=``), LoRA and DoRA adapters on linear layers
are equal after AdamW steps. Two differences are deliberate:

- peft decays every 1-D tensor not named ``bias``: DoRA's magnitude (pulled towards 0, away from ``||W||``, the
  adapted layer's starting point) and copied RMSNorm weights (likewise towards 0, not 1). lorakit decays none.
- peft gives an embedding adapter's A and B its own ``loraplus_lr_embedding`` (default 1e-6: next to lr 1e-4 an
  embedding adapter barely trains). lorakit has no embedding learning rate: ``lora_B`` at ``ratio * lr``,
  ``lora_A`` at ``lr``, as on any layer. For peft's groups, build the AdamW groups yourself.

The schedule is a pure function of the step number (``Schedule.factor``), so resuming needs no scheduler state
beyond the step counter, and the learning rate of step k is the same whether or not the run was interrupted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.schedules import SCHEDULES


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, loraplus_ratio: float | None = None
                 ) -> list[dict]:
    """AdamW parameter groups over the trainable parameters of ``model``.

    Args:
        model: a model whose trainable parameters are the ones to optimise (adapters, or everything for full
            fine-tuning).
        lr: the base learning rate (that of ``lora_A``).
        weight_decay: decoupled weight decay for matrices (1-D tensors get none).
        loraplus_ratio: LoRA+ ratio ``lr_B / lr_A``; None (or 1) for plain AdamW.
    Returns:
        non-empty groups, each ``{"params": [...], "lr": float, "weight_decay": float, "name": str}``; every group
        records ``initial_lr`` so the schedule can scale it.
    """
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise LorakitError(f"learning rate must be a positive number, got {lr!r}")
    if loraplus_ratio is not None and not (math.isfinite(loraplus_ratio) and loraplus_ratio > 0):
        raise LorakitError(f"loraplus_ratio must be a positive number (e.g. 16), got {loraplus_ratio!r}")
    if weight_decay < 0:
        raise LorakitError(f"weight_decay must be >= 0, got {weight_decay!r}")
    ratio = 1.0 if loraplus_ratio is None else float(loraplus_ratio)
    buckets: dict[str, list[nn.Parameter]] = {"A": [], "A_no_decay": [], "B": [], "B_no_decay": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        fast = name.endswith("lora_B") or parameter.ndim < 2  # PEFT's LoRA+ rule
        decay = parameter.ndim >= 2
        buckets[("B" if fast else "A") + ("" if decay else "_no_decay")].append(parameter)
    if not any(buckets.values()):
        raise LorakitError("the model has no trainable parameters; inject an adapter (lorakit.inject) or train --full")
    groups = []
    for key, params in buckets.items():
        if not params:
            continue
        group_lr = lr * (ratio if key.startswith("B") else 1.0)
        groups.append({"params": params, "lr": group_lr, "initial_lr": group_lr,
                       "weight_decay": weight_decay if not key.endswith("no_decay") else 0.0, "name": key})
    return groups


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0, loraplus_ratio: float | None = None,
                    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`. ``foreach=False`` keeps the update order fixed on every device count, so a
    resumed CPU run is bit-identical to an uninterrupted one."""
    groups = param_groups(model, lr, weight_decay, loraplus_ratio)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=False)


@dataclass
class Schedule:
    """Learning-rate factor per optimizer step: linear warmup, then cosine / linear decay, or constant.

    ``factor(step)`` is the multiplier of every group's ``initial_lr`` for 0-based optimizer step ``step``:
    during warmup ``(step + 1) / warmup_steps`` (so the first step is not wasted at lr 0), then from 1 towards
    ``min_ratio``, which it would reach at step ``total_steps`` (so the last step is not wasted either).
    """

    kind: str = "cosine"
    warmup_steps: int = 0
    total_steps: int = 1
    min_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise LorakitError(f"unknown schedule {self.kind!r}; choose one of {', '.join(SCHEDULES)}")
        if self.total_steps < 1:
            raise LorakitError(f"total steps must be at least 1, got {self.total_steps}")
        if self.warmup_steps < 0:
            raise LorakitError(f"warmup steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_ratio <= 1.0:
            raise LorakitError(f"min_lr_ratio must be in [0, 1], got {self.min_ratio}")

    def factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        decay_steps = self.total_steps - self.warmup_steps
        progress = min(1.0, (step - self.warmup_steps) / max(1, decay_steps))
        if self.kind == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_ratio + (1.0 - self.min_ratio) * shape

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set each group's lr for ``step``; returns the factor."""
        factor = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        return factor
