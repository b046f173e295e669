"""combine_adapters against peft's add_weighted_adapter on the same inputs: equal tensors, bit for bit, for every
method; the cases where lorakit differs on purpose (rsLoRA first input, DoRA, modules_to_save) and every refusal."""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.cli import main
from lorakit.combine import METHODS, combine_adapters
from lorakit.inject import lora_layers
from test_serve_support import make_adapter
from test_train_helpers import tiny_folder  # noqa: F401 (fixture)

IDS = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(5))
WEIGHTS = {"a": 0.7, "b": -0.4}


def _quiet_inject(peft_model):
    """peft creates the new adapter (a random init, overwritten at once) before it combines; lorakit draws nothing
    there. Run peft's creation on a forked generator, so DARE's masks come from the same generator state in both."""
    original = peft_model.base_model.inject_adapter

    def inject_without_draws(*args, **kwargs):
        with torch.random.fork_rng():
            return original(*args, **kwargs)

    peft_model.base_model.inject_adapter = inject_without_draws
    return peft_model


def _peft_pair(folder, rank_b: int = 4, rslora_first: bool = False):
    """peft model with a (LoRA on q, v and the embedding) and b (rsLoRA, another alpha, on q, k, up), saved to
    ``folder``; non-zero B everywhere (init_lora_weights=False)."""
    torch.manual_seed(1)
    config_a = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
                               use_rslora=rslora_first, init_lora_weights=False)
    config_b = peft.LoraConfig(r=rank_b, lora_alpha=16, target_modules=["q_proj", "k_proj", "up_proj"],
                               use_rslora=not rslora_first, init_lora_weights=False)
    peft_model = peft.get_peft_model(tiny_llama(), config_a, adapter_name="a")
    peft_model.add_adapter("b", config_b)
    peft_model.eval().save_pretrained(folder)
    return _quiet_inject(peft_model)


def _lorakit_pair(folder, model=None):
    model = tiny_llama() if model is None else model
    lorakit.load_adapter(model, folder / "a", adapter="a")
    lorakit.load_adapter(model, folder / "b", adapter="b")
    return model


def _peft_tensors(peft_model, path: str, name: str):
    layer = peft_model.base_model.model.get_submodule(path)
    if name in layer.lora_A:
        return layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.lora_embedding_A[name], layer.lora_embedding_B[name]


def _assert_equal_to_peft(model, peft_model, name: str) -> int:
    layers = {p: layer for p, layer in lora_layers(model).items() if name in layer.adapters}
    for path, layer in layers.items():
        lora_A, lora_B = _peft_tensors(peft_model, path, name)
        ours = layer.adapters[name]
        assert torch.equal(ours.lora_A, lora_A) and torch.equal(ours.lora_B, lora_B), f"{name}: {path} differs from peft"
        assert ours.scaling == 1.0
    return len(layers)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pair")
    return _peft_pair(folder), _lorakit_pair(folder)


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_peft_tensors_bit_for_bit(pair, method):
    peft_model, model = pair
    options = {"density": 0.5} if method.removesuffix("_svd") in ("ties", "dare_linear", "dare_ties", "magnitude_prune") else {}
    torch.manual_seed(123)  # DARE draws from the global generator in peft's order
    peft_model.add_weighted_adapter(list(WEIGHTS), list(WEIGHTS.values()), method, combination_type=method, **options)
    torch.manual_seed(123)
    assert combine_adapters(model, WEIGHTS, name=method, method=method, **options) == method
    assert _assert_equal_to_peft(model, peft_model, method) == 9  # embedding + q, k, v, up in 2 layers
    assert lorakit.active_adapters(model) == [method]
    peft_model.set_adapter(method)
    assert_close(model(IDS).logits, peft_model(IDS).logits)


def test_options_different_ranks_and_conv1d_agree_with_peft(tmp_path):
    peft_model = _peft_pair(tmp_path, rank_b=2)
    model = _lorakit_pair(tmp_path)
    for method, options in (("cat", {}), ("svd", {"svd_rank": 3, "svd_clamp": 0.9}), ("ties_svd", {"density": 0.3})):
        peft_model.add_weighted_adapter(["a", "b"], [0.7, -0.4], method, combination_type=method, **options)
        combine_adapters(model, WEIGHTS, name=method, method=method, **options)
        _assert_equal_to_peft(model, peft_model, method)
    assert model.model.layers[0].self_attn.q_proj.adapters["cat"].rank == 6  # 4 + 2
    assert model.model.layers[0].self_attn.q_proj.adapters["svd"].rank == 3

    # GPT-2's Conv1D (peft's fan_in_fan_out) and DARE on the full deltas: peft draws the masks in the (in, out) layout
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2():
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2)).eval()

    config = dict(target_modules=["c_attn", "c_fc", "wte"], fan_in_fan_out=True, init_lora_weights=False)
    peft_model = peft.get_peft_model(gpt2(), peft.LoraConfig(r=2, lora_alpha=4, **config), adapter_name="a")
    peft_model.add_adapter("b", peft.LoraConfig(r=2, lora_alpha=8, **config))
    peft_model.save_pretrained(tmp_path / "gpt2")
    _quiet_inject(peft_model)
    model = gpt2()
    lorakit.load_adapter(model, tmp_path / "gpt2" / "a", adapter="a")
    lorakit.load_adapter(model, tmp_path / "gpt2" / "b", adapter="b")
    for method in ("dare_ties_svd", "dare_linear", "svd"):
        options = {} if method == "svd" else {"density": 0.5}
        torch.manual_seed(9)
        peft_model.add_weighted_adapter(["a", "b"], [0.5, 0.5], method, combination_type=method, **options)
        combine_adapters(model, {"a": 0.5, "b": 0.5}, name=method, method=method, seed=9, **options)
        assert _assert_equal_to_peft(model, peft_model, method) == 3
