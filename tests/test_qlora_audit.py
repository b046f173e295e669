"""QLoRA audit: what a new user does with NF4 on a CPU, against the real bitsandbytes and peft packages.

Each test is a regression for a bug found in the audit (or a check no other test makes): checkpoints saved by
transformers + bitsandbytes in several BitsAndBytesConfig variants, GPT-2 (Conv1D) bases, corrupt 4-bit states,
adapters trained by peft on a bitsandbytes 4-bit base, ``quantize`` on models with adapters or odd layers, and the
``lorakit train --quantize nf4`` -> ``merge`` -> ``generate`` path.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from conftest import assert_close, tiny_llama
from lorakit.errors import LorakitError
from lorakit.inject import lora_layers
from lorakit.models.quantized_loading import load_quantized
from lorakit.quant import dense_weight, weight_param_shape
from lorakit.quant.nf4 import NF4Linear, dynamic_code
from lorakit.quant.quantize import quantize

bnb = pytest.importorskip("bitsandbytes")  # a test dependency (pyproject [test]), as in tests/test_nf4.py
import bitsandbytes.functional as BF  # noqa: E402

FIXTURE = Path(__file__).parent / "fixtures" / "bnb_nf4_tiny"
# hidden 64 / intermediate 96: shapes bitsandbytes' CPU kernels handle (its CPU dequantize is wrong for some widths,
# e.g. in_features=160, and its inference forward fails on others: not what these tests are about)
SHAPE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2)


pytestmark = pytest.mark.usefixtures("no_dynamo")  # bitsandbytes' dequantize is compiled: eager here


def _bnb_config(**overrides):
    from transformers import BitsAndBytesConfig

    options = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                   bnb_4bit_compute_dtype=torch.float32)
    options.update(overrides)
    return BitsAndBytesConfig(**options)


def _bnb_model(folder: Path, **overrides):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    # dtype "auto" (5.x's default): transformers 4.x's bitsandbytes loader otherwise makes the model float16
    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=_bnb_config(**overrides), device_map="cpu",
                                                dtype="auto")


def _bnb_dequantized(model) -> dict[str, torch.Tensor]:
    """name -> bitsandbytes' own dequantization (float32, (out, in)) of every Linear4bit in ``model``.

    Asked for the flat (numel,) weight and reshaped: bitsandbytes 0.50.2's 2-D CPU kernel reads rows as if each
    started a new 64-block, which is wrong when in_features is even but not a multiple of 64 (96, 160: up to 1.4
    off on N(0, 1) weights); its flat path, its generic path (odd widths) and lorakit agree bit for bit."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ == "Linear4bit":
            state = copy.copy(module.weight.quant_state)
            state.shape = torch.Size([module.weight.quant_state.shape.numel()])
            flat = BF.dequantize_4bit(module.weight.data, state)
            out[name] = flat.reshape(module.weight.quant_state.shape).float()
    return out


