"""Merging into an NF4 base re-quantizes it; unmerge must give back the exact packed base, not W' - delta
re-quantized (which moved ~19% of a layer's 4-bit codes in a trained tiny adapter)."""

import warnings

import torch

import lorakit
from conftest import tiny_llama
from test_layers import randomize


def test_unmerge_restores_the_packed_base_exactly():
    model = lorakit.quantize(tiny_llama(hidden_size=64, intermediate_size=128), "nf4")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "down_proj"]))
    randomize(model, std=0.5)
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        unmerged_logits = model(ids).logits
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.merge(model, allow_lossy=True)
    q_proj = model.model.layers[0].self_attn.q_proj
    assert not torch.equal(q_proj.base_layer.weight_packed, before["model.layers.0.self_attn.q_proj.weight_packed"])
    lorakit.unmerge(model)
    for key, value in before.items():
        wrapped = key.replace("q_proj.", "q_proj.base_layer.").replace("down_proj.", "down_proj.base_layer.")
        assert torch.equal(model.state_dict()[wrapped], value), key
    with torch.no_grad():
        assert torch.equal(model(ids).logits, unmerged_logits)


def test_merge_and_unload_keeps_no_copy():
    model = lorakit.quantize(tiny_llama(hidden_size=64, intermediate_size=128), "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    layers = [m for m in model.modules() if isinstance(m, lorakit.layers.LoraLayer)]
    lorakit.merge_and_unload(model, allow_lossy=True)
    assert all("_quantized_original" not in layer.__dict__ for layer in layers)
