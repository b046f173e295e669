"""Fifteenth new-user audit: model folders as people have them, given to lorakit as the base.

Each folder is the tiny test Llama (``make_model_folder``), or one built from transformers' config classes, changed
the way real downloads and older tools leave them: an index that leaves out a shard the folder holds, a config.json
that names flash-attention (fine-tuning guides tell people to add it), a rotary type transformers no longer has
(Phi-3's "su"), transformers 4.x's "torch_dtype", weights quantized by GPTQ / AWQ / FP8 / compressed-tensors, an
``org/name`` id that ``hf download`` put in the Hugging Face cache (or did not), a cache snapshot whose links point at
deleted blobs, and a float16 folder trained on a CPU. The rule: each works (the logits are those of transformers'
own load of the same folder) or is refused in one stderr line that says what to do, and a refused command writes
nothing. ``lorakit generate`` / ``train`` (2 steps) / ``merge`` / ``quantize`` run in-process.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import lorakit
from conftest import assert_close, tiny_llama
from test_newuser_audit_13_models import PROMPT, TRAIN, _cache_entry, _edit_json, _refused, _run
from test_train_helpers import make_model_folder, task_records, tiny_tokenizer, write_jsonl

IDS = torch.tensor([[1, 7, 10, 11, 8, 3]])


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """A plain tiny folder, the same folder in 20 KB shards, an adapter of it and training data, shared below."""
    root = tmp_path_factory.mktemp("audit15")
    make_model_folder(root / "plain")
    write_jsonl(root / "train.jsonl", task_records(8, seed=1))
    model, _ = lorakit.load_base(str(root / "plain"), device="cpu")
    shutil.copytree(root / "plain", root / "sharded")
    (root / "sharded" / "model.safetensors").unlink()
    model.save_pretrained(root / "sharded", max_shard_size="20KB")
    lorakit.inject(model, lorakit.LoraConfig(r=2))
    lorakit.save_adapter(model, str(root / "adapter"))
    return root


def _copy(root: Path, name: str, source: str = "plain") -> Path:
    folder = root / name
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(root / source, folder)
    return folder


def _transformers_logits(folder: Path, dtype=torch.float32, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, **kwargs).eval()
    with torch.no_grad():
        return model(IDS).logits


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


def test_a_shard_the_index_leaves_out_is_named_not_called_another_models(root, tmp_path):
    """model-00004-of-00004.safetensors in the folder, but the index (from another download, or cut) maps none of
    its tensors: the load said the weights "lack 4 of the model's tensors ... config.json is for another model", and
    --quantize nf4 "no tensor for ...". Both now name the shard and the index to download again. A leftover shard
    whose tensors the index maps to other files is ignored, as transformers ignores it."""
    folder = _copy(root, "unlisted", "sharded")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    last = max(index["weight_map"].values())
    index["weight_map"] = {key: shard for key, shard in index["weight_map"].items() if shard != last}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    for command in (("generate", "--model", folder, "--max-new-tokens", 2, PROMPT),
                    ("quantize", "--model", folder, "--out", tmp_path / "nf4")):
        line = _refused(*command)
        assert f"{last} holds" in line and "model.safetensors.index.json does not list" in line, line
        assert "download model.safetensors.index.json again" in line and "another model" not in line, line
    assert not (tmp_path / "nf4").exists()

    stale = _copy(root, "stale-shard", "sharded")  # a copy of a listed shard under an unlisted number
    first = min(json.loads((stale / "model.safetensors.index.json").read_text())["weight_map"].values())
    total = first.rsplit("-of-", 1)[1]
    shutil.copy(stale / first, stale / f"model-00099-of-{total}")
    model, _ = lorakit.load_base(str(stale), device="cpu")
    assert_close(_logits(model), _transformers_logits(root / "plain"))


def test_a_config_naming_flash_attention_loads_with_the_attention_asked_for(root, tmp_path):
    """``"_attn_implementation": "flash_attention_2"`` in config.json (Qwen's fine-tuning guide says to add it; such
    folders get copied to machines without flash-attn) overrode lorakit's sdpa: "cannot load the model ...
    FlashAttention2 has been toggled on, but ... not installed". The model now loads with sdpa (transformers' logits)
    and trains; the merged folder does not carry the setting."""
    folder = _copy(root, "flash")
    _edit_json(folder / "config.json", lambda d: d.update(_attn_implementation="flash_attention_2"))
    model, _ = lorakit.load_base(str(folder), device="cpu")
    assert model.config._attn_implementation == "sdpa"
    assert_close(_logits(model), _transformers_logits(root / "plain"))
    code, out, err = _run("train", "--model", folder, "--data", root / "train.jsonl", *TRAIN, "--out", tmp_path / "run")
    assert code == 0, err
    code, out, err = _run("merge", "--model", folder, "--adapter", tmp_path / "run" / "adapter", "--out",
                          tmp_path / "merged", "--dtype", "fp32")
    assert code == 0, err
    assert "_attn_implementation" not in json.loads((tmp_path / "merged" / "config.json").read_text())


def test_a_rotary_type_transformers_lacks_is_one_line_that_says_the_new_name(root, tmp_path):
    """Phi-3's old rotary type "su" (its 2024 downloads): in a Llama config generate said only "cannot load the model
    in X: 'su'" and --quantize nf4 was a KeyError traceback, after transformers logged "Missing validation function"
    at each config read; in a Phi-3 config transformers 5 failed as "Missing required keys in `rope_parameters` for
    'rope_type'='longrope'" (its class renames "su" after that check). Now one line, naming the field and the new
    name; the Phi-3 folder with "longrope" written in, as the line says, gives transformers' logits."""
    from transformers import Phi3Config, Phi3ForCausalLM

    folder = _copy(root, "su")
    _edit_json(folder / "config.json", lambda d: (d.pop("rope_parameters", None), d.update(
        rope_scaling={"type": "su", "long_factor": [1.0] * 4, "short_factor": [1.0] * 4})))
    for command in (("generate", "--model", folder, "--max-new-tokens", 2, PROMPT),
                    ("train", "--model", folder, "--quantize", "nf4", "--data", root / "train.jsonl", *TRAIN,
                     "--out", tmp_path / "run")):
        line = _refused(*command)
        assert "rotary embedding type 'su'" in line and '"rope_scaling"' in line and 'write "longrope"' in line, line
    assert not (tmp_path / "run").exists()

    phi3 = tmp_path / "phi3"
    torch.manual_seed(0)
    Phi3ForCausalLM(Phi3Config(vocab_size=32, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                               original_max_position_embeddings=64, bos_token_id=1, eos_token_id=3, pad_token_id=3,
                               rope_scaling={"type": "longrope", "long_factor": [1.5] * 4, "short_factor": [1.0] * 4,
                                             "original_max_position_embeddings": 64})).save_pretrained(phi3)
    tiny_tokenizer().save_pretrained(phi3)
    old = {"type": "su", "long_factor": [1.5] * 4, "short_factor": [1.0] * 4}  # as the 2024 config.json has it
    _edit_json(phi3 / "config.json", lambda d: d.update(rope_scaling=old) or d.pop("rope_parameters"))
    line = _refused("generate", "--model", phi3, PROMPT)
    assert "rotary embedding type 'su'" in line and 'write "longrope"' in line, line
    _edit_json(phi3 / "config.json", lambda d: d["rope_scaling"].update(type="longrope"))
    model, _ = lorakit.load_base(str(phi3), device="cpu")
    assert model.config.rope_parameters["rope_type"] == "longrope"
    assert_close(_logits(model), _transformers_logits(phi3))


