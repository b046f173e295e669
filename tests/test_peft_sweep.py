"""Adapters saved by the real peft package, across architectures and LoraConfig options, loaded by lorakit (and back).

Each round trip: peft builds the adapter on a tiny random model and gives it random non-zero weights; lorakit loads
the saved folder into a fresh base (same logits as peft's PeftModel), merges (same logits as peft's
merge_and_unload), and saves it again for peft (same logits). Options lorakit cannot apply are refused in one line
that names them. test_peft_interop / test_peft_audit / test_architectures cover the cases not repeated here.
"""

from __future__ import annotations

import json
import shutil
import warnings

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file, save_file

import lorakit
from conftest import assert_close
from lorakit.inject import lora_layers
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from model_helpers import logits

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def build(kind: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of one transformers architecture (the same weights for the same seed)."""
    torch.manual_seed(seed)
    models = {
        "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, **SMALL)),
        "llama-tied": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=True, **SMALL)),
        "qwen2": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(num_key_value_heads=2, **SMALL)),  # q/k/v biases
        "qwen3": lambda: tf.Qwen3ForCausalLM(tf.Qwen3Config(num_key_value_heads=2, head_dim=8, **SMALL)),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(num_key_value_heads=2, **SMALL)),
        "gemma2": lambda: tf.Gemma2ForCausalLM(tf.Gemma2Config(num_key_value_heads=2, head_dim=8, **SMALL)),
        "phi3": lambda: tf.Phi3ForCausalLM(tf.Phi3Config(num_key_value_heads=2, pad_token_id=0, **SMALL)),
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64,
                                                         bos_token_id=0, eos_token_id=0)),
        "neox": lambda: tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(**SMALL)),
        "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                               num_attention_heads=4)),
        "bloom": lambda: tf.BloomForCausalLM(tf.BloomConfig(vocab_size=100, hidden_size=32, n_layer=2, n_head=4)),
        "starcoder2": lambda: tf.Starcoder2ForCausalLM(tf.Starcoder2Config(num_key_value_heads=2, **SMALL)),
        "llama-cls": lambda: tf.LlamaForSequenceClassification(tf.LlamaConfig(num_key_value_heads=2, num_labels=3,
                                                                              pad_token_id=0, **SMALL)),
        "bert-cls": lambda: tf.BertForSequenceClassification(tf.BertConfig(num_labels=3, **SMALL)),
    }
    return models[kind]().eval()


def randomize_peft(model, seed: int = 1, biases: bool = False) -> None:
    """Random non-zero LoRA weights (so the adapter matters), trained-looking copies and, if asked, biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude" in name:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))
            elif "lora_" in name or (p.requires_grad and "trainable_tokens_delta" in name):
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
            elif "modules_to_save" in name or (biases and p.requires_grad and name.endswith("bias")):
                p.add_(0.05 * torch.randn(p.shape, generator=gen))


def peft_saved(kind, folder, randomize=True, **options):
    """peft's adapter on ``build(kind)``, saved to ``folder``; returns the PeftModel."""
    options.setdefault("r", 4)
    options.setdefault("lora_alpha", 8)
    theirs = peft.get_peft_model(build(kind), peft.LoraConfig(**options)).eval()
    if randomize:
        randomize_peft(theirs)
    theirs.save_pretrained(folder)
    return theirs


def round_trip(kind, tmp_path, peft_merge_ok=True, **options):
    """peft -> lorakit (logits), lorakit merge vs peft merge_and_unload, lorakit -> peft (logits)."""
    ids = torch.randint(0, 100, (2, 7))
    theirs = peft_saved(kind, tmp_path / "peft", **options)
    expected = logits(theirs, ids)
    assert (expected - logits(build(kind), ids)).abs().max() > 1e-2  # the adapter changes the model
    ours = build(kind)
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert_close(logits(ours, ids), expected, msg=f"{kind} {options}: lorakit load differs from peft")
    lorakit.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours").eval()
    assert_close(logits(again, ids), expected, msg=f"{kind} {options}: peft load of lorakit's file differs")
    lorakit.merge_and_unload(ours)
    assert_close(logits(ours, ids), expected, msg=f"{kind} {options}: lorakit's merge changes the logits")
    if peft_merge_ok:
        assert_close(logits(ours, ids), logits(theirs.merge_and_unload(), ids), msg=f"{kind} {options}: merges differ")
    return ours


ARCH_CASES = {  # one architecture each, with the options a user of that model family sets
    "qwen3-all-linear-dora": ("qwen3", dict(target_modules="all-linear", use_dora=True)),
    "mistral-rslora-rank-regex": ("mistral", dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                                                  rank_pattern={r"^.*\.1\.self_attn\.q_proj$": 2, "down_proj": 3})),
    "gemma2-regex-alpha-pattern": ("gemma2", dict(target_modules=r".*\.(q_proj|o_proj|up_proj)",
                                                  alpha_pattern={r"layers\.0\..*": 3.0})),
    "phi3-fused-layers": ("phi3", dict(target_modules=["qkv_proj", "gate_up_proj"], layers_to_transform=[1],
                                       layers_pattern="layers")),
    "neox-fused-exclude-dora": ("neox", dict(target_modules="all-linear", exclude_modules=["dense_4h_to_h"], use_dora=True)),
    "falcon-layers-h": ("falcon", dict(target_modules=["query_key_value", "dense_h_to_4h"], layers_to_transform=0,
                                       layers_pattern="h")),
    # peft's merge_and_unload adds the embedding's delta to the output head tied to it (logits off by ~1); lorakit's
    # merge keeps the unmerged logits, so it is compared with those only
    "bloom-tied-embedding-dora-rslora": ("bloom", dict(target_modules=["query_key_value", "word_embeddings"], use_dora=True,
                                                       use_rslora=True, peft_merge_ok=False)),
    "gpt2-conv1d-fan-in-fan-out": ("gpt2", dict(target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, lora_dropout=0.1)),
    "starcoder2-modules-to-save": ("starcoder2", dict(target_modules=["q_proj", "c_fc"], modules_to_save=["lm_head"])),
}


