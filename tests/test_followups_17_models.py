"""Seventeenth follow-ups: model folders a new user brings that earlier audits did not build.

DBRX, whose experts are plain 2-D parameters (``ffn.experts.mlp.w1`` / ``v1`` / ``w2``: (experts x ffn, hidden))
that ``DbrxExperts`` slices itself and hands to its child: "all-linear" left them frozen without a word, and
``target_parameters`` on them made an adapter that never acted (lorakit) or failed (peft). A sharded folder whose index
lists a tensor in a shard that lacks it, and one whose listed shard holds an extra tensor. A classifier whose head has
layers of its own (RoBERTa's ``classifier.dense``): its "all-linear" adapter named a peft task peft could not load.
Encoder-decoders (T5, BART) adapted in Python match peft. Every model is tiny, random, built from transformers'
config classes; peft 0.21 is the reference where it supports the case.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import assert_close
from lorakit.cli import main
from lorakit.errors import LorakitError
from test_train_helpers import make_model_folder, task_records, tiny_tokenizer, write_jsonl

TRAIN = ("--max-steps", 1, "--batch-size", 2, "--eval-examples", 0, "--samples", 0, "--no-progress")
IDS = torch.tensor([[1, 8, 10, 11, 9], [1, 7, 12, 13, 9]])


def _run(*args) -> tuple[int, str, str]:
    """``lorakit ARGS`` in-process; (exit code, stdout, stderr with each Python warning as the ``warning: ...`` line
    the command prints; pytest's recording would take them away). An exception that escapes is a traceback: a bug."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # each warning once per place, as on the command line
        code = main([str(a) for a in args])
    said = "".join(f"warning: {w.message}\n" for w in caught if issubclass(w.category, UserWarning))
    return code, out.getvalue(), said + err.getvalue()


def _refused(*args) -> str:
    """The CLI must refuse with exit 2 and exactly one stderr line (warnings aside); returns it."""
    code, out, err = _run(*args)
    assert code == 2, (code, out, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning:")]
    assert len(lines) == 1, err
    return lines[0]


def _dbrx(vocab: int = 32):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.DbrxConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=64, vocab_size=vocab,
                           attn_config=dict(kv_n_heads=2, clip_qkv=8.0, rope_theta=10000.0),
                           ffn_config=dict(ffn_hidden_size=24, moe_num_experts=4, moe_top_k=2),
                           bos_token_id=1, eos_token_id=3, pad_token_id=3)
    return tf.DbrxForCausalLM(config).eval()


def _nudged(model) -> None:
    """Every trainable tensor moved off its initial value (LoRA B starts at zero: the adapter would change nothing)."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, parameter in lorakit.lora_parameters(model):
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))


def _peft_logits(base, folder: Path, **inputs) -> torch.Tensor:
    import peft

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(folder)).eval()
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data17") / "train.jsonl", task_records(8, seed=1))


# -- DBRX: expert weights its experts module reads from its child -------------------------------------------------
def test_dbrx_all_linear_says_once_that_its_experts_stay_frozen_and_what_trains_them():
    """One warning naming the three expert weights and modules_to_save=['experts'] (no LoRA reaches them); the
    attention and router layers are adapted as peft adapts them."""
    model = _dbrx()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lorakit.inject(model, lorakit.LoraConfig(target_modules="all-linear", r=4))
    said = [str(w.message) for w in caught if "expert" in str(w.message)]
    assert len(said) == 1, said
    for words in ("ffn.experts.mlp.w1", "ffn.experts.mlp.v1", "ffn.experts.mlp.w2", "stay frozen",
                  "modules_to_save=['experts']", "--modules-to-save experts"):
        assert words in said[0], said[0]
    assert not any(p.requires_grad for n, p in model.named_parameters() if n.endswith(("mlp.w1", "mlp.v1", "mlp.w2")))
    with warnings.catch_warnings(record=True) as caught:  # modules_to_save on the reader: nothing left frozen to say
        warnings.simplefilter("always")
        lorakit.inject(_dbrx(), lorakit.LoraConfig(target_modules="all-linear", r=4, modules_to_save=["experts"]))
    assert not [w for w in caught if "expert" in str(w.message)]


def test_dbrx_target_parameters_on_its_experts_is_refused_not_an_adapter_that_never_acts():
    """A ParamLora on ``experts.mlp`` shows W + delta only inside mlp's forward, and DbrxExperts reads mlp.w1 before
    calling it: the adapter's logits were the base's exactly, and its gradients zero. Now one line."""
    for targets in (["mlp.w1"], ["ffn.experts.mlp.w1", "ffn.experts.mlp.v1"]):
        with pytest.raises(LorakitError) as error:
            lorakit.inject(_dbrx(), lorakit.LoraConfig(target_modules=None, target_parameters=targets))
        line = str(error.value)
        assert "\n" not in line and "is read by DbrxExperts" in line and "would never apply" in line, line
        assert "modules_to_save=['experts']" in line, line


def test_dbrx_adapter_with_experts_as_modules_to_save_matches_peft_and_loads_without_the_warning(tmp_path):
    """all-linear LoRA with the experts trained whole: the saved adapter gives lorakit's logits in peft, and loading
    it (to generate, not to train) does not repeat the frozen-experts line; nor does loading a plain all-linear one."""
    base = _dbrx()
    for name, saved in (("plain", None), ("experts", ["experts"])):
        model = copy.deepcopy(base)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lorakit.inject(model, lorakit.LoraConfig(target_modules="all-linear", r=4, modules_to_save=saved))
        _nudged(model)
        with torch.no_grad():
            ours = model(IDS).logits
            assert (ours - base(IDS).logits).abs().max() > 1e-3
        lorakit.save_adapter(model, tmp_path / name)
        if saved is None:  # the plain one is what would warn: loading it must not (the experts one is loaded below)
            fresh = copy.deepcopy(base)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                lorakit.load_adapter(fresh, str(tmp_path / name))
            assert not [w for w in caught if "stay frozen" in str(w.message)]
            with torch.no_grad():
                assert_close(fresh(IDS).logits, ours)
    assert_close(_peft_logits(base, tmp_path / "experts", input_ids=IDS), ours)


def test_dbrx_folder_on_the_command_line(data, tmp_path):
    """--targets w1 says what w1 is; a --modules-to-save experts run trains the experts' own weights (nothing left
    frozen to warn of) and its merged folder gives its logits in transformers."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "dbrx"
    _dbrx().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    line = _refused("train", "--model", folder, "--data", data, *TRAIN, "--out", tmp_path / "w1", "--targets", "w1")
    assert "w1 is an MoE expert weight that DbrxExperts reads itself" in line and "--modules-to-save experts" in line

    code, _, err = _run("train", "--model", folder, "--data", data, *TRAIN, "--out", tmp_path / "whole",
                        "--modules-to-save", "experts", "--lr", "0.01")
    assert code == 0 and "stay frozen" not in err, err
    model, _ = lorakit.load_base(str(folder), device="cpu")
    lorakit.load_adapter(model, str(tmp_path / "whole" / "adapter"))
    with torch.no_grad():
        ours = model(IDS).logits
    trained = dict(lorakit.lora_parameters(model))
    copies = [n for n in trained if n.endswith("experts.copies.default.mlp.w1")]
    assert len(copies) == 2, sorted(trained)
    base = dict(model.named_parameters())[copies[0].replace("copies.default", "base_layer")]
    assert (trained[copies[0]] - base).abs().max() > 0  # the training step moved the experts' own weights
    assert _run("merge", "--model", folder, "--adapter", tmp_path / "whole" / "adapter", "--out", tmp_path / "merged",
                "--dtype", "float32")[0] == 0
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()(IDS).logits
    assert_close(merged, ours)


