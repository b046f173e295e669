"""Files in both directions against the real peft package: same logits, for LoRA, rsLoRA and DoRA."""

from __future__ import annotations

import json

import peft
import pytest
import torch

import lorakit
from conftest import assert_close, tiny_llama
from test_layers import randomize

VARIANTS = ["lora", "rslora", "dora"]


def peft_config(variant: str, **extra) -> peft.LoraConfig:
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                           use_rslora=variant == "rslora", use_dora=variant == "dora", init_lora_weights=False, **extra)


@pytest.mark.parametrize("variant", VARIANTS)
def test_lorakit_adapter_loads_in_peft(variant, tmp_path):
    ids = torch.randint(0, 128, (2, 9))
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, variant=variant, rank_pattern={"o_proj": 2}))
    randomize(model)
    expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert_close(peft_model(ids).logits, expected)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["use_dora"] == (variant == "dora") and saved["use_rslora"] == (variant == "rslora")


@pytest.mark.parametrize("variant", VARIANTS)
def test_peft_adapter_loads_in_lorakit(variant, tmp_path):
    ids = torch.randint(0, 128, (2, 9))
    peft_model = peft.get_peft_model(tiny_llama(), peft_config(variant, rank_pattern={"down_proj": 2})).eval()
    expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path)
    assert_close(model(ids).logits, expected)
    assert model.model.layers[0].mlp.down_proj.adapters["default"].rank == 2


def test_peft_embedding_and_modules_to_save(tmp_path):
    ids = torch.randint(0, 128, (2, 9))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"], modules_to_save=["lm_head"],
                             init_lora_weights=False)
    peft_model = peft.get_peft_model(tiny_llama(), config).eval()
    with torch.no_grad():
        peft_model.base_model.model.lm_head.modules_to_save["default"].weight.add_(0.05)
    expected = peft_model(ids).logits
    peft_model.save_pretrained(tmp_path)  # also writes a full copy of embed_tokens (unchanged): accepted
    model = tiny_llama()
    lorakit.load_adapter(model, tmp_path)
    assert_close(model(ids).logits, expected)
    # and back: lorakit's save loads in peft with the same logits
    out = tmp_path / "again"
    lorakit.save_adapter(model, out)
    again = peft.PeftModel.from_pretrained(tiny_llama(), out).eval()
    assert_close(again(ids).logits, expected)


def test_pissa_saves_as_plain_lora_for_the_original_base(tmp_path):
    ids = torch.randint(0, 128, (2, 9))
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=4, init="pissa"))
    with torch.no_grad():  # "training" moves A and B away from their PiSSA start
        for _, p in lorakit.lora_parameters(model):
            p.add_(0.01 * torch.randn_like(p))
    expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["r"] == 8
    original = tiny_llama()  # the untouched base
    lorakit.load_adapter(original, tmp_path)
    assert_close(original(ids).logits, expected)
    peft_model = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path).eval()
    assert_close(peft_model(ids).logits, expected)


def test_embedded_model_roundtrip_with_peft(embedded_base, tmp_path):
    model, tokenizer = embedded_base()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, variant="dora", target_modules=["q_proj", "v_proj", "down_proj"]))
    randomize(model, std=0.02)
    expected = model(ids).logits
    lorakit.save_adapter(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(embedded_base()[0], tmp_path).eval()
    assert_close(peft_model(ids).logits, expected)
    fresh = embedded_base()[0]
    lorakit.load_adapter(fresh, tmp_path)
    assert_close(fresh(ids).logits, expected)