def test_a_transformers_4_config_logs_no_torch_dtype_deprecation(root, monkeypatch):
    """Every folder transformers 4.x saved says "torch_dtype"; lorakit's own field check read that property of a
    5.x config, which logged "`torch_dtype` is deprecated! Use `dtype` instead!" on every lorakit train, a warning
    about code the user never wrote. The field is still checked (a dtype that is not one is refused)."""
    import transformers.configuration_utils as configuration_utils

    from lorakit.models.loading import check_causal_config

    said = []
    monkeypatch.setattr(configuration_utils.logger, "warning_once", lambda message, *a, **k: said.append(message))
    folder = _copy(root, "torch-dtype")
    _edit_json(folder / "config.json", lambda d: (d.pop("dtype"), d.update(torch_dtype="bfloat16")))
    check_causal_config(folder)
    assert not [m for m in said if "torch_dtype" in m], said
    _edit_json(folder / "config.json", lambda d: d.update(torch_dtype="auto"))
    with pytest.raises(lorakit.LorakitError, match='"torch_dtype": "auto" is not a torch dtype'):
        check_causal_config(folder)


@pytest.mark.parametrize("method, name", [("gptq", "GPTQ"), ("awq", "AWQ"), ("fp8", "FP8"),
                                          ("compressed-tensors", "compressed-tensors")])