# -- sharded folders --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    """The tiny Llama folder in 20 KB shards (model.safetensors.index.json beside them)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("sharded17")
    make_model_folder(root / "plain")
    shutil.copytree(root / "plain", root / "sharded")
    (root / "sharded" / "model.safetensors").unlink()
    AutoModelForCausalLM.from_pretrained(root / "plain").save_pretrained(root / "sharded", max_shard_size="20KB")
    return root / "sharded"


def _shard_edit(source: Path, target: Path, edit) -> Path:
    """A copy of ``source`` whose first listed shard is rewritten by ``edit(tensors, index)``."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    index = json.loads((target / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["lm_head.weight"]
    tensors = load_file(target / shard)
    edit(tensors)
    save_file(tensors, target / shard, metadata={"format": "pt"})
    return target


def test_an_index_listing_a_tensor_its_shard_lacks_names_the_shard(sharded, tmp_path):
    """The shard re-saved without lm_head.weight (the index still lists it there): generate said config.json
    needed "tie_word_embeddings": true, quantize "1 tensor(s) missing"; both now name the index, the key and the
    shard, and say to download them again."""
    folder = _shard_edit(sharded, tmp_path / "lacking", lambda tensors: tensors.pop("lm_head.weight"))
    shard = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]["lm_head.weight"]
    for command in (("generate", "--model", folder, "--max-new-tokens", 2, "copy a b :"),
                    ("quantize", "--model", folder, "--out", tmp_path / "nf4")):
        line = _refused(*command)
        assert f"lists 'lm_head.weight' in {shard}, which does not hold it" in line, line
        assert "tie_word_embeddings" not in line and "download" in line, line
    assert not (tmp_path / "nf4").exists()


def test_a_listed_shard_holding_an_extra_tensor_loads_as_transformers_reads_it(sharded, tmp_path):
    """A tensor the index does not list, inside a listed shard: transformers ignores it, and so does lorakit."""
    from transformers import AutoModelForCausalLM

    folder = _shard_edit(sharded, tmp_path / "extra",
                         lambda tensors: tensors.update({"model.layers.0.extra.weight": torch.ones(3, 3)}))
    model, _ = lorakit.load_base(str(folder), device="cpu")
    with torch.no_grad():
        expected = AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32).eval()(IDS).logits
        assert_close(model(IDS).logits, expected)


# -- encoders and encoder-decoders in Python ------------------------------------------------------------------------
def _encoder(kind: str):
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=64, num_labels=3)
    return {
        "roberta": lambda: tf.RobertaForSequenceClassification(tf.RobertaConfig(**common)),
        "bert": lambda: tf.BertForSequenceClassification(tf.BertConfig(**common)),
        "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=64, d_model=32, d_ff=48, d_kv=8,
                                                                 num_layers=2, num_heads=4)),
        "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(
            vocab_size=64, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64)),
    }[kind]().eval()


@pytest.mark.parametrize("kind", ["roberta", "bert", "t5", "bart"])
def test_all_linear_on_encoders_and_encoder_decoders_loads_in_peft(kind, tmp_path):
    """RoBERTa's head is a module of two linear layers: "all-linear" adapts them, and the file said task_type
    SEQ_CLS, so peft copied the whole classifier as modules_to_save and failed on their LoRA tensors (KeyError
    'base_model.model.classifier.dense.weight'). The file now names no task (as for BERT, whose head is one layer);
    T5 and BART: the file is peft's seq2seq task, the same layers adapted."""
    base = _encoder(kind)
    inputs = {"input_ids": torch.tensor([[5, 9, 12, 40, 7, 2]])}
    if kind in ("t5", "bart"):
        inputs["decoder_input_ids"] = torch.tensor([[2, 5, 9]])
    model = copy.deepcopy(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # r above a 3-class head's rank
        lorakit.inject(model, lorakit.LoraConfig(target_modules="all-linear", r=4))
    _nudged(model)
    with torch.no_grad():
        ours = model(**inputs).logits
    lorakit.save_adapter(model, tmp_path / kind)
    saved = json.loads((tmp_path / kind / "adapter_config.json").read_text())
    assert saved["task_type"] == ("SEQ_2_SEQ_LM" if kind in ("t5", "bart") else None), saved["task_type"]
    assert_close(_peft_logits(base, tmp_path / kind, **inputs), ours)


def test_an_adapter_training_a_module_with_submodules_whole_loads_back(tmp_path):
    """modules_to_save on a module with layers of its own (a Llama ``mlp``; DBRX's ``experts`` above): the base's
    fingerprint, taken with the module wrapped, left those layers out, so the saved adapter was refused by every
    base as "made for another base model", its own included."""
    from test_train_helpers import tiny_train_model

    base = tiny_train_model()
    model = copy.deepcopy(base)
    lorakit.inject(model, lorakit.LoraConfig(target_modules=["q_proj"], modules_to_save=["mlp"], r=2))
    _nudged(model)
    with torch.no_grad():
        ours = model(IDS).logits
    assert lorakit.base_fingerprint(model) == lorakit.base_fingerprint(base)
    lorakit.save_adapter(model, tmp_path / "mlp")
    lorakit.load_adapter(base, str(tmp_path / "mlp"))
    with torch.no_grad():
        assert_close(base(IDS).logits, ours)


# -- vision-language folders AutoModelForCausalLM builds as their text model ---------------------------------------
def _mllama():
    """Llama 3.2 Vision's class (MllamaForConditionalGeneration), tiny: the word tokenizer's ids, one cross-attention
    layer, a one-layer vision tower."""
    import transformers as tf

    torch.manual_seed(0)
    text = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, cross_attention_layers=[1], max_position_embeddings=64, bos_token_id=1,
                eos_token_id=3, pad_token_id=3)
    vision = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_global_layers=1, attention_heads=4,
                  image_size=28, patch_size=14, vision_output_dim=64, intermediate_layers_indices=[0], max_num_tiles=4)
    return tf.MllamaForConditionalGeneration(tf.MllamaConfig(text_config=text, vision_config=vision,
                                                             image_token_index=39)).eval()