@pytest.mark.parametrize("case", list(ARCH_CASES))
def test_architectures_and_options_both_ways(case, tmp_path):
    kind, options = ARCH_CASES[case]
    round_trip(kind, tmp_path, **options)


@pytest.mark.parametrize("init", ["pissa", "olora", "orthogonal", "mica", "gaussian"])
def test_peft_inits_load_as_peft_loads_them(init, tmp_path):
    """pissa / olora rewrite the base (W - s B0 A0) and peft's from_pretrained repeats that on the original base;
    lorakit loaded A and B onto the unchanged base (wrong logits, a warning only). Now it loads the same weights as
    a plain LoRA of rank 2r ([B, -B0] [A; A0]) on the untouched base, and saves that form."""
    round_trip("llama", tmp_path, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=init)
    if init in ("pissa", "olora"):
        assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["r"] == 8  # 2r: [B, -B0] [A; A0]


def test_pissa_next_to_other_adapters_keeps_the_base(tmp_path):
    """The pissa adapter is loaded in plain form (rank 2r on the original W), so the base is never rewritten: an
    adapter already there keeps its logits, and disable_adapters gives the real base. DoRA, Conv1D and an
    embedding target (which peft's pissa leaves alone) in one case."""
    ids = torch.randint(0, 100, (2, 7))
    theirs = peft_saved("gpt2", tmp_path / "pissa", target_modules=["c_attn", "c_fc", "wte"], init_lora_weights="pissa",
                        use_dora=True)
    model = build("gpt2")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["c_proj"]), adapter="first")
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(model, "first"):
            p.add_(0.3 * torch.randn_like(p))
    first = logits(model, ids)
    lorakit.load_adapter(model, tmp_path / "pissa", adapter="pissa")
    assert_close(logits(model, ids), logits(theirs, ids))
    lorakit.set_adapter(model, "first")
    assert_close(logits(model, ids), first)
    with lorakit.disable_adapters(model):
        assert_close(logits(model, ids), logits(build("gpt2"), ids))


