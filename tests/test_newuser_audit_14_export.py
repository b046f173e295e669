"""Fourteenth audit, as a demanding new user: merging, exporting and combining adapters (lorakit.merge,
lorakit.export, lorakit.combine and the ``lorakit merge`` / ``lorakit combine`` commands). Each test failed before
its fix. Tiny random models built from config classes; nothing is downloaded."""

from __future__ import annotations


import torch

import lorakit
from conftest import assert_close, tiny_llama
from test_serve_support import make_adapter


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def test_exporting_one_adapter_takes_its_own_modules_to_save_copy_not_the_active_adapters(tmp_path):
    """export_merged(model, tok, "a", out) while adapter "b" is active wrote b's choice of lm_head (here: the
    base's, b has no copy) beside a's merged LoRA: merge_and_unload picked modules-to-save copies by the active
    adapters, not by the adapters it was asked to merge."""
    from transformers import AutoModelForCausalLM

    from lorakit.export import export_merged

    base = tiny_llama(seed=4, initializer_range=0.3)
    with_head = make_adapter(base, tmp_path / "a", seed=5, std=0.1, target_modules=["q_proj"], modules_to_save=["lm_head"])
    other = make_adapter(base, tmp_path / "b", seed=6, std=0.1, target_modules=["v_proj"])
    lorakit.load_adapter(base, with_head, adapter="a")
    with torch.no_grad():  # a trained copy that differs from the base head
        base.lm_head.copies["a"].weight.add_(torch.randn_like(base.lm_head.copies["a"].weight))
    ids = torch.randint(0, 128, (2, 7))
    expected = _logits(base, ids)
    lorakit.load_adapter(base, other, adapter="b")  # now the active adapter
    assert lorakit.active_adapters(base) == ["b"]
    export_merged(base, None, "a", tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert_close(_logits(merged, ids), expected, torch.float32)