def test_a_vision_language_folder_trained_as_its_text_model_says_so_and_merges_that(data, tmp_path):
    """An mllama folder loads as MllamaForCausalLM (the text model, the full model's text logits): train says the
    adapter is for that class (peft on MllamaForConditionalGeneration finds none of its tensors), merge that the
    merged folder has no vision tower; the merged folder and peft on AutoModelForCausalLM give lorakit's logits.
    The merged folder was written with MllamaForCausalLM's own config ("mllama_text_model"), which neither
    AutoModelForCausalLM ("Unrecognized configuration class") nor lorakit read; it now holds the folder's config."""
    import peft
    from transformers import AutoModelForCausalLM

    full = _mllama()
    folder = tmp_path / "mllama"
    full.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    code, out, err = _run("train", "--model", folder, "--data", data, *TRAIN, "--out", tmp_path / "run", "--lr", "0.05")
    assert code == 0, err
    assert "holds a MllamaForConditionalGeneration" in out and "trains its text model, MllamaForCausalLM" in out, out
    code, out, err = _run("merge", "--model", folder, "--adapter", tmp_path / "run" / "adapter", "--out",
                          tmp_path / "merged", "--dtype", "float32")
    assert code == 0, err
    assert "the merged folder has no vision tower" in out, out

    model, _ = lorakit.load_base(str(folder), device="cpu")
    assert type(model).__name__ == "MllamaForCausalLM"
    with torch.no_grad():
        assert_close(model(IDS).logits, full(input_ids=IDS).logits)  # the text model is the full model on text
        lorakit.load_adapter(model, str(tmp_path / "run" / "adapter"))
        ours = model(IDS).logits
        assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(IDS).logits, ours)
        text = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(folder), str(tmp_path / "run" / "adapter"))
        assert_close(text.eval()(IDS).logits, ours)

    code, out, err = _run("merge", "--model", tmp_path / "merged", "--adapter", tmp_path / "run" / "adapter", "--out",
                          tmp_path / "twice", "--dtype", "float32")
    assert code == 0 and "vision tower" not in out, (out, err)  # the text model's own folder: nothing to say

    # the 4-bit copy wrote MllamaForCausalLM's own config class too ("mllama_text_model"), which lorakit then refused
    # as "not a causal language model"; now it reads back as the 4-bit model it was written from
    code, out, err = _run("quantize", "--model", folder, "--out", tmp_path / "nf4", "--dtype", "fp32")
    assert code == 0, err
    quantized, _ = lorakit.load_base(str(tmp_path / "nf4"), device="cpu")
    in_memory, _ = lorakit.load_base(str(folder), device="cpu", quantize="nf4")
    with torch.no_grad():
        assert_close(quantized(IDS).logits, in_memory(IDS).logits)


