"""TRL's SFTTrainer and DPOTrainer with a lorakit-injected model, as a PEFT user would write them
(lorakit/hf_trainer.py, lorakit/trl_support.py).

Before: SFT with a LoRA on ``lm_head`` ran to the end with that adapter never trained (TRL reads ``lm_head.weight``
directly; now refused in one line), ``modules_to_save=["lm_head"]`` crashed with ``AttributeError: 'ModulesToSave'
object has no attribute 'weight'`` (now the copy trains), and DPOTrainer without ``ref_model`` tried to load the base again from ``config._name_or_path`` (an
``OSError`` for a model built in memory; a second copy of the base otherwise).
"""

from __future__ import annotations

import json

import peft
import pytest
import torch
import trl  # in the test extra (pyproject.toml): a missing install fails here rather than skipping
from datasets import Dataset
from safetensors import safe_open

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.trl_support import AdaptersDisabled, reference_model
from test_train_helpers import LETTERS, tiny_tokenizer

CONFIG = dict(r=4, alpha=8)  # "all-linear": q, k, v, o, gate, up, down (not lm_head)
IDS = torch.tensor([[9, 12, 15, 10, 17, 11, 14]])


def injected(pretrained: bool = False, **config):
    """A tiny Llama with the tokenizer's vocabulary and an adapter; ``pretrained``: B random, as a loaded adapter."""
    model = tiny_llama(vocab_size=len(tiny_tokenizer()))
    lorakit.inject(model, lorakit.LoraConfig(**{**CONFIG, **config}))
    if pretrained:
        generator = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for name, parameter in lorakit.lora_parameters(model):
                if "lora_B" in name:
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return model.train()


def texts(n: int = 16) -> Dataset:
    return Dataset.from_list([{"text": " ".join(LETTERS[(i + j) % len(LETTERS)] for j in range(8))} for i in range(n)])


def preferences(n: int = 16) -> Dataset:
    L = LETTERS
    return Dataset.from_list([{"prompt": f"copy {L[i % 8]} {L[(i + 1) % 8]} :",
                               "chosen": f" {L[i % 8]} {L[(i + 1) % 8]}", "rejected": f" {L[(i + 3) % 8]}"}
                              for i in range(n)])


def common(out, **extra) -> dict:
    settings = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, save_steps=2, learning_rate=1e-2,
                    report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=1)
    settings.update(extra)
    return settings


def sft(model, out, **extra):
    return trl.SFTTrainer(model=model, train_dataset=texts(), args=trl.SFTConfig(**common(out, **extra)),
                          processing_class=tiny_tokenizer())


