"""peft adapters on models holding torch.nn.MultiheadAttention (a SigLIP pooling head, a VLM vision tower, custom
models), compared with the real peft 0.21.

nn.MultiheadAttention keeps q/k/v in one raw parameter ``in_proj_weight (3E, E)`` and passes it and
``out_proj.weight`` straight to F.multi_head_attention_forward, so no Linear forward runs inside it:

* peft's "all-linear" wraps ``out_proj`` (a NonDynamicallyQuantizableLinear) as a Linear whose LoRA never acts in
  peft's forward and never gets a gradient (so B stays zero after training); lorakit loads such files, drops that
  inert LoRA, and refuses one whose out_proj LoRA is not zero (peft's forward ignores it, its merge_and_unload adds it);
* ``target_modules`` naming the attention module itself gives peft's ``lora.MultiheadAttention`` (LoRA on in_proj and
  out_proj, applied by merging them around each forward): lorakit loads, runs, merges, trains and saves it with the
  same outputs, element by element in float32.
"""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file
from torch import nn

import lorakit
from lorakit.errors import LorakitError


class Block(nn.Module):
    """Self-attention through nn.MultiheadAttention, then a Linear: the smallest model with both kinds of layer."""

    def __init__(self, dim: int = 16, heads: int = 2, batch_first: bool = True, kdim: int | None = None):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=batch_first, kdim=kdim, vdim=kdim)
        self.fc = nn.Linear(dim, dim)
        self.batch_first = batch_first

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, T, dim) -> (B, T, dim)
        h = x if self.batch_first else x.transpose(0, 1)
        y = self.attn(h, h, h, need_weights=False)[0]
        y = y if self.batch_first else y.transpose(0, 1)
        return self.fc(torch.relu(y + x))


def block(seed: int = 0, **kwargs) -> Block:
    torch.manual_seed(seed)
    return Block(**kwargs).eval()


def tower(model: nn.Module) -> str:
    """The prefix of SigLIP's encoder and head: transformers 4.x nests them under ``vision_model.``, 5.x does not."""
    return "vision_model." if hasattr(model, "vision_model") else ""


def siglip(seed: int = 0) -> nn.Module:
    """A tiny random SigLIP vision tower with its attention-pooling head (an nn.MultiheadAttention named attention)."""
    torch.manual_seed(seed)
    config = tf.SiglipVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=8, patch_size=4, vision_use_head=True)
    return tf.SiglipVisionModel(config).eval()


X = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(3))
PIXELS = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))


def run(model: nn.Module, kind: str) -> torch.Tensor:
    with torch.no_grad():
        return model(X) if kind == "block" else model(pixel_values=PIXELS).pooler_output


def build(kind: str, seed: int = 0) -> nn.Module:
    return block(seed) if kind == "block" else siglip(seed)


