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
