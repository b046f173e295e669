"""QLoRA and merge/export as a new user runs them from the README, on inputs our other tests do not use.

What each test pins (each was broken before the fix it names):
  * ``lorakit merge --model <4-bit folder>`` (the folder ``lorakit quantize`` writes, which ``train`` takes as its
    --model) used to merge into the NF4 storage and save lorakit's packed buffers (``weight_packed``, ...) under
    a plain config: transformers loaded that folder with *random* q/k/v/... weights and no error, and the GGUF
    export died on "no llama.cpp name for ...weight_packed" after the merge. Now the NF4 base is dequantized first
    (exactly the weights the adapter trained on), so the folder and the GGUF carry the trained model.
  * ``export_merged`` on a model quantized in memory (``lorakit.quantize``) with a DoRA/rsLoRA adapter, a tied
    embedding, hidden sizes that are not multiples of the 64-value NF4 block, a float16 base, GPT-2's Conv1D.
  * an adapter already merged into NF4 storage is refused in one line (unmerge first), not saved as packed bytes.
  * ``lorakit.quant.quantize.dequantize``: the inverse of ``quantize`` that makes all of this possible.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import lorakit
from conftest import assert_close
from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.export import export_merged
from lorakit.quant.nf4 import NF4Linear
from lorakit.quant.quantize import dequantize
from test_serve_support import make_adapter, make_tokenizer, tiny_hf_folder

IDS = torch.tensor([[3, 17, 42, 99, 150, 7, 250, 31, 64], [5, 6, 7, 8, 9, 10, 11, 12, 13]])


def _random_b(model, std: float = 0.1, adapter: str = "default") -> None:
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for key, parameter in lorakit.lora_parameters(model, adapter):
            if key.endswith("lora_B"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)


@pytest.fixture(scope="module")
def nf4_folders(tmp_path_factory):
    """A tied-embedding Llama with hidden 40 / intermediate 54 (rows of 40 and 54: neither a multiple of NF4's 64
    nor of Q8_0's 32), its 4-bit folder written by ``lorakit quantize``, and a DoRA adapter trained on the 16-bit."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("qlora_newuser")
    model_dir = tiny_hf_folder(root / "model", initializer_range=0.3, hidden_size=40, intermediate_size=54,
                               num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    nf4_dir = root / "model-nf4"
    assert main(["quantize", "--model", str(model_dir), "--out", str(nf4_dir), "--dtype", "fp32"]) == 0
    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(model_dir), root / "adapter", seed=3, std=0.1,
                           variant="dora")
    return {"root": root, "model": model_dir, "nf4": nf4_dir, "adapter": adapter}


def test_cli_merge_of_a_4bit_base_writes_the_trained_model_for_transformers_and_llama_cpp(nf4_folders, tmp_path,
                                                                                          capsys):
    import gguf
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    # what the adapter computes on the 4-bit base (lorakit, unmerged): the model the user trained
    model, _ = lorakit.load_base(str(nf4_folders["nf4"]), dtype=torch.float32)
    assert isinstance(model.model.layers[0].self_attn.q_proj, NF4Linear)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "names another base": the adapter was trained on the 16-bit folder
        lorakit.load_adapter(model, str(nf4_folders["adapter"]))
    with torch.no_grad():
        expected = model(IDS).logits

    out = tmp_path / "merged"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["merge", "--model", str(nf4_folders["nf4"]), "--adapter", str(nf4_folders["adapter"]),
                     "--out", str(out), "--dtype", "fp32", "--format", "gguf", "--gguf-type", "q8_0"]) == 0
    printed = capsys.readouterr().out
    assert "4-bit (NF4): merging into its dequantized weights" in printed and "100.00%" in printed

    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        keys = set(handle.keys())
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    assert not [k for k in keys if k.endswith(("weight_packed", "absmax", "nested_code"))], sorted(keys)[:5]
    reloaded = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no bitsandbytes involved
    assert not getattr(reloaded.config, "quantization_config", None)
    with torch.no_grad():
        assert_close(reloaded(IDS).logits, expected)

    reader = gguf.GGUFReader(out / "merged-q8_0.gguf")
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.context_length") == reloaded.config.max_position_embeddings
    theta = getattr(reloaded.config, "rope_parameters", None) or {"rope_theta": reloaded.config.rope_theta}  # 4.x
    assert field("llama.rope.freq_base") == pytest.approx(theta["rope_theta"])
    assert field("llama.embedding_length") == 40 and field("llama.feed_forward_length") == 54
    assert len(field("tokenizer.ggml.tokens")) == reloaded.config.vocab_size
    assert "<|im_start|>" in field("tokenizer.chat_template")
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied head: llama.cpp reuses token_embd
    q = tensors["blk.0.attn_q.weight"]  # rows of 40 do not split into Q8_0 blocks of 32: kept f16
    assert q.tensor_type == gguf.GGMLQuantizationType.F16 and list(q.shape) == [40, 40]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    assert len(tensors) == 2 + 2 * 9  # token_embd, output_norm + 9 per layer: no packed buffer slipped through


