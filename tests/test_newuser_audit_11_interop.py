"""A new user's own peft adapters and model folders (audit 11): the defects found, each as a regression test.

The audit built tiny random models of many families (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, GPT-2, GPT-NeoX,
Falcon, OPT, Bloom, GPT-J, StableLM, Mixtral, Qwen2/3-MoE), gave them adapters made by the real peft package with the
options users set, and compared lorakit's logits, merges and saved files with peft's. What already agreed is tested
elsewhere (test_peft_sweep, test_peft_audit, test_model_folders); here are the cases that did not.
"""

from __future__ import annotations

import re
import warnings

import peft
import pytest
import torch
import transformers as tf

import lorakit
from conftest import assert_close
from model_helpers import logits

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def build(kind: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    makers = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)),
        "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=8, **SMALL)),
    }
    return makers[kind]().eval()


def randomize(model, seed: int = 1) -> None:
    """Non-zero B and trained-looking copies, so an adapter that is dropped or misapplied shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name or "trainable_tokens_delta" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "modules_to_save" in name:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def peft_folder(folder, kind: str = "llama", seed: int = 1, **options):
    """peft's adapter on ``build(kind)``, randomized and saved to ``folder``; returns the PeftModel."""
    theirs = peft.get_peft_model(build(kind), peft.LoraConfig(r=4, lora_alpha=8, **options)).eval()
    randomize(theirs, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on tied embeddings and saved embedding layers
        theirs.save_pretrained(folder)
    return theirs


IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 99]])


# -- modules_to_save names are path endings, as peft matches them ---------------------------------------------------
def _round_trip(theirs, tmp_path) -> None:
    """The peft adapter in tmp_path/peft loads into lorakit with peft's logits, saves back to a folder peft reads with
    the same logits, and merges as peft's merge_and_unload does."""
    ours = build()
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert_close(logits(ours, IDS), logits(theirs, IDS))
    lorakit.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    assert_close(logits(again, IDS), logits(theirs, IDS))
    lorakit.merge_and_unload(ours)
    assert_close(logits(ours, IDS), logits(theirs.merge_and_unload(), IDS))


@pytest.mark.parametrize("names", [["norm"], ["head"]])
def test_modules_to_save_names_match_as_peft_matches_them(names, tmp_path):
    """peft wraps every module whose path ends with a name (``key.endswith(name)``, no dot needed): ["norm"] trains
    each input_layernorm / post_attention_layernorm and model.norm, ["head"] the lm_head. lorakit took only whole
    segments, so the file's other copies were "unexpected tensor keys" (and lm_head's copy was blamed on
    save_embedding_layers)."""
    theirs = peft_folder(tmp_path / "peft", target_modules=["q_proj"], modules_to_save=names)
    _round_trip(theirs, tmp_path)


# -- one module cannot hold LoRA of one adapter and a whole copy of another -----------------------------------------
@pytest.mark.parametrize("first, second", [("lora", "tokens"), ("tokens", "lora"), ("lora", "copy"), ("copy", "lora")])
def test_lora_and_a_whole_copy_of_one_module_is_one_line(first, second, tmp_path):
    """Adapter 1 puts LoRA on embed_tokens, adapter 2 trains a whole copy of it (modules_to_save, or peft's
    trainable_token_indices, which lorakit loads as a copy), or the reverse: a TypeError from inside inject. Now a
    LorakitError naming the module and both adapters, and the model keeps only the first adapter."""
    options = {"lora": dict(target_modules=["embed_tokens", "q_proj"]),
               "tokens": dict(target_modules=["q_proj"], trainable_token_indices=[1, 5]),
               "copy": dict(target_modules=["v_proj"], modules_to_save=["embed_tokens"])}
    peft_folder(tmp_path / "one", **options[first])
    peft_folder(tmp_path / "two", seed=2, **options[second])
    model = build()
    lorakit.load_adapter(model, tmp_path / "one", adapter="one")
    before = logits(model, IDS)
    with pytest.raises(lorakit.LorakitError, match=r"model\.embed_tokens: adapter 'two' puts .*adapter 'one' already has"):
        lorakit.load_adapter(model, tmp_path / "two", adapter="two")
    assert lorakit.adapter_names(model) == ["one"]
    assert_close(logits(model, IDS), before)