def _dense_with(folder: Path, weights: dict[str, torch.Tensor]):
    """The dense model of ``folder`` with ``weights`` (name -> (out, in)) written in: the dequantized-weights math."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        for name, weight in weights.items():
            module = model.get_submodule(name)
            module.weight.copy_(weight.T if type(module).__name__ == "Conv1D" else weight)
    return model


@pytest.fixture(scope="module")
def dense_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("dense64")
    tiny_llama(**SHAPE).save_pretrained(folder)
    return folder


# -- (1) an adapter trained by peft on a bitsandbytes 4-bit base -----------------------------------------------------


def test_peft_adapter_trained_on_bnb_4bit_base_loads_on_nf4_and_dense(dense_folder, tmp_path):
    peft = pytest.importorskip("peft")
    model = _bnb_model(dense_folder)
    model.save_pretrained(tmp_path / "bnb")
    reference_weights = _bnb_dequantized(model)  # before any forward: bitsandbytes repacks weights on CPU inference
    peft_model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                            use_dora=True))
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, 128, (2, 10))
    peft_model.train()
    for _ in range(2):  # a real (tiny) QLoRA-DoRA training: B and the magnitudes move away from their init
        peft_model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path / "adapter")

    nf4 = load_quantized(tmp_path / "bnb", device="cpu", dtype=torch.float32)
    for name, weight in reference_weights.items():
        assert torch.equal(nf4.get_submodule(name).dequantize(), weight), name
    lorakit.load_adapter(nf4, tmp_path / "adapter")
    expected_q = peft.PeftModel.from_pretrained(_dense_with(dense_folder, reference_weights), tmp_path / "adapter")
    dense = _dense_with(dense_folder, {})
    lorakit.load_adapter(dense, tmp_path / "adapter")
    expected_d = peft.PeftModel.from_pretrained(_dense_with(dense_folder, {}), tmp_path / "adapter")
    with torch.no_grad():
        assert_close(nf4(input_ids=ids).logits, expected_q.eval()(input_ids=ids).logits)
        assert_close(dense(input_ids=ids).logits, expected_d.eval()(input_ids=ids).logits)
        adapter_effect = (dense(input_ids=ids).logits - _dense_with(dense_folder, {})(input_ids=ids).logits).abs().max()
    assert adapter_effect > 1e-3  # the trained adapter changes the output, so the comparisons above mean something


# -- (3) checkpoints saved by transformers + bitsandbytes --------------------------------------------------------------


@pytest.mark.parametrize("double_quant, storage, model_dtype", [
    (True, torch.bfloat16, None),  # quant_storage for FSDP: the packed bytes stored as bf16
    (False, torch.float32, None),  # no double quantization: float32 absmax
    (True, torch.uint8, torch.bfloat16),  # a bf16 model: the state records dtype bfloat16
])
def test_bnb_saved_variants_load_exactly(dense_folder, tmp_path, double_quant, storage, model_dtype):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": model_dtype or "auto"}  # "auto": 5.x's default (4.x's bitsandbytes loader picks float16)
    model = AutoModelForCausalLM.from_pretrained(dense_folder, device_map="cpu", **kwargs, quantization_config=_bnb_config(
        bnb_4bit_use_double_quant=double_quant, bnb_4bit_quant_storage=storage, bnb_4bit_compute_dtype=torch.bfloat16))
    model.save_pretrained(tmp_path)
    expected = _bnb_dequantized(model)
    loaded = lorakit.load_base(str(_with_tokenizer(tmp_path)), device="cpu", quantize="nf4")[0]
    assert len(expected) == 14
    for name, weight in expected.items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, NF4Linear) and layer.double_quant == double_quant, name
        # bitsandbytes dequantizes into the recorded dtype; lorakit in float32 rounds to the same values
        assert torch.equal(layer.dequantize(weight.dtype if model_dtype is None else model_dtype).float(), weight), name
    assert layer.weight_dtype == (model_dtype or torch.float32)
    reference = _dense_with(dense_folder, {})
    with torch.no_grad():
        for parameter in reference.parameters():  # the folder holds the embeddings, norms and head in its dtype
            parameter.copy_(parameter.to(model_dtype or torch.float32))
        for name in expected:  # lorakit computes from the exact float32 dequantization (bitsandbytes rounds it)
            reference.get_submodule(name).weight.copy_(loaded.get_submodule(name).dequantize())
    ids = torch.randint(0, 128, (2, 7))
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def _with_tokenizer(folder: Path) -> Path:
    from test_train_helpers import tiny_tokenizer

    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_bnb_saved_fp4_refused_by_name(dense_folder, tmp_path):
    _bnb_model(dense_folder, bnb_4bit_quant_type="fp4").save_pretrained(tmp_path)
    with pytest.raises(LorakitError, match="bnb_4bit_quant_type is 'fp4'"):
        load_quantized(tmp_path, device="cpu")
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["bnb_4bit_quant_type"] = "nf4"  # a config that lies: the tensors still say fp4
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(LorakitError, match=r"q_proj\.weight\.quant_state\.bitsandbytes__fp4: FP4"):
        load_quantized(tmp_path, device="cpu")


def test_bnb_checkpoint_with_4bit_head_and_skipped_layers_loads_them_dense(dense_folder, tmp_path):
    """bitsandbytes quantizes lm_head when llm_int8_skip_modules is overridden; lorakit keeps the head dense and
    failed with a shape error on the packed tensor (so did skip= naming any layer the file holds in 4-bit)."""
    model = _bnb_model(dense_folder, llm_int8_skip_modules=["nothing"])
    model.save_pretrained(tmp_path)
    expected = _bnb_dequantized(model)
    assert "lm_head" in expected
    loaded = load_quantized(tmp_path, device="cpu", dtype=torch.float32, skip=("lm_head", "down_proj"))
    for name, weight in expected.items():
        layer = loaded.get_submodule(name)
        dense = name == "lm_head" or name.endswith("down_proj")
        assert (type(layer) is nn.Linear) if dense else isinstance(layer, NF4Linear), name
        assert torch.equal(layer.weight if dense else layer.dequantize(), weight), name
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, _dense_with(dense_folder, expected)(input_ids=ids).logits)


# -- GPT-2 (Conv1D) bases -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt2_folder(tmp_path_factory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(folder)
    return folder


def test_gpt2_dense_folder_loads_into_nf4_like_quantize(gpt2_folder):
    """load_quantized left GPT-2's Conv1D layers dense (so --quantize nf4 on GPT-2 saved no memory)."""
    from transformers import AutoModelForCausalLM

    loaded = load_quantized(gpt2_folder, device="cpu", dtype=torch.float32)
    expected = quantize(AutoModelForCausalLM.from_pretrained(gpt2_folder), "nf4")
    names = [n for n, m in expected.named_modules() if isinstance(m, NF4Linear)]
    assert len(names) == 8
    for name in names:
        layer = loaded.get_submodule(name)
        assert isinstance(layer, NF4Linear) and torch.equal(layer.weight_packed, expected.get_submodule(name).weight_packed)
        # the dense parameter shape (in, out) is remembered: what the adapter fingerprint / fan_in_fan_out follow
        assert layer.conv1d_layout and weight_param_shape(layer) == (layer.in_features, layer.out_features)
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, expected(input_ids=ids).logits)


