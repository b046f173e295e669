"""LoRA+ parameter groups and the learning-rate schedule (lorakit/optim.py)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import tiny_llama
from lorakit import LoraConfig, inject
from lorakit.errors import LorakitError
from lorakit.optim import Schedule, build_optimizer, param_groups


def _groups_by_name(model, **kwargs):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: (g, [names[id(p)] for p in g["params"]]) for g in param_groups(model, **kwargs)}


def test_loraplus_gives_lora_B_and_magnitude_ratio_times_the_lr():
    model = inject(tiny_llama(), LoraConfig(r=4, alpha=8, variant="dora"))
    groups = _groups_by_name(model, lr=1e-3, weight_decay=0.1, loraplus_ratio=16)
    a_group, a_names = groups["A"]
    b_group, b_names = groups["B"]
    m_group, m_names = groups["B_no_decay"]
    assert a_names and all(n.endswith("lora_A") for n in a_names)
    assert b_names and all(n.endswith("lora_B") for n in b_names)
    assert m_names and all(n.endswith("magnitude") for n in m_names)
    assert a_group["lr"] == pytest.approx(1e-3) and b_group["lr"] == pytest.approx(16e-3) and m_group["lr"] == pytest.approx(16e-3)
    assert a_group["weight_decay"] == 0.1 and b_group["weight_decay"] == 0.1 and m_group["weight_decay"] == 0.0
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert len(a_names) + len(b_names) + len(m_names) == n_trainable


def test_loraplus_step_moves_B_ratio_times_more_than_plain_adam():
    """Adam's first update is lr * sign(grad) in size, so B's first step is exactly ratio x A's learning rate."""
    torch.manual_seed(0)
    model = inject(tiny_llama(), LoraConfig(r=4, alpha=8, target_modules=["q_proj"], init="gaussian"))
    layer = model.model.layers[0].self_attn.q_proj.adapters["default"]
    with torch.no_grad():
        layer.lora_B.normal_()  # non-zero B so that A gets a gradient too
    optimizer = build_optimizer(model, lr=1e-3, loraplus_ratio=8, eps=1e-20)
    before_A, before_B = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    model(torch.randint(0, 128, (2, 7))).logits.square().mean().backward()
    optimizer.step()
    step_A = (layer.lora_A.detach() - before_A).abs()
    step_B = (layer.lora_B.detach() - before_B).abs()
    assert torch.allclose(step_A[step_A > 0], torch.full_like(step_A[step_A > 0], 1e-3), rtol=1e-3)
    assert torch.allclose(step_B[step_B > 0], torch.full_like(step_B[step_B > 0], 8e-3), rtol=1e-3)


def test_plain_groups_and_errors():
    model = inject(tiny_llama(), LoraConfig(r=2))
    groups = param_groups(model, lr=2e-3)
    assert {g["lr"] for g in groups} == {2e-3}
    frozen = tiny_llama()
    for p in frozen.parameters():
        p.requires_grad_(False)
    with pytest.raises(LorakitError, match="no trainable parameters"):
        param_groups(frozen, lr=1e-3)
    with pytest.raises(LorakitError, match="loraplus_ratio"):
        param_groups(model, lr=1e-3, loraplus_ratio=-1.0)
    with pytest.raises(LorakitError, match="learning rate"):
        param_groups(model, lr=float("nan"))


def test_schedule_warmup_then_cosine_linear_constant():
    cosine = Schedule("cosine", warmup_steps=4, total_steps=14)
    assert [cosine.factor(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert cosine.factor(4) == 1.0
    assert cosine.factor(9) == pytest.approx(0.5 * (1 + math.cos(math.pi * 5 / 10)))
    assert 0 < cosine.factor(13) < 0.05  # the last step still learns
    decreasing = [cosine.factor(s) for s in range(4, 14)]
    assert decreasing == sorted(decreasing, reverse=True)
    linear = Schedule("linear", warmup_steps=0, total_steps=10, min_ratio=0.1)
    assert linear.factor(0) == 1.0 and linear.factor(5) == pytest.approx(0.1 + 0.9 * 0.5)
    assert Schedule("constant", 2, 10).factor(7) == 1.0
    with pytest.raises(LorakitError, match="unknown schedule"):
        Schedule("step", 0, 10)