@pytest.mark.parametrize("init", ["pissa_niter_2", "corda", "loftq"])
def test_irreproducible_base_rewrites_refused(init, tmp_path):
    peft_saved("llama", tmp_path, target_modules=["q_proj"])
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, "init_lora_weights": init}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one clear error, not a warning first
        with pytest.raises(lorakit.LorakitError, match=rf"init_lora_weights='{init}' rewrote the base .*"
                                                       "path_initial_model_for_weight_conversion") as error:
            lorakit.load_adapter(build("llama"), tmp_path)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["llama-cls", "bert-cls"])
def test_sequence_classification_both_ways(kind, tmp_path):
    """peft's SEQ_CLS task saves modules_to_save=["classifier", "score"] and a model has one of them: lorakit
    refused the other ("names that this model does not have"). Its own save said task CAUSAL_LM, which peft
    cannot put on a classifier; and its "all-linear" LoRA on the head broke peft's SEQ_CLS wrapper."""
    ids = torch.randint(1, 100, (2, 7))
    target = ["q_proj", "v_proj"] if kind == "llama-cls" else ["query", "value"]
    theirs = peft_saved(kind, tmp_path / "peft", target_modules=target, task_type="SEQ_CLS")
    assert json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())["modules_to_save"] == ["classifier", "score"]
    ours = build(kind)
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert_close(logits(ours, ids), logits(theirs, ids))
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["task_type"] == "SEQ_CLS"
    again = peft.PeftModel.from_pretrained(build(kind), tmp_path / "ours").eval()
    assert_close(logits(again, ids), logits(theirs, ids))

    everything = build(kind)  # lorakit's all-linear includes the classifier head
    lorakit.inject(everything, lorakit.LoraConfig(r=2, alpha=4))
    with torch.no_grad():
        for _, p in lorakit.lora_parameters(everything):
            p.add_(0.3 * torch.randn_like(p))
    lorakit.save_adapter(everything, tmp_path / "all")
    assert json.loads((tmp_path / "all" / CONFIG_NAME).read_text())["task_type"] is None
    loaded = peft.PeftModel.from_pretrained(build(kind), tmp_path / "all").eval()
    assert_close(logits(loaded, ids), logits(everything, ids))


def test_bias_options(tmp_path):
    """bias="all" / "lora_only" were refused outright; a model without biases (Llama) or with untrained ones loads,
    a trained bias is refused by name."""
    round_trip("llama", tmp_path / "llama", target_modules=["q_proj", "v_proj"], bias="all")
    ids = torch.randint(0, 100, (2, 7))
    theirs = peft_saved("qwen2", tmp_path / "unchanged", target_modules=["q_proj", "v_proj"], bias="lora_only")
    assert any(k.endswith("q_proj.base_layer.bias") for k in load_file(tmp_path / "unchanged" / WEIGHTS_NAME))
    ours = build("qwen2")
    lorakit.load_adapter(ours, tmp_path / "unchanged")
    assert_close(logits(ours, ids), logits(theirs, ids))
    theirs = peft.get_peft_model(build("qwen2"), peft.LoraConfig(r=4, target_modules=["q_proj"], bias="all")).eval()
    randomize_peft(theirs, biases=True)
    theirs.save_pretrained(tmp_path / "trained")
    with pytest.raises(lorakit.LorakitError, match=r"\.bias is a trained bias \(peft bias='all'\).*merge_and_unload"):
        lorakit.load_adapter(build("qwen2"), tmp_path / "trained")