def test_weights_quantized_by_another_method_are_refused_by_name_before_anything_is_written(root, tmp_path, method,
                                                                                           name):
    """A GPTQ / AWQ / FP8 / compressed-tensors download: refused in one line that names the method and says what to
    use (the unquantized model, with --quantize nf4 for a 4-bit base), by generate, train and merge, with no run
    or merge folder left. train's first line called such a folder "NF4 4-bit base: QLoRA, a 4-bit folder"."""
    folder = _copy(root, f"q-{method}")
    _edit_json(folder / "config.json", lambda d: d.update(quantization_config={"quant_method": method, "bits": 4}))
    code, out, err = _run("train", "--model", folder, "--data", root / "train.jsonl", *TRAIN, "--out", tmp_path / "run")
    assert code == 2 and "NF4" not in out and len(err.strip().splitlines()) == 1, (out, err)
    lines = [err.strip(), _refused("generate", "--model", folder, PROMPT)]
    lines.append(_refused("merge", "--model", folder, "--adapter", root / "adapter", "--out", tmp_path / "merged"))
    for line in lines:
        assert f"quantized with {name}" in line and f"quant_method is '{method}'" in line, line
        assert "unquantized model" in line and "--quantize nf4" in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "merged").exists()


def test_a_quantization_config_that_is_not_an_object_names_the_field(root):
    """It said "'str' object has no attribute 'to_dict'; fix that field", naming no field."""
    folder = _copy(root, "q-string")
    _edit_json(folder / "config.json", lambda d: d.update(quantization_config="gptq"))
    line = _refused("generate", "--model", folder, PROMPT)
    assert '"quantization_config" must be an object' in line and "to_dict" not in line, line


