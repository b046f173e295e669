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


def _qwen2(seed: int = 0):
    import transformers

    torch.manual_seed(seed)
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2)).eval()


def test_save_pretrained_refuses_a_4bit_model_instead_of_writing_nf4_buffers(tmp_path):
    """merge_and_unload on a 4-bit model leaves NF4 layers (with a warning); save_pretrained then wrote lorakit's
    buffers (weight_packed, absmax...) under the layers' names, a folder transformers loads with random linear
    layers. The same for a model quantized and never injected, or loaded with load_base(quantize="nf4")."""
    from test_train_helpers import make_model_folder

    model = lorakit.quantize(_qwen2(), "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    with pytest.warns(UserWarning, match="re-quantizes"):
        plain = lorakit.merge_and_unload(model)
    with pytest.raises(LorakitError, match="4-bit buffers .*lorakit.save_quantized.*lorakit.dequantize"):
        plain.save_pretrained(tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    quantized = lorakit.quantize(_qwen2(), "nf4")
    with pytest.raises(LorakitError, match="4-bit buffers"):
        quantized.save_pretrained(tmp_path / "plain")
    lorakit.dequantize(quantized)
    quantized.save_pretrained(tmp_path / "plain")  # dense again: transformers' own folder
    assert (tmp_path / "plain" / "model.safetensors").is_file()
    loaded, _ = lorakit.load_base(str(make_model_folder(tmp_path / "base")), quantize="nf4")
    with pytest.raises(LorakitError, match="4-bit buffers"):
        loaded.save_pretrained(tmp_path / "loaded")


def test_a_string_of_module_names_says_it_is_a_whole_path_regex():
    """target_modules="q_proj" (a string, peft's whole-path regex) matched nothing, and the error listed the model's
    names, q_proj among them, without saying why q_proj did not match."""
    import transformers

    with pytest.raises(LorakitError, match=r"named: .*q_proj.*whole module path.*target_modules=\['q_proj'\]"):
        lorakit.inject(_qwen2(), lorakit.LoraConfig(target_modules="q_proj"))
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64))
    with pytest.raises(LorakitError, match=r"target_modules=\['c_attn', 'c_fc'\]") as refused:
        lorakit.inject(gpt2, lorakit.LoraConfig(target_modules="c_attn|c_fc"))
    pattern = str(refused.value).rsplit("a pattern such as ", 1)[1].strip("'").replace("\\\\", "\\")
    lorakit.inject(gpt2, lorakit.LoraConfig(r=2, target_modules=pattern))  # the suggested pattern works
    assert {n.split(".adapters.")[0].rsplit(".", 1)[-1] for n, _ in lorakit.lora_parameters(gpt2)} == {"c_attn", "c_fc"}
    with pytest.raises(LorakitError, match=r"matched no module; [^;]*$"):  # a real regex: no note
        lorakit.inject(_qwen2(), lorakit.LoraConfig(target_modules=r".*\.zz"))


def test_save_pretrained_after_deleting_every_adapter_refuses_wrapped_names(tmp_path):
    """delete_adapter of the last adapter leaves the layers wrapped; save_pretrained then wrote q_proj.base_layer.weight
    and the like, which transformers' from_pretrained skips, loading those layers (and the head) with random
    weights. Refused now, naming merge_and_unload, which unwraps them and saves the base exactly."""
    import transformers

    ids = torch.tensor([[1, 5, 9, 3, 7]])
    model = _qwen2()
    with torch.no_grad():
        base = model(ids).logits
    lorakit.inject(model, lorakit.LoraConfig(r=2, modules_to_save=["lm_head"]))
    lorakit.delete_adapter(model, "default")
    with pytest.raises(LorakitError, match="still wrapped .*lorakit.merge_and_unload"):
        model.save_pretrained(tmp_path / "saved")
    assert not (tmp_path / "saved").exists()
    lorakit.merge_and_unload(model).save_pretrained(tmp_path / "saved")
    with torch.no_grad():
        again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()(ids).logits
    assert torch.equal(again, base)