def test_a_bitsandbytes_config_naming_no_bit_width_says_what_to_do(tmp_path):
    """``"quantization_config": {"quant_method": "bitsandbytes"}`` with neither load_in_4bit nor load_in_8bit (an
    edited or half-written config.json): the line named the two fields and no fix."""
    folder = make_model_folder(tmp_path / "plain")
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes"}
    (folder / "config.json").write_text(json.dumps(config))
    line = _refused("generate", "--model", folder, "--max-new-tokens", 1, "copy a :")
    assert "neither load_in_4bit nor load_in_8bit" in line and "delete it if the weights are 16-bit" in line, line


def test_nf4_loading_of_a_vision_language_folder_whose_text_layers_transformers_renames(tmp_path):
    """Qwen 3.5's vision-language folder keeps its text model under model.language_model.*; transformers builds
    Qwen3_5ForCausalLM (model.*) and renames as it loads, the NF4 loader read names as they are and refused the
    folder ("no tensor for model.layers.0.self_attn.q_proj.weight"). It now loads, with the 4-bit logits of the
    same text model saved on its own (read tensor by tensor)."""
    import transformers as tf

    torch.manual_seed(0)
    text = dict(vocab_size=40, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, bos_token_id=1, eos_token_id=3,
                pad_token_id=3, layer_types=["full_attention", "full_attention"])
    vision = dict(depth=1, hidden_size=32, num_heads=4, intermediate_size=48, out_hidden_size=32, patch_size=14,
                  spatial_merge_size=2)
    full = tf.Qwen3_5ForConditionalGeneration(tf.Qwen3_5Config(text_config=text, vision_config=vision,
                                                               image_token_id=39, video_token_id=38)).eval()
    folder = tmp_path / "qwen3_5"
    full.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    dense, tokenizer = lorakit.load_base(str(folder), device="cpu")
    dense.save_pretrained(tmp_path / "text")  # Qwen3_5ForCausalLM's own names: the streaming NF4 path reads it
    tokenizer.save_pretrained(tmp_path / "text")
    quantized, _ = lorakit.load_base(str(folder), device="cpu", quantize="nf4")
    reference, _ = lorakit.load_base(str(tmp_path / "text"), device="cpu", quantize="nf4")
    assert type(quantized.model.layers[0].mlp.down_proj).__name__ == "NF4Linear"
    with torch.no_grad():
        assert_close(quantized(IDS).logits, reference(IDS).logits)