def test_a_hub_id_reads_the_hugging_face_cache_and_one_not_there_says_how_to_get_it(root, tmp_path, monkeypatch):
    """``hf download org/name`` without --local-dir fills the cache (HF_HUB_CACHE, HF_HOME/hub); lorakit then refused
    --model org/name as "neither an embedded model nor a local folder" and told people to run
    `huggingface-cli download`, a command huggingface_hub 1.x no longer has. The id now loads from the cache (no
    network), is what adapter_config.json names as the base (as peft writes it), and works for train, generate and
    merge; an id not in the cache says `hf download` and where the cache is; an entry with no finished snapshot
    says to download again."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    _cache_entry(root / "plain", cache / "models--org--tiny")
    model, _ = lorakit.load_base("org/tiny", device="cpu")
    assert_close(_logits(model), _transformers_logits(root / "plain"))
    code, out, err = _run("train", "--model", "org/tiny", "--data", root / "train.jsonl", *TRAIN, "--out",
                          tmp_path / "run")
    assert code == 0, err
    saved = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == "org/tiny"
    code, out, err = _run("generate", "--model", "org/tiny", "--adapter", tmp_path / "run" / "adapter",
                          "--max-new-tokens", 2, PROMPT)
    assert code == 0 and "Traceback" not in err, err
    line = _refused("merge", "--adapter", tmp_path / "run" / "adapter", "--out", tmp_path / "merged")
    assert line.endswith("was trained on 'org/tiny' (base_model_name_or_path in its adapter_config.json), not on the "
                         "default --model smollm2-135m; pass --model org/tiny"), line  # it is there: no download
    code, out, err = _run("merge", "--model", "org/tiny", "--adapter", tmp_path / "run" / "adapter", "--out",
                          tmp_path / "merged", "--dtype", "fp32")
    assert code == 0, err
    lorakit.load_adapter(model, str(tmp_path / "run" / "adapter"))
    assert_close(_transformers_logits(tmp_path / "merged"), _logits(model))

    line = _refused("generate", "--model", "org/absent", PROMPT)
    assert "`hf download org/absent` puts it there, then pass the same id" in line and str(cache) in line, line
    assert "huggingface-cli" not in line and "--local-dir absent" in line, line
    (cache / "models--org--cut" / "snapshots" / "abc").mkdir(parents=True)  # a download stopped before config.json
    line = _refused("generate", "--model", "org/cut", PROMPT)
    assert "no snapshot there holds config.json" in line and "hf download org/cut" in line, line


@pytest.mark.parametrize("name", ["model.safetensors", "tokenizer.json", "config.json"])
def test_a_cache_snapshot_linking_to_a_deleted_blob_names_the_file(root, tmp_path, name):
    """A Hugging Face cache snapshot is links into blobs/; a blob removed by a cache cleanup or never finished left
    "model.safetensors: No such file or directory", "Couldn't instantiate the backend tokenizer", or "has no
    config.json". Now one line naming the link, its missing target and how to download again."""
    snapshot = _cache_entry(root / "plain", tmp_path / "models--org--tiny")
    target = os.readlink(snapshot / name)
    (snapshot / name).resolve().unlink()
    line = _refused("generate", "--model", snapshot, PROMPT)
    assert f"{name} is a link to {target}, which does not exist" in line and "hf download" in line, line


