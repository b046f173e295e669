"""Adapters saved by the real peft package (0.21) in the ways a new user brings them and earlier peft tests left out
(eighteenth session), and lorakit's adapters handed back to peft.

Each case builds the adapter with peft on a tiny random model (random non-zero weights, ``test_peft_sweep``'s
helpers) and compares lorakit's logits with peft's element by element (conftest's float32 tolerance), through the
Python API and the command line (``lorakit merge`` / ``generate`` / ``inspect``), or checks a one-line refusal that
says what to do.
"""

from __future__ import annotations

import warnings

import peft
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import lorakit
from conftest import assert_close
from lorakit.cli import main
from lorakit.io import WEIGHTS_NAME
from model_helpers import logits
from test_peft_sweep import build, randomize_peft

IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 99], [2, 4, 8, 16, 32, 63, 98]])
NEW_IDS = torch.tensor([[1, 5, 100, 101, 103, 7], [2, 103, 4, 100, 8, 16]])  # the 4 tokens a user added


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes (embedding layers saved, tied weights, ...)
        return function(*args, **kwargs)


def base_folder(kind, folder):
    """``build(kind)`` saved as a Hugging Face folder with the word-level test tokenizer (what ``lorakit merge``
    reads); peft's save then names it as base_model_name_or_path, as for a downloaded model."""
    from test_train_helpers import tiny_tokenizer

    build(kind).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def from_folder(folder, resize: int | None = None):
    model = quiet(tf.AutoModelForCausalLM.from_pretrained, folder).eval()
    if resize:
        quiet(model.resize_token_embeddings, resize, mean_resizing=False)
    return model


# -- peft's save_embedding_layers beside copies of the embedding / head ------------------------------------------------
EMBEDDING_COPIES = {  # (model, LoraConfig options, vocabulary resized to)
    "copies-of-both-saved-with-the-layers": ("llama", dict(modules_to_save=["embed_tokens", "lm_head"]), None),
    "token-rows-of-a-tied-head-saved-with-the-layers": ("llama-tied", dict(trainable_token_indices=[5, 9]), None),
    # the recipe for new tokens: resize, train their rows (or copies); peft's save then sees the resize and saves the
    # embedding layers by itself ("auto")
    "new-token-copies": ("llama", dict(modules_to_save=["embed_tokens", "lm_head"]), 104),
    "new-token-rows-tied": ("llama-tied", dict(trainable_token_indices=[100, 101, 103]), 104),
    "new-token-copy-of-a-tied-embedding": ("llama-tied", dict(modules_to_save=["embed_tokens"]), 104),
}


@pytest.mark.parametrize("case", list(EMBEDDING_COPIES))
def test_embedding_layers_saved_beside_copies_or_token_rows(case, tmp_path):
    """With modules_to_save or trainable_token_indices on the embedding / head, peft's save_embedding_layers (True,
    or "auto" after resize_token_embeddings) also writes the wrappers' own tensors: <path>.original_module.weight
    (the base), <path>.modules_to_save.weight (the trained copy again), <path>.token_adapter.base_layer.weight (the
    base). lorakit refused them as "unexpected tensor keys" (and, for a resized tied embedding, took the trained copy
    for the base). Now: peft's logits (new tokens included) on a plain base, which lorakit resizes, on the command
    line's merge too, and a file peft reads back onto its resized base."""
    kind, options, size = EMBEDDING_COPIES[case]
    base = base_folder(kind, tmp_path / "base")
    theirs = quiet(peft.get_peft_model, from_folder(base, size), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                                                 **options)).eval()
    randomize_peft(theirs)
    quiet(theirs.save_pretrained, tmp_path / "peft", save_embedding_layers=True if size is None else "auto")
    wrapper_keys = [k for k in load_file(tmp_path / "peft" / WEIGHTS_NAME) if ".original_module." in k
                    or ".modules_to_save." in k or ".token_adapter.base_layer." in k]
    assert wrapper_keys  # what peft writes for these options
    ids = IDS if size is None else NEW_IDS
    expected = logits(theirs, ids)
    ours = from_folder(base)
    quiet(lorakit.load_adapter, ours, tmp_path / "peft")
    assert_close(logits(ours, ids), expected)
    lorakit.save_adapter(ours, tmp_path / "ours")
    again = quiet(peft.PeftModel.from_pretrained, from_folder(base, size), tmp_path / "ours").eval()
    assert_close(logits(again, ids), expected)
    if size is not None:
        assert quiet(main, ["merge", "--model", str(base), "--adapter", str(tmp_path / "peft"), "--out",
                            str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
        assert_close(logits(from_folder(tmp_path / "merged"), ids), expected)


def test_a_second_trained_copy_that_differs_is_refused(tmp_path):
    """The wrapper's trained copy must be the one the file holds as <path>.weight; another is refused by name."""
    from safetensors.torch import save_file

    theirs = quiet(peft.get_peft_model, build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                        modules_to_save=["lm_head"])).eval()
    randomize_peft(theirs)
    quiet(theirs.save_pretrained, tmp_path, save_embedding_layers=True)
    tensors = load_file(tmp_path / WEIGHTS_NAME)
    tensors["base_model.model.lm_head.modules_to_save.weight"] = tensors["base_model.model.lm_head.weight"] + 1
    save_file(tensors, tmp_path / WEIGHTS_NAME)
    model = build("llama")
    with pytest.raises(lorakit.LorakitError, match=r"unexpected tensor keys .*lm_head\.modules_to_save\.weight") as error:
        lorakit.load_adapter(model, tmp_path)
    assert "\n" not in str(error.value) and not lorakit.adapter_names(model)


RESIZED = {  # LoraConfig options of an adapter trained on a vocabulary resized for 4 new tokens
    "lora": ("llama", dict(target_modules=["q_proj", "v_proj"])),
    "lora-tied": ("llama-tied", dict(target_modules=["q_proj"])),
    "pissa": ("llama", dict(target_modules=["q_proj"], init_lora_weights="pissa")),
    "copy-of-a-tied-embedding": ("llama-tied", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])),
}


