"""The twenty-third session's Python API audit: the README's workflows (inject, train, save/load, several adapters,
merge, QLoRA, combine) on model families and combinations the earlier tests did not reach. Each test fails on
the lorakit before its fix."""

from __future__ import annotations

import json

import pytest
import torch

import lorakit
from lorakit.errors import LorakitError
from test_train_helpers import task_records, tiny_tokenizer, tiny_train_model

QUICK = dict(max_steps=2, batch_size=4, eval_examples=0, progress=False, save_every=0, lr=5e-3)


def _two_adapters():
    model = tiny_train_model()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4), adapter="b")  # active now
    return model


def test_train_saves_the_active_trainable_adapter_not_the_first(tmp_path):
    """Two injected (trainable) adapters, the second active: train() trained "b" but saved "a", untouched, as the
    run's adapter (the first adapter with trainable tensors in parameter order)."""
    from lorakit.train import TrainConfig, train

    model = _two_adapters()
    before = {n: p.detach().clone() for n, p in lorakit.lora_parameters(model, "b")}
    result = train(model, tiny_tokenizer(), task_records(8), TrainConfig(**QUICK), out=tmp_path / "run",
                   log=lambda line: None)
    assert json.loads((result.adapter_dir / "adapter_config.json").read_text())["r"] == 2
    assert any(not torch.equal(before[n], p) for n, p in lorakit.lora_parameters(model, "b"))
    saved = lorakit.read_adapter(result.adapter_dir)
    trained = dict(lorakit.lora_parameters(model, "b"))
    name = next(n for n in trained if n.endswith("lora_B"))
    assert any(torch.equal(t, trained[name].detach()) for t in saved.tensors.values())


def test_train_refuses_trainable_adapters_it_cannot_save_as_one():
    from lorakit.train import TrainConfig, train

    model = _two_adapters()
    lorakit.set_adapter(model, ["a", "b"])
    with pytest.raises(LorakitError, match="all active and trainable.*set_adapter"):
        train(model, tiny_tokenizer(), task_records(8), TrainConfig(**QUICK), log=lambda line: None)
    model = tiny_train_model()
    lorakit.inject(model, lorakit.LoraConfig(r=4), adapter="mine")
    lorakit.inject(model, lorakit.LoraConfig(r=4), adapter="other", trainable=False)  # active, frozen
    with pytest.raises(LorakitError, match="'mine' is trainable but not active.*set_adapter"):
        train(model, tiny_tokenizer(), task_records(8), TrainConfig(**QUICK), log=lambda line: None)