def test_a_float16_folder_trains_on_cpu_in_float32_and_merges_back_to_float16(root, tmp_path):
    """A float16 folder on a CPU: lorakit loads float32 (transformers' logits of the folder read as float32), the
    adapter trains, and merge writes float16 again, the folder's own dtype; --dtype fp16 keeps float16 on the CPU."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "fp16"
    tiny_llama(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2).half().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    model, _ = lorakit.load_base(str(folder), device="cpu")
    assert model.dtype == torch.float32
    assert_close(_logits(model), _transformers_logits(folder))
    half, _ = lorakit.load_base(str(folder), device="cpu", dtype="fp16")
    assert half.dtype == torch.float16
    code, out, err = _run("train", "--model", folder, "--data", root / "train.jsonl", *TRAIN, "--out", tmp_path / "run")
    assert code == 0, err
    code, out, err = _run("merge", "--model", folder, "--adapter", tmp_path / "run" / "adapter", "--out",
                          tmp_path / "merged")
    assert code == 0, err
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert merged.dtype == torch.float16
    lorakit.load_adapter(model, str(tmp_path / "run" / "adapter"))
    assert_close(_logits(merged.float()), _logits(model), dtype=torch.float16)  # weights rounded to float16 once


def test_a_tied_config_whose_file_holds_its_own_head_loads_as_transformers_reads_it(tmp_path):
    """"tie_word_embeddings": true, and the file holds lm_head.weight too (exporters write both; a head trained apart
    and merged by a tool that left the config alone makes them differ). transformers keeps such a head untied; the
    16-bit load agreed, but --quantize nf4 tied it to the embedding anyway: other logits (off by 15 on the tiny
    model) than lorakit.quantize of the 16-bit load. A head equal to the embedding, or none in the file, stays tied;
    a file holding the head alone (no embedding) is tied the other way, as transformers reads it: --quantize nf4
    said "1 tensor(s) missing ... 'model.embed_tokens.weight'"."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "tied-twice"
    tiny_llama(vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2,
               tie_word_embeddings=True).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    tensors = load_file(folder / "model.safetensors")
    assert "lm_head.weight" not in tensors
    for head, tied in ((tensors["model.embed_tokens.weight"].clone(), True),
                       (torch.randn_like(tensors["model.embed_tokens.weight"]), False)):
        save_file({**tensors, "lm_head.weight": head}, folder / "model.safetensors", metadata={"format": "pt"})
        dense, _ = lorakit.load_base(str(folder), device="cpu")
        assert_close(_logits(dense), _transformers_logits(folder))
        nf4, _ = lorakit.load_base(str(folder), device="cpu", quantize="nf4")
        assert (nf4.lm_head.weight is nf4.model.embed_tokens.weight) == tied
        lorakit.quantize(dense, "nf4")
        assert torch.equal(_logits(nf4), _logits(dense)), tied
    head_only = {key: value for key, value in tensors.items() if key != "model.embed_tokens.weight"}
    head_only["lm_head.weight"] = tensors["model.embed_tokens.weight"]
    save_file(head_only, folder / "model.safetensors", metadata={"format": "pt"})
    dense, _ = lorakit.load_base(str(folder), device="cpu")
    assert_close(_logits(dense), _transformers_logits(folder))
    nf4, _ = lorakit.load_base(str(folder), device="cpu", quantize="nf4")
    assert nf4.lm_head.weight is nf4.model.embed_tokens.weight
    lorakit.quantize(dense, "nf4")
    assert torch.equal(_logits(nf4), _logits(dense))


def _tokenizer_past_the_rows(root: Path, name: str, added: list[str], pad: str | None = None) -> Path:
    """The plain folder (32 embedding rows) with tokens added to its tokenizer and not to the model."""
    folder = _copy(root, name)
    tokenizer = tiny_tokenizer()
    tokenizer.add_tokens(added)
    if pad is not None:
        tokenizer.add_special_tokens({"pad_token": pad})
    tokenizer.save_pretrained(folder)
    assert len(tokenizer) > 32
    return folder


def test_a_pad_token_added_past_the_embedding_rows_pads_with_eos_instead(root, tmp_path):
    """Llama 2 fine-tunes added "[PAD]" as id 32000 to a 32000-row model: lorakit padded batches with it and
    training stopped at the first step with "IndexError: index out of range in self". Padding is masked out, so
    the eos token pads instead, said in one warning; the run trains."""
    folder = _tokenizer_past_the_rows(root, "pad-past", [f"w{i}" for i in range(14)], pad="[PAD]")
    with pytest.warns(UserWarning, match=r"pad token '\[PAD\]' is id 32, past the model's embedding rows .* so the "
                                         r"eos token '<\|im_end\|>' pads instead"):
        model, tokenizer = lorakit.load_base(str(folder), device="cpu")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == 3
    batch_4 = [4 if previous == "--batch-size" else a for previous, a in zip((None, *TRAIN), TRAIN)]  # given once
    code, out, err = _run("train", "--model", folder, "--data", root / "train.jsonl", *batch_4, "--out", tmp_path / "run")
    assert code == 0 and "Traceback" not in err, err
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()