@pytest.mark.parametrize("case", list(RESIZED))
def test_an_adapter_loaded_on_a_vocabulary_it_resized_saves_the_new_rows(case, tmp_path):
    """load_adapter resizes a plain base for peft's adapter of a resized vocabulary and takes the saved embedding and
    head; save_adapter then wrote the adapter alone, so the new tokens' rows were lost: lorakit's own load of that
    file on the same plain base was refused as "made for another base model" (the base its config names), or, with
    a trained copy of a tied embedding, ran that copy as the head (logits off by ~1.6, no word); peft's load onto its
    resized base gave other logits for the new tokens. The file now holds the resized embedding and head as peft's
    save_embedding_layers writes them: both loads give the trained logits."""
    kind, options = RESIZED[case]
    base = base_folder(kind, tmp_path / "base")
    theirs = quiet(peft.get_peft_model, from_folder(base, 104), peft.LoraConfig(r=4, lora_alpha=8, **options)).eval()
    randomize_peft(theirs)
    quiet(theirs.save_pretrained, tmp_path / "peft")  # "auto": peft sees the resize and saves the embedding layers
    expected = logits(theirs, NEW_IDS)
    ours = from_folder(base)
    quiet(lorakit.load_adapter, ours, tmp_path / "peft")
    lorakit.save_adapter(ours, tmp_path / "ours")
    again = from_folder(base)
    with pytest.warns(UserWarning, match="resized from 100 to 104 tokens"):
        lorakit.load_adapter(again, tmp_path / "ours")
    assert_close(logits(again, NEW_IDS), expected)
    theirs_again = quiet(peft.PeftModel.from_pretrained, from_folder(base, 104), tmp_path / "ours").eval()
    assert_close(logits(theirs_again, NEW_IDS), expected)
    plain = from_folder(base)  # a base lorakit did not resize saves the adapter alone, as before
    lorakit.inject(plain, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(plain, tmp_path / "plain")
    assert all("lora_" in key for key in load_file(tmp_path / "plain" / WEIGHTS_NAME))


# -- peft types lorakit does not read: the advice must work ----------------------------------------------------------
def test_a_bias_tuning_adapter_is_not_sent_to_a_merge_that_raises(tmp_path):
    """peft's BEFT adds a trained bias to each target layer; its merge_and_unload raises on a layer without a bias
    (Llama's projections), so the refusal's advice, "merge this one into the base with peft", failed there. The
    refusal now says when the merge works and to run it with peft otherwise. (Every other peft 0.21 type lorakit
    does not read was checked the same way in this session: peft's merge works where lorakit says to merge.)"""
    model = peft.get_peft_model(build("llama"), peft.BeftConfig(target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "beft_bias" in name:
                parameter.add_(0.1)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="Base layer has no bias, cannot merge"):
        peft.PeftModel.from_pretrained(build("llama"), tmp_path).merge_and_unload()
    with pytest.raises(lorakit.LorakitError) as error:
        lorakit.load_adapter(build("llama"), tmp_path)
    message = str(error.value)
    assert "\n" not in message and "peft_type 'BEFT' is not LoRA (it adds a trained bias to each target layer)" in message
    assert message.endswith("else run it with peft (PeftModel.from_pretrained)"), message
    with torch.no_grad():  # where the layers have biases, the merge the message offers keeps peft's outputs
        qwen = peft.get_peft_model(build("qwen2"), peft.BeftConfig(target_modules=["q_proj"]))
        for name, parameter in qwen.named_parameters():
            if "beft_bias" in name:
                parameter.add_(0.1)
        expected = logits(qwen.eval(), IDS)
        assert_close(logits(qwen.merge_and_unload(), IDS), expected)


# -- a vision-language model's adapter on the text model lorakit builds ---------------------------------------------
@pytest.mark.parametrize("options", [
    dict(target_modules=["q_proj", "v_proj"]),  # the vision tower's q_proj / v_proj too
    dict(target_modules=r".*language_model.*\.(q_proj|down_proj)", rank_pattern={r"^model\.language_model\.layers\.0\..*": 2}),
    dict(target_modules="all-linear", use_dora=True),
], ids=["names", "regex-rank-pattern", "all-linear-dora"])
def test_an_adapter_of_the_full_vision_language_class_runs_on_its_text_model(options, tmp_path, capsys):
    """peft users fine-tune Llama 3.2 Vision (and Llama 4) on the full ...ForConditionalGeneration class: its file
    names model.language_model.layers... (and the vision tower's layers). lorakit.load_base and the commands build
    the text model (MllamaForCausalLM: model.layers...), so every such adapter was refused ("unexpected tensor keys",
    or its regex "matched no module"). The language model's tensors now load renamed (peft's logits on text, its
    rank_pattern read for the text model's names); the vision tower's, which act on images only, are left out with
    a warning. lorakit merge writes that model, and lorakit's own file loads in peft on AutoModelForCausalLM."""
    from test_followups_17_models import _mllama

    folder = tmp_path / "mllama"
    _mllama().save_pretrained(folder)
    from test_train_helpers import tiny_tokenizer

    tiny_tokenizer().save_pretrained(folder)
    ids = torch.tensor([[1, 7, 10, 11, 8, 12], [1, 9, 12, 14, 15, 8]])
    theirs = quiet(peft.get_peft_model, _mllama(), peft.LoraConfig(r=4, lora_alpha=8, **options)).eval()
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(input_ids=ids).logits
    model, _ = lorakit.load_base(str(folder), device="cpu")
    assert type(model).__name__ == "MllamaForCausalLM"
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        lorakit.load_adapter(model, tmp_path / "peft")
    vision = [str(w.message) for w in said if "vision-language" in str(w.message)]
    if options.get("target_modules") == ["q_proj", "v_proj"]:
        assert len(vision) == 1 and "never runs model.vision_model: their 8 tensor(s) are left out" in vision[0], vision
    assert_close(logits(model, ids), expected)
    if "rank_pattern" in options:
        assert model.model.layers[0].self_attn.q_proj.adapters["default"].rank == 2
        assert model.model.layers[1].cross_attn.q_proj.adapters["default"].rank == 4
    lorakit.save_adapter(model, tmp_path / "ours")
    text = quiet(tf.AutoModelForCausalLM.from_pretrained, folder)
    assert_close(logits(quiet(peft.PeftModel.from_pretrained, text, tmp_path / "ours").eval(), ids), expected)
    if "use_dora" in options:
        assert quiet(main, ["merge", "--model", str(folder), "--adapter", str(tmp_path / "peft"), "--out",
                            str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
        assert_close(logits(from_folder(tmp_path / "merged"), ids), expected)


# -- lorakit inspect of peft's files ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind, options, save_embedding_layers", [
    ("llama", dict(target_modules=["q_proj", "embed_tokens"], use_dora=True), "auto"),  # "auto" saves the embedding
    ("llama", dict(target_modules=["q_proj", "lm_head"]), "auto"),
    ("llama", dict(target_modules=["q_proj"], modules_to_save=["embed_tokens", "lm_head"]), True),
    ("llama-tied", dict(target_modules=["q_proj"], trainable_token_indices=[3, 5]), True),
], ids=["embedding-dora", "head", "copies", "token-rows"])
def test_inspect_counts_what_the_adapter_trains(kind, options, save_embedding_layers, tmp_path, capsys):
    """lorakit inspect counted every tensor of the file as a trainable parameter, peft's save_embedding_layers copies
    of the base embedding / head included (a DoRA adapter of 1,136 parameters on q_proj and the embedding showed
    4,336; on an 8B model the embedding copy alone is 525M). It now counts what peft trains
    (get_nb_trainable_parameters) and names the saved copies on a line of their own."""
    theirs = quiet(peft.get_peft_model, build(kind), peft.LoraConfig(r=4, **options))
    quiet(theirs.save_pretrained, tmp_path, save_embedding_layers=save_embedding_layers)
    trained, _ = theirs.get_nb_trainable_parameters()
    copied = sum(t.numel() for k, t in load_file(tmp_path / WEIGHTS_NAME).items()) - trained
    assert copied > 0  # the file holds base copies
    from lorakit.commands.inspect import describe

    info = describe(str(tmp_path))
    if "trainable_token_indices" in options:  # the tied head's two trained rows are saved again (peft counts them once)
        assert info["trainable_parameters"] == trained + 2 * 32
    else:
        assert info["trainable_parameters"] == trained
    assert info["saved_copy_parameters"] == sum(t.numel() for k, t in load_file(tmp_path / WEIGHTS_NAME).items()) \
        - info["trainable_parameters"]
    capsys.readouterr()
    assert main(["inspect", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"trainable parameters  {info['trainable_parameters']:,} (float32)" in out, out
    assert f"saved copies          {info['saved_copy_parameters']:,} parameters (peft's save_embedding_layers" in out, out


def test_an_adapter_of_gemma3s_text_model_runs_on_the_full_class(tmp_path):
    """The reverse: Gemma 3 (4B and up) folders build as Gemma3ForConditionalGeneration (language model under
    model.language_model), while adapters trained on the text model alone (Gemma3ForCausalLM: model.layers...) were
    refused as "unexpected tensor keys" (peft itself finds none of them there and runs the base). They load renamed
    now, with the text model's logits; lorakit's file loads in peft on the full class."""
    text = dict(num_key_value_heads=2, head_dim=8, vocab_size=100, hidden_size=32, intermediate_size=48,
                num_hidden_layers=2, num_attention_heads=4)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=16,
                  patch_size=8)

    def full():
        torch.manual_seed(0)
        return tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
            text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=99, boi_token_index=97,
            eoi_token_index=98)).eval()

    ids = IDS % 90  # no image token (99) nor its markers
    whole = full()
    alone = tf.Gemma3ForCausalLM(whole.config.text_config).eval()  # the same weights, as the text model
    alone.model.load_state_dict(whole.model.language_model.state_dict())
    alone.lm_head.load_state_dict(whole.lm_head.state_dict())
    theirs = quiet(peft.get_peft_model, alone, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                                  rank_pattern={r"layers\.1\.self_attn\.v_proj": 2})).eval()
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    expected = logits(theirs, ids)
    lorakit.load_adapter(whole, tmp_path / "peft")
    assert_close(logits(whole, ids), expected)
    assert whole.model.language_model.layers[1].self_attn.v_proj.adapters["default"].rank == 2
    lorakit.save_adapter(whole, tmp_path / "ours")
    assert_close(logits(quiet(peft.PeftModel.from_pretrained, full(), tmp_path / "ours").eval(), ids), expected)


