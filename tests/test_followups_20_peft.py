"""Adapters saved by peft 0.21.2 that a new user brings (twentieth session, peft).

A sweep of peft's LoraConfig fields and tuner types on tiny Llama / Qwen3 / Gemma3 models found lorakit's logits and
merges equal to peft's (or the method refused in one line); what it fixed is tested here:

* a folder whose weights hold LoRA tensors of layers its config does not select (target_modules edited by hand, an
  exclude_modules / layers_to_transform copied from another run) was refused as "unexpected tensor keys" with no word
  on why or what to change; peft loads it without those tensors. The refusal now names the layers, the fields that
  leave them out, and the edit, and the edited file loads with peft's logits.
* VeRA saved with ``save_projection=False`` was refused, with advice peft cannot follow; its shared matrices are now
  drawn from ``projection_prng_key`` as peft draws them.
* AdaLoRA whose (LoraConfig) fields name a base-rewriting init or KaSA, which peft's AdaLoRA never runs, was loaded
  on a rewritten base (logits off peft's, silently); AdaLoRA with layer_replication is refused by name.
"""

from __future__ import annotations

import json
import re
import warnings

import peft
import pytest
import torch
import transformers as tf

import lorakit
from conftest import assert_close
from lorakit.io import CONFIG_NAME
from model_helpers import logits

IDS = torch.tensor([[7, 11, 12, 10, 9, 13], [4, 4, 8, 2, 15, 6]])
SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def build(kind: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(head_dim=8, **SMALL)).eval()
    if kind == "gemma3":
        return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(head_dim=8, **SMALL)).eval()
    return tf.LlamaForCausalLM(tf.LlamaConfig(**SMALL)).eval()


def randomize(model, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)


def peft_folder(folder, kind="llama", config=None):
    """peft's adapter (q_proj and v_proj of both layers unless ``config``) with random weights, saved to ``folder``."""
    config = config or peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    theirs = quiet(peft.get_peft_model, build(kind), config).eval()
    randomize(theirs)
    quiet(theirs.save_pretrained, folder)
    return folder


def edit_config(folder, **fields):
    path = folder / CONFIG_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


@pytest.mark.parametrize("edit, layers, advice", [
    (dict(target_modules=["q_proj"]), "model.layers.0.self_attn.v_proj, model.layers.1.self_attn.v_proj",
     "add v_proj to target_modules in adapter_config.json"),
    (dict(exclude_modules=r".*\.0\.self_attn\.q_proj"), "model.layers.0.self_attn.q_proj",
     "edit exclude_modules in adapter_config.json to keep them"),
    (dict(layers_to_transform=[0]), "model.layers.1.self_attn.q_proj, model.layers.1.self_attn.v_proj",
     "edit layers_to_transform in adapter_config.json to keep them"),
])
def test_lora_tensors_of_layers_the_config_leaves_out_are_named_with_the_edit(edit, layers, advice, tmp_path):
    folder = peft_folder(tmp_path / "adapter")
    want = logits(quiet(peft.PeftModel.from_pretrained, build(), folder).eval(), IDS)
    edit_config(folder, **edit)
    model = build()
    with pytest.raises(lorakit.LorakitError, match=r"unexpected tensor keys") as error:
        lorakit.load_adapter(model, folder)
    message = str(error.value)
    assert "\n" not in message and not lorakit.adapter_names(model)
    assert f"they are LoRA tensors of {layers}, which adapter_config.json leaves out" in message, message
    assert message.endswith(advice), message
    # peft loads the edited folder without those tensors: another model than the one trained
    edited = logits(quiet(peft.PeftModel.from_pretrained, build(), folder).eval(), IDS)
    assert (edited - want).abs().max() > 1e-3
    # the edit the line asks for: the trained model, in both libraries
    edit_config(folder, target_modules=["q_proj", "v_proj"], exclude_modules=None, layers_to_transform=None)
    lorakit.load_adapter(model, folder)
    assert_close(logits(model, IDS), want)