def randomize(model: nn.Module, skip: str | None = None, seed: int = 1) -> None:
    """Random non-zero B (A is random already) on every LoRA tensor, except those whose name holds ``skip``."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name and not (skip and skip in name):
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=gen))


def peft_model(base: nn.Module, target_modules, skip: str | None = None, **options) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules,
                                                                          **options))
    randomize(model, skip)
    return model.eval()


def peft_load(base: nn.Module, folder) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()


# -- "all-linear": peft's LoRA on MultiheadAttention.out_proj never acts ------------------------------------------
@pytest.mark.parametrize("kind", ["block", "siglip"])
def test_peft_all_linear_adapter_loads_with_peft_outputs_and_saves_back(kind, tmp_path):
    base = build(kind)
    theirs = peft_model(base, "all-linear", skip="out_proj")  # as trained: out_proj's B never moved (no gradient)
    theirs.save_pretrained(tmp_path / "peft")
    assert any("attn.out_proj.lora_A" in k or "attention.out_proj.lora_A" in k
               for k in load_file(tmp_path / "peft" / "adapter_model.safetensors"))  # peft did wrap it
    expected = run(theirs, kind)
    assert (expected - run(base, kind)).abs().max() > 1e-3  # the other layers' LoRA changes the output

    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(run(ours, kind), expected, rtol=0, atol=1e-6)
    lorakit.save_adapter(ours, tmp_path / "ours")
    torch.testing.assert_close(run(peft_load(base, tmp_path / "ours"), kind), expected, rtol=0, atol=1e-6)
    lorakit.merge_and_unload(ours)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        merged = theirs.merge_and_unload()  # out_proj's zero LoRA adds nothing here either
    torch.testing.assert_close(run(ours, kind), run(merged, kind), rtol=0, atol=1e-5)


def test_peft_all_linear_adapter_with_a_nonzero_out_proj_lora_is_refused_in_one_line(tmp_path):
    base = build("block")
    theirs = peft_model(base, "all-linear")  # out_proj's B non-zero: peft's forward ignores it, its merge adds it
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    with pytest.raises(LorakitError, match=r"attn\.out_proj.*MultiheadAttention.*merge_and_unload") as error:
        lorakit.load_adapter(ours, tmp_path / "peft")
    assert "\n" not in str(error.value)
    assert not lorakit.adapter_names(ours)


# -- target_modules naming the attention module: peft's lora.MultiheadAttention -----------------------------------
def _keys(folder) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.parametrize("kind,targets", [("block", ["attn", "fc"]), ("siglip", ["attention"])])
def test_attention_module_adapter_matches_peft_forward_merge_and_files(kind, targets, tmp_path):
    base = build(kind)
    theirs = peft_model(base, targets)
    theirs.save_pretrained(tmp_path / "peft")
    expected = run(theirs, kind)  # peft's first forward: merged from the untouched base weights
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(run(ours, kind), expected, rtol=0, atol=1e-6)
    if kind == "siglip":  # only the attention is adapted: the same operations in the same order, the same bits
        assert torch.equal(run(ours, kind), expected)

    lorakit.save_adapter(ours, tmp_path / "ours")
    saved, original = _keys(tmp_path / "ours"), _keys(tmp_path / "peft")
    assert sorted(saved) == sorted(original) and all(torch.equal(saved[k], original[k]) for k in saved)
    assert any(k.endswith("base_layer.out_proj.lora_B.weight") for k in saved)
    torch.testing.assert_close(run(peft_load(base, tmp_path / "ours"), kind), expected, rtol=0, atol=1e-6)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_merged = run(copy.deepcopy(theirs).merge_and_unload(), kind)
    lorakit.merge(ours)
    torch.testing.assert_close(run(ours, kind), peft_merged, rtol=0, atol=1e-6)
    torch.testing.assert_close(run(ours, kind), expected, rtol=0, atol=2e-6)  # merged = unmerged forward
    lorakit.unmerge(ours)
    torch.testing.assert_close(run(ours, kind), expected, rtol=0, atol=1e-6)
    with lorakit.disable_adapters(ours):
        torch.testing.assert_close(run(ours, kind), run(base, kind), rtol=0, atol=1e-6)
    lorakit.merge_and_unload(ours)
    assert type(ours.get_submodule("attn" if kind == "block" else f"{tower(ours)}head.attention")) is nn.MultiheadAttention
    torch.testing.assert_close(run(ours, kind), peft_merged, rtol=0, atol=1e-6)


def test_out_proj_delta_is_added_twice_as_peft_does():
    """peft 0.21 adds out_proj's delta twice (forward and merge); lorakit follows, so files mean one model."""
    base = build("block")
    ours = copy.deepcopy(base)
    lorakit.inject(ours, lorakit.LoraConfig(r=4, alpha=8, target_modules=["attn"]))
    randomize(ours)
    host = ours.attn
    lorakit.merge(ours)
    for part, applied in (("in_proj_weight", 1), ("out_proj_weight", 2)):
        adapter = host.adapters["default"][part]
        delta = adapter.lora_B.detach() @ adapter.lora_A.detach() * 2.0  # s = alpha / r
        before = base.attn.in_proj_weight if part == "in_proj_weight" else base.attn.out_proj.weight
        torch.testing.assert_close(host.parameter(part).detach() - before.detach(), applied * delta, rtol=0, atol=1e-6)