def test_a_mixed_batch_through_copied_dbrx_experts_gives_each_row_its_adapter(tmp_path):
    """Two adapters that train DBRX's experts whole (--modules-to-save experts, what the warning above suggests),
    served together: a batch mixing them ran each row group's copy with the whole batch's routing ((rows x tokens, k)
    indices) and failed with an IndexError. Each row now gets its own adapter's logits."""
    base = _dbrx()
    for seed, name in ((1, "a"), (2, "b")):
        model = copy.deepcopy(base)
        lorakit.inject(model, lorakit.LoraConfig(target_modules=["Wqkv"], r=4, modules_to_save=["experts"]))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, parameter in lorakit.lora_parameters(model):
                parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
        lorakit.save_adapter(model, tmp_path / name)
    model = copy.deepcopy(base)
    for name in ("a", "b"):
        lorakit.load_adapter(model, str(tmp_path / name), adapter=name)
    with torch.no_grad():
        alone = {}
        for name in ("a", "b"):
            lorakit.set_adapter(model, name)
            alone[name] = model(IDS).logits
        assert (alone["a"] - alone["b"]).abs().max() > 1e-3
        with lorakit.mixed_batch(model, ["b", "a"]):
            mixed = model(IDS).logits
    assert_close(mixed[0], alone["b"][0])
    assert_close(mixed[1], alone["a"][1])
