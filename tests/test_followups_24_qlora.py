"""QLoRA / NF4 as a new user on a CPU: a folder whose config.json's ``quantization_config`` does not match its weights.

* ``"quantization_config": {}`` failed in transformers as "The model's quantization config from the arguments has no
  `quant_method` attribute. Make sure that the model has been correctly quantized", which names neither the file
  nor the fix (and the ``--quantize nf4`` path silently ignored it): it is now refused in one line on every path.
* a bitsandbytes 4-bit NF4 ``quantization_config`` over weights that are not quantized (a config copied from a 4-bit
  repository, or one an older transformers kept through ``dequantize()`` + ``save_pretrained``) loaded every layer
  dense, silently, while ``lorakit train`` announced "NF4 4-bit base: QLoRA, a 4-bit folder": no memory saved.
* ``{"load_in_4bit": true}`` without ``bnb_4bit_quant_type`` was refused as "bnb_4bit_quant_type is 'fp4'", a value
  the file does not hold (bitsandbytes' default): the message now says it is not set.
* fused MoE experts (transformers 5's 3-D ``mlp.experts.*`` parameters, most of a Mixtral) stay 16-bit under NF4,
  without a word: quantizing and loading a 4-bit folder now warn with their share of the weights.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.errors import LorakitError
from lorakit.quant.nf4 import NF4Linear
from test_serve_support import tiny_hf_folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_hf_folder(tmp_path_factory.mktemp("qlora") / "base")


def _with_quantization_config(base: Path, folder: Path, value) -> Path:
    shutil.copytree(base, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = value
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _data(tmp_path: Path) -> Path:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Order {n} pens", "completion": f" {n} pens"}) + "\n"
                            for n in range(8)))
    return path


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_an_empty_quantization_config_is_named_on_every_load(base, tmp_path, quantize):
    folder = _with_quantization_config(base, tmp_path / "model", {})
    with pytest.raises(LorakitError) as caught:
        lorakit.load_base(str(folder), device="cpu", quantize=quantize)
    message = str(caught.value)
    assert '"quantization_config" is empty' in message and "delete that line" in message, message
    assert "quant_method` attribute" not in message  # transformers' words, which name no file and no fix


def test_an_empty_quantization_config_stops_train_in_one_line_before_the_run_folder(base, tmp_path, capsys):
    from lorakit.cli import main

    folder = _with_quantization_config(base, tmp_path / "model", {})
    out = tmp_path / "run"
    code = main(["train", "--model", str(folder), "--data", str(_data(tmp_path)), "--max-steps", "1", "--out", str(out),
                 "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and '"quantization_config" is empty' in error, error
    assert not out.exists()


def test_an_nf4_config_over_unquantized_weights_is_refused_not_loaded_dense(base, tmp_path, capsys):
    from lorakit.cli import main

    config = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
              "bnb_4bit_use_double_quant": True, "bnb_4bit_compute_dtype": "float32"}
    folder = _with_quantization_config(base, tmp_path / "model", config)
    for quantize in (None, "nf4"):
        with pytest.raises(LorakitError, match="no weight in the safetensors files is 4-bit") as caught:
            lorakit.load_base(str(folder), device="cpu", quantize=quantize)
        assert "delete quantization_config" in str(caught.value)
    # train announced "(NF4 4-bit base: QLoRA, a 4-bit folder)" and trained a 16-bit base
    out = tmp_path / "run"
    code = main(["train", "--model", str(folder), "--data", str(_data(tmp_path)), "--max-steps", "1", "--out", str(out),
                 "--no-progress"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "no weight in the safetensors files is 4-bit" in error, error
    assert not out.exists()


def test_a_real_4bit_folder_still_loads_as_nf4_with_the_weights_check(base, tmp_path):
    """The check above reads only the safetensors keys: a folder lorakit saved 4-bit (bitsandbytes' format) with an
    odd element count and double quantization off loads back exactly, as NF4."""
    model, tokenizer = lorakit.load_base(str(base), device="cpu")
    lorakit.quantize(model, "nf4", double_quant=False)
    lorakit.save_quantized(model, tokenizer, tmp_path / "nf4")
    loaded, _ = lorakit.load_base(str(tmp_path / "nf4"), device="cpu")
    pairs = [(n, m, loaded.get_submodule(n)) for n, m in model.named_modules() if isinstance(m, NF4Linear)]
    assert pairs and all(isinstance(other, NF4Linear) and not other.double_quant for _, _, other in pairs)
    for name, layer, other in pairs:
        assert torch.equal(layer.dequantize(), other.dequantize()), name


def test_an_unset_4bit_quant_type_is_said_to_be_unset(base, tmp_path):
    folder = _with_quantization_config(base, tmp_path / "model", {"load_in_4bit": True})
    with pytest.raises(LorakitError, match="bnb_4bit_quant_type is not set, so bitsandbytes' default 'fp4'"):
        lorakit.load_base(str(folder), device="cpu")


def _tiny_mixtral(folder: Path) -> Path:
    from transformers import MixtralConfig, MixtralForCausalLM

    from test_serve_support import make_tokenizer

    torch.manual_seed(0)
    tokenizer = make_tokenizer()
    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, num_local_experts=4, num_experts_per_tok=2, vocab_size=len(tokenizer),
                           max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
    MixtralForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_fused_moe_experts_left_dense_by_nf4_are_said(tmp_path):
    """transformers 5 holds Mixtral's experts as 3-D parameters, which NF4 (linear layers only) leaves in 16-bit:
    most of the model. ``--quantize nf4`` announced "NF4 4-bit base: QLoRA" and ``lorakit quantize`` "2.1x smaller"
    (the float32 -> bfloat16 cast) without a word; quantizing, and loading the 4-bit folder, now warn with the share."""
    folder = _tiny_mixtral(tmp_path / "mixtral")
    model, tokenizer = lorakit.load_base(str(folder), device="cpu")
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    share = round(100 * experts / sum(p.numel() for p in model.parameters()))
    with pytest.warns(UserWarning, match=rf"fused MoE expert weights \(mlp\.experts\.down_proj, "
                                         rf"mlp\.experts\.gate_up_proj; {share}% of its weights\).*stay float32"):
        lorakit.quantize(model, "nf4")
    lorakit.save_quantized(model, tokenizer, tmp_path / "nf4")
    with pytest.warns(UserWarning, match=rf"{share}% of its weights\) are 3-D parameters"):
        lorakit.load_base(str(tmp_path / "nf4"), device="cpu")
    with pytest.warns(UserWarning, match="NF4 quantizes linear layers only"):
        lorakit.load_base(str(folder), device="cpu", quantize="nf4")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model without fused experts: no word
        lorakit.quantize(lorakit.load_base(str(tiny_hf_folder(tmp_path / "llama")), device="cpu")[0], "nf4")


def test_quantize_skip_takes_one_name_as_a_string_and_says_names_that_match_nothing(base):
    """``skip="v_proj"`` was iterated letter by letter: nothing matched, so v_proj was quantized (and the head, whose
    default skip the argument replaced), silently; a misspelt name in a list left its layer quantized without a word."""
    import warnings

    from lorakit.models.quantized_loading import load_quantized

    model, _ = lorakit.load_base(str(base), device="cpu")
    lorakit.quantize(model, "nf4", skip="v_proj")
    v_proj = model.model.layers[0].self_attn.v_proj
    assert type(v_proj) is torch.nn.Linear and isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    loaded = load_quantized(base, device="cpu", skip="v_proj")
    assert type(loaded.model.layers[1].self_attn.v_proj) is torch.nn.Linear
    model, _ = lorakit.load_base(str(base), device="cpu")
    with pytest.warns(UserWarning, match=r"skip names \['v_prj'\] match no linear layer"):
        lorakit.quantize(model, "nf4", skip=("lm_head", "v_prj"))
    model, _ = lorakit.load_base(str(base), device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # names that match (a suffix of the path too) say nothing
        lorakit.quantize(model, "nf4", skip=["lm_head", "self_attn.v_proj"])
    assert type(model.model.layers[0].self_attn.v_proj) is torch.nn.Linear


def test_dequantize_takes_a_dtype_name_and_quantize_an_absent_device_in_one_line(base):
    """``lorakit.dequantize(model, "bf16")`` raised torch's "empty(): argument 'dtype' must be torch.dtype, not str"
    (load_base takes the same names), and ``lorakit.quantize(model, device="cuda")`` on a machine without CUDA
    torch's "AssertionError: Torch not compiled with CUDA enabled"."""
    model, _ = lorakit.load_base(str(base), device="cpu", quantize="nf4")
    with pytest.raises(LorakitError, match="unknown dtype 'int8'"):
        lorakit.dequantize(model, "int8")
    assert isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)  # refused before anything changed
    lorakit.dequantize(model, "bf16")
    assert model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    if not torch.cuda.is_available():
        model, _ = lorakit.load_base(str(base), device="cpu")
        with pytest.raises(LorakitError, match="device cuda: no CUDA GPU"):
            lorakit.quantize(model, "nf4", device="cuda")
        assert type(model.model.layers[0].mlp.up_proj) is torch.nn.Linear


