"""Adapter folders written by the real peft package (0.21) that a new user brings to lorakit (audit 14): each defect
found is a regression test here, through the Python API and the CLI (``lorakit generate / merge / eval / inspect``).

Round trips follow ``test_peft_sweep``: peft builds the adapter on a tiny random model with random non-zero weights,
lorakit loads the saved folder (peft's logits), saves it back for peft (same logits) and merges (same logits).
"""

from __future__ import annotations

import json
import warnings

import peft
import pytest
import torch
import transformers as tf

import lorakit
from conftest import assert_close
from lorakit.cli import main
from lorakit.inject import lora_layers
from lorakit.io import CONFIG_NAME
from model_helpers import logits
from test_peft_sweep import build, peft_saved, refusal, round_trip


def saved_by_peft(folder, config, kind: str = "llama"):
    """``config`` (any peft method) on ``build(kind)``, saved to ``folder`` by peft; returns the folder."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(build(kind), config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("config", [
    peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
], ids=["prompt-tuning", "prefix-tuning"])
def test_a_prompt_learning_adapter_is_refused_by_its_type(config, tmp_path, capsys):
    """A prompt-tuning folder names no target_modules: lorakit read its tensors to find them and said 'add
    target_modules to the config', which cannot help (and merging it with peft, the advice for LoHa or IA3, is not
    possible either). It is refused by its peft_type, saying to run it with peft."""
    folder = saved_by_peft(tmp_path / "adapter", config)
    kind = config.peft_type.value
    message = refusal(folder)
    assert f"peft_type '{kind}' is not LoRA" in message and "run this one with peft" in message
    assert "target_modules" not in message and "merge_and_unload" not in message
    assert main(["inspect", str(folder)]) == 2
    assert f"peft_type '{kind}' is not LoRA" in capsys.readouterr().err


def test_a_config_written_by_early_peft(tmp_path):
    """alpaca-lora era files (peft 0.1 - 0.2) carry merge_weights (whether eval() merged the update: the same
    outputs either way); true was refused as an 'unknown field (from a newer peft?)'. It loads, with peft's logits.
    enable_lora (LoRA on parts of a fused layer, tensors of another layout) is refused saying where it comes from."""
    ids = torch.randint(0, 100, (2, 7))
    theirs = peft_saved("llama", tmp_path, target_modules=["q_proj", "v_proj"])
    early = {"base_model_name_or_path": "decapoda-research/llama-7b-hf", "bias": "none", "enable_lora": None,
             "fan_in_fan_out": False, "inference_mode": True, "lora_alpha": 8, "lora_dropout": 0.05, "merge_weights": True,
             "modules_to_save": None, "peft_type": "LORA", "r": 4, "target_modules": ["q_proj", "v_proj"],
             "task_type": "CAUSAL_LM"}
    (tmp_path / CONFIG_NAME).write_text(json.dumps(early))
    ours = build("llama")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the file names another base than this tiny model
        lorakit.load_adapter(ours, tmp_path)
    assert_close(logits(ours, ids), logits(theirs, ids))
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**early, "enable_lora": [True, False, True]}))
    message = refusal(tmp_path)
    assert "enable_lora=[True, False, True] is early peft's (0.1 - 0.2) LoRA on parts of a fused layer" in message
    assert "newer peft" not in message


def test_trainable_tokens_are_not_loaded_for_training_as_whole_copies(tmp_path):
    """peft's trainable_token_indices load as whole copies of the embedding and of its tied head (same logits).
    With trainable=True every row of both copies took gradients, so continued training changed the whole vocabulary
    and untied the head, where peft trains the listed rows only: refused, the model untouched; it runs as before."""
    peft_saved("llama-tied", tmp_path, target_modules=["q_proj"], trainable_token_indices=[3, 4])
    model = build("llama-tied")
    with pytest.raises(lorakit.LorakitError, match=r"trainable_token_indices \[3, 4\] load as whole copies .*trainable=True "
                                                   r"would train all their rows, not only these tokens"):
        lorakit.load_adapter(model, tmp_path, trainable=True)
    assert not lorakit.adapter_names(model) and all(p.requires_grad for p in model.parameters())  # not frozen by inject
    lorakit.load_adapter(model, tmp_path)
    assert not any(p.requires_grad for name, p in model.named_parameters() if ".copies." in name)


@pytest.mark.parametrize("options", [dict(target_modules=["q_proj", "embed_tokens"]),
                                     dict(target_modules=["q_proj"], modules_to_save=["embed_tokens"])],
                         ids=["lora", "copy"])
def test_an_ensure_weight_tying_adapter_is_not_loaded_for_training_apart(options, tmp_path):
    """With ensure_weight_tying peft trains one update (LoRA or copy) for the embedding and the head tied to it;
    lorakit loads them as two (same logits), and with trainable=True each took its own gradients, so one step of
    continued training untied them. Refused for training; it loads to run, and an adapter with nothing tied trains."""
    peft_saved("llama-tied", tmp_path / "tied", ensure_weight_tying=True, **options)
    model = build("llama-tied")
    with pytest.raises(lorakit.LorakitError, match=r"ensure_weight_tying peft trains one update shared by the tied lm_head "
                                                   r"and model.embed_tokens; .*trainable=True would train them apart"):
        lorakit.load_adapter(model, tmp_path / "tied", trainable=True)
    assert not lorakit.adapter_names(model)
    lorakit.load_adapter(model, tmp_path / "tied")
    peft_saved("llama-tied", tmp_path / "q", ensure_weight_tying=True, target_modules=["q_proj"])
    lorakit.load_adapter(build("llama-tied"), tmp_path / "q", trainable=True)


def test_a_trained_copy_of_an_attention_block_runs(tmp_path):
    """modules_to_save=["layers.1.self_attn"]: transformers calls an attention block with keyword arguments only
    (self_attn(hidden_states=..., ...)), and lorakit's copy took the input as its first positional argument: the
    loaded adapter's forward raised a TypeError. It runs with peft's logits, both ways; a mixed batch that would have
    to split such a call among adapters is refused in one line."""
    ids = torch.randint(0, 100, (2, 7))
    theirs = peft_saved("llama", tmp_path / "peft", target_modules=["q_proj", "down_proj"],
                        modules_to_save=["layers.1.self_attn"]).eval()
    ours = build("llama")
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert_close(logits(ours, ids), logits(theirs, ids))
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert_close(logits(peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours").eval(), ids), logits(theirs, ids))
    with lorakit.mixed_batch(ours, ["default", "default"]):  # one adapter on every row: the copy runs whole
        assert_close(logits(ours, ids), logits(theirs, ids))
    with pytest.raises(lorakit.LorakitError, match=r"called with keyword arguments only \(hidden_states, .*use one adapter"):
        with lorakit.mixed_batch(ours, ["default", None]):
            logits(ours, ids)


def test_layers_to_transform_leaves_a_target_named_by_its_whole_path(tmp_path):
    """peft adapts a module whose whole path is in target_modules whatever layers_to_transform says (only names
    matched as path endings are filtered by layer); lorakit filtered both, so peft's file was refused for 'unexpected
    tensor keys' of the named module, and a lorakit config of the same fields adapted one module fewer than peft."""
    options = dict(target_modules=["model.layers.0.self_attn.q_proj", "v_proj"], layers_to_transform=[1])
    round_trip("llama", tmp_path, **options)
    model = build("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, **options))
    assert sorted(lora_layers(model)) == ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def test_a_merged_model_given_as_the_adapter_says_to_pass_it_as_the_model(tmp_path, capsys):
    """peft's merge_and_unload().save_pretrained(folder) written where an adapter goes: ``lorakit generate
    --adapter merged`` said only 'load it with lorakit.load_base(folder)', a Python call, to a command-line user."""
    from test_train_helpers import make_model_folder

    base = make_model_folder(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(tf.AutoModelForCausalLM.from_pretrained(base), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    theirs.merge_and_unload().save_pretrained(tmp_path / "merged")
    capsys.readouterr()  # transformers' progress bars
    for command in (["generate", "--model", str(base), "--adapter", str(tmp_path / "merged"), "--max-new-tokens", "1", "a"],
                    ["merge", "--model", str(base), "--adapter", str(tmp_path / "merged"), "--out", str(tmp_path / "out")]):
        assert main(command) == 2
        error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(error) == 1 and "whole model's folder" in error[0] and "as --model, with no --adapter" in error[0]


def test_a_classification_adapter_on_a_causal_lm_names_the_model_class(tmp_path, capsys):
    """A peft SEQ_CLS adapter (its head copy is modules_to_save 'score') given to a causal LM was refused with
    "modules_to_save names ['score'] that this model does not have", which reads as a broken file; it now says the
    adapter was saved from a sequence classifier and which transformers class loads such a base."""
    from test_train_helpers import make_model_folder

    base = make_model_folder(tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3)
        peft.get_peft_model(classifier, peft.LoraConfig(r=4, target_modules=["q_proj"], task_type="SEQ_CLS")).save_pretrained(
            tmp_path / "cls")
    capsys.readouterr()
    hint = "its task_type SEQ_CLS says it was saved from a ...ForSequenceClassification model, and this one is a LlamaForCausalLM"
    assert main(["generate", "--model", str(base), "--adapter", str(tmp_path / "cls"), "--max-new-tokens", "1", "a"]) == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error) == 1 and hint in error[0] and "AutoModelForSequenceClassification" in error[0]
    lorakit.load_adapter(tf.AutoModelForSequenceClassification.from_pretrained(base, num_labels=3), tmp_path / "cls")


def test_an_adapter_saved_from_ungathered_zero3_shards_says_so(tmp_path, capsys):
    """A DeepSpeed ZeRO-3 run that saves without gathering writes every tensor with shape (0,) (peft saves what the
    rank holds). lorakit said "has shape (0,), but module ... needs (4, 32); the adapter was made for a different
    model or rank", sending the user after the wrong cause; it now names the sharded save, for load and inspect."""
    from safetensors.torch import load_file, save_file

    peft_saved("llama", tmp_path, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    save_file({key: torch.empty(0) for key in load_file(tmp_path / "adapter_model.safetensors")},
              tmp_path / "adapter_model.safetensors")
    message = refusal(tmp_path)
    assert "is empty (shape (0,); 9 of 9 tensors are): it was saved from a sharded training run (DeepSpeed ZeRO-3" in message
    assert "different model" not in message
    assert main(["inspect", str(tmp_path)]) == 2 and "saved from a sharded training run" in capsys.readouterr().err