@pytest.mark.parametrize("options, option", [
    (dict(target_modules=["q_proj"], layer_replication=[[0, 2], [1, 2]]), "layer_replication="),
    (dict(target_modules=["q_proj", "v_proj"], alora_invocation_tokens=[3, 4]), "alora_invocation_tokens="),
])
def test_unsupported_peft_options_refused_in_one_line(options, option, tmp_path):
    peft_saved("llama", tmp_path, **options)
    model = build("llama")
    with pytest.raises(lorakit.LorakitError, match=rf"PEFT option {option}.* is not supported .*merge_and_unload") as error:
        lorakit.load_adapter(model, tmp_path)
    assert "\n" not in str(error.value) and not lorakit.adapter_names(model)


@pytest.mark.parametrize("kind, tokens", [("llama-tied", [1, 5, 7]), ("qwen2", {"embed_tokens": [0, 99]})])
def test_trainable_tokens_load_as_copies(kind, tokens, tmp_path):
    """peft's trainable_token_indices (new rows of the embedding, and of the output head tied to it) was refused;
    it loads as modules-to-save copies with those rows, which peft loads back too."""
    round_trip(kind, tmp_path, target_modules=["q_proj", "down_proj"], trainable_token_indices=tokens)
    config = json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())
    assert config["modules_to_save"] == (["model.embed_tokens", "lm_head"] if kind == "llama-tied" else ["model.embed_tokens"])
    bad = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    (tmp_path / "peft" / CONFIG_NAME).write_text(json.dumps({**bad, "trainable_token_indices": [1, 2, 3, 4]}))
    assert "has a delta of shape" in refusal(tmp_path / "peft", build(kind))  # 4 ids, fewer trained rows


def test_ensure_weight_tying(tmp_path):
    """peft's ensure_weight_tying (refused before) also adapts the head tied to a targeted embedding and saves both
    LoRAs, while its target list names only the embedding: the file's keys say what to adapt. (peft's own
    merge_and_unload is off on tied weights, so lorakit's merge is checked against the unmerged logits.)"""
    round_trip("llama-tied", tmp_path, target_modules=["q_proj", "embed_tokens"], ensure_weight_tying=True,
               peft_merge_ok=False)
    assert "lm_head" in json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["target_modules"]
    raw = json.loads((tmp_path / "peft" / CONFIG_NAME).read_text())
    with pytest.raises(lorakit.LorakitError, match="ensure_weight_tying=True cannot be part of a LoraConfig; lorakit.load_adapter"):
        lorakit.LoraConfig.from_peft_dict(raw)  # the config alone cannot say which head is tied


def test_two_adapters_saved_in_one_folder(tmp_path):
    ids = torch.randint(0, 100, (2, 7))
    theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.add_adapter("other", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj", "up_proj"], use_dora=True))
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path)  # "default" at the top, "other" in a subfolder
    ours = build("llama")
    lorakit.load_adapter(ours, tmp_path)
    lorakit.load_adapter(ours, tmp_path / "other", adapter="other")
    theirs.eval()
    for name in ("default", "other"):
        theirs.set_adapter(name)
        lorakit.set_adapter(ours, name)
        assert_close(logits(ours, ids), logits(theirs, ids), msg=name)


# -- odd and hostile folders -----------------------------------------------------------------------------------------
@pytest.fixture
def peft_folder(tmp_path):
    peft_saved("llama", tmp_path / "adapter", target_modules=["q_proj", "v_proj"])
    return tmp_path / "adapter"


def edit(folder, config=None, tensors=None):
    if config is not None:
        data = json.loads((folder / CONFIG_NAME).read_text())
        (folder / CONFIG_NAME).write_text(json.dumps(config(data)))
    if tensors is not None:
        save_file(tensors(load_file(folder / WEIGHTS_NAME)), folder / WEIGHTS_NAME)
    return folder


def refusal(folder, model=None) -> str:
    model = model if model is not None else build("llama")
    with pytest.raises(lorakit.LorakitError) as error:
        lorakit.load_adapter(model, folder)
    assert "\n" not in str(error.value) and not lorakit.adapter_names(model)
    return str(error.value)