def test_generate_names_the_clashing_adapters_by_their_folders(tmp_path, capsys):
    """The same clash from ``lorakit generate --adapter A --adapter B``: one line naming the folders the user gave,
    not the command's internal names ('adapter0', 'adapter1')."""
    from lorakit.cli import main
    from test_train_helpers import make_model_folder

    base = make_model_folder(tmp_path / "base")
    for name, options in (("emb", dict(target_modules=["embed_tokens", "q_proj"])),
                          ("tokens", dict(target_modules=["q_proj"], trainable_token_indices=[4, 5]))):
        theirs = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(r=4, **options))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs.save_pretrained(tmp_path / name)
    code = main(["generate", "--model", str(base), "--adapter", str(tmp_path / "emb"), "--adapter", str(tmp_path / "tokens"),
                 "--max-new-tokens", "2", "a b"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("lorakit generate: error:")]
    assert code == 2 and len(errors) == 1
    assert f"adapter '{tmp_path / 'tokens'}' puts a whole trained copy" in errors[0] and "'adapter0'" not in errors[0]


# -- peft's embedding copies and biases, on a base loaded in another precision ---------------------------------------
def rounded(model, dtype):
    """``model`` in ``dtype``; "bf16-in-fp32": float32 holding bfloat16 values, as an NF4 folder's embedding (stored
    in bfloat16) loads with ``dtype="float32"``."""
    return model.to(torch.bfloat16).float() if dtype == "bf16-in-fp32" else model.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, "bf16-in-fp32"])
def test_embedding_copy_saved_from_float32_loads_on_a_16_bit_base(dtype, tmp_path):
    """peft saves a full copy of a targeted embedding (save_embedding_layers) in the training dtype, float32 here;
    the same base loaded in bf16 (lorakit's default on CUDA, ``--dtype bf16``) or from an NF4 folder (embedding
    stored in bf16) was refused as "a full copy that differs from this model's". Up to one 16-bit rounding, it is
    the same base."""
    peft_folder(tmp_path, target_modules=["embed_tokens", "q_proj"])
    theirs = peft.PeftModel.from_pretrained(rounded(build(), dtype), tmp_path).eval()
    ours = rounded(build(), dtype)
    lorakit.load_adapter(ours, tmp_path)
    # peft loads the float32 copy over the embedding, lorakit keeps the model's rounded one: one bfloat16 rounding
    assert_close(logits(ours, IDS), logits(theirs, IDS), dtype=torch.bfloat16 if dtype == "bf16-in-fp32" else None)
    other = rounded(build(), dtype)
    with torch.no_grad():
        other.model.embed_tokens.weight[7] += 0.05  # a retrained row is still another base
    with pytest.raises(lorakit.LorakitError, match="full copy of model.embed_tokens.weight .*differs"):
        lorakit.load_adapter(other, tmp_path)


def test_a_float32_copy_that_differs_by_less_than_a_16_bit_rounding_is_still_another_base(tmp_path):
    """The 16-bit tolerance above is for a model that holds 16-bit values; on a float32 model a copy must match
    exactly, so a slightly retrained embedding is not taken for this base."""
    peft_folder(tmp_path, target_modules=["embed_tokens", "q_proj"])
    other = build()
    with torch.no_grad():
        other.model.embed_tokens.weight[7] *= 1.001
    with pytest.raises(lorakit.LorakitError, match="full copy of model.embed_tokens.weight .*differs"):
        lorakit.load_adapter(other, tmp_path)


