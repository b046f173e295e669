"""``lorakit merge`` audited as a new user would use it: several adapters, peft's LoRA variants, and bases that
bitsandbytes itself saved 4-bit / 8-bit. Each merged folder is loaded by plain transformers and its logits are
checked element by element against peft running the unmerged adapter(s); every refusal is one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli_helpers import cli_error
from conftest import assert_close
from lorakit.cli import main
from test_serve_support import tiny_hf_folder

IDS = torch.tensor([[3, 17, 42, 99, 150, 7], [5, 6, 7, 8, 9, 10]])


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    # a space in the path: every folder below is passed as one argument, as a shell user quotes it
    return tiny_hf_folder(tmp_path_factory.mktemp("merge18") / "base model", hidden_size=64, intermediate_size=128)


def peft_adapter(base: Path, folder: Path, seed: int, **config) -> Path:
    """A peft adapter with random non-zero A and B (init_lora_weights=False), saved by peft itself."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **config))
    model.save_pretrained(folder)
    return folder


def peft_logits(base, adapters: list[Path], dequantize: bool = False) -> torch.Tensor:
    """peft's output with every adapter in ``adapters`` active at once (their updates summed), unmerged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, **({"device_map": "cpu"} if dequantize else {}))
    if dequantize:  # bitsandbytes' own dequantization of its checkpoint: the weights the adapter would train on
        model = model.dequantize().float()
    model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], 1):
        model.load_adapter(adapter, adapter_name=f"a{i}")
    model.base_model.set_adapter([f"a{i}" for i in range(len(adapters))])
    with torch.no_grad():
        return model(IDS).logits


def merged_logits(out: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config  # a plain 16/32-bit folder, whatever the base was
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(out)(IDS).logits


def test_merge_of_several_adapters_is_refused_naming_combine_and_the_advice_merges_their_sum(base, tmp_path, capsys):
    """`--adapter a --adapter b` merged b alone (argparse keeps an option's last value) and said it merged b: the
    folder silently lacked a. Now one line says to combine them first; doing what it says gives peft's a + b."""
    a = peft_adapter(base, tmp_path / "adapter a", seed=1, target_modules="all-linear")
    b = peft_adapter(base, tmp_path / "adapter b", seed=2, target_modules=["q_proj", "v_proj", "down_proj"])
    out = tmp_path / "merged both"
    line = cli_error(capsys, main(["merge", "--model", str(base), "--adapter", str(a), "--adapter", str(b),
                                   "--out", str(out), "--dtype", "fp32"]))
    assert "merge takes one --adapter, got 2" in line and "lorakit combine" in line, line
    assert not out.exists()
    mix = tmp_path / "mix"
    assert main(["combine", "--model", str(base), "--adapter", str(a), "--adapter", str(b), "--out", str(mix)]) == 0
    assert main(["merge", "--model", str(base), "--adapter", str(mix), "--out", str(out), "--dtype", "fp32"]) == 0
    assert_close(merged_logits(out), peft_logits(base, [a, b]))


@pytest.mark.parametrize("variant", [
    dict(target_modules="all-linear", use_rslora=True),
    dict(target_modules="all-linear", use_dora=True),
    dict(target_modules="all-linear", rank_pattern={"q_proj": 2}, alpha_pattern={"v_proj": 3}),
])
def test_merged_peft_variants_load_in_transformers_with_peft_logits(base, tmp_path, variant):
    adapter = peft_adapter(base, tmp_path / "adapter", seed=3, **variant)
    out = tmp_path / "out"
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"]) == 0
    assert_close(merged_logits(out), peft_logits(base, [adapter]))


@pytest.fixture(scope="module")
def bnb_folders(base, tmp_path_factory):
    """The base saved by transformers + bitsandbytes (its CPU backend) in 4-bit NF4 with and without double
    quantization, 4-bit FP4 and 8-bit, each with the base's tokenizer beside it."""
    pytest.importorskip("bitsandbytes")
    import shutil

    import torch._dynamo
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    root = tmp_path_factory.mktemp("bnb18")
    kinds = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
             "nf4 double bf16": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                     bnb_4bit_compute_dtype=torch.bfloat16),
             "fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4"), "int8": dict(load_in_8bit=True)}
    previous = torch._dynamo.config.disable
    torch._dynamo.config.disable = True  # bitsandbytes' CPU dequantize is compiled otherwise (slow, same bits)
    try:
        for kind, options in kinds.items():
            model = AutoModelForCausalLM.from_pretrained(base, quantization_config=BitsAndBytesConfig(**options),
                                                         device_map="cpu")
            model.save_pretrained(root / kind)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                shutil.copy(base / name, root / kind / name)
        yield root
    finally:
        torch._dynamo.config.disable = previous


