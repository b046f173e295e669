"""transformers' Trainer resuming (and loading the best checkpoint of) a lorakit-injected model says nothing unless
something is wrong (lorakit/hf_trainer.py ``load_state_dict``).

Before: ``trainer.train(resume_from_checkpoint=...)`` logged "There were missing keys in the checkpoint model loaded:
[...]" listing every frozen base weight (the checkpoint holds only the adapters, by design), though resume worked.
"""

from __future__ import annotations

import logging
import re
import warnings
from contextlib import contextmanager

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

import lorakit
from conftest import assert_close
from test_hf_trainer import args, dataset, injected, lora_tensors


@contextmanager
def captured():
    """Every transformers log record (WARNING and up) and every Python warning raised inside, as text lines."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    handler, logger = Keep(level=logging.WARNING), logging.getLogger("transformers")
    logger.addHandler(handler)  # transformers' loggers do not propagate to the root: listen on its own root
    # a test run earlier in this process may have quietened transformers (set_verbosity_error): hear warnings here
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield lines
        lines.extend(str(w.message) for w in caught)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def test_resume_and_best_model_are_quiet_and_exact(tmp_path):
    straight = injected()
    with captured() as first:  # load_best_model_at_end loads a checkpoint through the same call as resume
        Trainer(model=straight, args=args(tmp_path / "a", eval_strategy="steps", eval_steps=2, load_best_model_at_end=True,
                                          metric_for_best_model="loss", greater_is_better=False),
                train_dataset=dataset(), eval_dataset=dataset(4)).train()
    resumed = injected()
    with captured() as second:
        Trainer(model=resumed, args=args(tmp_path / "b"), train_dataset=dataset()).train(
            resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert not [line for line in first + second if "keys" in line], first + second  # no missing/unexpected keys
    fresh = injected()  # the same steps 3-4 without interruption (no best-model load): the resumed run matches it
    Trainer(model=fresh, args=args(tmp_path / "c"), train_dataset=dataset()).train()
    expected = lora_tensors(fresh)
    for name, tensor in lora_tensors(resumed).items():
        assert_close(tensor, expected[name], msg=name)


def test_a_checkpoint_missing_an_adapter_tensor_is_still_reported(tmp_path):
    Trainer(model=injected(), args=args(tmp_path / "a", max_steps=2), train_dataset=dataset()).train()
    weights = tmp_path / "a" / "checkpoint-2" / "model.safetensors"
    tensors = load_file(weights)
    lost = sorted(tensors)[0]
    del tensors[lost]
    tensors["model.layers.0.self_attn.q_proj.adapters.default.lora_C"] = torch.zeros(2)  # a key this model lacks
    save_file(tensors, weights, metadata={"format": "pt"})
    model = injected()
    with captured() as lines:
        Trainer(model=model, args=args(tmp_path / "b", max_steps=2), train_dataset=dataset()).train(
            resume_from_checkpoint=str(weights.parent))
    missing = [line for line in lines if "missing keys" in line]
    assert len(missing) == 1 and f"['{lost}']" in missing[0], lines  # that tensor only, no frozen base weight
    assert any("unexpected keys" in line and "lora_C" in line for line in lines), lines


def test_load_state_dict_rules():
    model = injected()
    adapters = {name: torch.ones_like(p) for name, p in model.named_parameters() if p.requires_grad}
    result = model.load_state_dict(adapters, strict=False)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if n in adapters)  # loaded

    with pytest.raises(RuntimeError, match=r"Missing key\(s\).*base_layer\.weight"):  # strict stays strict
        model.load_state_dict(adapters)

    whole = model.state_dict()
    base_name = next(name for name in whole if name.endswith("base_layer.weight"))
    del whole[base_name]  # a whole-model file that lacks a base weight: a real problem, still reported
    assert model.load_state_dict(whole, strict=False).missing_keys == [base_name]

    partial = dict(list(adapters.items())[1:])
    assert model.load_state_dict(partial, strict=False).missing_keys == [next(iter(adapters))]


def test_a_checkpoint_of_another_rank_is_one_line():
    """Resuming with another rank: torch's RuntimeError listed one size mismatch per adapter tensor."""
    model = injected(r=8)
    other = lora_tensors(injected())  # what a rank-4 run saved
    with pytest.raises(lorakit.LorakitError) as info:
        model.load_state_dict(other, strict=False)
    message = str(info.value)
    assert "\n" not in message
    assert re.fullmatch(r"the state dict's model\.layers\.0\.self_attn\.q_proj\.adapters\.default\.lora_A has shape "
                        r"\(4, \d+\), this model's is \(8, \d+\) \(\d+ adapter tensor\(s\) differ\): it was saved with "
                        r"other adapter settings; .*", message), message
