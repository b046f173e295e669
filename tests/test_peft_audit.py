"""Adapters made by the real peft package with the options users set, loaded here and back (regressions of an audit).

Each case: peft builds the adapter on a tiny random model and gives it random weights; lorakit loads the saved folder
into a fresh base (same logits as peft), merges (same logits), and saves it again for peft (same logits).
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.io import CONFIG_NAME

CASES = {
    # layers_to_transform was refused; PEFT's rule: the first number after "<layers_pattern>." is the layer index
    "layers_to_transform+pattern": dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1], layers_pattern="layers"),
    "layers_to_transform-int": dict(target_modules=["q_proj", "gate_proj"], layers_to_transform=0),
    # injected dropout modules started in training mode, so a model in eval() gave random logits after load_adapter
    "dropout": dict(target_modules=["q_proj", "down_proj"], lora_dropout=0.3),
    # DoRA with rsLoRA scaling was refused
    "dora+rslora": dict(target_modules=["q_proj", "embed_tokens"], use_dora=True, use_rslora=True),
    "regex+alpha_pattern-regex": dict(target_modules=r".*\.(q_proj|up_proj)", exclude_modules=r"model\.layers\.0\.mlp\..*",
                                      alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3}, rank_pattern={"up_proj": 2}),
    # merging an embedding adapter wrote into the weight the output head shares, so the head changed too
    "tied-embedding+head": dict(target_modules=["embed_tokens", "lm_head", "q_proj"], tie=True),
    "modules_to_save": dict(target_modules=["q_proj"], modules_to_save=["lm_head", "embed_tokens"]),
}


def _randomize_peft(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _base(tie=False):
    return tiny_llama(num_hidden_layers=2, tie_word_embeddings=tie)


@pytest.mark.parametrize("case", list(CASES))
def test_peft_options_both_ways_and_merge(case, tmp_path):
    options = dict(CASES[case])
    tie = options.pop("tie", False)
    ids = torch.randint(0, 128, (2, 7))
    theirs = peft.get_peft_model(_base(tie), peft.LoraConfig(r=4, lora_alpha=8, **options)).eval()
    _randomize_peft(theirs)
    with torch.no_grad():
        expected = theirs(ids).logits
        assert (expected - _base(tie)(ids).logits).abs().max() > 1e-2  # the adapter does change the model
    theirs.save_pretrained(tmp_path / "peft")

    ours = _base(tie)
    lorakit.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        assert_close(ours(ids).logits, expected)
    lorakit.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(_base(tie), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(again(ids).logits, expected)
        before = {k: v.clone() for k, v in ours.state_dict().items()}
        lorakit.merge(ours)
        assert_close(ours(ids).logits, expected)
        lorakit.unmerge(ours)
        after = ours.state_dict()
        assert all(torch.allclose(before[k], after[k], atol=1e-6) for k in before)
        if tie:  # the tie is back after unmerge
            assert ours.lm_head.base_layer.weight is ours.model.embed_tokens.base_layer.weight
        lorakit.merge_and_unload(ours)
        assert_close(ours(ids).logits, expected)


def test_layers_to_transform_targets_only_those_layers():
    model = _base()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[1], layers_pattern="layers"))
    assert [n for n, m in model.named_modules() if isinstance(m, lorakit.layers.LoraLinear)] == ["model.layers.1.self_attn.q_proj"]
    with pytest.raises(lorakit.LorakitError, match="layers_to_transform"):
        lorakit.LoraConfig(target_modules=["q_proj"], layers_to_transform=["1"])
    with pytest.raises(lorakit.LorakitError, match="need target_modules as a list"):
        lorakit.LoraConfig(target_modules="all-linear", layers_to_transform=[0])


def test_overlapping_rank_patterns_keep_their_order_on_save(tmp_path):
    """The first matching pattern wins; the file used to be written with sorted keys, so a reload picked another."""
    ids = torch.randint(0, 128, (2, 7))
    model = _base()
    config = lorakit.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], rank_pattern={"q_proj": 2, r"^model\.layers\.1\..*": 6})
    lorakit.inject(model, config)
    assert model.model.layers[1].self_attn.q_proj.adapters["default"].rank == 2
    lorakit.save_adapter(model, tmp_path)
    assert list(json.loads((tmp_path / CONFIG_NAME).read_text())["rank_pattern"]) == ["q_proj", r"^model\.layers\.1\..*"]
    fresh = _base()
    lorakit.load_adapter(fresh, tmp_path)
    assert fresh.model.layers[1].self_attn.v_proj.adapters["default"].rank == 6
    assert_close(fresh(ids).logits, model(ids).logits)
    peft.PeftModel.from_pretrained(_base(), tmp_path)  # peft reads the same ranks (it raises on a shape mismatch)


def test_save_embedding_layers_copies_and_named_subfolders(tmp_path):
    ids = torch.randint(0, 128, (2, 7))
    theirs = peft.get_peft_model(_base(), peft.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="mine").eval()
    _randomize_peft(theirs)
    theirs.save_pretrained(tmp_path, save_embedding_layers=True)  # adds full copies of embed_tokens and lm_head
    with pytest.raises(lorakit.LorakitError, match=r"subfolders \(mine\); pass one of them"):
        lorakit.load_adapter(_base(), tmp_path)
    ours = _base()
    lorakit.load_adapter(ours, tmp_path / "mine")
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits)
    other = tiny_llama(seed=3, num_hidden_layers=2)  # same shapes, other values
    with pytest.raises(lorakit.LorakitError, match="full copy of .*differs from this model's"):
        lorakit.load_adapter(other, tmp_path / "mine")
    assert not lorakit.adapter_names(other)


def test_config_fields_from_other_peft_versions():
    read = lorakit.LoraConfig.from_peft_dict
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    # init-only settings and inits that leave the base alone: the saved weights are final
    for extra in ({"init_lora_weights": "orthogonal"}, {"init_lora_weights": None}, {"eva_config": {"rho": 2.0}},
                  {"bias": None, "r": 4.0, "lora_dropout": None, "rank_pattern": None}):
        assert read({**base, **extra}).r == 4
    assert read({**base, "use_rslora": True, "use_dora": True}).variant == "rsdora"
    with pytest.warns(UserWarning, match="rewrites the base weights"):
        read({**base, "init_lora_weights": "pissa_niter_4"})
    # (lora_bias was refused here: lorakit runs it now, test_followups_15_lora_bias)
    for extra, words in (({"layer_replication": [[0, 2]]}, "layer_replication=.* is not supported .*merge_and_unload"),
                         ({"brand_new": "x"}, "unknown field 'brand_new'.*delete it from the file"),
                         ({"bias": "all"}, "bias='all' is not supported.*use bias='none'")):
        with pytest.raises(lorakit.LorakitError, match=words):
            read({**base, **extra})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        read({**base, "init_lora_weights": "gaussian", "megatron_core": None, "task_type": "SEQ_CLS"})
