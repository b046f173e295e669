"""Models that read a wrapped projection's own ``.weight``.

T5's feed-forward casts to ``wo.weight.dtype``: the LoRA layer answers with its base layer's tensors, as peft's do,
so T5 runs with every linear adapted. Mamba's mixer uses ``dt_proj.weight`` (and, in its fused path, ``x_proj`` and
``out_proj``) as tensors instead of calling the modules, so an adapter there would be bypassed without a word:
"all-linear" skips them with a warning and naming them is refused in one line.
"""

from __future__ import annotations

import pytest
import torch

import lorakit
from conftest import assert_close
from lorakit.errors import LorakitError


def _t5():
    from transformers import T5Config, T5ForConditionalGeneration

    model = T5ForConditionalGeneration(T5Config(vocab_size=64, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                                decoder_start_token_id=0)).eval()
    ids = torch.randint(0, 64, (2, 5))
    return model, lambda m: m(input_ids=ids, decoder_input_ids=ids).logits


def _mamba():
    from transformers import MambaConfig, MambaForCausalLM

    model = MambaForCausalLM(MambaConfig(vocab_size=64, hidden_size=16, state_size=4, num_hidden_layers=1)).eval()
    ids = torch.randint(0, 64, (2, 5))
    return model, lambda m: m(ids).logits


@pytest.mark.parametrize("build", [_t5, _mamba], ids=["t5", "mamba"])
def test_models_reading_weight_from_wrapped_modules_run_and_merge_alike(build):
    model, run = build()
    with torch.no_grad():
        base = run(model)
        if build is _mamba:
            with pytest.warns(UserWarning, match=r"skips 3 modules \(dt_proj, out_proj, x_proj\)"):
                lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4))
        else:
            lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4))
        wrapped = {name: m for name, m in model.named_modules() if isinstance(m, lorakit.layers.LoraLayer)}
        if build is _mamba:
            assert {name.rsplit(".", 1)[-1] for name in wrapped} == {"in_proj"}
        else:
            assert {name.rsplit(".", 1)[-1] for name in wrapped} == {"q", "k", "v", "o", "wi", "wo"}
        assert all(m.weight is m.base_layer.weight for m in wrapped.values())
        assert all(m.bias is getattr(m.base_layer, "bias", None) for m in wrapped.values())
        for m in wrapped.values():
            for adapter in m.adapters.values():
                adapter.lora_B.normal_(std=0.5)
        unmerged = run(model)
        assert (unmerged - base).abs().max() > 1e-3  # the adapters are really applied
        lorakit.merge(model)
        assert_close(run(model), unmerged)  # and what merging folds in is what the forward applied


def test_naming_a_module_the_model_reads_directly_is_refused():
    model, _ = _mamba()
    with pytest.raises(LorakitError, match=r"MambaMixer uses dt_proj.weight directly .* remove 'dt_proj'"):
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["in_proj", "dt_proj"]))
    assert not any(isinstance(m, lorakit.layers.LoraLayer) for m in model.modules())  # left as it was