@pytest.mark.parametrize("kind", ["nf4", "nf4 double bf16"])
def test_merge_into_a_bitsandbytes_nf4_folder_equals_bitsandbytes_dequantized_base_with_peft(
        base, bnb_folders, tmp_path, kind, no_dynamo):
    adapter = peft_adapter(base, tmp_path / "adapter", seed=4, target_modules="all-linear")
    out = tmp_path / "out"
    assert main(["merge", "--model", str(bnb_folders / kind), "--adapter", str(adapter), "--out", str(out),
                 "--dtype", "fp32"]) == 0
    assert_close(merged_logits(out), peft_logits(bnb_folders / kind, [adapter], dequantize=True))


@pytest.mark.parametrize("kind, said", [("fp4", "'fp4'"), ("int8", "8-bit")])
def test_merge_into_other_bitsandbytes_folders_is_one_line_naming_what_to_do(base, bnb_folders, tmp_path, capsys,
                                                                             kind, said):
    adapter = peft_adapter(base, tmp_path / "adapter", seed=5, target_modules=["q_proj"])
    out = tmp_path / "out"
    line = cli_error(capsys, main(["merge", "--model", str(bnb_folders / kind), "--adapter", str(adapter),
                                   "--out", str(out)]))
    assert said in line and "16-bit" in line, line
    assert not out.exists()


@pytest.mark.parametrize("kind", ["nf4 double bf16", "int8", "fp4"])
def test_dequantize_of_a_model_loaded_through_bitsandbytes_is_exact_or_refused(base, bnb_folders, kind, no_dynamo):
    """lorakit.dequantize(model) on a model loaded with BitsAndBytesConfig returned it with every bitsandbytes layer
    still 4-bit or 8-bit, silently: "dequantized", it then saved (or merged into) quantized layers. Now NF4 layers
    become nn.Linear holding bitsandbytes' own dequantized weight; 8-bit and FP4 are refused, the model unchanged."""
    import bitsandbytes
    import lorakit
    from lorakit.errors import LorakitError
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(bnb_folders / kind, device_map="cpu", dtype=torch.float32)
    bnb_layers = (bitsandbytes.nn.Linear4bit, bitsandbytes.nn.Linear8bitLt)
    if kind != "nf4 double bf16":
        with pytest.raises(LorakitError, match="8-bit" if kind == "int8" else "FP4") as refused:
            lorakit.dequantize(model)
        assert "\n" not in str(refused.value)
        assert isinstance(model.model.layers[0].self_attn.q_proj, bnb_layers)  # nothing changed
        return
    expected = {name: bitsandbytes.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                for name, module in model.named_modules() if isinstance(module, bitsandbytes.nn.Linear4bit)}
    assert len(expected) == 14
    lorakit.dequantize(model, torch.float32)
    for name, weight in expected.items():
        module = model.get_submodule(name)
        assert type(module) is torch.nn.Linear, name
        assert torch.equal(module.weight, weight.float()), name
    reference = AutoModelForCausalLM.from_pretrained(bnb_folders / kind, device_map="cpu", dtype=torch.float32)
    reference = reference.dequantize().float()
    with torch.no_grad():
        assert_close(model(IDS).logits, reference(IDS).logits)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