def test_config_without_target_modules_targets_the_saved_modules(peft_folder):
    ids = torch.randint(0, 100, (2, 7))
    reference = build("llama")
    lorakit.load_adapter(reference, peft_folder)
    edit(peft_folder, config=lambda c: {k: v for k, v in c.items() if k != "target_modules"})
    ours = build("llama")
    lorakit.load_adapter(ours, peft_folder)
    assert_close(logits(ours, ids), logits(reference, ids))
    assert len(lora_layers(ours)) == 4  # q_proj and v_proj of 2 layers, nothing else


def test_config_field_mistakes(peft_folder):
    edit(peft_folder, config=lambda c: {k: v for k, v in c.items() if k != "r"})
    assert "the tensors have rank 4, the config says 8 (it has no 'r'" in refusal(peft_folder)
    edit(peft_folder, config=lambda c: {**c, "r": 4, "lora_alpha": "8"})
    assert "lora_alpha must be a finite number, got '8'" in refusal(peft_folder)  # the file's name for it
    edit(peft_folder, config=lambda c: {**c, "lora_alpha": 8, "use_dora": "false"})  # bool("false") is True: was DoRA
    assert "use_dora must be true or false, got 'false'" in refusal(peft_folder)
    edit(peft_folder, config=lambda c: {**c, "use_dora": False, "use_rslora": "no"})  # was a silent rsLoRA scaling
    assert "use_rslora must be true or false" in refusal(peft_folder)
    edit(peft_folder, config=lambda c: {**c, "use_rslora": False, "peft_version": "0.23.0", "use_brand_new": True})
    assert "unknown field 'use_brand_new'=True (saved by peft 0.23.0; lorakit knows peft 0.21's" in refusal(peft_folder)
    text = json.dumps({k: v for k, v in json.loads((peft_folder / CONFIG_NAME).read_text()).items() if k != "use_brand_new"})
    (peft_folder / CONFIG_NAME).write_bytes(b"\xef\xbb\xbf" + text.encode())  # a BOM, as a Windows editor writes
    lorakit.load_adapter(build("llama"), peft_folder)