def test_train_refuses_quantize_for_a_dense_model_it_would_train_16_bit(base, tmp_path):
    """``train(model, tokenizer, records, config=TrainConfig(quantize="nf4"))`` never read ``quantize`` (only the
    CLI's loader does): a dense model trained 16-bit without a word. Refused now before anything changes; a model
    already 4-bit (what ``lorakit train --quantize nf4`` passes) trains."""
    from lorakit.train import TrainConfig, train

    records = [{"prompt": f"Order {n} pens", "completion": f" {n} pens"} for n in range(8)]
    config = TrainConfig(max_steps=1, quantize="nf4", eval_examples=0, samples=0, progress=False)
    model, tokenizer = lorakit.load_base(str(base), device="cpu")
    with pytest.raises(LorakitError, match=r"call lorakit\.quantize\(model, 'nf4'\) before train\(\)"):
        train(model, tokenizer, records, config=config)
    assert not lorakit.adapter_names(model)  # nothing injected
    lorakit.quantize(model, "nf4")
    result = train(model, tokenizer, records, config=config)
    assert math.isfinite(result.train_loss)


def test_a_weight_past_float16_range_is_named_as_the_casts_doing(base, tmp_path):
    """Loading into NF4 with dtype float16 casts each weight first: a value of 1e6 (finite in the file) became inf and
    was refused as "has 1 non-finite value(s) (NaN/inf) in its weight ...: fix or skip this module", a fault the file
    does not have. The message now names the cast and the dtype that keeps it."""
    from safetensors.torch import load_file, save_file

    folder = shutil.copytree(base, tmp_path / "model")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LorakitError, match=r"up_proj\.weight holds values up to 1e\+06, beyond float16's range.*"
                                           r"--dtype bf16 / fp32"):
        lorakit.load_base(str(folder), device="cpu", quantize="nf4", dtype="float16")
    model, _ = lorakit.load_base(str(folder), device="cpu", quantize="nf4", dtype="bfloat16")  # bf16 holds it
    assert isinstance(model.model.layers[0].mlp.up_proj, NF4Linear)