def test_lorakit_adapter_on_a_bitsandbytes_4bit_model_is_not_called_another_bases(base, bnb_folders, tmp_path, kind,
                                                                                   no_dynamo):
    """load_adapter on a model loaded 4-bit with BitsAndBytesConfig said the adapter "was made for another base model"
    (the fingerprint took bitsandbytes' packed (out*in/2, 1) weights for the base's shapes): the user hunted for
    the wrong base. Now the bitsandbytes layer is named: NF4 converts with lorakit.quantize (then it loads and runs
    as peft does on the bitsandbytes model), FP4 is refused."""
    import lorakit
    from lorakit.errors import LorakitError
    from lorakit.io import base_fingerprint
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dense = AutoModelForCausalLM.from_pretrained(base)
    folder = tmp_path / "adapter"
    lorakit.inject(dense, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]), adapter="mine")
    with torch.no_grad():
        for key, parameter in lorakit.lora_parameters(dense, "mine"):
            if key.endswith("lora_B"):
                parameter.normal_(0, 0.05)
    lorakit.save_adapter(dense, folder, adapter="mine")
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=kind)
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
    assert base_fingerprint(model) == base_fingerprint(AutoModelForCausalLM.from_pretrained(base))
    with pytest.raises(LorakitError) as refused:
        lorakit.load_adapter(model, folder)
    assert "another base" not in str(refused.value) and "bitsandbytes" in str(refused.value)
    assert ("lorakit.quantize(model, 'nf4')" if kind == "nf4" else "'fp4'") in str(refused.value)
    if kind == "fp4":
        return
    reference = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu"), folder)
    # on a CPU with AVX512-BF16, bitsandbytes' first inference forward repacks each weight and rounds its absmax to
    # bfloat16 (logits 2.5e-3 off the checkpoint's own); keep the reference on the dequantizing path, which computes
    # with the stored state as a GPU does
    for module in reference.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    lorakit.quantize(model, "nf4")  # what the line says: exact
    lorakit.load_adapter(model, folder)
    with torch.no_grad():
        assert_close(model(IDS).logits, reference(IDS).logits)