@pytest.mark.parametrize("variant,dtype", [("rslora", torch.float16), ("dora", torch.bfloat16)])
def test_export_of_a_model_quantized_in_memory(tmp_path, variant, dtype):
    """README's QLoRA flow in Python: quantize a 16-bit model, train an adapter, export it merged."""
    from transformers import AutoModelForCausalLM

    from conftest import tiny_llama

    tokenizer = make_tokenizer()
    # default init: with 0.3 the float32 merge-vs-unmerged rounding alone reaches 4e-5 on these logits
    model = tiny_llama(vocab_size=len(tokenizer), hidden_size=40, intermediate_size=54, tie_word_embeddings=True)
    rotary = model.model.rotary_emb
    inv_freq = rotary.inv_freq.clone()
    model.to(dtype)
    lorakit.quantize(model, "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, variant=variant))
    _random_b(model)
    model.float()  # compare in float32: the NF4 layers compute in the input's dtype, the storage stays 4-bit
    rotary.inv_freq.copy_(inv_freq)  # .to(float16) rounded it; the reloaded model computes it afresh
    with torch.no_grad():
        expected = model(IDS).logits
    out, report = export_merged(model, tokenizer, "default", tmp_path / "merged", dtype=torch.float32)
    assert report.layers == 14 and report.lost_share == 0.0
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert_close(reloaded(IDS).logits, expected)


def test_export_of_a_gpt2_conv1d_nf4_model(tmp_path):
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    tokenizer = make_tokenizer()
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=40, n_layer=2, n_head=4,
                                       n_positions=64)).eval()
    lorakit.quantize(model, "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8))
    _random_b(model)
    with torch.no_grad():
        expected = model(IDS).logits
    with pytest.raises(LorakitError, match="'gpt2'.*convert_hf_to_gguf"):  # refused before anything changes
        export_merged(model, tokenizer, "default", tmp_path / "gguf", gguf_type="f16")
    assert isinstance(model.transformer.h[0].attn.c_attn.base_layer, NF4Linear)
    out, _ = export_merged(model, tokenizer, "default", tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(reloaded.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    with torch.no_grad():
        assert_close(reloaded(IDS).logits, expected)


def test_adapter_merged_into_nf4_storage_is_refused_not_exported(tmp_path):
    from conftest import tiny_llama

    model = lorakit.quantize(tiny_llama(), "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8))
    _random_b(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lorakit.merge(model)
    with pytest.raises(LorakitError, match=r"merged into the quantized layer .*lorakit.unmerge\(model\) first"):
        export_merged(model, make_tokenizer(), "default", tmp_path / "merged")
    assert not (tmp_path / "merged").exists()
    lorakit.unmerge(model)
    out, report = export_merged(model, make_tokenizer(), "default", tmp_path / "merged")
    assert report.layers == 14 and (out / "model.safetensors").is_file()


def test_dequantize_is_exact_and_keeps_adapters():
    from conftest import tiny_llama

    model = lorakit.quantize(tiny_llama(hidden_size=40, intermediate_size=50), "nf4")
    layer = model.model.layers[1].mlp.down_proj
    packed = layer.dequantize(torch.float32)
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8))
    _random_b(model)
    with torch.no_grad():
        expected = model(IDS % 128).logits
    dequantize(model)
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down.base_layer, torch.nn.Linear) and not down.base_layer.weight.requires_grad
    assert torch.equal(down.base_layer.weight, packed)  # bit for bit what the NF4 layer computed with
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(list(lorakit.lora_parameters(model, "default"))) == 2 * 14
    with torch.no_grad():
        assert_close(model(IDS % 128).logits, expected)


def test_cli_merge_of_a_bitsandbytes_folder_uses_bitsandbytes_dequantization(tmp_path, no_dynamo, capsys):
    """A folder saved by transformers + bitsandbytes (NF4, double quant) is a foreign base a user brings: the merged
    weights are bitsandbytes' own dequantization plus the adapter's update; an FP4 folder is refused in one line."""
    bnb = pytest.importorskip("bitsandbytes")
    import copy

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # hidden 64 / intermediate 96: widths bitsandbytes' CPU kernels dequantize correctly (see test_qlora_audit.py)
    dense = tiny_hf_folder(tmp_path / "dense", hidden_size=64, intermediate_size=96)
    adapter = make_adapter(AutoModelForCausalLM.from_pretrained(dense), tmp_path / "adapter", seed=5, std=0.05)
    results = {}
    for quant_type in ("nf4", "fp4"):
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quant_type, bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.float32)
        model = AutoModelForCausalLM.from_pretrained(dense, quantization_config=config, device_map="cpu", dtype="auto")
        model.save_pretrained(tmp_path / quant_type)
        make_tokenizer().save_pretrained(tmp_path / quant_type)
        results[quant_type] = model
    expected = {}  # bitsandbytes' dequantization of each 4-bit layer, asked for flat (its 2-D CPU path is off)
    for name, module in results["nf4"].named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = copy.copy(module.weight.quant_state)
            state.shape = torch.Size([module.weight.quant_state.shape.numel()])
            flat = bnb.functional.dequantize_4bit(module.weight.data, state)
            expected[name] = flat.reshape(module.weight.quant_state.shape).float()
    assert len(expected) == 14

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["merge", "--model", str(tmp_path / "nf4"), "--adapter", str(adapter), "--out",
                     str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    merged = load_file(str(tmp_path / "merged" / "model.safetensors"))
    probe = AutoModelForCausalLM.from_pretrained(dense)
    lorakit.load_adapter(probe, str(adapter))
    for name, weight in expected.items():
        layer = probe.get_submodule(name)
        delta = layer.merged_candidate("default") - layer.linear_weight(torch.float32)  # the adapter's update
        torch.testing.assert_close(merged[f"{name}.weight"], weight + delta, rtol=0, atol=1e-6, msg=name)

    capsys.readouterr()
    assert main(["merge", "--model", str(tmp_path / "fp4"), "--adapter", str(adapter), "--out",
                 str(tmp_path / "merged-fp4")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "bnb_4bit_quant_type is 'fp4'" in error and "16-bit" in error
    assert not (tmp_path / "merged-fp4").exists()


@pytest.mark.parametrize("adds_bos", [False, True])
def test_gguf_says_whether_the_tokenizer_adds_bos(tmp_path, adds_bos):
    """llama.cpp adds BOS by its own per-vocabulary default unless tokenizer.ggml.add_bos_token says otherwise (a
    Llama-3-style 'llama-bpe' vocabulary defaults to adding it): the file now says what the HF tokenizer does."""
    import gguf
    from tokenizers.processors import TemplateProcessing

    from conftest import tiny_llama
    from lorakit.export import write_gguf

    tokenizer = make_tokenizer()
    if adds_bos:
        bos = tokenizer.bos_token
        tokenizer._tokenizer.post_processor = TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A $B",
                                                                 special_tokens=[(bos, tokenizer.bos_token_id)])
    assert (tokenizer("hello").input_ids[0] == tokenizer.bos_token_id) == adds_bos
    path = write_gguf(tiny_llama(vocab_size=len(tokenizer)), tokenizer, tmp_path / "m.gguf", "f16")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.add_bos_token"].contents() is adds_bos
    assert fields["tokenizer.ggml.add_eos_token"].contents() is False


def test_float16_export_that_would_overflow_is_refused_before_merging(tmp_path):
    """float16 tops out at 65504: a merged weight beyond it used to be saved as inf (with only a "loses 100%"
    warning), a folder that loads and generates NaN. Now refused in one line, nothing merged or written."""
    from conftest import tiny_llama
    from lorakit.inject import lora_layers

    tokenizer = make_tokenizer()
    model = lorakit.quantize(tiny_llama(vocab_size=len(tokenizer)), "nf4")
    lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj"]))
    with torch.no_grad():
        for _, parameter in lorakit.lora_parameters(model, "default"):
            parameter.fill_(200.0)  # (alpha / r) * r * 200 * 200 = 80,000 added to every weight
    with pytest.raises(LorakitError, match=r"q_proj exceed the float16 range .*--dtype bf16 or fp32"):
        export_merged(model, tokenizer, "default", tmp_path / "merged", dtype=torch.float16)
    assert not (tmp_path / "merged").exists() and len(lora_layers(model)) == 2
    assert isinstance(model.model.layers[0].self_attn.q_proj.base_layer, NF4Linear)  # untouched
    out, report = export_merged(model, tokenizer, "default", tmp_path / "merged", dtype=torch.bfloat16)
    assert report.overflow == [] and (out / "model.safetensors").is_file()


def test_nf4linear_from_linear_takes_conv1d_and_bitsandbytes_layers_and_refuses_others(no_dynamo):
    """``NF4Linear.from_linear`` (the lorakit.quant API) read a GPT-2 Conv1D's (in, out) weight as (out, in): a
    square Conv1D quantized silently transposed. A bitsandbytes Linear4bit was refused for its uint8 weight, an
    embedding died on AttributeError."""
    bnb = pytest.importorskip("bitsandbytes")
    import copy

    from transformers.pytorch_utils import Conv1D

    conv = Conv1D(48, 48)
    torch.nn.init.normal_(conv.weight)
    torch.nn.init.normal_(conv.bias)
    layer = NF4Linear.from_linear(conv)
    assert layer.conv1d_layout and torch.equal(layer.dequantize(), NF4Linear.from_weight(conv.weight.T).dequantize())
    x = torch.randn(3, 48)
    error = (layer(x) - conv(x)).abs().max() / conv(x).abs().max()
    assert error < 0.2  # NF4 rounding only (a transposed weight gave ~1.4)

    dense = torch.nn.Linear(64, 96)
    packed = bnb.nn.Linear4bit(64, 96, compute_dtype=torch.float32, quant_type="nf4", compress_statistics=True)
    packed.load_state_dict(dense.state_dict())
    packed = packed.to("cpu")  # bitsandbytes quantizes on the move to a device
    state = copy.copy(packed.weight.quant_state)
    state.shape = torch.Size([64 * 96])
    expected = bnb.functional.dequantize_4bit(packed.weight.data, state).reshape(96, 64).float()
    converted = NF4Linear.from_linear(packed, name="up_proj")
    assert torch.equal(converted.dequantize(), expected) and torch.equal(converted.bias, dense.bias)

    with pytest.raises(LorakitError, match=r"'embed' \(Embedding\) is not linear"):
        NF4Linear.from_linear(torch.nn.Embedding(10, 64), name="embed")


def test_cli_gguf_of_an_unknown_family_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=32,
                                               bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    make_tokenizer().save_pretrained(folder)
    adapter = tmp_path / "adapter"
    adapter.mkdir()

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(lorakit, "load_base", never)
    capsys.readouterr()  # the setup's progress bars
    assert main(["merge", "--model", str(folder), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--format", "gguf"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "'gpt2'" in error and "convert_hf_to_gguf.py" in error
    assert not (tmp_path / "out").exists()
    monkeypatch.undo()
    (folder / "config.json").write_text('{"model_type": "nonsense"}')  # the early look may not turn into a traceback
    assert main(["merge", "--model", str(folder), "--adapter", str(adapter), "--out", str(tmp_path / "out"),
                 "--format", "gguf"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "model_type 'nonsense'" in error


def test_dequantize_follows_the_models_compute_dtype():
    """A base quantized from bf16 (``lorakit quantize``'s default --dtype) and loaded in float32 computes in
    float32: its dense layers must be float32 too (bf16 ones crashed the forward with a dtype mismatch)."""
    from conftest import tiny_llama

    model = lorakit.quantize(tiny_llama().to(torch.bfloat16), "nf4").float()
    assert model.model.layers[0].mlp.up_proj.weight_dtype == torch.bfloat16
    with torch.no_grad():
        expected = model(IDS % 128).logits
    dequantize(model)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with torch.no_grad():
        assert torch.equal(model(IDS % 128).logits, expected)
    assert dequantize(lorakit.quantize(tiny_llama(), "nf4"), torch.float16).lm_head.weight.dtype == torch.float32


def test_write_gguf_of_an_nf4_model_and_of_one_with_adapters(tmp_path):
    """``write_gguf`` on an NF4 model used to die on "no llama.cpp name for ...weight_packed; this llama variant is
    not supported" (and on ``...base_layer.weight`` for a model with adapters): the first now writes the dequantized
    weights, the second says to merge first."""
    import gguf

    from conftest import tiny_llama
    from lorakit.export import permute_rows, write_gguf

    tokenizer = make_tokenizer()
    model = lorakit.quantize(tiny_llama(vocab_size=len(tokenizer)), "nf4")
    path = write_gguf(model, tokenizer, tmp_path / "nf4.gguf", "f16")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    layer = model.model.layers[1].mlp.down_proj
    values = gguf.quants.dequantize(tensors["blk.1.ffn_down.weight"].data, tensors["blk.1.ffn_down.weight"].tensor_type)
    assert torch.equal(torch.from_numpy(values.reshape(32, 48).copy()), layer.dequantize().half().float())
    q = gguf.quants.dequantize(tensors["blk.0.attn_q.weight"].data, gguf.GGMLQuantizationType.F16).reshape(32, 32)
    expected_q = permute_rows(model.model.layers[0].self_attn.q_proj.dequantize().half().float().numpy(), 4)
    assert (q == expected_q).all() and len(tensors) == 3 + 2 * 9

    lorakit.inject(model, lorakit.LoraConfig(r=2, alpha=4))
    with pytest.raises(LorakitError, match=r"still has lorakit adapters .*merge_and_unload"):
        write_gguf(model, tokenizer, tmp_path / "adapters.gguf", "f16")
    assert not (tmp_path / "adapters.gguf").exists()


def test_save_pretrained_of_a_4bit_model_is_named_when_loaded(tmp_path):
    """model.save_pretrained on a 4-bit model writes lorakit's NF4 buffers, which transformers would fill with random
    weights: load_base says what wrote the folder and what to use instead."""
    folder = tiny_hf_folder(tmp_path / "dense", hidden_size=64, intermediate_size=128)
    model, tokenizer = lorakit.load_base(str(folder), quantize="nf4")
    # the class's own save_pretrained: what model.save_pretrained wrote before lorakit refused it (a folder of an
    # older lorakit; test_followups_23_api checks the refusal)
    type(model).save_pretrained(model, tmp_path / "saved")
    tokenizer.save_pretrained(tmp_path / "saved")
    with pytest.raises(LorakitError, match=r"4-bit buffers \(e\.g\. '.*weight_packed'\).*lorakit\.save_quantized"):
        lorakit.load_base(str(tmp_path / "saved"))