# -- lorakit merge of a tied model whose output head is wrapped too -------------------------------------------------
@pytest.mark.parametrize("options", [dict(target_modules=["embed_tokens", "q_proj"], ensure_weight_tying=True),
                                     dict(target_modules=["embed_tokens"], modules_to_save=["lm_head"])])
def test_merged_folder_of_a_tied_model_with_a_wrapped_head(options, tmp_path):
    """Gemma 3's head is tied to its embedding. With LoRA on both (peft's ensure_weight_tying) or a trained copy of
    the head, ``lorakit merge`` failed with KeyError "attribute 'weight' already exists" while untying the head."""
    from lorakit.export import export_merged

    theirs = peft_folder(tmp_path / "adapter", kind="gemma3", **options)
    ours = build("gemma3")
    lorakit.load_adapter(ours, tmp_path / "adapter")
    export_merged(ours, None, "default", tmp_path / "merged")
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(logits(merged, IDS), logits(theirs, IDS))


# -- the server's refusals, in the names its operator and clients use ------------------------------------------------
def test_server_names_the_other_adapter_as_clients_know_it(tmp_path):
    """The LoRA-beside-a-copy clash in ``lorakit serve``: a 4xx refusal (it was a TypeError) that names the adapters by
    their folders, not by the pool's internal names (lk0, lk1)."""
    import threading

    from lorakit.serve.pool import AdapterPool, AdapterRejected

    peft_folder(tmp_path / "adapters" / "emb", target_modules=["embed_tokens", "q_proj"])
    peft_folder(tmp_path / "adapters" / "tokens", seed=2, target_modules=["q_proj"], trainable_token_indices=[1, 5])
    pool = AdapterPool(build(), tmp_path / "adapters", threading.RLock())
    pool.acquire("emb")
    with pytest.raises(AdapterRejected, match=r"^adapter 'tokens' refused: model\.embed_tokens: adapter 'tokens' puts .*"
                                              r"adapter 'emb' already has LoRA") as refused:
        pool.acquire("tokens")
    assert "'lk" not in str(refused.value)
    assert [a["name"] for a in pool.loaded()] == ["emb"]


def test_server_says_to_move_a_named_peft_adapter_up_into_its_folder(tmp_path):
    """peft's save_pretrained of an adapter named "orders" into adapters/orders writes adapters/orders/orders/; the
    server's refusal said "pass one of them, e.g. adapters/orders/orders", which no client can (names have no
    slash). It now says to move the files up."""
    import threading

    from lorakit.serve.pool import AdapterPool, AdapterRejected

    theirs = peft.get_peft_model(build(), peft.LoraConfig(r=4, target_modules=["q_proj"]), adapter_name="orders")
    theirs.save_pretrained(tmp_path / "adapters" / "orders")
    pool = AdapterPool(build(), tmp_path / "adapters", threading.RLock())
    with pytest.raises(AdapterRejected, match=r"adapter 'orders' refused: .*orders holds peft's named-adapter subfolder "
                                              r"orders instead of the adapter files: move the files of .*orders/orders up "
                                              r"into .*orders"):
        pool.acquire("orders")


# -- peft's trainable_token_indices beyond the input embedding -----------------------------------------------------
@pytest.mark.parametrize("tokens", [{"lm_head": [1, 2]}, {"embed_tokens": [1, 2], "lm_head": [3, 99]}])
def test_trainable_tokens_on_an_untied_output_head(tokens, tmp_path):
    """peft trains token rows of a linear output head too (F.linear with the rows replaced); lorakit refused the file
    as naming "no embedding of this model". Loaded as a whole copy of the head with those rows, like an embedding."""
    theirs = peft_folder(tmp_path / "peft", target_modules=["q_proj"], trainable_token_indices=tokens)
    _round_trip(theirs, tmp_path)