def test_pickled_only_folder_says_how_to_convert(peft_folder, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(peft_folder / CONFIG_NAME, pickled)
    torch.save(load_file(peft_folder / WEIGHTS_NAME), pickled / "adapter_model.bin")
    message = refusal(pickled)
    assert "never unpickles" in message
    command = message.split('python -c "', 1)[1].split('"', 1)[0]
    exec(command, {})  # the conversion it suggests works (weights_only=True: no code runs from the file)
    lorakit.load_adapter(build("llama"), pickled)


def test_keys_from_another_root_or_peft_memory_names(peft_folder, tmp_path):
    assert "saved from a model that holds this one as 'model'" in refusal(peft_folder, build("llama").model)
    torch.manual_seed(0)
    inner = peft.get_peft_model(build("llama").model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    inner.save_pretrained(tmp_path / "inner")
    assert "pass that submodule (lorakit.load_adapter(model.model, folder))" in refusal(tmp_path / "inner")
    lorakit.load_adapter(build("llama").model, tmp_path / "inner")  # which works
    edit(peft_folder, tensors=lambda t: {k.replace(".weight", ".default.weight"): v for k, v in t.items()})
    assert "carry peft's adapter name 'default'" in refusal(peft_folder)


def test_other_base_named_in_the_config(peft_folder):
    edit(peft_folder, config=lambda c: {**c, "base_model_name_or_path": "Qwen/Qwen3-0.6B"})
    model = build("llama")
    model.config._name_or_path = "/models/Llama-3.2-1B-Instruct"
    with pytest.warns(UserWarning, match="names the base 'Qwen/Qwen3-0.6B', this model is '/models/Llama-3.2-1B-Instruct'"):
        lorakit.load_adapter(model, peft_folder)
    edit(peft_folder, config=lambda c: {**c, "base_model_name_or_path": "meta-llama/Llama-3.2-1B"})
    same = build("llama")
    same.config._name_or_path = "/root/.cache/huggingface/hub/models--meta-llama--Llama-3.2-1B-Instruct/snapshots/" + "a" * 40
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_adapter(same, peft_folder)  # a base and its -Instruct, through a hub cache path: quiet
    assert "names the base 'meta-llama/Llama-3.2-1B'" in refusal(peft_folder, build("gpt2"))  # nothing matches: said


def test_file_or_hub_id_instead_of_a_folder(peft_folder, monkeypatch):
    assert f"pass the folder that holds it: {peft_folder}" in refusal(peft_folder / WEIGHTS_NAME)
    monkeypatch.chdir(peft_folder)  # a hub id that is no local path
    assert "download a hub adapter first (hf download tloen/alpaca-lora-7b --local-dir DIR)" in refusal("tloen/alpaca-lora-7b")


def test_folders_that_hold_something_else(tmp_path):
    model_folder = tmp_path / "model"
    build("llama").save_pretrained(model_folder)
    assert "a whole model's folder (config.json and model weights): load it with lorakit.load_base" in refusal(model_folder)
    mlx = tmp_path / "mlx"
    mlx.mkdir()
    (mlx / "adapters.safetensors").write_bytes(b"")
    (mlx / "adapter_config.json").write_text('{"fine_tune_type": "lora"}')
    assert "adapters.safetensors, MLX-LM's adapter format" in refusal(mlx)


def test_adapter_from_an_older_transformers_layout(tmp_path):
    """A Llava adapter saved before transformers 4.52 names language_model.model.layers...; transformers 5's model
    has model.language_model.layers... peft renames the keys with transformers' conversion mapping; lorakit
    refused them as unexpected keys. It now applies the same renamings to keys that do not match as they are."""
    text = tf.LlamaConfig(num_key_value_heads=2, **SMALL)
    vision = tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 image_size=16, patch_size=8)

    def llava():
        torch.manual_seed(0)
        return tf.LlavaForConditionalGeneration(tf.LlavaConfig(text_config=text, vision_config=vision,
                                                               image_token_index=99)).eval()

    ids = torch.randint(0, 90, (2, 6))
    theirs = peft.get_peft_model(llava(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path)
    old = {k.replace(".model.model.language_model.", ".model.language_model.model.").replace(
        ".model.model.vision_tower.", ".model.vision_tower."): v for k, v in load_file(tmp_path / WEIGHTS_NAME).items()}
    assert any(".language_model.model.layers." in k for k in old)
    save_file(old, tmp_path / WEIGHTS_NAME)
    expected = logits(theirs, ids)
    assert_close(logits(peft.PeftModel.from_pretrained(llava(), tmp_path).eval(), ids), expected)  # peft renames
    ours = llava()
    lorakit.load_adapter(ours, tmp_path)
    assert_close(logits(ours, ids), expected)
    new = {k.replace(".language_model.model.", ".model.language_model."): v.clone() for k, v in old.items()}
    save_file({**old, **new}, tmp_path / WEIGHTS_NAME)  # both layouts in one file: which one should win?
    assert "is a second tensor for" in refusal(tmp_path, llava())


def test_server_pool_admits_a_pissa_adapter_at_the_rank_it_loads_with(tmp_path):
    """peft's pissa adapter of rank r loads as a plain LoRA of rank 2r: the server pool's --max-rank check counts
    that before loading, so it neither admits what it then refuses after the load nor names a rank never written."""
    import threading

    from lorakit.serve.pool import AdapterPool, AdapterRejected

    peft_saved("llama", tmp_path / "adapters" / "p", r=4, target_modules=["q_proj"], init_lora_weights="pissa")
    model = build("llama")
    with pytest.raises(AdapterRejected, match=r"rank 8 is above --max-rank 6 \(a pissa adapter of rank 4 loads at rank 8\)"):
        AdapterPool(model, tmp_path / "adapters", threading.RLock(), max_rank=6).acquire("p")
    pool = AdapterPool(model, tmp_path / "adapters", threading.RLock(), max_rank=8)
    internal = pool.acquire("p")
    assert model.model.layers[0].self_attn.q_proj.adapters[internal].rank == 8
