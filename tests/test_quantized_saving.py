"""``lorakit.save_quantized`` / ``lorakit quantize``: a lorakit NF4 model saved in bitsandbytes' 4-bit layout.

Checked against the real transformers + bitsandbytes (CPU): the folder is byte for byte what they save for the same
dense weights, ``lorakit.load_base`` reads it back bit-identically, and ``AutoModelForCausalLM.from_pretrained``
loads it (Linear4bit layers) with the same logits. Model widths are multiples of 64 throughout: bitsandbytes
0.50.2's 2-D CPU dequantize is wrong when in_features is even but not a multiple of 64 (see
tests/test_qlora_audit.py ``_bnb_dequantized``), which is its bug, not the file's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.errors import LorakitError
from lorakit.models.quantized_loading import load_quantized
from lorakit.quant.nf4 import NF4Linear

pytest.importorskip("bitsandbytes")  # a test dependency (pyproject [test]), as in tests/test_qlora_audit.py

NF4_STATE = ("weight_packed", "absmax", "nested_absmax", "absmax_offset", "code", "nested_code", "bias")


pytestmark = pytest.mark.usefixtures("no_dynamo")  # bitsandbytes' dequantize is compiled: eager here


def _with_tokenizer(folder: Path) -> Path:
    from test_train_helpers import tiny_tokenizer

    tiny_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Dense float32 folders: a Llama with tied embeddings, a GPT-2 (Conv1D, tied), an untied Llama with biases."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("dense")
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    tiny_llama(tie_word_embeddings=True, **shape).save_pretrained(root / "llama_tied")
    tiny_llama(seed=1, attention_bias=True, **shape).save_pretrained(root / "llama")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(root / "gpt2")
    return {name: _with_tokenizer(root / name) for name in ("llama_tied", "llama", "gpt2")}


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    out = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            assert handle.metadata() == {"format": "pt"}
            out.update({key: handle.get_tensor(key) for key in handle.keys()})
    return out


def _hf_4bit(folder: Path, **bnb):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    kwargs = {"quantization_config": BitsAndBytesConfig(**bnb)} if bnb else {}
    return AutoModelForCausalLM.from_pretrained(folder, device_map="cpu", dtype=torch.float32, **kwargs).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def _assert_hf_reads(hf, model, ids) -> int:
    """transformers + bitsandbytes hold exactly lorakit's 4-bit weights, and compute the same logits.

    bitsandbytes 0.50.2 runs its CPU 4-bit matmul in bfloat16 whatever the input dtype (backends/cpu/ops.py,
    gemv_4bit: "cpu fused op only support bf16 for now"), so its float32 logits sit ~2e-3 from the exact ones: the
    weights are compared bit for bit and the logits with the table's bfloat16 row."""
    import copy

    import bitsandbytes.functional as BF

    count = 0
    for name, module in hf.named_modules():
        if type(module).__name__ == "Linear4bit":
            state = copy.copy(module.weight.quant_state)  # the flat (numel,) path: see the module docstring
            state.shape = torch.Size([module.weight.quant_state.shape.numel()])
            weight = BF.dequantize_4bit(module.weight.data, state).reshape(module.weight.quant_state.shape)
            assert torch.equal(weight.float(), model.get_submodule(name).dequantize()), name
            count += 1
    assert_close(_logits(hf, ids), _logits(model, ids), dtype=torch.bfloat16)
    return count


def _assert_same_nf4(loaded, saved) -> int:
    layers = {n: m for n, m in saved.named_modules() if isinstance(m, NF4Linear)}
    for name, layer in layers.items():
        again = loaded.get_submodule(name)
        assert isinstance(again, NF4Linear) and again.conv1d_layout == layer.conv1d_layout, name
        assert again.weight_dtype == layer.weight_dtype and again.blocksize == layer.blocksize, name
        for attr in NF4_STATE:
            a, b = getattr(again, attr), getattr(layer, attr)
            assert (a is None and b is None) or (a.dtype == b.dtype and torch.equal(a, b)), f"{name}.{attr}"
    return len(layers)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("kind", ["llama_tied", "gpt2"])
