"""Core follow-ups (session 13): one implementation of the call with adapted parameters for LoRA on raw parameters
and on nn.MultiheadAttention (lorakit.param_call), and a trainable-tokens load that writes only the trained rows.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from conftest import assert_close
from lorakit.errors import LorakitError
from lorakit.mha_lora import MhaLora
from test_mha_interop import X, block, randomize
from test_param_lora_replicas import replicate_on_cpu


def attention_model() -> nn.Module:
    """The interop tests' Block (nn.MultiheadAttention, then a Linear) with peft's attention LoRA, B random."""
    model = block()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["attn"]))
    randomize(model)
    return model


def held_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)}


def test_attention_lora_in_a_replica_equals_the_model_and_gives_its_copies_back():
    """DataParallel replicas hold in_proj_weight and out_proj.weight as plain attributes: the call reads the adapted
    tensors there and puts the replica's own copies back, in both modules, with no mark of the call left."""
    model = attention_model()
    host = model.attn
    assert isinstance(host, MhaLora)
    with torch.no_grad():
        expected = model(X)
    replica = replicate_on_cpu(model)
    owners = (replica.attn.base_layer, replica.attn.base_layer.out_proj)
    before = [held_tensors(owner) for owner in owners]
    assert {"in_proj_weight"} <= before[0].keys() and {"weight"} <= before[1].keys()
    with torch.no_grad():
        got = replica(X)
    assert_close(got, expected)
    with lorakit.disable_adapters(model), torch.no_grad():
        plain = model(X)
    assert (got - plain).abs().max() > 1e-3  # the adapter acts in the replica
    for owner, held in zip(owners, before):
        after = held_tensors(owner)
        assert after.keys() == held.keys() and all(after[k] is v for k, v in held.items())
        assert not any(k.startswith("_lorakit") for k in vars(owner))
    # the model's own attention reads its registered parameters again
    assert "in_proj_weight" not in vars(host.base_layer) and "weight" not in vars(host.base_layer.out_proj)


def test_nested_call_through_an_attention_wrapper_is_refused_in_a_replica_and_in_the_model():
    """A module that calls its own wrapper again would read the first call's adapted tensors as its parameters (in a
    replica, where they are plain attributes anyway, the delta would be added twice): refused in one line, as for
    ParamLora. Before the one shared implementation, MhaLora let a replica's nested call through."""
    for in_replica in (False, True):
        model = attention_model()
        model = replicate_on_cpu(model) if in_replica else model
        host = model.attn
        attention = host.base_layer
        inner = attention.forward

        def nested(*args, host=host, inner=inner, **kwargs):
            host(*args, **kwargs)
            return inner(*args, **kwargs)

        before = [held_tensors(owner) for owner in (attention, attention.out_proj)]
        attention.forward = nested
        with pytest.raises(LorakitError, match="already replaced during this call") as caught, torch.no_grad():
            model(X)
        assert "\n" not in str(caught.value)
        del attention.forward
        after = [held_tensors(owner) for owner in (attention, attention.out_proj)]
        assert [a.keys() for a in after] == [b.keys() for b in before], in_replica
        assert all(a[k] is v for a, b in zip(after, before) for k, v in b.items())