def test_gpt2_bnb_checkpoint_loads(gpt2_folder, tmp_path):
    """A GPT-2 saved 4-bit by transformers + bitsandbytes failed with a shape error on its first Conv1D."""
    model = _bnb_model(gpt2_folder)
    model.save_pretrained(tmp_path)
    expected = _bnb_dequantized(model)
    loaded = load_quantized(tmp_path, device="cpu", dtype=torch.float32)
    assert len(expected) == 8
    for name, weight in expected.items():
        assert torch.equal(loaded.get_submodule(name).dequantize(), weight), name
    ids = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        assert_close(loaded(input_ids=ids).logits, _dense_with(gpt2_folder, expected)(input_ids=ids).logits)


# -- corrupt 4-bit states: one line naming the tensor ----------------------------------------------------------------

K = "model.layers.0.self_attn.k_proj"
QS = f"{K}.weight.quant_state.bitsandbytes__nf4"


def _state(tensors, **changes):
    state = json.loads(bytes(tensors[QS].tolist()).decode())
    state.update(changes)
    tensors[QS] = torch.tensor(list(json.dumps(state).encode()), dtype=torch.uint8)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop(f"{K}.weight.absmax"), rf"{K}\.weight\.absmax: missing"),
    (lambda t: t.pop(f"{K}.weight.quant_map"), rf"{K}\.weight\.quant_map: missing"),
    (lambda t: t.pop(f"{K}.weight.nested_quant_map"), rf"{K}\.weight\.nested_quant_map: missing"),
    (lambda t: t.pop(QS), rf"{K}\.weight has absmax but no {K}\.weight\.quant_state"),
    (lambda t: t.__setitem__(QS, torch.tensor(list(b"[" * 5000 + b"]" * 5000), dtype=torch.uint8)), "nested too deeply"),
    (lambda t: _state(t, nested_offset=10 ** 400), "nested_offset missing or not a number"),
    (lambda t: _state(t, nested_offset=True), "nested_offset missing or not a number"),
    (lambda t: _state(t, shape=[True, 800]), r"shape must be \[out_features, in_features\]"),
    (lambda t: _state(t, blocksize=64.0), "blocksize 64.0"),
    (lambda t: t.__setitem__(f"{K}.bias", torch.ones(21)), rf"'{K}\.bias' has shape \(21,\), the model expects \(20,\)"),
])
def test_corrupt_bnb_state_refused_naming_the_tensor(tmp_path, edit, message):
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURE, folder)
    (folder / "reference.safetensors").unlink()
    tensors = load_file(str(folder / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(LorakitError, match=message) as caught:
        load_quantized(folder, device="cpu")
    assert "\n" not in str(caught.value)


def test_read_bnb_linear_refuses_a_bias_of_the_wrong_shape():
    from lorakit.quant.bnb_checkpoint import bnb_tensors, read_bnb_linear

    tensors = bnb_tensors(NF4Linear.from_linear(nn.Linear(70, 33)), "layer")
    with pytest.raises(LorakitError, match=r"layer\.bias has shape \(32,\), expected \(33,\)"):
        read_bnb_linear("layer.weight", tensors.__getitem__, set(tensors), bias=torch.ones(32))


def test_dense_folder_with_wrong_bias_refused(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(tmp_path)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.ones(33)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    with pytest.raises(LorakitError, match=r"'model.layers.0.self_attn.q_proj.bias' has shape \(33,\).*\(32,\)"):
        load_quantized(tmp_path, device="cpu")


# -- NF4Linear state: no tensor shared between layers or with the cached code map -------------------------------------


def test_nested_code_is_per_layer_so_state_dicts_save_and_load_safely(tmp_path):
    model = quantize(tiny_llama(), "nf4")
    first, second = model.model.layers[0].mlp.up_proj, model.model.layers[1].mlp.up_proj
    assert first.nested_code.data_ptr() != second.nested_code.data_ptr()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "m.safetensors"))  # no sharing
    state = first.state_dict()
    state["nested_code"] = torch.zeros(256)
    first.load_state_dict(state)  # copies in place: used to write into the cached map every layer (and quantize) used
    assert torch.equal(second.nested_code, dynamic_code()) and dynamic_code().abs().sum() > 0


# -- quantize(): adapters, odd layers, refusals --------------------------------------------------------------------


def test_quantize_model_with_adapters_quantizes_only_the_frozen_base():
    model = tiny_llama(tie_word_embeddings=True)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "lm_head", "embed_tokens"],
                                             modules_to_save=["down_proj"]))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.adapters["default"].lora_B.normal_(0, 0.1)
    trainable_before = lorakit.trainable_report(model).trainable
    dense = copy.deepcopy(model)
    quantize(model, "nf4", skip=("lm_head", "v_proj"))
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)
    assert isinstance(model.model.layers[0].self_attn.v_proj, nn.Linear)  # skip names match as on a plain model
    assert type(model.lm_head.base_layer) is nn.Linear  # the tied head under an adapter stays dense and tied
    assert model.lm_head.base_layer.weight is model.model.embed_tokens.base_layer.weight
    saved = model.model.layers[0].mlp.down_proj
    assert isinstance(saved.base_layer, NF4Linear) and type(saved.copies["default"]) is nn.Linear
    assert lorakit.trainable_report(model).trainable == trainable_before  # modules_to_save copies still train
    # the quantized model computes what the same adapters compute over the dequantized weights
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, NF4Linear):
                dense.get_submodule(name).weight.copy_(module.dequantize())
        ids = torch.randint(0, 128, (2, 7))
        assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits)