def test_the_command_line_says_the_edit_and_no_other_base(tmp_path, capsys):
    """``lorakit merge`` / ``generate`` add "pass --model ..." to refusals that mean another base; this one is the
    folder disagreeing with itself on this base's own layers, so the line ends with the edit."""
    from lorakit.cli import main
    from test_serve_support import tiny_hf_folder

    base = tiny_hf_folder(tmp_path / "base")
    folder = tmp_path / "adapter"
    theirs = quiet(peft.get_peft_model, tf.AutoModelForCausalLM.from_pretrained(base),
                   peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    quiet(theirs.save_pretrained, folder)
    edit_config(folder, target_modules=["q_proj"], base_model_name_or_path="meta-llama/Llama-3.2-1B")
    for command in (["merge", "--out", str(tmp_path / "merged")], ["generate", "--no-chat", "--max-new-tokens", "2", "hi"]):
        capsys.readouterr()
        assert main([command[0], "--model", str(base), "--adapter", str(folder), *command[1:]]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and line.endswith("add v_proj to target_modules in adapter_config.json"), line


def test_keys_of_another_model_keep_their_own_hint(tmp_path):
    """The hint speaks of this model's layers only: keys naming modules it lacks (an adapter of the bare
    LlamaModel loaded into LlamaForCausalLM) keep the hint to load the other class."""
    inner = quiet(peft.get_peft_model, build().model, peft.LoraConfig(r=4, target_modules=["q_proj"]))
    quiet(inner.save_pretrained, tmp_path / "inner")
    edit_config(tmp_path / "inner", target_modules=["k_proj"])
    with pytest.raises(lorakit.LorakitError) as error:
        lorakit.load_adapter(build(), tmp_path / "inner")
    assert "leaves out" not in str(error.value) and re.search(r"'model'", str(error.value)), str(error.value)


def test_vera_saved_without_its_projections_draws_them_as_peft_does(tmp_path, capsys):
    """``VeraConfig(save_projection=False)`` saves the scaling vectors alone; peft draws the shared vera_A / vera_B
    again from ``projection_prng_key`` at the model's largest adapted layer. lorakit refused such a file, saying to
    re-save it with save_projection=True, which peft cannot do for a model loaded from it (its buffers stay
    unsaved: "Model was initialised to not save vera_A and vera_B"). It now draws them the same way: peft's logits on
    Qwen3 (layers of 5 shapes, a non-default key), peft's merge_and_unload through ``lorakit merge``, and inspect."""
    from lorakit.cli import main
    from test_serve_support import make_tokenizer

    base = tmp_path / "base"
    build("qwen3").save_pretrained(base)
    make_tokenizer().save_pretrained(base)
    config = quiet(peft.VeraConfig, r=8, target_modules="all-linear", save_projection=False, projection_prng_key=1234)
    folder = peft_folder(tmp_path / "vera", "qwen3", config)
    theirs = quiet(peft.PeftModel.from_pretrained, build("qwen3"), folder).eval()
    want = logits(theirs, IDS)
    assert (want - logits(build("qwen3"), IDS)).abs().max() > 1e-2  # the adapter matters
    model = build("qwen3")
    lorakit.load_adapter(model, folder)
    assert_close(logits(model, IDS), want)
    assert main(["merge", "--model", str(base), "--adapter", str(folder), "--out", str(tmp_path / "merged"),
                 "--dtype", "float32"]) == 0
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(logits(merged, IDS), logits(quiet(theirs.merge_and_unload), IDS))
    capsys.readouterr()
    assert main(["inspect", str(folder)]) == 0
    assert "peft VeRA (VERA), loaded as the plain LoRA it equals" in capsys.readouterr().out
    # the key is the draw: another key is another adapter (so the key is what was read)
    edit_config(folder, projection_prng_key=0)
    other = build("qwen3")
    lorakit.load_adapter(other, folder)
    assert (logits(other, IDS) - want).abs().max() > 1e-3


@pytest.mark.parametrize("fields", [dict(init_lora_weights="pissa"), dict(init_lora_weights="olora"),
                                    dict(kasa_config={})], ids=["pissa", "olora", "kasa"])
def test_adalora_with_lora_s_base_rewriting_fields_runs_on_the_untouched_base(fields, tmp_path):
    """AdaLoraConfig is a LoraConfig, so a user can set init_lora_weights="pissa" / "olora" or kasa_config on it;
    peft's AdaLoRA layers (SVDLinear) never run them and leave the base as it is. lorakit read the fields from the
    file and rewrote the base as for a LoRA (a rank-2r plain form): logits 3e-2 to 9e-2 off peft's."""
    from peft.tuners.lora.config import KasaConfig

    if "kasa_config" in fields:
        fields = dict(kasa_config=KasaConfig())
    config = quiet(peft.AdaLoraConfig, total_step=10, init_r=4, target_r=2, target_modules=["q_proj", "v_proj", "down_proj"],
                   **fields)
    folder = peft_folder(tmp_path / "adalora", config=config)
    want = logits(quiet(peft.PeftModel.from_pretrained, build(), folder).eval(), IDS)
    model = build()
    lorakit.load_adapter(model, folder)
    assert_close(logits(model, IDS), want)
    assert lorakit.read_adapter(folder).base_rewrite is None
    # training it is refused for being AdaLoRA, not for an init peft never ran
    with pytest.raises(lorakit.LorakitError, match=r"AdaLoRA \(peft trains") as error:
        lorakit.load_adapter(build(), folder, trainable=True)
    assert "PiSSA" not in str(error.value) and "OLoRA" not in str(error.value) and "KaSA" not in str(error.value)


def test_adalora_with_layer_replication_is_refused_by_name(tmp_path):
    """peft's AdaLoRA copies layers by layer_replication as LoRA does (here 2 layers run as 4, each with its own
    update); lorakit refused it as "unexpected tensor keys" of layers the model lacks. Now by name, as for a LoRA."""
    config = quiet(peft.AdaLoraConfig, total_step=10, init_r=4, target_r=2, target_modules=["q_proj", "v_proj"],
                   layer_replication=[[0, 2], [1, 2]])
    folder = peft_folder(tmp_path / "adalora", config=config)
    with pytest.raises(lorakit.LorakitError, match=r"PEFT option layer_replication=\[\[0, 2\], \[1, 2\]\] is not supported "
                                                   r"by lorakit .*run it with peft") as error:
        lorakit.load_adapter(build(), folder)
    assert "\n" not in str(error.value)