def test_data_holding_a_token_past_the_embedding_rows_is_refused_by_name(root, tmp_path):
    """Tokens added to the tokenizer without resizing the model: a training (or evaluation) example holding one
    stopped lorakit train and lorakit eval with "IndexError: index out of range in self" (a traceback, after the
    model had loaded). Now one line naming the token and how to resize the model; no run folder is left."""
    folder = _tokenizer_past_the_rows(root, "tokens-past", [f"w{i}" for i in range(20)])
    data = write_jsonl(tmp_path / "new-words.jsonl", [{"prompt": "reverse a b w19 :", "completion": "w19 b a"}] * 4)
    line = _refused("train", "--model", folder, "--data", data, *TRAIN, "--out", tmp_path / "run")
    assert "the training data holds the token 'w19' (id 37; 4 rows hold ids past the model's 32 embedding rows)" in line
    assert "resize_token_embeddings(len(tokenizer))" in line, line
    assert not (tmp_path / "run").exists()
    line = _refused("eval", "--model", folder, "--data", data)
    assert "the evaluation data holds the token 'w19'" in line, line
    code, out, err = _run("train", "--model", folder, "--data", root / "train.jsonl", *TRAIN, "--out", tmp_path / "ok")
    assert code == 0, err  # data of the model's own tokens trains as before


@pytest.mark.parametrize("tokenizer_class", [None, "LlamaTokenizer", "GPT2Tokenizer"])
def test_a_tokenizer_config_without_its_vocabulary_is_refused_not_an_empty_tokenizer(root, tokenizer_class):
    """tokenizer_config.json downloaded without tokenizer.json (or tokenizer.model / vocab.json): transformers 5
    builds a tokenizer of the special tokens alone where the config names a class (LlamaTokenizer: 4 tokens, every
    text encoded to []), so lorakit generate answered an empty line with exit 0 and training would have trained
    on nothing; without a class it said "Couldn't instantiate the backend tokenizer from one of:". One line now."""
    folder = _copy(root, f"no-vocabulary-{tokenizer_class}")
    (folder / "tokenizer.json").unlink()
    if tokenizer_class:
        _edit_json(folder / "tokenizer_config.json", lambda d: d.update(tokenizer_class=tokenizer_class))
    line = _refused("generate", "--model", folder, PROMPT)
    assert "has tokenizer_config.json but no vocabulary file for it" in line, line
    assert "download the model's tokenizer files into the same folder" in line, line


