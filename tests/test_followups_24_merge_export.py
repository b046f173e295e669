"""Merging and exporting as a new user (helper merge_export, session 24): ``merge`` / ``merge_and_unload`` with no
adapter active (they merged nothing without a word, and merge_and_unload handed back the plain base with every adapter
dropped), ``merge`` inside a ``disable_adapters`` block (the block then ran the merged adapter), and ``lorakit merge``
swallowing export's own warnings (the GGUF context cut to a Mistral's sliding window, which the README says is
warned about)."""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import tiny_llama
from lorakit.errors import LorakitError
from lorakit.inject import adapter_hosts, lora_layers

IDS = torch.tensor([[3, 17, 42, 99, 7]])


def _two_adapters():
    """A tiny Llama holding adapters "a" and "b" with non-zero B ("b" active, as after two loads)."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    for name in ("a", "b"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter=name)
    with torch.no_grad():
        for key, parameter in lorakit.lora_parameters(model):
            if key.endswith("lora_B"):
                parameter.normal_(std=0.5)
    lorakit.set_adapter(model, "b")
    return model


def _weights(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def _unchanged(model, before) -> bool:
    after = model.state_dict()
    return before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


@pytest.mark.parametrize("how", ["set_adapter([])", "delete the active one"])
def test_merge_with_no_active_adapter_is_refused_not_a_silent_no_op(how):
    model = _two_adapters()
    if how == "set_adapter([])":
        lorakit.set_adapter(model, [])
    else:
        lorakit.delete_adapter(model, "b")  # "a" stays, inactive
    assert lorakit.active_adapters(model) == []
    before = _weights(model)
    names = "a, b" if how == "set_adapter([])" else "a"
    for call in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(LorakitError, match=f"no adapter is active, so nothing would be merged \\(this model has: "
                                               f"{names}\\); name the ones to merge, e.g. lorakit.merge\\(model, 'a'\\)"):
            call(model)
        assert _unchanged(model, before)  # still wrapped, nothing merged
    with pytest.raises(LorakitError, match=r"adapters=\[\] names no adapter"):
        lorakit.merge(model, [])
    # naming the adapter still merges it, and gives what it runs unmerged
    lorakit.set_adapter(model, "a")
    with torch.no_grad():
        expected = model(IDS).logits
    lorakit.set_adapter(model, [])
    plain = lorakit.merge_and_unload(model, "a")
    assert not adapter_hosts(plain)
    with torch.no_grad():
        torch.testing.assert_close(plain(IDS).logits, expected, rtol=0, atol=1e-5)


def test_merge_and_unload_with_no_adapter_left_still_only_unwraps():
    """The README's way to save a base whose last adapter was deleted (``save_pretrained`` says so) keeps working."""
    model = _two_adapters()
    lorakit.delete_adapter(model, "a")
    lorakit.delete_adapter(model, "b")
    plain = lorakit.merge_and_unload(model)
    assert not adapter_hosts(plain)


def test_merge_inside_disable_adapters_is_refused():
    """Inside the block the base runs alone; a merge there put the adapter into the base weights, so the block's
    forwards ran base + adapter (and the model stayed merged after it)."""
    model = _two_adapters()
    with torch.no_grad():
        base = None
        with lorakit.disable_adapters(model):
            base = model(IDS).logits
            before = _weights(model)
            for call in (lorakit.merge, lorakit.merge_and_unload):
                with pytest.raises(LorakitError, match="cannot merge inside a lorakit.disable_adapters block"):
                    call(model)
            assert _unchanged(model, before)
            torch.testing.assert_close(model(IDS).logits, base, rtol=0, atol=0)
    lorakit.merge(model)  # after the block: as before
    assert lora_layers(model)["model.layers.0.self_attn.q_proj"].merged == ["b"]


def test_merge_cli_prints_the_gguf_sliding_window_warning(tmp_path, capsys):
    """``export_merged`` warns that a Mistral's GGUF declares its sliding window as the context (llama.cpp runs it
    without one); ``lorakit merge --format gguf`` recorded every warning and printed only the bf16 one."""
    from transformers import MistralConfig, MistralForCausalLM

    from lorakit.cli import main
    from test_gguf_architectures import qwen_tokenizer
    from test_serve_support import make_adapter

    tokenizer = qwen_tokenizer()
    torch.manual_seed(0)
    base = MistralForCausalLM(MistralConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                                            max_position_embeddings=256, sliding_window=64))
    base.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    adapter = make_adapter(base, tmp_path / "adapter", seed=1, std=0.05, target_modules=["q_proj"])
    out = tmp_path / "merged"
    assert main(["merge", "--model", str(tmp_path / "base"), "--adapter", str(adapter), "--out", str(out),
                 "--format", "gguf"]) == 0
    err = capsys.readouterr().err
    assert ("warning: llama.cpp runs this mistral model without its sliding window (64 tokens), so the GGUF declares a "
            "context of 64 tokens, not 256") in err
    assert (out / "merged-f16.gguf").is_file()


def test_merge_of_a_peft_model_says_it_is_peft_s(tmp_path):
    """A PeftModel handed to lorakit.merge was told to load an adapter first, or that it was merged and unloaded
    already: neither, its layers are peft's."""
    import peft

    torch.manual_seed(0)
    peft_model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    for call in (lorakit.merge, lorakit.merge_and_unload):
        with pytest.raises(LorakitError, match=r"this model holds peft's adapter layers \(e.g. base_model\.model\.model"
                                               r"\.layers\.0\.self_attn\.q_proj\), not lorakit's: merge it with peft's "
                                               r"own model\.merge_and_unload\(\)"):
            call(peft_model)
    with pytest.raises(LorakitError, match="this model has no lorakit adapters to merge"):
        lorakit.merge(tiny_llama())