def lora_tensors(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def keys(path) -> set[str]:
    with safe_open(str(path), "pt") as handle:
        return set(handle.keys())


def test_sft_trains_only_the_adapters_and_saves_an_adapter_folder(tmp_path):
    model = injected()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    start = lora_tensors(model)
    trainer = sft(model, tmp_path / "run")
    assert trainer.args.gradient_checkpointing  # SFTConfig's default: the frozen base must still pass gradients
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)  # the base never moved
    moved = {n for n, t in lora_tensors(model).items() if not torch.equal(t, start[n])}
    assert moved == set(start)  # every adapter tensor of every layer trained (checkpointed layers included)

    checkpoint = tmp_path / "run" / "checkpoint-2"
    assert keys(checkpoint / "model.safetensors") == set(start)  # only the adapters, never the base
    final = tmp_path / "final"
    trainer.save_model(str(final))
    names = {p.name for p in final.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names
    assert not names & {"model.safetensors", "config.json"}  # an adapter folder, not a full model
    assert json.loads((final / "adapter_config.json").read_text())["r"] == 4

    model.eval()
    with torch.no_grad():  # the class's forward: accelerate left model.forward wrapped in SFTConfig's bf16 autocast
        expected = type(model).forward(model, IDS).logits
        in_peft = peft.PeftModel.from_pretrained(tiny_llama(vocab_size=len(tiny_tokenizer())), final).eval()(IDS).logits
        fresh = tiny_llama(vocab_size=len(tiny_tokenizer()))
        lorakit.load_adapter(fresh, final)
        in_lorakit = fresh.eval()(IDS).logits
        base = tiny_llama(vocab_size=len(tiny_tokenizer()))(IDS).logits
    assert (expected - base).abs().max() > 1e-4  # the trained adapter changes the output
    assert_close(in_peft, expected)
    assert_close(in_lorakit, expected)


def test_sft_resume_continues_from_the_checkpoint(tmp_path):
    straight = injected()
    sft(straight, tmp_path / "a").train()
    with safe_open(str(tmp_path / "a" / "checkpoint-2" / "model.safetensors"), "pt") as handle:
        at_step_2 = {name: handle.get_tensor(name) for name in handle.keys()}

    resumed = injected()
    trainer = sft(resumed, tmp_path / "b")
    trainer.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    expected, actual = lora_tensors(straight), lora_tensors(resumed)
    assert any(not torch.equal(actual[n], at_step_2[n]) for n in actual)  # steps 3-4 ran after the load
    for name in expected:  # and continued from the saved adapters, as if never interrupted
        assert_close(actual[name], expected[name], msg=name)


def test_reentrant_gradient_checkpointing_trains_as_without_it(tmp_path):
    """Reentrant checkpointing (older recipes pass use_reentrant=True) gives no gradient to a checkpointed layer
    whose input does not require grad: every layer's adapters must still train, exactly as without checkpointing."""
    plain, checkpointed = injected(), injected()
    sft(plain, tmp_path / "a", max_steps=2, save_strategy="no", gradient_checkpointing=False).train()
    sft(checkpointed, tmp_path / "b", max_steps=2, save_strategy="no",
        gradient_checkpointing_kwargs={"use_reentrant": True}).train()
    assert any(getattr(m, "gradient_checkpointing", False) for m in checkpointed.modules())  # it was really on
    expected = lora_tensors(plain)
    assert all(t.abs().sum() > 0 for n, t in expected.items() if "lora_B" in n)
    for name, tensor in lora_tensors(checkpointed).items():
        assert_close(tensor, expected[name], msg=name)


def test_a_modules_to_save_copy_of_the_output_head_trains_under_the_fused_head(tmp_path):
    """TRL reads ``lm_head.weight``: a ModulesToSave head answers with the active copy's weight (the base's when
    adapters are disabled, as for DPO's reference), so the copy trains and the base head stays as it was."""
    model = injected(target_modules=["q_proj"], modules_to_save=["lm_head"])
    head = model.lm_head
    base_weight = head.base_layer.weight.detach().clone()
    assert head.weight is head.copies["default"].weight and head.bias is None
    with lorakit.disable_adapters(model):
        assert head.weight is head.base_layer.weight
    sft(model, tmp_path / "run", save_strategy="no").train()
    assert torch.equal(head.base_layer.weight, base_weight)
    assert not torch.equal(head.copies["default"].weight, base_weight)  # the copy trained through lm_head.weight
    lorakit.save_adapter(model, tmp_path / "adapter")
    model.eval()
    with torch.no_grad():
        expected = type(model).forward(model, IDS).logits
        in_peft = peft.PeftModel.from_pretrained(tiny_llama(vocab_size=len(tiny_tokenizer())),
                                                 tmp_path / "adapter").eval()(IDS).logits
    assert_close(in_peft, expected)


@pytest.mark.parametrize("config, message", [
    (dict(target_modules=["q_proj", "lm_head"]), "the LoRA adapter on lm_head would never be trained"),
])
def test_an_adapter_on_the_output_head_is_refused_in_one_line(tmp_path, config, message):
    model = injected(**config)
    start = lora_tensors(model)
    trainer = sft(model, tmp_path / "run", save_strategy="no")
    with pytest.raises(lorakit.LorakitError, match=message) as caught:
        trainer.train()
    assert "\n" not in str(caught.value)
    assert all(torch.equal(t, start[n]) for n, t in lora_tensors(model).items())  # refused before any step
    with torch.no_grad():  # the model's own forward (generate, transformers' Trainer) is untouched
        assert model(IDS).logits.shape == (1, IDS.shape[1], len(tiny_tokenizer()))


def fused_log_probs(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, labels=ids, fused_lm_head=True).log_probs


def test_reference_model_is_the_base_with_the_adapters_off_and_no_copy():
    from trl.trainer.utils import add_fused_lm_head

    model = injected(pretrained=True)
    with torch.no_grad():
        before = model(IDS).logits
    reference = reference_model(model)
    assert isinstance(reference, AdaptersDisabled) and reference_model(reference) is reference
    add_fused_lm_head(reference)  # what DPOTrainer does to ref_model
    add_fused_lm_head(model)
    base = tiny_llama(vocab_size=len(tiny_tokenizer()))
    add_fused_lm_head(base)
    expected = fused_log_probs(base, IDS)
    assert (fused_log_probs(model, IDS) - expected).abs().max() > 1e-3  # the adapter matters here
    assert_close(fused_log_probs(reference, IDS), expected)
    with torch.no_grad():
        assert_close(reference(IDS).logits, base(IDS).logits)  # the plain forward too
        assert_close(model(IDS).logits, before)  # adapters on again after each reference call

    reference.eval()
    assert model.training  # TRL's eval()/dropout changes to the reference do not reach the model being trained
    assert list(reference.parameters()) == [] and reference.config is model.config
    with pytest.raises(lorakit.LorakitError, match="has no lorakit adapters"):
        reference_model(tiny_llama())


def test_reference_model_state_dict_is_the_base_for_trls_precompute_cache_key():
    """precompute_ref_log_probs=True caches the reference log-probs under hash_module(ref_model): two bases must
    not share a key (an empty state dict would), and the adapter's values must not matter (the reference ignores it)."""
    from trl.trainer.utils import hash_module

    first, retrained = injected(), injected(pretrained=True)
    other_base = tiny_llama(seed=1, vocab_size=len(tiny_tokenizer()))
    lorakit.inject(other_base, lorakit.LoraConfig(**CONFIG))
    tensors = reference_model(first).state_dict()
    assert tensors and not any(".adapters." in key for key in tensors)
    assert set(tensors) == {n for n, _ in first.named_parameters() if ".adapters." not in n} | {
        n for n, _ in first.named_buffers() if n in first.state_dict()}
    assert hash_module(reference_model(first)) == hash_module(reference_model(retrained))
    assert hash_module(reference_model(first)) != hash_module(reference_model(other_base))


def test_dpo_with_reference_model_trains_as_with_a_separate_base(tmp_path):
    """The reference must be the base, not the adapter being trained: with an adapter that starts away from zero,
    training against reference_model(model) matches training against a separate copy of the base, step for step."""
    def dpo(model, ref, out, **extra):
        args = trl.DPOConfig(**common(out, max_steps=2, save_strategy="no", **extra))
        trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=preferences(),
                                 processing_class=tiny_tokenizer())
        trainer.train()
        return trainer

    shared, separate, precomputed = injected(pretrained=True), injected(pretrained=True), injected(pretrained=True)
    start = lora_tensors(shared)
    trainer = dpo(shared, reference_model(shared), tmp_path / "a")
    dpo(separate, tiny_llama(vocab_size=len(tiny_tokenizer())), tmp_path / "b")
    dpo(precomputed, reference_model(precomputed), tmp_path / "c", precompute_ref_log_probs=True)
    first = next(entry for entry in trainer.state.log_history if "rewards/margins" in entry)
    assert first["rewards/margins"] != 0  # policy != reference from step 1: the reference ran without the adapter
    expected = lora_tensors(separate)
    for name, tensor in lora_tensors(shared).items():
        assert not torch.equal(tensor, start[name]) or "lora_A" in name
        assert_close(tensor, expected[name], msg=name)
    for name, tensor in lora_tensors(precomputed).items():  # the reference scored once, before training, also off
        assert_close(tensor, expected[name], msg=name)
