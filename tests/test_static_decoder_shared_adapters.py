"""One copy of each served adapter: after the static decoder stacks an adapter, the model's own lora_A / lora_B
are views of the stacks (lorakit.decoding.adapters), through growth, reloads and evictions, with values unchanged.

The model's forward (transformers' path: lorakit's mixed batches), saved files and the decoder's steps must be
exactly what they were with two copies. Float32 on the CPU, kernels under TRITON_INTERPRET=1 (conftest).
"""

from __future__ import annotations

import gc
import weakref

import torch
from safetensors.torch import load_file

import lorakit
from lorakit.decoding import StaticDecoder
from lorakit.generation import decode, prefill
from tests.conftest import tiny_llama
from tests.test_static_decoder import _with_adapters

ATOL = 1e-5  # float32, as tests/test_static_decoder.py


def _model():
    return _with_adapters(tiny_llama(seed=7))  # "a" r=4, "b" r=2 rsLoRA on q/v/down, "d" r=3 DoRA; random B


def _adapter_tensors(model, name):
    """{module path + tensor name: a clone} of adapter ``name``'s lora_A / lora_B on every layer."""
    out = {}
    for path, module in model.named_modules():
        adapters = getattr(module, "adapters", None)
        if adapters is not None and name in adapters:
            out[f"{path}.A"] = adapters[name].lora_A.detach().clone()
            out[f"{path}.B"] = adapters[name].lora_B.detach().clone()
    return out


def _logits(model, prompts, names):
    logits, batch = prefill(model, prompts, names)
    return logits, decode(model, batch, logits.argmax(-1).tolist(), names)


PROMPTS = [[5, 9, 2, 7, 1], [3, 4], [8, 8, 1, 2, 3]]
NAMES = ["a", "d", "b"]
MODULES = {"a": 14, "b": 6, "d": 14}  # projections holding each adapter: 2 layers x (7, 3, 7)


def test_served_adapters_are_views_of_the_stacks_and_nothing_changes(tmp_path):
    model = _model()
    before = {name: _adapter_tensors(model, name) for name in MODULES}
    expected = _logits(model, PROMPTS, NAMES)
    lorakit.save_adapter(model, tmp_path / "before", adapter="a")
    decoder = StaticDecoder(model, max_batch=4, max_len=16, adapter_slots=2)  # 3 adapters: the slots grow once
    old_stack = weakref.ref(decoder.adapters.layers[0]["qkv"].A)
    logits, batch = prefill(model, PROMPTS, NAMES)
    decoder.admit([0, 1, 2], batch)
    got = decoder.step([0, 1, 2], logits.argmax(-1).tolist(), NAMES)
    assert torch.allclose(got, expected[1], atol=ATOL, rtol=1e-5)
    assert decoder.adapters.capacity >= 3
    gc.collect()
    assert old_stack() is None  # the first buffers are gone: no module still views them
    for name, count in MODULES.items():
        assert len(decoder.adapters._shared(name)) == count
        after = _adapter_tensors(model, name)
        assert all(torch.equal(after[key], value) for key, value in before[name].items())
    again = _logits(model, PROMPTS, NAMES)  # the model's own forward through the views
    assert all(torch.equal(x, y) for x, y in zip(again, expected))
    lorakit.save_adapter(model, tmp_path / "after", adapter="a")
    saved = [load_file(str(tmp_path / folder / "adapter_model.safetensors")) for folder in ("before", "after")]
    assert saved[0].keys() == saved[1].keys() and all(torch.equal(saved[0][k], saved[1][k]) for k in saved[0])


def test_growth_reload_and_eviction_keep_the_models_values():
    model = _model()
    decoder = StaticDecoder(model, max_batch=4, max_len=16)
    logits, batch = prefill(model, PROMPTS, NAMES)
    decoder.admit([0, 1, 2], batch)
    decoder.step([0, 1, 2], logits.argmax(-1).tolist(), NAMES)
    values = _adapter_tensors(model, "a")
    # a larger rank re-lays every slot out (R grows): "a" is re-pointed into the new buffers with its values
    lorakit.inject(model, lorakit.LoraConfig(r=8, alpha=8), adapter="e")
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(model):
            if name.endswith("lora_B") and ".e." in f".{name}.":
                p.normal_(0, 0.1)
    decoder.release([0, 1, 2])
    logits, batch = prefill(model, [PROMPTS[0]], ["e"])
    decoder.admit([0], batch)
    decoder.step([0], logits.argmax(-1).tolist(), ["e"])
    assert decoder.adapters.r_max >= 8
    assert len(decoder.adapters._shared("a")) == MODULES["a"]
    assert all(torch.equal(_adapter_tensors(model, "a")[k], v) for k, v in values.items())
    # changed in place through the view: the decoder reads the new values at once; a reload keeps them
    q = model.model.layers[0].self_attn.q_proj.adapters["a"]
    with torch.no_grad():
        q.lora_B.mul_(3)
    changed = _adapter_tensors(model, "a")
    decoder.reload_adapter("a")
    assert all(torch.equal(_adapter_tensors(model, "a")[k], v) for k, v in changed.items())
    decoder.release([0])
    expected = _logits(model, [PROMPTS[0]], ["a"])
    logits, batch = prefill(model, [PROMPTS[0]], ["a"])
    decoder.admit([0], batch)
    got = decoder.step([0], logits.argmax(-1).tolist(), ["a"])
    assert torch.allclose(got, expected[1], atol=ATOL, rtol=1e-5)
    # evicted while still in the model: the modules get their own copy back, values intact, the slot zeroed
    slot = decoder.adapters.slot_of["a"]
    decoder.adapters.evict("a")
    assert decoder.adapters._shared("a") == []
    assert all(torch.equal(_adapter_tensors(model, "a")[k], v) for k, v in changed.items())
    assert decoder.adapters.layers[0]["qkv"].A[slot].abs().sum() == 0


def test_an_adapter_deleted_and_added_again_under_its_name_is_served_with_its_new_values(tmp_path):
    model = _model()
    decoder = StaticDecoder(model, max_batch=4, max_len=16)
    logits, batch = prefill(model, [PROMPTS[0]], ["a"])
    decoder.admit([0], batch)
    decoder.step([0], logits.argmax(-1).tolist(), ["a"])
    decoder.release([0])
    other = _model()  # the same layout, other values: saved, then loaded in place of "a"
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(other):
            if name.endswith("lora_B"):
                p.normal_(0, 0.3)
    lorakit.save_adapter(other, tmp_path / "new_a", adapter="a")
    lorakit.delete_adapter(model, "a")
    lorakit.load_adapter(model, tmp_path / "new_a", adapter="a")
    expected = _logits(model, [PROMPTS[0]], ["a"])
    logits, batch = prefill(model, [PROMPTS[0]], ["a"])
    decoder.admit([0], batch)
    got = decoder.step([0], logits.argmax(-1).tolist(), ["a"])
    assert torch.allclose(got, expected[1], atol=ATOL, rtol=1e-5)
    assert len(decoder.adapters._shared("a")) == MODULES["a"]  # the new modules now view the slot
