"""Reading bitsandbytes 4-bit checkpoints without bitsandbytes, writing its format, and the streaming NF4 loader.

The fixture tests/fixtures/bnb_nf4_tiny/ was saved 4-bit by transformers + bitsandbytes 0.50.2 (see
tests/fixtures/make_bnb_fixture.py); its reference.safetensors holds what bitsandbytes dequantizes each layer to
and the logits of the dense model holding those weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import assert_close, tiny_llama
from lorakit.errors import LorakitError
from lorakit.quant.bnb_checkpoint import bnb_tensors, read_bnb_linear
from lorakit.quant.nf4 import NF4Linear
from lorakit.models.quantized_loading import load_quantized
from lorakit.quant.quantize import quantize

FIXTURE = Path(__file__).parent / "fixtures" / "bnb_nf4_tiny"


def _reference():
    return load_file(str(FIXTURE / "reference.safetensors"))


def test_bnb_checkpoint_read_exactly():
    model = load_quantized(FIXTURE, device="cpu", dtype=torch.float32)
    reference = _reference()
    layers = {name[: -len(".dequantized")] for name in reference if name.endswith(".dequantized")}
    assert len(layers) == 14
    for name in layers:
        module = model.get_submodule(name)
        assert isinstance(module, NF4Linear), name
        assert torch.equal(module.dequantize(), reference[f"{name}.dequantized"]), name
    assert isinstance(model.lm_head, nn.Linear)  # bitsandbytes kept the head dense
    q_proj = model.model.layers[0].self_attn.q_proj
    raw = load_file(str(FIXTURE / "model.safetensors"))
    assert torch.equal(q_proj.bias, raw["model.layers.0.self_attn.q_proj.bias"])
    with torch.no_grad():
        logits = model(input_ids=reference["input_ids"]).logits
    assert_close(logits, reference["logits"])


def test_bnb_export_roundtrip_and_bitsandbytes_reads_it():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    layer = NF4Linear.from_linear(nn.Linear(70, 33))
    tensors = bnb_tensors(layer, "layer")
    keys = set(tensors)
    again = read_bnb_linear("layer.weight", tensors.__getitem__, keys, bias=tensors["layer.bias"])
    assert torch.equal(again.dequantize(), layer.dequantize())
    state = bnb_functional.QuantState.from_dict(
        {k[len("layer.weight."):]: v for k, v in tensors.items() if k.startswith("layer.weight.")}, device="cpu")
    assert torch.equal(bnb_functional.dequantize_4bit(tensors["layer.weight"], state), layer.dequantize())


def _copy_fixture(tmp_path: Path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, target)
    (target / "reference.safetensors").unlink()
    return target


def _edit_config(folder: Path, **quant):
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(quant)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_tensors(folder: Path, edit):
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.mark.parametrize("quant, message", [
    (dict(bnb_4bit_quant_type="fp4"), "'fp4'"),
    (dict(load_in_4bit=False, _load_in_4bit=False, load_in_8bit=True), "8-bit"),
    (dict(quant_method="gptq"), "'gptq'"),
])
def test_unsupported_checkpoint_quantization_refused(tmp_path, quant, message):
    folder = _copy_fixture(tmp_path)
    _edit_config(folder, **quant)
    with pytest.raises(LorakitError, match=message):
        load_quantized(folder, device="cpu")


QS = "model.layers.0.self_attn.k_proj.weight.quant_state.bitsandbytes__nf4"


def _set_state(tensors, **changes):
    state = json.loads(bytes(tensors[QS].tolist()).decode())
    state.update(changes)
    tensors[QS] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.__setitem__(QS, torch.tensor(list(b"{not json"), dtype=torch.uint8)), "not valid JSON"),
    (lambda t: _set_state(t, blocksize=48), "blocksize 48"),
    (lambda t: _set_state(t, quant_type="fp4"), "quant_type"),
    (lambda t: _set_state(t, shape=[20, 41]), "packed bytes"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight.absmax", torch.zeros(5, dtype=torch.uint8)),
     "absmax has 5 entries, expected 13"),
    (lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight.quant_map", torch.linspace(-1, 1, 16)),
     "not the NF4 code"),
    (lambda t: t.pop("model.layers.1.mlp.down_proj.weight"), "model.layers.1.mlp.down_proj.weight"),
    (lambda t: t["model.layers.0.self_attn.k_proj.weight.nested_absmax"].fill_(float("nan")),
     "k_proj.weight.nested_absmax holds NaN"),
    (lambda t: _set_state(t, nested_blocksize=10 ** 12), "nested_blocksize"),
    (lambda t: t.__setitem__("model.norm.weight", torch.ones(41)), r"'model.norm.weight'.*\(41,\).*\(40,\)"),
])
def test_corrupt_bnb_checkpoint_refused_naming_the_key(tmp_path, edit, message):
    folder = _copy_fixture(tmp_path)
    _edit_tensors(folder, edit)
    with pytest.raises(LorakitError, match=message):
        load_quantized(folder, device="cpu")


def test_load_quantized_dense_folder_equals_quantize(tmp_path):
    dense = tiny_llama(tie_word_embeddings=True)
    dense.save_pretrained(tmp_path)
    loaded = load_quantized(tmp_path, device="cpu", dtype=torch.float32)
    expected = quantize(tiny_llama(tie_word_embeddings=True), "nf4")
    for name, module in expected.named_modules():
        if isinstance(module, NF4Linear):
            assert torch.equal(loaded.get_submodule(name).weight_packed, module.weight_packed), name
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight  # tied head stays tied and dense
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_load_quantized_refuses_unknown_quant_and_missing_tensor(tmp_path):
    tiny_llama().save_pretrained(tmp_path)
    with pytest.raises(LorakitError, match="'int4'"):
        load_quantized(tmp_path, "int4", device="cpu")
    _edit_tensors(tmp_path, lambda t: t.pop("model.layers.0.mlp.up_proj.weight"))
    with pytest.raises(LorakitError, match="model.layers.0.mlp.up_proj.weight"):
        load_quantized(tmp_path, device="cpu")


def test_fixture_keys_are_what_bitsandbytes_writes():
    with safe_open(str(FIXTURE / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    stem = "model.layers.0.mlp.up_proj.weight"
    assert {stem, f"{stem}.absmax", f"{stem}.quant_map", f"{stem}.nested_absmax", f"{stem}.nested_quant_map",
            f"{stem}.quant_state.bitsandbytes__nf4"} <= keys


def test_load_base_reads_a_bitsandbytes_folder_as_nf4_without_being_asked(tmp_path):
    """`lorakit train/generate/merge --model <bnb 4-bit folder>` with no --quantize: read as NF4, exactly."""
    from test_train_helpers import tiny_tokenizer

    import lorakit

    folder = tmp_path / "bnb"
    shutil.copytree(FIXTURE, folder)
    tiny_tokenizer().save_pretrained(folder)
    model, _ = lorakit.load_base(str(folder), device="cpu", dtype="fp32")
    reference = _reference()
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    with torch.no_grad():
        assert_close(model(input_ids=reference["input_ids"]).logits, reference["logits"])
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(LorakitError, match="quant_method is 'gptq'"):
        lorakit.load_base(str(folder), device="cpu")
