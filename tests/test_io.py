"""Bad adapter files and bad calls: a clear LorakitError, and the model exactly as before."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from conftest import tiny_llama
from test_layers import randomize


def snapshot(model):
    return {n: (p.detach().clone(), p.requires_grad) for n, p in model.state_dict(keep_vars=True).items()}


def assert_unchanged(model, before):
    after = snapshot(model)
    assert after.keys() == before.keys()
    for name, (tensor, grad) in before.items():
        assert torch.equal(after[name][0], tensor) and after[name][1] == grad, name


@pytest.fixture
def saved(tmp_path):
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    randomize(model)
    folder = tmp_path / "adapter"
    lorakit.save_adapter(model, folder)
    return folder


def rewrite_tensors(folder, change):
    tensors = load_file(folder / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_NAME, metadata={"format": "pt"})


def refused(model, folder, match, **kwargs):
    before = snapshot(model)
    names_before = lorakit.adapter_names(model)
    with pytest.raises(lorakit.LorakitError, match=match):
        lorakit.load_adapter(model, folder, **kwargs)
    assert_unchanged(model, before)
    assert lorakit.adapter_names(model) == names_before


def test_missing_key(saved):
    rewrite_tensors(saved, lambda t: t.pop("base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"))
    refused(tiny_llama(), saved, "missing tensor keys: .*layers.1.self_attn.v_proj.lora_B.weight")


def test_unexpected_key(saved):
    rewrite_tensors(saved, lambda t: t.update({"base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)}))
    refused(tiny_llama(), saved, "unexpected tensor keys.*up_proj")


def test_wrong_shape_names_module_and_shapes(saved):
    rewrite_tensors(saved, lambda t: t.update({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(4, 31)}))
    refused(tiny_llama(), saved, r"q_proj.*\(4, 31\).*needs \(4, 32\)")


def test_other_base_model_by_fingerprint(saved):
    other = tiny_llama(vocab_size=130)
    refused(other, saved, "made for another base model")


def test_peft_adapter_without_fingerprint_gets_shape_check(saved):
    rewrite_tensors(saved, lambda t: None)  # re-saved without lorakit metadata, as PEFT would
    lorakit.load_adapter(tiny_llama(vocab_size=130), saved)  # same shapes where it matters: accepted
    refused(tiny_llama(hidden_size=48, num_attention_heads=4), saved, "has shape")


def test_duplicate_name_and_multiple_adapters(saved):
    model = tiny_llama()
    lorakit.load_adapter(model, saved, adapter="a")
    lorakit.load_adapter(model, saved, adapter="b")
    assert lorakit.adapter_names(model) == ["a", "b"] and lorakit.active_adapters(model) == ["b"]
    refused(model, saved, "already has an adapter named 'a'", adapter="a")


def test_pickled_adapter_refused(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / CONFIG_NAME).write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"]}))
    (folder / "adapter_model.bin").write_bytes(b"\x80\x04this would be a pickle")
    refused(tiny_llama(), folder, "never unpickles")


@pytest.mark.parametrize("cut", [4, 100, -10])
def test_truncated_or_garbage_safetensors(saved, cut):
    data = (saved / WEIGHTS_NAME).read_bytes()
    (saved / WEIGHTS_NAME).write_bytes(data[:cut])
    refused(tiny_llama(), saved, "truncated|not a valid safetensors")


def test_garbage_header(saved):
    (saved / WEIGHTS_NAME).write_bytes((20).to_bytes(8, "little") + b"{not json at all!!!}" + b"\0" * 64)
    refused(tiny_llama(), saved, "not a valid safetensors")


def test_malformed_and_unsupported_config(saved):
    (saved / CONFIG_NAME).write_text("{ not json")
    refused(tiny_llama(), saved, "not valid JSON")
    # (use_qalora was refused here: peft runs it as plain LoRA on dense layers, test_newuser_audit_15_peft loads it)
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_bias": True}
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    refused(tiny_llama(), saved, r"missing tensor keys: .*lora_B\.bias")  # lora_bias loads now: its biases are missing
    config.pop("lora_bias")
    config["layer_replication"] = [[0, 2]]
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    refused(tiny_llama(), saved, "layer_replication")
    config.pop("layer_replication")
    config["brand_new_field"] = 3
    (saved / CONFIG_NAME).write_text(json.dumps(config))
    refused(tiny_llama(), saved, "unknown field 'brand_new_field'")


def test_missing_folder_and_files(tmp_path):
    refused(tiny_llama(), tmp_path / "nope", "does not exist")
    refused(tiny_llama(), tmp_path, "adapter_model.safetensors not found")


def test_nan_in_file_refused(saved):
    def poison(t):
        t["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"][0, 0] = float("inf")
    rewrite_tensors(saved, poison)
    refused(tiny_llama(), saved, "NaN or Inf")


def test_config_validation():
    for bad in (dict(r=0), dict(r=-1), dict(r=2.5), dict(alpha=float("nan")), dict(alpha=float("inf")), dict(variant="vera"),
                dict(init="loftq"), dict(bias="all"), dict(dropout=1.0), dict(target_modules=[]), dict(target_modules="(")):
        with pytest.raises(lorakit.LorakitError):
            lorakit.LoraConfig(**bad)


def test_targets_that_match_nothing_list_what_exists():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(lorakit.LorakitError, match="matched no module.*q_proj"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["query", "value"]))
    assert_unchanged(model, before)


def test_failed_inject_leaves_model_unwrapped():
    model = tiny_llama()
    before = snapshot(model)
    with pytest.raises(lorakit.LorakitError, match="pissa.*embedding"):
        lorakit.inject(model, lorakit.LoraConfig(init="pissa", target_modules=["q_proj", "embed_tokens"]))
    assert_unchanged(model, before)
    with pytest.raises(lorakit.LorakitError, match="modules_to_save"):
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=["score"]))
    assert_unchanged(model, before)


def test_save_is_atomic_and_peft_readable_config(tmp_path, saved):
    config = json.loads((saved / CONFIG_NAME).read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_NAME, WEIGHTS_NAME]  # no temp files left behind
    from safetensors import safe_open

    with safe_open(str(saved / WEIGHTS_NAME), "pt") as handle:
        meta = handle.metadata()
    assert meta["lorakit_format"] == "1" and len(meta["lorakit_base_fingerprint"]) == 16


def test_saved_files_get_normal_permissions(saved):
    """Atomic writes go through private temp files; what lands must be readable like any other file."""
    import os

    umask = os.umask(0o022)
    os.umask(umask)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        assert (saved / name).stat().st_mode & 0o777 == 0o666 & ~umask


def test_hostile_config_values_and_integer_tensors(saved):
    for bad in ({"target_modules": [1, 2]}, {"target_modules": ["q_proj", None]}, {"rank_pattern": ["q_proj"]},
                {"r": "8"}, {"lora_alpha": "16"}, {"modules_to_save": 3}):
        config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **bad}
        (saved / CONFIG_NAME).write_text(json.dumps(config))
        refused(tiny_llama(), saved, "must be|must map|positive integer|finite number")
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    (saved / CONFIG_NAME).write_text(json.dumps(config))

    def to_int(t):
        key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        t[key] = t[key].to(torch.int32)
    rewrite_tensors(saved, to_int)
    refused(tiny_llama(), saved, "dtype torch.int32")
