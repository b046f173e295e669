"""A lorakit-injected transformers model handed to transformers' Trainer, as a PEFT user would (lorakit/hf_trainer.py).

Before: Trainer checkpoints and ``trainer.save_model`` held the whole base under lorakit's internal names
(``q_proj.base_layer.weight``, ``q_proj.adapters.default.lora_A``), which neither peft nor ``lorakit.load_adapter``
reads, and ``from_pretrained`` would load with the adapted projections missing.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import LlamaForCausalLM, Trainer, TrainingArguments

import lorakit
from conftest import assert_close, tiny_llama

CONFIG = dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
IDS = torch.tensor([[5, 9, 17, 3, 101, 44, 7]])


def dataset(n: int = 16) -> list[dict[str, torch.Tensor]]:
    rows = []
    for i in range(n):
        ids = torch.randint(0, 128, (12,), generator=torch.Generator().manual_seed(i))
        rows.append({"input_ids": ids, "labels": ids.clone()})
    return rows


def args(out, **extra) -> TrainingArguments:
    settings = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, save_steps=2, learning_rate=1e-2,
                    report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=100)
    settings.update(extra)
    return TrainingArguments(**settings)


def injected(**config) -> LlamaForCausalLM:
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(**{**CONFIG, **config}))
    return model.train()


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def keys(path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def test_trainer_trains_adapters_and_writes_peft_folders(tmp_path):
    peft = pytest.importorskip("peft")
    model = injected()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = set(lora_tensors(model))
    trainer = Trainer(model=model, args=args(tmp_path / "run"), train_dataset=dataset())
    trainer.train()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # the base never moved
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # B starts at zero: it trained

    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert {"adapter_config.json", "adapter_model.safetensors", "model.safetensors"} <= {p.name for p in checkpoint.iterdir()}
    assert keys(checkpoint / "model.safetensors") == trainable  # only the adapters, never the base
    assert all(k.startswith("base_model.model.") and ".lora_" in k for k in keys(checkpoint / "adapter_model.safetensors"))

    final = tmp_path / "final"
    trainer.save_model(str(final))
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not names & {"model.safetensors", "config.json"}  # a clean adapter folder, not a half model
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4

    model.eval()
    with torch.no_grad():
        expected = model(IDS).logits
        in_peft = peft.PeftModel.from_pretrained(tiny_llama(), final).eval()(IDS).logits
        fresh = tiny_llama()
        lorakit.load_adapter(fresh, final)
        in_lorakit = fresh.eval()(IDS).logits
        base = tiny_llama()(IDS).logits
    assert (expected - base).abs().max() > 1e-4  # the adapter changes the output, so the comparisons below mean something
    assert_close(in_peft, expected)
    assert_close(in_lorakit, expected)


def test_resume_from_checkpoint_restores_the_adapters(tmp_path):
    straight = injected()
    Trainer(model=straight, args=args(tmp_path / "a"), train_dataset=dataset()).train()

    resumed = injected()
    Trainer(model=resumed, args=args(tmp_path / "b"), train_dataset=dataset()).train(
        resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    expected, actual = lora_tensors(straight), lora_tensors(resumed)
    assert set(actual) == set(expected)
    for name in expected:  # steps 3-4 continued from the saved adapters, as if never interrupted
        assert_close(actual[name], expected[name], msg=name)


def test_load_best_model_at_end_loads_the_best_checkpoint(tmp_path):
    model = injected()
    trainer = Trainer(model=model, args=args(tmp_path, eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                                             metric_for_best_model="loss", greater_is_better=False, max_steps=6),
                      train_dataset=dataset(), eval_dataset=dataset(4))
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best and best.endswith(("checkpoint-2", "checkpoint-4", "checkpoint-6"))
    with safe_open(f"{best}/model.safetensors", "pt") as handle:
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                assert torch.equal(parameter.detach(), handle.get_tensor(name)), name


def test_gradient_checkpointing_trains_the_same(tmp_path):
    plain, checkpointed = injected(), injected()
    Trainer(model=plain, args=args(tmp_path / "a", max_steps=2, save_strategy="no"), train_dataset=dataset()).train()
    Trainer(model=checkpointed, args=args(tmp_path / "b", max_steps=2, save_strategy="no", gradient_checkpointing=True),
            train_dataset=dataset()).train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())  # it was really on
    expected = lora_tensors(plain)
    for name, tensor in lora_tensors(checkpointed).items():
        assert_close(tensor, expected[name], msg=name)
    assert any(tensor.abs().sum() > 0 for name, tensor in expected.items() if "lora_B" in name)


def test_save_pretrained_writes_each_adapter_as_peft_does(tmp_path):
    model = injected()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter="other")
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    assert (tmp_path / "other" / "adapter_model.safetensors").is_file()  # PeftModel.save_pretrained's layout
    assert json.loads((tmp_path / "other" / "adapter_config.json").read_text())["r"] == 2
    assert not (tmp_path / "model.safetensors").exists()  # not a Trainer checkpoint folder

    with pytest.raises(lorakit.LorakitError, match="selected_adapters names 'nope'"):
        model.save_pretrained(tmp_path / "x", selected_adapters=["nope"])
    with pytest.raises(lorakit.LorakitError, match="push_to_hub"):
        model.save_pretrained(tmp_path / "y", push_to_hub=True)
    model.save_pretrained(tmp_path / "z", is_main_process=False)
    assert not (tmp_path / "z").exists()  # other ranks write nothing


def test_after_merge_and_unload_save_pretrained_is_a_whole_model_again(tmp_path):
    model = injected()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.1)
    model.eval()
    lorakit.merge_and_unload(model)
    with torch.no_grad():
        expected = model(IDS).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and not (tmp_path / "adapter_config.json").exists()
    assert not any("lora" in key or "base_layer" in key for key in keys(tmp_path / "model.safetensors"))
    with torch.no_grad():
        assert_close(LlamaForCausalLM.from_pretrained(tmp_path).eval()(IDS).logits, expected)


def test_print_trainable_parameters(capsys):
    model = injected()
    model.print_trainable_parameters()
    report = lorakit.trainable_report(model)
    assert capsys.readouterr().out.strip() == (f"trainable params: {report.trainable:,} || all params: {report.total:,} "
                                               f"|| trainable%: {100 * report.share:.4f}")


def test_plain_torch_models_are_left_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["0"]))
    assert "save_pretrained" not in vars(model) and not hasattr(model, "print_trainable_parameters")


def test_sharded_adapters_are_refused_not_saved_in_slices(tmp_path):
    model = injected()
    next(p for n, p in model.named_parameters() if "lora_A" in n).ds_id = 0  # how DeepSpeed ZeRO-3 marks a partition
    with pytest.raises(lorakit.LorakitError, match=r"is sharded \(FSDP / DeepSpeed ZeRO-3\) and no whole state_dict"):
        model.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_given_state_dict_is_what_gets_saved(tmp_path):
    """transformers' rule, and how Trainer hands over the gathered tensors under DeepSpeed ZeRO-3 / FSDP."""
    model = injected()
    next(p for n, p in model.named_parameters() if "lora_A" in n).ds_id = 0
    gathered = {n: torch.full_like(p, 0.25) for n, p in model.named_parameters() if p.requires_grad}
    before = lora_tensors(model)
    model.save_pretrained(tmp_path / "checkpoint-7", state_dict={**model.state_dict(), **gathered})
    assert all(torch.equal(p, before[n]) for n, p in lora_tensors(model).items())  # the model's own are put back
    with safe_open(str(tmp_path / "checkpoint-7" / "model.safetensors"), "pt") as handle:
        assert all(torch.equal(handle.get_tensor(n), gathered[n]) for n in gathered)
    with safe_open(str(tmp_path / "checkpoint-7" / "adapter_model.safetensors"), "pt") as handle:
        assert all(torch.all(handle.get_tensor(k) == 0.25) for k in handle.keys())