def test_trainable_tokens_beside_lora_on_the_tied_head_is_one_line(tmp_path):
    """Token rows on a tied embedding reach the output head too; with LoRA on that head as well the load failed
    with KeyError 'lora_B.weight'. lorakit holds either a copy or LoRA on a module: refused by name."""
    try:
        peft_folder(tmp_path, kind="gemma3", target_modules=["q_proj", "lm_head"], trainable_token_indices=[1, 2])
    except TypeError:  # peft 0.21 on transformers 4.x will not wrap the LoRA head in trainable tokens (5.x does)
        _tokens_beside_lora_head_file(tmp_path)
    model = build("gemma3")
    with pytest.raises(lorakit.LorakitError, match=r"trainable_token_indices: lm_head is also a LoRA target"):
        lorakit.load_adapter(model, tmp_path)
    assert not lorakit.adapter_names(model)


def _tokens_beside_lora_head_file(folder):
    """The file peft writes on transformers 5.x for LoRA on q_proj and the tied lm_head plus token rows 1, 2 of the
    embedding, put together from two peft files on any version: the LoRA one (less the head's base copy, which 5.x's
    file does not hold) and the token rows of one with trainable_token_indices."""
    import json

    from safetensors.torch import load_file, save_file

    peft_folder(folder, kind="gemma3", target_modules=["q_proj", "lm_head"])
    tokens = folder.with_name(folder.name + "-tokens")  # beside it: the adapter folder holds the adapter's files only
    peft_folder(tokens, kind="gemma3", target_modules=["q_proj"], trainable_token_indices=[1, 2])
    tensors = {k: v for k, v in load_file(folder / "adapter_model.safetensors").items() if ".base_layer." not in k}
    tensors.update({k: v for k, v in load_file(tokens / "adapter_model.safetensors").items()
                    if "trainable_tokens" in k})
    save_file(tensors, folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["trainable_token_indices"] = [1, 2]
    (folder / "adapter_config.json").write_text(json.dumps(config))


def test_a_tensor_the_saved_module_does_not_have_is_an_unexpected_key(tmp_path):
    """A file tensor under a modules_to_save path that the module has no such tensor for (another tool's extra, or
    LoRA on a module also listed in modules_to_save) was a KeyError from inside load_adapter."""
    from safetensors.torch import load_file, save_file

    peft_folder(tmp_path, target_modules=["q_proj"], modules_to_save=["lm_head"])
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 32)
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    model = build()
    with pytest.raises(lorakit.LorakitError, match=r"unexpected tensor keys for this model and config: "
                                                   r"base_model\.model\.lm_head\.lora_A\.weight"):
        lorakit.load_adapter(model, tmp_path)
    assert not lorakit.adapter_names(model)


def test_dora_magnitudes_under_a_config_without_use_dora_are_one_line(tmp_path):
    """A DoRA file whose config says use_dora false (edited by hand, or written by a tool that left the field out):
    peft drops the magnitudes with a warning; lorakit failed with AttributeError ('NoneType' ... 'copy_')."""
    import json

    peft_folder(tmp_path, target_modules=["q_proj"], use_dora=True)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "use_dora": False}))
    model = build()
    with pytest.raises(lorakit.LorakitError, match=r"lora_magnitude_vector is a DoRA magnitude, but adapter_config.json "
                                                   r"has no use_dora: true"):
        lorakit.load_adapter(model, tmp_path)
    assert not lorakit.adapter_names(model)


@pytest.mark.parametrize("options, line", [
    (dict(trainable_token_indices=[3, 5]), r"trainable tokens\s+\[3, 5\] \(2 trained rows; each module"),
    (dict(init_lora_weights="pissa"), r"init\s+pissa: peft rewrote the base; loads as rank 8 on the original base"),
])
def test_inspect_shows_what_changes_how_a_peft_adapter_loads(options, line, tmp_path, capsys):
    """``lorakit inspect`` of a trainable-tokens adapter said "modules to save: none" and nothing of the trained
    rows; of a PiSSA adapter, rank 4, where it loads (and counts against the server's --max-rank) at rank 8."""
    from lorakit.cli import main

    peft_folder(tmp_path, target_modules=["q_proj"], **options)
    assert main(["inspect", str(tmp_path)]) == 0
    assert re.search(line, capsys.readouterr().out)