def test_a_bpe_vocabulary_without_its_merges_names_merges_txt(tmp_path):
    """A GPT-2-style tokenizer as vocab.json + merges.txt alone loads (and tokenizes with the merges); with
    merges.txt missing it said "`vocab` and `merges` must be both be from memory or both filenames"."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz:Ġ")}}
    vocab["Ġa"] = len(vocab)
    folder = tmp_path / "gpt2-files"
    folder.mkdir()
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nĠ a\n")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=4, n_positions=64,
                               bos_token_id=0, eos_token_id=0)).save_pretrained(folder)
    _, tokenizer = lorakit.load_base(str(folder), device="cpu")
    assert tokenizer(" a b")["input_ids"] == [vocab["Ġa"], vocab["Ġ"], vocab["b"]]
    (folder / "merges.txt").unlink()
    line = _refused("generate", "--model", folder, "a b")
    assert "has the tokenizer's vocab.json but not its merges.txt" in line, line


@pytest.mark.parametrize("both_keys", [False, True])
def test_an_mlx_quantized_folder_is_named_as_such(root, tmp_path, both_keys):
    """mlx-community's 4-bit folders: "quantization": {"group_size", "bits"} in config.json (newer mlx-lm writes the
    same dict as a quantization_config with no quant_method) and packed weights with .scales / .biases. It said
    "tensor ... is (32, 5) in the weights but config.json makes it (32, 40) ... an edited vocab_size or
    hidden_size?" (or "quantization_config has neither load_in_4bit nor load_in_8bit set"); now one line naming
    MLX and what to use instead."""
    from safetensors.torch import load_file, save_file

    folder = _copy(root, f"mlx-{both_keys}")
    packed = {}
    for key, tensor in load_file(folder / "model.safetensors").items():
        if key.endswith("proj.weight"):  # 4-bit values, 8 to a 32-bit word; a scale and a bias per 32 inputs
            rows, columns = tensor.shape
            packed[key] = torch.zeros(rows, columns // 8, dtype=torch.int32)
            packed[key.replace(".weight", ".scales")] = torch.ones(rows, max(columns // 32, 1), dtype=torch.float16)
            packed[key.replace(".weight", ".biases")] = torch.zeros(rows, max(columns // 32, 1), dtype=torch.float16)
        else:
            packed[key] = tensor
    save_file(packed, folder / "model.safetensors", metadata={"format": "mlx"})
    quantization = {"group_size": 32, "bits": 4}
    _edit_json(folder / "config.json", lambda d: d.update(
        quantization=quantization, **({"quantization_config": quantization} if both_keys else {})))
    for command in (("generate", "--model", folder, PROMPT),
                    ("train", "--model", folder, "--quantize", "nf4", "--data", root / "train.jsonl", *TRAIN, "--out",
                     tmp_path / "run")):
        line = _refused(*command)
        assert "quantized by MLX" in line and "unquantized model" in line and "--quantize nf4" in line, line
    assert not (tmp_path / "run").exists()


def test_a_model_folder_holding_an_adapter_too_is_refused_before_peft_applies_it(root, tmp_path):
    """A merged model saved into the folder that held its adapter (or an adapter copied beside a model to make one
    repository): transformers' from_pretrained applied that adapter through peft while loading, so lorakit train
    refused "this model holds peft's adapter layers ... the base without PeftModel" after the whole load. A trainer's
    output folder (adapter files and the base's config.json, no weights) said "config.json but no weights". Each is
    now one line, before loading, saying which folder goes where."""
    folder = _copy(root, "model-and-adapter")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(root / "adapter" / name, folder / name)
    line = _refused("train", "--model", folder, "--data", root / "train.jsonl", *TRAIN, "--out", tmp_path / "run")
    assert "holds a model and an adapter (adapter_config.json)" in line and "--adapter" in line, line
    assert "PeftModel" not in line and not (tmp_path / "run").exists()
    with pytest.raises(lorakit.LorakitError, match="holds a model and an adapter"):
        lorakit.load_base(str(folder), device="cpu")

    output = tmp_path / "trainer-output"
    shutil.copytree(root / "adapter", output)
    shutil.copy(root / "plain" / "config.json", output / "config.json")
    line = _refused("generate", "--model", output, PROMPT)
    assert "is an adapter folder (adapter_config.json; the config.json beside it is its base's" in line, line


@pytest.mark.parametrize("name, words", [("consolidated.safetensors", "Mistral's native weights"),
                                         ("weights.safetensors", "rename a single file holding the whole model"),
                                         ("model-00001-of-00002.safetensors", "download the index of the shards")])
def test_safetensors_under_a_name_transformers_does_not_read_are_named(root, tmp_path, name, words):
    """No model.safetensors and no index, but other safetensors (Mistral's consolidated.safetensors fetched alone, a
    renamed file, shards without their index): the 16-bit load said transformers' "Error no file named
    model.safetensors found in directory", while --quantize nf4 read whatever file was there. Both say the same
    line now, with the fix for what the folder holds."""
    folder = _copy(root, f"named-{name}")
    (folder / "model.safetensors").rename(folder / name)
    for command in (("generate", "--model", folder, PROMPT), ("quantize", "--model", folder, "--out", tmp_path / "q")):
        line = _refused(*command)
        assert f"has no model.safetensors and no model.safetensors.index.json, only {name}" in line and words in line
    assert not (tmp_path / "q").exists()


def test_the_rotary_check_refuses_no_causal_lm_family_transformers_builds(tmp_path):
    """The check above must not refuse a family whose config transformers makes itself: each causal-LM config
    class's defaults (about 200, MusicGen's two text configs included) pass it."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from lorakit.models.rope_types import check_rope_types

    checked = 0
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        try:
            config = CONFIG_MAPPING[model_type]()
        except Exception:  # a class that needs arguments
            continue
        check_rope_types(config, model_type, tmp_path)
        checked += 1
    assert checked > 100
