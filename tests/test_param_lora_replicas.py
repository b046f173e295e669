"""LoRA on raw parameters (lorakit.param_lora) inside ``torch.nn.DataParallel`` replicas.

transformers' ``Trainer`` in one process with several visible GPUs wraps the model in ``nn.DataParallel``, which runs
each forward on replicas made by ``torch.nn.parallel.replicate``: every module copied by
``Module._replicate_for_data_parallel()`` (empty ``_parameters``, ``_is_replica = True``) and each parameter's
per-device copy (not a leaf; its gradient flows back to the original) set as a plain attribute. ``replicate`` itself
needs CUDA, so ``replicate_on_cpu`` below takes its steps for one device, the broadcast replaced by ``p * 1``.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import transformers as tf
from torch import nn

import lorakit
from conftest import assert_close
from lorakit.errors import LorakitError
from lorakit.param_lora import ParamLora, param_hosts

# MoE experts are fused 3-D parameters (what target_parameters adapts) only from transformers 5; 4.x builds one
# nn.Linear per expert, which target_modules adapts like any other layer
FUSED_EXPERTS = hasattr(tf, "MixtralForCausalLM") and any(p.ndim == 3 for p in tf.MixtralForCausalLM(tf.MixtralConfig(
    vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
    num_local_experts=2)).parameters())
needs_fused_experts = pytest.mark.skipif(not FUSED_EXPERTS, reason="fused 3-D MoE expert parameters need transformers >= 5")
EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTER = ["mlp.gate.weight"]
TINY = dict(vocab_size=64, hidden_size=16, intermediate_size=12, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1, num_experts_per_tok=2, pad_token_id=0, bos_token_id=1, eos_token_id=2,
            max_position_embeddings=32)
IDS = torch.tensor([[5, 17, 42, 8, 63, 3, 61], [12, 7, 7, 30, 55, 21, 4]])


def replicate_on_cpu(network: nn.Module) -> nn.Module:
    """``torch.nn.parallel.replicate(network, [device])[0]`` without CUDA: the same module copies, links, parameter
    attributes and ``_former_parameters``; the parameter copies are ``p * 1`` (what ``Broadcast`` gives: a non-leaf
    copy whose gradient reaches ``p``), buffers are detached clones."""
    params = list(network.parameters())
    copies = [p * 1 for p in params]
    param_index = {p: i for i, p in enumerate(params)}
    modules = list(network.modules())
    module_index = {m: i for i, m in enumerate(modules)}
    replicas = []
    for module in modules:
        replica = module._replicate_for_data_parallel()
        replica._former_parameters = OrderedDict()
        replicas.append(replica)
    for module, replica in zip(modules, replicas):
        for key, child in module._modules.items():
            if child is None:
                replica._modules[key] = None
            else:
                setattr(replica, key, replicas[module_index[child]])
        for key, param in module._parameters.items():
            if param is None:
                replica._parameters[key] = None
            else:
                copy = copies[param_index[param]]
                setattr(replica, key, copy)  # not a Parameter: lands in the replica's __dict__
                replica._former_parameters[key] = copy
        for key, buffer in module._buffers.items():
            if buffer is None:
                replica._buffers[key] = None
            else:
                setattr(replica, key, buffer.detach().clone())
    return replicas[0]


def build(kind: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "mixtral":
        model = tf.MixtralForCausalLM(tf.MixtralConfig(num_local_experts=3, **TINY))
    else:
        model = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(num_experts=3, head_dim=8, moe_intermediate_size=12,
                                                         norm_topk_prob=True, **TINY))
    with torch.no_grad():  # Qwen3-MoE's router starts at zero: random, so the routing depends on the input
        for name, parameter in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                parameter.normal_(std=0.5)
    return model


def adapted_model(kind: str, adapters: tuple[str, ...] = ("default",)) -> nn.Module:
    """Expert + router LoRA and a plain LoRA on q_proj, each B random (every adapter changes the output)."""
    model = build(kind)
    for name in adapters:
        lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj"],
                                                 target_parameters=EXPERTS + ROUTER), adapter=name)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=gen))
    if len(adapters) > 1:
        lorakit.set_adapter(model, list(adapters))
    return model.train()


def loss_of(logits: torch.Tensor) -> torch.Tensor:
    weights = torch.linspace(-1.0, 1.0, logits.numel()).reshape(logits.shape)
    return (logits * weights).sum()


def adapter_grads(model: nn.Module) -> dict[str, torch.Tensor]:
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def base_attributes(replica: nn.Module) -> dict[str, dict[str, object]]:
    """The ``__dict__`` entries of each wrapped module of a replica that hold its parameter copies."""
    return {path: {k: v for k, v in vars(host.base_layer).items() if isinstance(v, torch.Tensor)}
            for path, host in replica.named_modules() if isinstance(host, ParamLora)}


@needs_fused_experts
@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("adapters", [("default",), ("one", "two")], ids=["one_adapter", "two_stacked"])
def test_replica_forward_and_backward_equal_the_model(kind, adapters):
    model = adapted_model(kind, adapters)
    expected = model(IDS).logits
    loss_of(expected).backward()
    expected_grads = adapter_grads(model)
    # every adapter parameter of every kind gets a gradient: experts, router and q_proj, in both layers
    assert len(expected_grads) == len(adapters) * 2 * 2 * (2 + 1 + 1)
    assert all(".adapters." in n for n in expected_grads)

    replica = replicate_on_cpu(model)
    assert replica._is_replica and not list(replica.parameters())  # what replicate gives: no parameters of its own
    hosts = param_hosts(replica)
    assert len(hosts) == 2 * 2 and all(not h.base_layer._parameters for h in hosts.values())
    before = base_attributes(replica)
    assert all(set(names) >= {"gate_up_proj", "down_proj"} or set(names) >= {"weight"} for names in before.values())

    got = replica(IDS).logits
    assert_close(got, expected.detach())
    loss_of(got).backward()
    got_grads = adapter_grads(model)  # gradients flow through the copies back to the original adapters
    assert got_grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        assert grad.abs().max() > 0, name
        assert_close(got_grads[name], grad)

    # the replica still holds its own parameter copies, the very same tensors, and nothing of the call is left
    after = base_attributes(replica)
    assert after.keys() == before.keys()
    for path, names in before.items():
        assert after[path].keys() == names.keys()
        assert all(after[path][k] is v for k, v in names.items()), path
        assert not any(k.startswith("_lorakit") for k in vars(hosts[path].base_layer))
    # and the original model is untouched: its modules read their registered parameters
    for host in param_hosts(model).values():
        assert not any(k in vars(host.base_layer) for k in host.base_layer._parameters)
    assert_close(model(IDS).logits.detach(), expected.detach())


@needs_fused_experts
def test_second_replica_forward_after_the_first_gives_the_same_output():
    model = adapted_model("mixtral")
    replica = replicate_on_cpu(model)
    with torch.no_grad():
        first, second = replica(IDS).logits, replica(IDS).logits
    assert torch.equal(first, second)
    with lorakit.disable_adapters(model):  # the switch reaches fresh replicas (DataParallel replicates each forward)
        with torch.no_grad():
            plain = replicate_on_cpu(model)(IDS).logits
            reference = model(IDS).logits
    assert_close(plain, reference)
    assert (plain - first).abs().max() > 1e-3


class TwoWeights(nn.Module):
    """A module with two raw 2-D parameters, read by name in its forward (as routers read ``self.weight``)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(5, 3))
        self.other = nn.Parameter(torch.randn(4, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (rows, 3) -> (rows, 4)
        return nn.functional.linear(nn.functional.linear(x, self.weight), self.other)


def tiny_host() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(TwoWeights())
    config = lorakit.LoraConfig(r=2, alpha=2, target_modules=[], target_parameters=["0.weight", "0.other"])
    lorakit.inject(model, config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_()
    return model


def test_a_failing_forward_in_a_replica_puts_its_parameters_back():
    model = tiny_host()
    replica = replicate_on_cpu(model)
    base = replica[0].base_layer
    held = dict(vars(base))
    with pytest.raises(RuntimeError):
        replica(torch.randn(2, 7))  # wrong width: the module's own error, raised while its parameters are replaced
    assert vars(base).keys() == held.keys()
    assert all(vars(base)[k] is v for k, v in held.items())
    x = torch.randn(3, 3)
    assert_close(replica(x), model(x))


def test_nested_call_through_the_same_wrapper_is_refused_in_a_replica_and_in_the_model():
    for model in (tiny_host(), None):
        model = model or replicate_on_cpu(tiny_host())
        host = model[0]
        inner = host.base_layer.forward

        def nested(x, host=host, inner=inner):
            return host(x) + inner(x)

        host.base_layer.forward = nested
        with pytest.raises(LorakitError, match="already replaced during this call") as caught:
            model(torch.randn(2, 3))
        assert "\n" not in str(caught.value)
        del host.base_layer.forward
        tensors = {k for k, v in vars(host.base_layer).items() if isinstance(v, torch.Tensor)}
        assert tensors == (set() if not host.base_layer.__dict__.get("_is_replica") else {"weight", "other"})


def test_module_that_lost_its_parameter_says_so_in_one_line():
    model = tiny_host()
    del model[0].base_layer._parameters["other"]
    with pytest.raises(LorakitError, match="holds no parameter 'other'") as caught:
        model(torch.randn(2, 3))
    assert "\n" not in str(caught.value)
