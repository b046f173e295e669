"""One merge for ``ParamLora`` and ``MhaLora`` (a per-part count of delta additions), one ``delete_adapter`` for the
adapter hosts, and ``lorakit.save_quantized`` on a model whose adapters were deleted (saved as if never adapted) or
still held (refused with what works: save_adapter, then delete_adapter; never a lossy merge into 4-bit weights)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from conftest import tiny_llama
from lorakit.errors import LorakitError
from lorakit.inject import adapter_hosts
from lorakit.layers import LoraLinear
from lorakit.mha_lora import MhaLora
from lorakit.param_lora import ParamLora


class Experts(nn.Module):
    """A raw 3-D expert stack ``weight (E, out, in)`` that no nn.Linear holds: x (N, in) -> (N, out), mean of experts."""

    def __init__(self, experts: int = 3, dim: int = 8):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("eoi,ni->no", self.weight, x) / self.weight.shape[0]


class Net(nn.Module):
    """nn.MultiheadAttention (MhaLora), a raw expert stack (ParamLora) and a Linear (LoraLinear)."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.experts = Experts(dim=dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, dim) -> (B, T, dim)
        h = self.attn(x, x, x, need_weights=False)[0] + x
        return self.fc(self.experts(h.reshape(-1, h.shape[-1])).reshape(h.shape))


def _adapted_net(*adapters: str) -> nn.Module:
    torch.manual_seed(0)
    model = Net().eval()
    config = lorakit.LoraConfig(r=2, alpha=4, target_modules=["attn", "fc"], target_parameters=["experts.weight"])
    for name in adapters:
        lorakit.inject(model, config, adapter=name)
    with torch.no_grad():  # B starts at zero: give every adapter an update
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:
                param.normal_(std=0.3)
    return model


X = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def test_merge_adds_each_delta_as_many_times_as_the_forward_and_unmerge_takes_them_back():
    model = _adapted_net("default")
    mha, experts = model.attn, model.experts
    assert isinstance(mha, MhaLora) and type(experts) is ParamLora
    before = {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" not in name}
    w_in, w_out = mha.parameter("in_proj_weight").detach().float(), mha.parameter("out_proj_weight").detach().float()
    d_in, d_out = (mha.adapters["default"][p].delta() for p in ("in_proj_weight", "out_proj_weight"))
    candidates = mha.merged_candidates("default")
    assert torch.equal(candidates["in_proj_weight"], w_in + d_in)  # once
    assert torch.equal(candidates["out_proj_weight"], (w_out + d_out) + d_out)  # twice, as peft 0.21
    assert torch.equal(experts.merged_candidates("default")["weight"],
                       experts.parameter("weight").detach() + experts.adapters["default"]["weight"].delta())
    unmerged = model(X)
    lorakit.merge(model)
    assert mha.merged == ["default"] and experts.merged == ["default"]
    torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-5)  # the merged weights are the forward's
    lorakit.unmerge(model)
    for name, param in model.named_parameters():
        if name in before:
            torch.testing.assert_close(param, before[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(model(X), unmerged, rtol=1e-5, atol=1e-6)  # back to the base, up to rounding


def test_delete_adapter_is_one_rule_for_linear_attention_and_parameter_hosts():
    model = _adapted_net("a", "b")
    lorakit.set_adapter(model, ["a", "b"])
    hosts = [model.attn, model.experts, model.fc]
    assert [type(h) for h in hosts] == [MhaLora, ParamLora, LoraLinear]
    lorakit.merge(model, "a")
    for host in hosts:  # a merged adapter's update is in the base weights: refused on each kind alike
        with pytest.raises(LorakitError, match=r"adapter 'a' is merged; unmerge it before deleting it"):
            host.delete_adapter("a")
        assert host.adapter_names() == ["a", "b"]
    lorakit.unmerge(model)
    only_b = _adapted_net("a", "b")
    lorakit.set_adapter(only_b, "b")
    expected = only_b(X)
    lorakit.delete_adapter(model, "a")
    for host in hosts:
        assert host.adapter_names() == ["b"] and host.active == ["b"]
        assert not any(".a." in name for name, _ in host.named_parameters())
    torch.testing.assert_close(model(X), expected, rtol=1e-5, atol=1e-6)  # (merged and unmerged once: rounding)


def _files(folder) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.usefixtures("no_dynamo")
def test_save_quantized_after_delete_adapter_writes_the_never_adapted_files_and_refusal_says_what_works(tmp_path):
    pytest.importorskip("bitsandbytes")
    from lorakit.models.quantized_loading import load_quantized

    model = tiny_llama(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    lorakit.quantize(model, "nf4")
    never = _files(lorakit.save_quantized(model, None, tmp_path / "never", progress=False))

    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear", modules_to_save=["lm_head"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    ids = torch.tensor([[1, 5, 9, 3, 7]])
    adapted = model(ids).logits

    with pytest.raises(LorakitError) as refused:
        lorakit.save_quantized(model, None, tmp_path / "refused", progress=False)
    said = str(refused.value)
    assert "\n" not in said and "'default'" in said
    assert "lorakit.save_adapter(model, folder, adapter='default')" in said
    assert "lorakit.delete_adapter(model, 'default')" in said
    assert "merge" not in said  # merged into 4-bit weights the update is re-quantized: not a way to keep it
    assert not (tmp_path / "refused").exists()

    # what the refusal says, step by step: the adapter saved, the base saved alone, the two loaded back together
    lorakit.save_adapter(model, tmp_path / "adapter")
    lorakit.delete_adapter(model, "default")
    hosts = adapter_hosts(model)
    assert hosts and not any(h.adapter_names() for h in hosts.values())  # the wrappers stay, empty
    plain = model(ids).logits
    out = lorakit.save_quantized(model, None, tmp_path / "after", progress=False)
    assert _files(out) == never  # byte for byte: no base_layer keys, the same config and skip list
    assert adapter_hosts(model).keys() == hosts.keys()  # the model is left as it was, wrappers included
    assert all(adapter_hosts(model)[path] is host for path, host in hosts.items())
    torch.testing.assert_close(model(ids).logits, plain, rtol=0, atol=0)

    loaded = load_quantized(out, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(loaded(ids).logits, plain, rtol=0, atol=0)
    lorakit.load_adapter(loaded, tmp_path / "adapter")
    torch.testing.assert_close(loaded(ids).logits, adapted, rtol=1e-5, atol=1e-5)  # the whole update, nothing lost