def test_the_hook_survives_deepcopy_and_pickling(tmp_path):
    import copy
    import pickle

    model = injected()
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # a bound method would not unpickle
        clone.save_pretrained(tmp_path / str(id(clone)))
        assert (tmp_path / str(id(clone)) / "adapter_model.safetensors").is_file()
        assert clone.save_pretrained.args[0] is clone  # saves the copy, not the original


def test_a_folder_saved_before_the_hook_is_named_with_its_way_back(tmp_path):
    """transformers' own save_pretrained on an injected model (what lorakit before the hook, and Trainer with it,
    wrote) gives a whole model under lorakit's internal names and no adapter_config.json: load_adapter and load_base
    both say what the folder is (they suggested load_base / blamed missing tensors), and the recipe they give
    recovers the adapter exactly."""
    from safetensors.torch import load_file

    model = injected()
    with torch.no_grad():
        for _, parameter in lorakit.lora_parameters(model):
            parameter.normal_(0, 0.1)
        expected = model(IDS).logits
    LlamaForCausalLM.save_pretrained(model, tmp_path / "old")  # the class's method: what the hook replaced
    from test_train_helpers import tiny_tokenizer

    tiny_tokenizer().save_pretrained(tmp_path / "old")  # as Trainer.save_model with a processing_class
    with pytest.raises(lorakit.LorakitError, match=r"is a whole model saved with lorakit's internal names \(e\.g\. '.*"
                                                   r"(base_layer|adapters)\..*'\) by model\.save_pretrained"):
        lorakit.load_adapter(tiny_llama(), tmp_path / "old")
    with pytest.raises(lorakit.LorakitError, match="whole model saved with lorakit's internal names"):
        lorakit.load_base(str(tmp_path / "old"))
    recovered = tiny_llama()
    lorakit.inject(recovered, lorakit.LoraConfig(**CONFIG))
    recovered.load_state_dict(load_file(str(tmp_path / "old" / "model.safetensors")), strict=False)
    with torch.no_grad():
        assert_close(recovered(IDS).logits, expected)