def test_quantize_refuses_merged_adapters_and_unloaded_weights_before_changing_anything():
    model = tiny_llama()
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["o_proj"]))
    lorakit.merge(model)
    with pytest.raises(LorakitError, match=r"merged into 'model.layers.0.self_attn.o_proj'.*unmerge"):
        quantize(model, "nf4")
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    lorakit.unmerge(model)
    quantize(model, "nf4")
    assert isinstance(model.model.layers[0].self_attn.o_proj.base_layer, NF4Linear)

    mixed = tiny_llama()
    mixed.model.layers[1].mlp.down_proj.double()
    with pytest.raises(LorakitError, match=r"'model.layers.1.mlp.down_proj'.*float64"):
        quantize(mixed, "nf4")
    assert not any(isinstance(m, NF4Linear) for m in mixed.modules())  # layer 0 was not quantized first
    with pytest.raises(LorakitError, match=r"'0' has no weight values yet \(meta"):
        quantize(nn.Sequential(nn.Linear(4, 4, device="meta")), "nf4")
    with pytest.raises(LorakitError, match="blocksize must be one of"):
        quantize(nn.Sequential(nn.Linear(4, 4)), "nf4", blocksize=100)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_tiny_and_odd_layers_with_biases(dtype):
    layers = [nn.Linear(7, 3), nn.Linear(3, 1, bias=False), nn.Linear(1, 5), nn.Linear(5, 65), nn.Linear(65, 2)]
    model = nn.Sequential(*layers).to(dtype)
    dense = nn.Sequential(*[nn.Linear(l.in_features, l.out_features, bias=l.bias is not None) for l in layers])
    dense.load_state_dict(model.state_dict())
    quantize(model, "nf4")
    assert all(isinstance(m, NF4Linear) for m in model)
    with torch.no_grad():
        for index, module in enumerate(model):
            dense[index].weight.copy_(module.dequantize(dtype))
        x = torch.randn(4, 7, dtype=dtype)
        assert_close(model(x), dense.to(dtype)(x))