# -- peft configs: another version's adapter_config.json, a LoraConfig object ----------------------------------------
def test_an_init_lorakit_does_not_know_is_refused_by_name():
    """peft raises "Unknown initialization" for an init_lora_weights it does not know; lorakit loaded it as plain
    LoRA, so an init of a newer peft that rewrote the base (as pissa does) would give wrong logits without a word."""
    read = lorakit.LoraConfig.from_peft_dict
    base = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    with pytest.raises(lorakit.LorakitError, match=r"init_lora_weights='spectral_v2' is not an init lorakit knows .*"
                                                   r"set it to true"):
        read({**base, "init_lora_weights": "spectral_v2"})
    for known in (True, False, None, "gaussian", "Gaussian", "eva", "orthogonal", "mica", "MiCA"):
        assert read({**base, "init_lora_weights": known}).r == 4


def test_a_peft_config_objects_dict_converts_with_exclude_modules():
    """lorakit.inject's own error says to pass LoraConfig.from_peft_dict(peft_config.to_dict()); peft keeps
    exclude_modules (like target_modules) as a set there, which was refused as "must be a list"."""
    theirs = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", exclude_modules=["down_proj", "up_proj"])
    ours = lorakit.LoraConfig.from_peft_dict(theirs.to_dict())
    assert ours.exclude_modules == ["down_proj", "up_proj"]
    from lorakit.inject import lora_layers

    model = build()
    lorakit.inject(model, ours)
    adapted = {name.rsplit(".", 1)[-1] for name in lora_layers(model)}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj"}


def test_a_peft_model_given_to_lorakit_is_named_as_such(tmp_path):
    """A PeftModel (PeftModel.from_pretrained(base, folder)) passed to lorakit.load_adapter / inject was refused with
    "target '...q_proj' is a Linear; lorakit adapts nn.Linear, ..." (peft's layer class is also called Linear)."""
    peft_folder(tmp_path / "one", target_modules=["q_proj"])
    peft_folder(tmp_path / "two", seed=2, target_modules=["v_proj"])
    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "one")
    for call in (lambda: lorakit.load_adapter(theirs, tmp_path / "two"),
                 lambda: lorakit.inject(theirs, lorakit.LoraConfig(target_modules=["q_proj"]))):
        with pytest.raises(lorakit.LorakitError, match=r"holds peft's adapter layers \(\S+ is peft's \w+\).*"
                                                       r"lorakit.load_adapter"):
            call()


# -- model folders that are not Hugging Face safetensors folders ------------------------------------------------------
def test_a_folder_of_pth_weights_is_refused_as_pickled_and_a_gguf_folder_is_named(tmp_path):
    """Meta's original checkpoints (consolidated.00.pth, pickled) got transformers' "no file named
    model.safetensors"; a downloaded GGUF repository folder got "has no config.json" with no word of the GGUF."""
    from test_train_helpers import tiny_tokenizer

    pth = tmp_path / "llama-original"
    build().config.save_pretrained(pth)
    tiny_tokenizer().save_pretrained(pth)
    torch.save({"tok_embeddings.weight": torch.zeros(2, 2)}, pth / "consolidated.00.pth")
    with pytest.raises(lorakit.LorakitError, match=r"holds only pickled weights \(consolidated\.00\.pth\); lorakit never "
                                                   r"unpickles"):
        lorakit.load_base(str(pth))
    gguf = tmp_path / "model-GGUF"
    gguf.mkdir()
    (gguf / "model-Q4_K_M.gguf").write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(lorakit.LorakitError, match=r"has no config.json; it holds model-Q4_K_M\.gguf, a GGUF file: .*"
                                                   r"gguf_file='model-Q4_K_M\.gguf'"):
        lorakit.load_base(str(gguf))