# -- an adapter id in the Hugging Face cache ---------------------------------------------------------------------------
def test_an_adapter_id_downloaded_into_the_hugging_face_cache_loads(tmp_path, monkeypatch, capsys):
    """``hf download org/adapter`` (no --local-dir) puts a peft adapter in the Hugging Face cache, from which peft's
    from_pretrained("org/adapter") reads it and lorakit's --model reads a base. lorakit refused the adapter id ("download
    a hub adapter first ... --local-dir DIR"), though it was there. It now reads the cached snapshot (nothing is
    downloaded), through load_adapter and lorakit generate; an id not in the cache keeps the refusal."""
    from huggingface_hub import constants

    from test_newuser_audit_13_models import _cache_entry

    cache = tmp_path / "hub"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # org/ is no local folder here
    theirs = quiet(peft.get_peft_model, build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])).eval()
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "saved")
    _cache_entry(tmp_path / "saved", cache / "models--org--adapter")
    ours = build("llama")
    lorakit.load_adapter(ours, "org/adapter")
    assert_close(logits(ours, IDS), logits(theirs, IDS))
    base = base_folder("llama", tmp_path / "base")
    capsys.readouterr()
    assert main(["generate", "--model", str(base), "--adapter", "org/adapter", "--max-new-tokens", "2", "--no-chat",
                 "copy a b"]) == 0
    with pytest.raises(lorakit.LorakitError, match=r"download a hub adapter first \(hf download org/absent --local-dir"):
        lorakit.load_adapter(build("llama"), "org/absent")