def test_training_reaches_both_projections_with_peft_gradients(tmp_path):
    base = block()
    theirs = peft_model(base, ["attn"]).train()
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "peft", trainable=True)
    ours.train()
    (theirs(X) ** 2).mean().backward()
    (ours(X) ** 2).mean().backward()
    peft_grads = {name: p.grad for name, p in theirs.named_parameters() if p.requires_grad}
    parts = ours.attn.adapters["default"]
    for which in ("lora_A", "lora_B"):
        torch.testing.assert_close(getattr(parts["in_proj_weight"], which).grad,
                                   peft_grads[f"base_model.model.attn.{which}.default.weight"], rtol=1e-5, atol=1e-6)
        # peft's autograd sees out_proj's delta once while its forward adds it twice: lorakit's gradient is the
        # gradient of that forward, twice peft's
        torch.testing.assert_close(getattr(parts["out_proj_weight"], which).grad,
                                   2 * peft_grads[f"base_model.model.attn.base_layer.out_proj.{which}.default.weight"],
                                   rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for n, p in ours.named_parameters() if ".adapters." not in n)

    fresh = block()
    lorakit.inject(fresh, lorakit.LoraConfig(r=4, alpha=8, target_modules=["attn"]))
    before = {n: p.detach().clone() for n, p in fresh.named_parameters()}
    optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):
        optimizer.zero_grad()
        ((fresh.train()(X) - 1) ** 2).mean().backward()
        optimizer.step()
    moved = {n for n, p in fresh.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {f"attn.adapters.default.{part}.{which}" for part in ("in_proj_weight", "out_proj_weight")
                     for which in ("lora_A", "lora_B")}


def test_two_adapters_on_one_attention_switch_and_save_each(tmp_path):
    base = block()
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["attn"]), adapter="one")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=4, variant="rslora", target_modules=["attn", "fc"]), adapter="two")
    randomize(model)
    outputs = {}
    for name in ("one", "two"):
        lorakit.set_adapter(model, name)
        outputs[name] = run(model, "block")
        lorakit.save_adapter(model, tmp_path / name, adapter=name)
        torch.testing.assert_close(run(peft_load(base, tmp_path / name), "block"), outputs[name], rtol=0, atol=1e-6)
    assert (outputs["one"] - outputs["two"]).abs().max() > 1e-3
    alone = copy.deepcopy(base)
    lorakit.load_adapter(alone, tmp_path / "two")
    torch.testing.assert_close(run(alone, "block"), outputs["two"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("model_kwargs,options,message", [
    ({"kdim": 8}, {}, r"kdim/vdim \(8/8\) other than embed_dim \(16\)"),
    ({}, {"variant": "dora"}, r"nn\.MultiheadAttention, which has no DoRA form"),
    ({}, {"init": "pissa"}, r"init='pissa' cannot be used on the nn\.MultiheadAttention 'attn'"),
])
def test_what_peft_cannot_do_either_is_refused_in_one_line(model_kwargs, options, message):
    model = block(**model_kwargs)
    with pytest.raises(LorakitError, match=message) as error:
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["attn"], **options))
    assert "\n" not in str(error.value) and not lorakit.adapter_names(model)


def test_all_linear_and_out_proj_point_to_the_attention_module():
    with pytest.warns(UserWarning, match=r"all-linear skips 1 modules \(out_proj\).*target_modules \['attn'\]"):
        lorakit.inject(block(), lorakit.LoraConfig(target_modules="all-linear"))
    with pytest.raises(LorakitError, match=r"remove 'out_proj' from target_modules \(to adapt an nn\.MultiheadAttention"):
        lorakit.inject(block(), lorakit.LoraConfig(target_modules=["out_proj"]))


def test_mixed_batch_runs_each_row_with_its_adapter_or_refuses_sequence_first():
    model = block()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["attn"]), adapter="one")
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["attn"]), adapter="two")
    randomize(model)
    single = {}
    for name in ("one", "two"):
        lorakit.set_adapter(model, name)
        single[name] = run(model, "block")
    with lorakit.mixed_batch(model, ["two", "one"]):
        mixed = run(model, "block")
    torch.testing.assert_close(mixed, torch.stack([single["two"][0], single["one"][1]]), rtol=0, atol=1e-6)

    sequence_first = block(batch_first=False)
    lorakit.inject(sequence_first, lorakit.LoraConfig(r=2, target_modules=["attn"]))
    with pytest.raises(LorakitError, match="batch_first=False"), lorakit.mixed_batch(sequence_first, ["default", None]):
        run(sequence_first, "block")


