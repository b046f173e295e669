"""Many adapters on one base: set, disable, delete, and mixed batches equal to per-row runs."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import assert_close, tiny_llama
from test_layers import randomize


def three_adapters():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8), adapter="a")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, variant="dora", target_modules=["q_proj", "down_proj"]), adapter="b")
    lorakit.inject(model, lorakit.LoraConfig(r=3, variant="rslora", target_modules=["v_proj"], modules_to_save=["lm_head"]), adapter="c")
    randomize(model)
    with torch.no_grad():
        model.lm_head.copies["c"].weight.add_(0.1)
    return model


def test_set_disable_delete():
    model = three_adapters()
    ids = torch.randint(0, 128, (2, 6))
    with lorakit.disable_adapters(model):
        base = model(ids).logits
    outputs = {}
    for name in "abc":
        lorakit.set_adapter(model, name)
        outputs[name] = model(ids).logits
        assert not torch.allclose(outputs[name], base)
    assert lorakit.active_adapters(model) == ["c"]
    lorakit.delete_adapter(model, "b")
    assert lorakit.adapter_names(model) == ["a", "c"]
    lorakit.set_adapter(model, "a")
    assert_close(model(ids).logits, outputs["a"])
    with pytest.raises(lorakit.LorakitError, match="unknown adapter 'b'"):
        lorakit.set_adapter(model, "b")


def test_only_the_new_adapter_trains_when_injected():
    model = three_adapters()
    grads = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(".a." in n for n in grads) and any(".c." in n for n in grads)
    assert not any("base_layer" in n for n in grads)


def test_mixed_batch_equals_rows_alone():
    model = three_adapters()
    ids = torch.randint(0, 128, (5, 7))
    names = ["a", None, "b", "c", "a"]
    expected = []
    for row, name in zip(ids, names):
        if name is None:
            with lorakit.disable_adapters(model):
                expected.append(model(row[None]).logits)
        else:
            lorakit.set_adapter(model, name)
            expected.append(model(row[None]).logits)
    with lorakit.mixed_batch(model, names):
        mixed = model(ids).logits
    assert_close(mixed, torch.cat(expected))
    with pytest.raises(lorakit.LorakitError, match="unknown adapter 'zzz'"):
        with lorakit.mixed_batch(model, ["a", "zzz"]):
            pass
    with pytest.raises(lorakit.LorakitError, match="2 adapter names but the batch has 5 rows"):
        with lorakit.mixed_batch(model, ["a", "b"]):
            model(ids)


def test_merged_adapter_blocks_disable_mixed_and_delete():
    model = three_adapters()
    lorakit.set_adapter(model, "a")
    lorakit.merge(model)
    for action in (lambda: lorakit.disable_adapters(model).__enter__(), lambda: lorakit.mixed_batch(model, ["a"]).__enter__(),
                   lambda: lorakit.delete_adapter(model, "a")):
        with pytest.raises(lorakit.LorakitError, match="unmerge"):
            action()
    lorakit.unmerge(model)
    lorakit.delete_adapter(model, "a")


def test_duplicate_adapter_name_refused():
    model = three_adapters()
    with pytest.raises(lorakit.LorakitError, match="already has an adapter named 'a'"):
        lorakit.inject(model, lorakit.LoraConfig(), adapter="a")
