"""Follow-ups 24, ecosystem: lorakit beside the tools a user already has (transformers' Trainer, TRL, accelerate,
torch.compile, DistributedDataParallel, plain PyTorch loops).

Found and fixed:
- The public functions given a wrapped model (``torch.compile(model)``'s ``OptimizedModule``,
  ``DistributedDataParallel`` / ``DataParallel``, what a plain training loop holds) named everything by the
  wrapper's paths: ``save_adapter`` wrote keys ``base_model.model._orig_mod.model.layers...`` /
  ``...module.model.layers...`` that neither peft nor ``load_adapter`` maps back, ``load_adapter`` called the
  adapter saved from the same base "made for another base model", and, since DDP forwards no attributes, the saved
  ``adapter_config.json`` was the default ``LoraConfig`` (r=8, alpha 16, "all-linear") beside rank-4 tensors.
  lorakit now works on the model inside those wrappers (``lorakit.inject.unwrap``).
- ``lorakit.train.train`` on ``torch.compile(model)`` wrote its checkpoints' tensors as ``_orig_mod.model...``, so
  resuming on the plain model (or a plain run's checkpoint on a compiled one) was refused as "does not match this
  model's trainable parameters". Checkpoints now use the inner model's names.
- transformers' own peft integration on an injected model (``model.load_adapter(folder)``, a transformers habit)
  put peft's layers over lorakit's, loaded part of the file and froze lorakit's adapters; its ``set_adapter`` /
  ``disable_adapters`` / ... blamed the peft version. ``set_adapter`` / ``active_adapters`` now run lorakit's, the
  others are refused in one line naming the lorakit call.
- A compiled QLoRA model (or a mixed batch under torch.compile) warned from dynamo that it traced through a
  ``functools.lru_cache`` in ``triton_usable`` ("silent incorrectness is only a potential risk"); the answer is now
  remembered without the cache wrapper.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import lorakit
from conftest import tiny_llama

IDS = torch.tensor([[5, 9, 17, 3, 101, 44, 7], [8, 2, 66, 13, 90, 1, 12]])
CONFIG = dict(r=4, alpha=32, target_modules=["q_proj", "v_proj"])


def injected(seed: int = 0) -> nn.Module:
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(**CONFIG))
    torch.manual_seed(seed)
    for _, parameter in lorakit.lora_parameters(model):  # a non-zero B: the adapter changes the logits
        nn.init.normal_(parameter, std=0.1)
    return model


def _ddp(model, tmp_path):
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    return nn.parallel.DistributedDataParallel(model)


@pytest.mark.parametrize("wrapper", ["compile", "data_parallel", "ddp"])
def test_a_wrapped_model_saves_and_loads_its_adapter_as_the_model_inside(wrapper, tmp_path):
    import torch.distributed as dist

    model = injected()
    with torch.no_grad():
        expected = model(IDS).logits
    wrapped = {"compile": lambda: torch.compile(model), "data_parallel": lambda: nn.DataParallel(model),
               "ddp": lambda: _ddp(model, tmp_path)}[wrapper]()
    try:
        lorakit.save_adapter(wrapped, tmp_path / "adapter")
        fingerprint = lorakit.base_fingerprint(wrapped)
        lorakit.load_adapter(wrapped, tmp_path / "adapter", adapter="again")  # "made for another base model" before
        lorakit.combine_adapters(wrapped, {"default": 1.0, "again": 1.0}, name="both", method="cat")
        both_config = json.loads((lorakit.save_adapter(wrapped, tmp_path / "both", adapter="both")
                                  / "adapter_config.json").read_text())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    keys = list(load_file(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert keys and all(key.startswith("base_model.model.model.layers.") for key in keys), keys[:2]
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], sorted(config["target_modules"])) == (4, 32, ["q_proj", "v_proj"])
    assert both_config["r"] == 8
    assert fingerprint == lorakit.base_fingerprint(model)

    fresh = tiny_llama()
    lorakit.load_adapter(fresh, tmp_path / "adapter")
    with torch.no_grad():
        torch.testing.assert_close(fresh(IDS).logits, expected)
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        torch.testing.assert_close(peft.PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter"))(IDS).logits,
                                   expected)


def test_inject_through_a_wrapper_puts_the_config_on_the_model_inside(tmp_path):
    model = tiny_llama()
    wrapped = nn.DataParallel(model)
    assert lorakit.inject(wrapped, lorakit.LoraConfig(**CONFIG)) is wrapped
    assert model.lorakit_configs["default"].r == 4
    assert "save_pretrained" in vars(model)  # the Trainer hooks are on the transformers model, not the wrapper
    lorakit.inject(torch.compile(model), lorakit.LoraConfig(r=2, target_modules=r"model\.layers\.0\.self_attn\.k_proj"),
                   adapter="regex")  # a whole-path regex matches the model's own paths, not _orig_mod.model...
    assert lorakit.adapter_names(model) == ["default", "regex"]
    lorakit.delete_adapter(wrapped, "regex")
    assert list(model.lorakit_configs) == ["default"]


def test_a_checkpoint_of_a_compiled_model_resumes_without_compile_and_back(tmp_path):
    """lorakit's own checkpoints named the trainable tensors by the model given to ``train``: a run on
    ``torch.compile(model)`` wrote ``_orig_mod.model.layers...`` names, and its resume on the plain model was refused
    ("does not match this model's trainable parameters"), as was the reverse."""
    from lorakit.train.checkpoint import load_checkpoint, save_checkpoint
    from lorakit.train.distributed import gathered_trainable

    model = injected(seed=1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    compiled = torch.compile(model)
    with gathered_trainable(compiled) as trainable:  # what train() saves
        assert not any(name.startswith("_orig_mod.") for name in trainable)
        checkpoint = save_checkpoint(tmp_path / "checkpoints", 1, compiled, optimizer, {}, trainable=trainable)
    for target in (lambda m: m, torch.compile):
        fresh = injected(seed=2)
        load_checkpoint(checkpoint, target(fresh), torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad]))
        for (name, ours), (_, saved) in zip(lorakit.lora_parameters(fresh), lorakit.lora_parameters(model)):
            torch.testing.assert_close(ours, saved, msg=name)
    plain = save_checkpoint(tmp_path / "plain", 1, compiled, optimizer, {})  # trainable read from the model
    fresh = injected(seed=2)
    load_checkpoint(plain, fresh, torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad]))


def test_transformers_peft_integration_methods_say_the_lorakit_call_or_run_it(tmp_path):
    """``model.load_adapter(folder)`` (transformers' PeftAdapterMixin, a habit of transformers users) on an injected
    model wrapped lorakit's layers in peft's, loaded part of the file (the rest stayed random, a table of MISSING
    keys said so) and froze lorakit's adapter; ``model.set_adapter`` / ``disable_adapters`` / ... said "The version of
    PEFT you are using is not compatible", which is not the cause."""
    from lorakit.errors import LorakitError

    model = injected()
    lorakit.save_adapter(model, tmp_path / "adapter")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["k_proj"]), adapter="other")
    before = {name: (p.detach().clone(), p.requires_grad) for name, p in model.named_parameters()}
    kinds = {name: type(module) for name, module in model.named_modules()}
    for call, says in [(lambda: model.load_adapter(str(tmp_path / "adapter"), adapter_name="x"), "lorakit.load_adapter("),
                       (lambda: model.add_adapter(None), "lorakit.inject("),
                       (lambda: model.disable_adapters(), "with lorakit.disable_adapters(model)"),
                       (lambda: model.enable_adapters(), "with lorakit.disable_adapters(model)"),
                       (lambda: model.delete_adapter("other"), "lorakit.delete_adapter("),
                       (lambda: model.get_adapter_state_dict(), "lorakit.save_adapter(")]:
        with pytest.raises(LorakitError, match="transformers' peft integration") as error:
            call()
        assert says in str(error.value) and "\n" not in str(error.value)
    assert {name: type(module) for name, module in model.named_modules()} == kinds  # no peft layer anywhere
    assert all(torch.equal(p, before[name][0]) and p.requires_grad == before[name][1]
               for name, p in model.named_parameters())
    model.set_adapter("default")  # the same as lorakit's
    assert model.active_adapters() == ["default"] == lorakit.active_adapters(model)
    model.set_adapter(["default", "other"])
    assert model.active_adapters() == ["default", "other"]
    assert model.num_parameters(only_trainable=True) == sum(p.numel() for _, p in lorakit.lora_parameters(model))
    plain = lorakit.merge_and_unload(model)  # no lorakit layer left: transformers' own methods again
    with pytest.raises(ValueError, match="(?i)peft|adapter"):
        plain.active_adapters()


def test_a_compiled_forward_through_lorakit_kernels_checks_draws_no_dynamo_warning():
    """``triton_usable`` (asked by every NF4 layer and mixed batch) read a ``functools.lru_cache`` function: a compiled
    QLoRA model's first forward warned "Dynamo detected a call to a functools.lru_cache-wrapped function ... Silent
    incorrectness is only a potential risk". The check now traces as plain code, in one graph."""
    import warnings

    from lorakit.kernels._triton import triton_usable

    compiled = torch.compile(lambda x: x * 2 if triton_usable(x) else x + 1, backend="eager", fullgraph=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = compiled(torch.ones(3))
    assert torch.equal(out, torch.ones(3) * 2 if triton_usable(torch.ones(3)) else torch.ones(3) + 1)
    assert not [w for w in caught if "lru_cache" in str(w.message)], [str(w.message) for w in caught]