# -- bitsandbytes 4-bit layers in memory (a model loaded with BitsAndBytesConfig) -------------------------------------


def test_bnb_model_in_memory_refused_by_inject_and_converted_exactly_by_quantize(dense_folder):
    model = _bnb_model(dense_folder)
    expected = _bnb_dequantized(model)
    with pytest.raises(LorakitError, match="Linear4bit is a bitsandbytes quantized layer.*lorakit.quantize"):
        dense_weight(model.model.layers[0].mlp.up_proj)
    quantize(model, "nf4")
    assert not any(type(m).__name__ == "Linear4bit" for m in model.modules())
    for name, weight in expected.items():
        assert torch.equal(model.get_submodule(name).dequantize(), weight), name
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    ids = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        assert_close(model(input_ids=ids).logits, _dense_with(dense_folder, expected)(input_ids=ids).logits)

    fp4 = _bnb_model(dense_folder, bnb_4bit_quant_type="fp4")
    with pytest.raises(LorakitError, match=r"model\.layers\.0\.self_attn\.q_proj.*FP4"):
        quantize(fp4, "nf4")
    assert not any(isinstance(m, NF4Linear) for m in fp4.modules())


# -- (4) + (5): lorakit train --quantize nf4, merge onto the dense base, generate; the adapter in peft --------------


def test_cli_qlora_train_merge_generate_and_peft_reads_the_adapter(tmp_path, capsys):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    from lorakit.cli import main
    from test_train_helpers import make_model_folder, task_records, write_jsonl

    folder = make_model_folder(tmp_path / "model")
    data = write_jsonl(tmp_path / "train.jsonl", task_records(16, seed=1))
    run = tmp_path / "run"
    assert main(["train", "--model", str(folder), "--data", str(data), "--quantize", "nf4", "--max-steps", "3",
                 "--batch-size", "4", "--lr", "1e-2", "--out", str(run), "--no-progress"]) == 0
    adapter = run / "adapter"
    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(folder), "--adapter", str(adapter), "--out", str(merged), "--dtype",
                 "fp32"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", str(folder), "--adapter", str(adapter), "--no-chat", "--max-new-tokens", "4",
                 "reverse a b :"]) == 0
    with_adapter = capsys.readouterr().out
    assert main(["generate", "--model", str(merged), "--no-chat", "--max-new-tokens", "4", "reverse a b :"]) == 0
    assert capsys.readouterr().out.strip() == with_adapter.strip()  # the merged folder answers the same

    # the QLoRA adapter on the dense base: peft, lorakit and the merged folder agree
    ids = torch.randint(0, 18, (2, 6))
    reference = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), adapter).eval()
    ours = lorakit.load_base(str(folder), device="cpu")[0]
    lorakit.load_adapter(ours, adapter)
    with torch.no_grad():
        expected = reference(input_ids=ids).logits
        assert_close(ours(input_ids=ids).logits, expected)
        assert_close(AutoModelForCausalLM.from_pretrained(merged)(input_ids=ids).logits, expected)
        assert (expected - AutoModelForCausalLM.from_pretrained(folder)(input_ids=ids).logits).abs().max() > 1e-3

    # from Python: merging into the NF4 base warns with the surviving share, allow_lossy silences it
    import warnings

    from lorakit.quant.merge_loss import LossyMergeWarning

    quantized = lorakit.load_base(str(folder), device="cpu", quantize="nf4")[0]
    lorakit.load_adapter(quantized, adapter)
    with pytest.warns(LossyMergeWarning, match="% of the update survives"):
        lorakit.merge(quantized)
    lorakit.unmerge(quantized)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LossyMergeWarning)
        lorakit.merge(quantized, allow_lossy=True)
