"""LoRA / DoRA on an NF4 base (QLoRA): the same outputs and adapter gradients as over a dense base holding the
dequantized weights; merging re-quantizes through load_dense and warns."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.inject import lora_layers
from lorakit.kernels.nf4 import dequantize_nf4
from lorakit.quant.nf4 import NF4Linear, quantize_nf4
from lorakit.quant.quantize import quantize


def _pair(variant: str):
    """(QLoRA model, dense model with the dequantized weights), both with the same non-zero adapters."""
    quantized = quantize(tiny_llama(), "nf4")
    dense = tiny_llama()
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if isinstance(module, NF4Linear):
                dense.get_submodule(name).weight.copy_(module.dequantize())
    config = lorakit.LoraConfig(r=4, alpha=8.0, target_modules="all-linear", variant=variant)
    lorakit.inject(quantized, config)
    lorakit.inject(dense, config)
    q_layers, d_layers = lora_layers(quantized), lora_layers(dense)
    assert set(q_layers) == set(d_layers) and len(q_layers) == 14
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for path, layer in q_layers.items():
            assert isinstance(layer.base_layer, NF4Linear), path
            source, target = layer.adapters["default"], d_layers[path].adapters["default"]
            source.lora_B.copy_(torch.randn(source.lora_B.shape, generator=generator) * 0.1)
            for name, parameter in source.named_parameters():
                dict(target.named_parameters())[name].copy_(parameter)
    return quantized, dense


@pytest.mark.parametrize("variant", ["lora", "dora"])
def test_qlora_forward_and_adapter_grads_equal_dense_over_dequantized(variant):
    quantized, dense = _pair(variant)
    ids = torch.randint(0, 128, (2, 7))
    quantized.train()
    dense.train()
    out_q = quantized(input_ids=ids, labels=ids)
    out_d = dense(input_ids=ids, labels=ids)
    assert_close(out_q.logits, out_d.logits)
    out_q.loss.backward()
    out_d.loss.backward()
    d_layers = lora_layers(dense)
    checked = 0
    for path, layer in lora_layers(quantized).items():
        for name, parameter in layer.adapters["default"].named_parameters():
            reference = dict(d_layers[path].adapters["default"].named_parameters())[name]
            assert parameter.grad is not None, f"{path}.{name}"
            assert_close(parameter.grad, reference.grad, msg=f"{path}.{name}")
            checked += 1
    assert checked == 14 * (3 if variant == "dora" else 2)
    # the frozen 4-bit base gets no gradient and holds no float weight
    assert all(not p.requires_grad for n, p in quantized.named_parameters() if "base_layer" in n)


def test_merge_into_nf4_requantizes_and_warns():
    quantized, _ = _pair("lora")
    layer = lora_layers(quantized)["model.layers.0.mlp.up_proj"]
    expected = dequantize_nf4(quantize_nf4(layer.merged_candidate("default")), torch.float32)
    with pytest.warns(UserWarning, match="quantized"):
        lorakit.merge(quantized)
    assert torch.equal(layer.base_layer.dequantize(), expected)
    assert isinstance(layer.base_layer, NF4Linear)


def test_merge_into_nf4_warns_once_with_measured_share_unless_allowed():
    import warnings as _warnings

    from lorakit.quant.merge_loss import LossyMergeWarning

    quantized, _ = _pair("lora")
    with pytest.warns(LossyMergeWarning) as caught:
        lorakit.merge(quantized)
    assert len(caught) == 1 and "% of the update survives" in str(caught[0].message)
    lorakit.unmerge(quantized)
    with _warnings.catch_warnings():
        _warnings.simplefilter("error", LossyMergeWarning)
        lorakit.merge(quantized, allow_lossy=True)