def test_export_merged_of_several_adapters_says_to_combine_them_and_that_exports_their_sum(base, tmp_path):
    """export_merged(model, tok, ["a", "b"], out) said "unknown adapter ['a', 'b']; this model has: a, b". Now one
    line names combine_adapters; doing so exports what the model computes with both adapters active (a tied
    embedding with LoRA on it included)."""
    import lorakit
    from lorakit.errors import LorakitError
    from lorakit.export import export_merged
    from transformers import AutoModelForCausalLM

    tied = tiny_hf_folder(tmp_path / "tied", hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    a = peft_adapter(tied, tmp_path / "a", seed=8, target_modules=["q_proj", "embed_tokens"])
    b = peft_adapter(tied, tmp_path / "b", seed=9, target_modules="all-linear")
    model = AutoModelForCausalLM.from_pretrained(tied)
    lorakit.load_adapter(model, a, adapter="a")
    lorakit.load_adapter(model, b, adapter="b")
    for wrong in (["a", "b"], None):
        with pytest.raises(LorakitError, match="combine_adapters") as refused:
            export_merged(model, None, wrong, tmp_path / "out")
        assert "\n" not in str(refused.value) and "unknown adapter" not in str(refused.value)
    assert not (tmp_path / "out").exists()
    lorakit.combine_adapters(model, {"a": 1.0, "b": 1.0}, name="mix")
    export_merged(model, None, "mix", tmp_path / "out")
    assert_close(merged_logits(tmp_path / "out"), peft_logits(tied, [a, b]))


@pytest.mark.parametrize("kind, said", [("nf4", "train on it directly"), ("int8", "8-bit"), ("fp4", "'fp4'")])
def test_quantize_of_a_bitsandbytes_folder_says_what_works(bnb_folders, tmp_path, capsys, kind, said):
    """`lorakit quantize` of an 8-bit or FP4 folder said "train on it directly (lorakit train --model ...)", which
    lorakit refuses for those folders: now it names the kind and the 16-bit original; an NF4 folder is trainable."""
    out = tmp_path / "out"
    line = cli_error(capsys, main(["quantize", "--model", str(bnb_folders / kind), "--out", str(out)]))
    assert said in line, line
    if kind != "nf4":
        assert "train on it" not in line and "16-bit" in line, line
    assert not out.exists()


@pytest.mark.parametrize("config", [
    dict(target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True),  # LoRA on the tied pair
    dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"], ensure_weight_tying=True),
    dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"]),  # a trained input embedding, head untouched
])
def test_merge_into_a_tied_embedding_model_keeps_peft_outputs(tmp_path, config):
    """A guard (these pass): the merged folder of an adapter on a tied embedding / head computes what peft computes
    unmerged. peft's own merge_and_unload of the first one does not (measured once on peft 0.21.2, without the
    scaling below: logits off by up to 500, peft warns about tied modules); lorakit unties first."""
    tied = tiny_hf_folder(tmp_path / "tied", hidden_size=64, intermediate_size=128, tie_word_embeddings=True)
    adapter = peft_adapter(tied, tmp_path / "adapter", seed=3, **config)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    noise = None
    for key in tensors:
        if "lora_embedding_B" in key or "lm_head.lora_A" in key:  # peft's random init gives logits in the
            tensors[key] = tensors[key] * 0.05  # hundreds (float32 rounding shows); the head's A is tied to this B
        elif "lora" not in key and "base_layer" not in key:  # trained copies (modules_to_save) unlike the base;
            noise = 0.1 * torch.randn_like(tensors[key]) if noise is None else noise  # the tied pair's: one value
            tensors[key] = tensors[key] + noise
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "out"
    assert main(["merge", "--model", str(tied), "--adapter", str(adapter), "--out", str(out), "--dtype", "fp32"]) == 0
    assert_close(merged_logits(out), peft_logits(tied, [adapter]))


def test_merge_refusal_names_the_adapter_folder_not_an_internal_name(base, tmp_path, capsys):
    """A lora_bias adapter on a base without biases cannot be merged (peft refuses it too); the line said
    "adapter 'merged' has a trained bias...", a name the user never gave. Now it names the folder."""
    adapter = peft_adapter(base, tmp_path / "my-bias", seed=6, target_modules=["q_proj"], lora_bias=True)
    out = tmp_path / "out"
    line = cli_error(capsys, main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(out)]))
    assert "adapter 'my-bias' has a trained bias" in line and "'merged'" not in line, line
    assert not out.exists()


def test_converting_a_bitsandbytes_model_after_a_cpu_forward_warns_that_its_scales_were_rounded(base, no_dynamo):
    """bitsandbytes' first inference forward on a CPU with AVX512-BF16 repacks each 4-bit weight and rounds its
    absmax to bfloat16, for good: lorakit.quantize then converts the rounded scales, and says so once (not once per
    layer); converted before any forward, nothing is said and the conversion is exact."""
    pytest.importorskip("bitsandbytes")
    import warnings

    import lorakit
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    model = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
    if not model.model.layers[0].self_attn.q_proj.support_avx512bf16_for_cpu:
        pytest.skip("this CPU has no AVX512-BF16: bitsandbytes keeps its checkpoint layout on the CPU")
    with torch.no_grad():
        model(IDS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        lorakit.quantize(model, "nf4")
    said = [str(w.message) for w in caught if "bfloat16" in str(w.message)]
    assert len(said) == 1 and "convert before the first forward" in said[0], said
    fresh = AutoModelForCausalLM.from_pretrained(base, quantization_config=config, device_map="cpu")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        lorakit.quantize(fresh, "nf4")
    assert not [w for w in caught if "bfloat16" in str(w.message)]
