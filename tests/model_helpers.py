"""Model helpers the tests share: tiny random transformers models by class name, their logits, and transformers'
own greedy generation (the reference lorakit's generation is checked against)."""

from __future__ import annotations

import torch


def seeded_model(model_class: str, config_class: str, arguments: dict) -> torch.nn.Module:
    """``transformers.<model_class>(<config_class>(**arguments))`` in eval mode, its random weights drawn after
    ``torch.manual_seed(0)``: a second call gives the same weights."""
    import transformers

    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config_class)(**arguments)).eval()


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    """(batch, length, vocab): the model's logits for ``ids`` (batch, length), without autograd."""
    with torch.no_grad():
        return model(ids).logits


def hf_greedy(model, prompts: list[list[int]], new: int) -> list[list[int]]:
    """transformers' generate on the batch of ``prompts`` left-padded with id 0 (masked), no end token: the ``new``
    tokens of each row."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[:, width:].tolist()


def with_lora_and_dora(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with two adapters on every projection, "a" (LoRA r=4) and "d" (DoRA r=3), whose lora_B and
    magnitudes are moved off their start (so each changes the logits), in eval mode: the mixed batches of the
    engine and decoder tests."""
    import lorakit

    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=3, alpha=6, variant="dora"), adapter="d")
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(model):
            if name.endswith(("lora_B", "magnitude")):
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()