def test_a_name_matching_plain_layers_and_an_attention_out_proj_adapts_the_plain_ones(tmp_path):
    """SigLIP's encoder has Linear out_proj layers (called) and its pooling head an nn.MultiheadAttention out_proj
    (read directly): "out_proj" adapts the former and skips the latter with a warning, as all-linear does; the file
    names the adapted layers by path, so peft adapts exactly those too."""
    base = siglip()
    model = copy.deepcopy(base)
    with pytest.warns(UserWarning, match=r"head\.attention\.out_proj.*skipped.*target_modules \['attention'\]"):
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "out_proj"]))
    from lorakit.inject import adapter_hosts, lora_layers

    assert f"{tower(model)}encoder.layers.0.self_attn.out_proj" in lora_layers(model)
    assert f"{tower(model)}head.attention.out_proj" not in adapter_hosts(model)
    randomize(model)
    lorakit.save_adapter(model, tmp_path / "ours")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "ours")).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower()]  # peft adapts exactly the saved layers
    torch.testing.assert_close(run(theirs, "siglip"), run(model, "siglip"), rtol=0, atol=1e-6)
    again = copy.deepcopy(base)
    lorakit.load_adapter(again, tmp_path / "ours")
    torch.testing.assert_close(run(again, "siglip"), run(model, "siglip"), rtol=0, atol=0)


def test_16_bit_base_matches_peft_bit_for_bit(tmp_path):
    """bfloat16 base, float32 adapter: peft rounds in_proj's delta before adding it and adds out_proj's second copy
    unrounded (an in-place add); lorakit's forward rounds the same way."""
    base = siglip().to(torch.bfloat16)
    theirs = peft_model(base, ["attention"])
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(pixel_values=PIXELS.bfloat16()).pooler_output
        assert torch.equal(ours(pixel_values=PIXELS.bfloat16()).pooler_output, expected)


def test_dropout_and_a_newer_peft_file_are_said_once(tmp_path):
    import json

    with pytest.warns(UserWarning, match=r"dropout=0\.1 does not apply to the nn\.MultiheadAttention attn"):
        lorakit.inject(block(), lorakit.LoraConfig(r=2, dropout=0.1, target_modules=["attn"]))
    base = block()
    peft_model(base, ["attn"]).save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "peft_version": "0.22.0"}))
    with pytest.warns(UserWarning, match=r"saved by peft 0\.22\.0; lorakit runs LoRA on nn\.MultiheadAttention as peft 0\.21"):
        lorakit.load_adapter(copy.deepcopy(base), tmp_path / "peft")


def test_ensure_weight_tying_file_still_leaves_the_zero_out_proj_lora_out(tmp_path):
    """ensure_weight_tying makes lorakit take the targets from the file's keys: the zero out_proj LoRA is among them."""
    import json

    base = build("block")
    theirs = peft_model(base, "all-linear", skip="out_proj")
    theirs.save_pretrained(tmp_path / "peft")
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps({**config, "ensure_weight_tying": True}))
    ours = copy.deepcopy(base)
    lorakit.load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(run(ours, "block"), run(theirs, "block"), rtol=0, atol=1e-6)


def test_inspect_counts_an_attention_adapter_once(tmp_path):
    # peft's keys for one attention module: <path>.lora_A (in_proj) and <path>.base_layer.out_proj.lora_A (out_proj)
    from lorakit.commands.inspect import describe

    model = block()
    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["attn", "fc"]))
    lorakit.save_adapter(model, tmp_path / "a")
    info = describe(str(tmp_path / "a"))
    assert info["adapted_modules"] == {"attn": 1, "fc": 1} and info["adapted_layers"] == 2
    assert info["ranks_in_file"] == [2]