def test_folder_is_what_bitsandbytes_saves_and_both_loaders_read_it(folders, tmp_path, kind, double_quant):
    dense = folders[kind]
    model = load_quantized(dense, device="cpu", dtype=torch.float32, double_quant=double_quant)
    tokenizer = lorakit.load_base(dense, device="cpu")[1]
    out = lorakit.save_quantized(model, tokenizer, tmp_path / "nf4")

    # 1. exactly the files transformers + bitsandbytes write for the same dense weights (tied head left out)
    reference = _hf_4bit(dense, load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant,
                         bnb_4bit_compute_dtype=torch.float32)
    reference.save_pretrained(tmp_path / "bnb")
    assert json.loads((out / "config.json").read_text()) == json.loads((tmp_path / "bnb" / "config.json").read_text())
    ours, theirs = _tensors(out), _tensors(tmp_path / "bnb")
    assert sorted(ours) == sorted(theirs) and "lm_head.weight" not in ours
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key
    assert (out / "generation_config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp folder left beside it

    # 2. lorakit reads it back bit for bit (a GPT-2 layer remembers its Conv1D layout)
    ids = torch.randint(0, 128, (2, 7))
    expected = _logits(model, ids)
    loaded, _ = lorakit.load_base(out, device="cpu", dtype=torch.float32)
    layers = 14 if kind == "llama_tied" else 8  # q, k, v, o, gate, up, down / c_attn, c_proj, c_fc, c_proj per block
    assert _assert_same_nf4(loaded, model) == layers
    assert all(m.conv1d_layout == (kind == "gpt2") for m in loaded.modules() if isinstance(m, NF4Linear))
    assert torch.equal(_logits(loaded, ids), expected)

    # 3. transformers + bitsandbytes load it as Linear4bit and compute the same logits
    from transformers import AutoModelForCausalLM

    # dtype "auto" is 5.x's default; 4.x's bitsandbytes loader would make it float16
    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu", dtype="auto").eval()
    assert hf.dtype == torch.float32 and _assert_hf_reads(hf, model, ids) == layers


def test_skipped_layers_and_shards(folders, tmp_path):
    """Layers lorakit kept dense besides the head (skip=) are listed in llm_int8_skip_modules so transformers builds
    them dense; above max_shard_size the weights are sharded with an index, and both loaders read the shards."""
    model = load_quantized(folders["llama"], device="cpu", dtype=torch.float32, skip=("lm_head", "down_proj"))
    tokenizer = lorakit.load_base(folders["llama"], device="cpu")[1]
    out = lorakit.save_quantized(model, tokenizer, tmp_path / "nf4", max_shard_size=40_000)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["llm_int8_skip_modules"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(out).values())
    assert "lm_head.weight" in index["weight_map"]  # untied: the head is saved (dense)

    ids = torch.randint(0, 128, (2, 5))
    expected = _logits(model, ids)
    loaded, _ = lorakit.load_base(out, device="cpu", dtype=torch.float32)
    assert _assert_same_nf4(loaded, model) == 12
    assert type(loaded.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert torch.equal(_logits(loaded, ids), expected)
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out, device_map="cpu").eval()
    assert type(hf.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert _assert_hf_reads(hf, model, ids) == 12


def test_refusals_and_atomic_overwrite(folders, tmp_path, monkeypatch):
    from lorakit.models import quantized_saving

    model = load_quantized(folders["llama_tied"], device="cpu", dtype=torch.float32)
    out = lorakit.save_quantized(model, None, tmp_path / "nf4")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    with pytest.raises(LorakitError, match="already exists.*overwrite=True"):
        lorakit.save_quantized(model, None, out)
    (tmp_path / "file").write_text("x")
    with pytest.raises(LorakitError, match="is a file"):
        lorakit.save_quantized(model, None, tmp_path / "file")
    with pytest.raises(LorakitError, match=r"no NF4 layers.*save_pretrained"):
        lorakit.save_quantized(tiny_llama(), None, tmp_path / "dense")

    # a crash while writing leaves the old folder as it was and no temp folder beside it
    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(quantized_saving, "_write_weights", crash)
    with pytest.raises(OSError, match="disk full"):
        lorakit.save_quantized(model, None, out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "nf4"]
    monkeypatch.undo()

    lorakit.inject(model, lorakit.LoraConfig(r=2))
    with pytest.raises(LorakitError, match=r"holds LoRA adapter.*save_adapter.*delete_adapter"):
        lorakit.save_quantized(model, None, out, overwrite=True)
    with pytest.warns(lorakit.LossyMergeWarning):  # merged into the 4-bit weights: a base model again
        lorakit.merge_and_unload(model)
    lorakit.save_quantized(model, None, out, overwrite=True)
    assert {p.name for p in out.iterdir()} == set(before)  # replaced whole (the same file names)
    (out / "notes.txt").write_text("mine")  # overwrite=True replaces a saved model, never a user's other files
    with pytest.raises(LorakitError, match=r"holds what a model folder does not \(notes.txt\)"):
        lorakit.save_quantized(model, None, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()

    layer = model.model.layers[0].self_attn.q_proj
    layer._buffers["absmax"] = torch.empty_like(layer.absmax, device="meta")
    with pytest.raises(LorakitError, match=r"model.layers.0.self_attn.q_proj.absmax.*meta device"):
        lorakit.save_quantized(model, None, tmp_path / "meta")
    assert not (tmp_path / "meta").exists()


def test_cli_quantize(folders, tmp_path, capsys):
    from lorakit.cli import main

    out = tmp_path / "gpt2-nf4"
    assert main(["quantize", "--model", str(folders["gpt2"]), "--out", str(out), "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert "MiB ->" in printed and "smaller" in printed
    assert f"lorakit train --model {out} --data train.jsonl" in printed
    loaded, tokenizer = lorakit.load_base(out, device="cpu")
    direct = load_quantized(folders["gpt2"], device="cpu", dtype=torch.float32)
    assert _assert_same_nf4(loaded, direct) == 8 and tokenizer.eos_token == "<|im_end|>"

    assert main(["quantize", "--model", str(folders["gpt2"]), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["quantize", "--model", str(folders["gpt2"]), "--out", str(folders["gpt2"] / "sub")]) == 2
    assert "sits inside the model folder" in capsys.readouterr().err
