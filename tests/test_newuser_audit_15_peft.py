"""Audit 15: every field of peft 0.21's LoraConfig (and PeftConfig) in adapters saved by the real peft package, loaded
by lorakit. The fields earlier tests left out are checked here: each loads with peft's logits (and saves back for
peft, and merges to the same logits) or is refused in one line naming the field and what to do.

peft's variants whose forward is a plain LoRA in another form (VeLoRA, MonteCLoRA, QA-LoRA, BD-LoRA, KaSA) were
refused as "changes the adapter's math"; they now load as that plain LoRA (``lorakit.peft_variants``).
"""

from __future__ import annotations

import json
import re
import warnings

import peft
import pytest
import torch
import transformers as tf
from peft.tuners.lora import config as lora_config
from safetensors.torch import load_file

import lorakit
from conftest import assert_close
from lorakit.cli import main
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from model_helpers import logits
from test_peft_sweep import SMALL, build, peft_saved, randomize_peft, refusal, round_trip

IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 99], [2, 4, 8, 16, 32, 63, 98]])
QV = ["q_proj", "v_proj"]


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes (eva without data, fan_in_fan_out corrected, ...)
        return function(*args, **kwargs)


def from_peft(kind, folder):
    """peft's own load of ``folder`` on a fresh ``build(kind)`` (the logits lorakit must give)."""
    return quiet(peft.PeftModel.from_pretrained, build(kind), folder).eval()


def edit_config(folder, **changes):
    data = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**data, **changes}))
    return folder


# -- variants that run as a plain LoRA ------------------------------------------------------------------------------
PLAIN_FORMS = {
    # VeLoRA compresses the input kept for the backward pass only; the file adds lora_velora_embed
    "velora": dict(target_modules=QV, velora_config=lora_config.VeloraConfig(num_groups=4)),
    # MonteCLoRA samples noise on A in training only; the file adds its sampler's tensors
    "monteclora": dict(target_modules=QV, monteclora_config=lora_config.MontecloraConfig()),
    # KaSA: B diag(d) A on a base with its r smallest singular triplets removed (rank 2r on the original base)
    "kasa-rank-pattern-rslora": dict(target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                                     rank_pattern={"down_proj": 2}, kasa_config=lora_config.KasaConfig()),
    # BD-LoRA: q_proj's A and o_proj's B are saved as their stacked diagonal blocks
    "bdlora": dict(target_modules=["q_proj", "v_proj", "o_proj"], use_bdlora=lora_config.BdLoraConfig(
        target_modules_bd_a=["q_proj"], target_modules_bd_b=["o_proj"], nblocks=2, match_strict=False)),
    # QA-LoRA acts on GPTQ layers only: on a dense model peft runs (and saves) a plain LoRA
    "qalora-on-dense-layers": dict(target_modules=QV, use_qalora=True, qalora_group_size=8),
    # GPT-2's Conv1D (fan_in_fan_out) with VeLoRA and dropout
    "gpt2-velora": dict(kind="gpt2", target_modules=["c_attn", "c_fc"], lora_dropout=0.1,
                        velora_config=lora_config.VeloraConfig(num_groups=4)),
}


@pytest.mark.parametrize("case", list(PLAIN_FORMS))
def test_variants_that_run_as_a_plain_lora_load_both_ways(case, tmp_path):
    """Refused before ("PEFT option velora_config=... is not supported"): now peft's logits, its merge, and a file
    peft reads back; continued training (trainable=True) is refused in one line, the model untouched."""
    options = dict(PLAIN_FORMS[case])
    kind = options.pop("kind", "llama")
    ours = quiet(round_trip, kind, tmp_path, **options)
    assert not lorakit.adapter_names(ours)  # merged and unloaded by round_trip
    model = build(kind)
    with pytest.raises(lorakit.LorakitError, match=r"loads it as the plain LoRA it equals when it runs, .*trainable=False") as error:
        lorakit.load_adapter(model, tmp_path / "peft", trainable=True)
    assert "\n" not in str(error.value) and not lorakit.adapter_names(model)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("init, words", [("pissa", "PiSSA (loaded at rank 2r, so the init's own half would train too"),
                                         ("mica", "MiCA (peft keeps its B frozen)")])
def test_inits_that_train_otherwise_in_peft_are_not_loaded_for_training(init, words, tmp_path):
    """peft's PiSSA adapter loads at rank 2r ([B, -B0] [A; A0] on the original base) and MiCA's freezes B in peft:
    trainable=True trained the init's half (or B) too, silently another method than the one continued. Refused in one
    line; the plain LoRA that save_adapter writes then trains, from peft's logits."""
    quiet(peft_saved, "llama", tmp_path / "peft", target_modules=QV, init_lora_weights=init)
    model = build("llama")
    with pytest.raises(lorakit.LorakitError, match=re.escape(words) + ".*trainable=False.*lorakit.save_adapter") as error:
        lorakit.load_adapter(model, tmp_path / "peft", trainable=True)
    assert "\n" not in str(error.value) and not lorakit.adapter_names(model)
    lorakit.load_adapter(model, tmp_path / "peft")
    lorakit.save_adapter(model, tmp_path / "plain")
    again = build("llama")
    lorakit.load_adapter(again, tmp_path / "plain", trainable=True)
    assert_close(logits(again, IDS), logits(from_peft("llama", tmp_path / "peft"), IDS))
    assert all(p.requires_grad for _, p in lorakit.lora_parameters(again))


def test_kasa_adapter_merged_on_the_command_line(tmp_path, capsys):
    """``lorakit merge`` of peft's KaSA adapter writes the model peft's merge_and_unload gives."""
    from test_train_helpers import make_model_folder

    base = make_model_folder(tmp_path / "base")
    ids = torch.randint(0, 32, (2, 6))
    theirs = quiet(peft.get_peft_model, tf.AutoModelForCausalLM.from_pretrained(base),
                   peft.LoraConfig(r=4, target_modules=QV, kasa_config=lora_config.KasaConfig())).eval()
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "kasa")
    assert main(["merge", "--model", str(base), "--adapter", str(tmp_path / "kasa"), "--out", str(tmp_path / "merged")]) == 0
    merged = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert_close(logits(merged, ids), logits(theirs, ids))


def test_qalora_pooled_factors_of_gptq_layers(tmp_path, monkeypatch):
    """On GPTQ layers peft's QA-LoRA saves A as (r, in / g): it reads the input averaged over groups of g features,
    times in / g. peft runs it with QALoraLinearVariant (made here on dense layers, as peft's GPTQ layer picks it);
    lorakit loads the same update as the plain A (r, in) and saves it so that peft reads it without QA-LoRA."""
    from peft.tuners.lora import layer, variants

    def qalora_variant(self, *, config, **kwargs):
        return variants.QALoraLinearVariant() if config.use_qalora else None

    with monkeypatch.context() as patched:
        patched.setattr(layer.Linear, "resolve_lora_variant", qalora_variant)
        theirs = peft_saved("llama", tmp_path / "peft", target_modules=QV, use_qalora=True, qalora_group_size=8)
        assert load_file(tmp_path / "peft" / WEIGHTS_NAME)[
            "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 4)  # in 32 / 8
        expected = logits(theirs, IDS)
    assert (expected - logits(build("llama"), IDS)).abs().max() > 1e-2
    ours = build("llama")
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert_close(logits(ours, IDS), expected)
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert_close(logits(from_peft("llama", tmp_path / "ours"), IDS), expected)  # plain peft: no QA-LoRA there
    lorakit.merge_and_unload(ours)  # peft cannot merge QA-LoRA; the plain form can
    assert_close(logits(ours, IDS), expected)


def test_moe_expert_parameters_with_rslora_alpha_pattern_and_chosen_layers(tmp_path):
    """Already agreed: peft's ParamWrapper LoRA on Qwen2-MoE's fused experts (target_parameters) with rsLoRA, an
    alpha_pattern key and layers_to_transform, beside LoRA on q_proj: peft's logits both ways and in the merge."""
    from test_newuser_audit_13_peft import both_ways

    quiet(both_ways, "qwen2moe", tmp_path, target_modules=["q_proj"], use_rslora=True, alpha_pattern={"down_proj": 3.0},
          target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"], layers_to_transform=[1],
          layers_pattern="layers")


# -- fields that only describe the file, or change nothing a saved adapter does ---------------------------------------
def test_file_fields_and_noop_options_load_with_peft_logits(tmp_path):
    """Already agreed (audit 15 found no defect): kept so they stay that way. Each folder is saved by peft with the
    option, loaded by peft and by lorakit."""
    cases = {
        "task-type-none": ("llama", dict(task_type=None)),  # peft writes auto_mapping {"base_model_class": ...}
        "inference-mode-false": ("llama", dict(inference_mode=False)),
        "revision": ("llama", dict(revision="v2.0")),
        "init-false": ("llama", dict(init_lora_weights=False)),
        "fan-in-fan-out-on-linear": ("llama", dict(fan_in_fan_out=True)),  # peft sets it back to False, warning
        # (it moves DoRA's init to a GPU: CUDA only, so without DoRA here)
        "runtime-ephemeral-offload": ("llama", dict(runtime_config=lora_config.LoraRuntimeConfig(ephemeral_gpu_offload=True))),
        "exclude-regex": ("llama", dict(target_modules="all-linear", exclude_modules=r".*\.mlp\.(up|down)_proj")),
    }
    for name, (kind, options) in cases.items():
        folder = tmp_path / name
        quiet(peft_saved, kind, folder, **{"target_modules": QV, **options})
        ours = build(kind)
        lorakit.load_adapter(ours, folder)
        assert_close(logits(ours, IDS), logits(from_peft(kind, folder), IDS), msg=name)
    saved = json.loads((tmp_path / "task-type-none" / CONFIG_NAME).read_text())
    assert saved["auto_mapping"]["base_model_class"] == "LlamaForCausalLM" and saved["peft_version"].startswith("0.21")
    assert "runtime_config" not in json.loads((tmp_path / "runtime-ephemeral-offload" / CONFIG_NAME).read_text())
    # an older peft wrote runtime_config into the file: a setting of DoRA's init speed, ignored
    folder = edit_config(tmp_path / "runtime-ephemeral-offload", runtime_config={"ephemeral_gpu_offload": True})
    lorakit.load_adapter(build("llama"), folder)


def test_fan_in_fan_out_false_on_gpt2_conv1d(tmp_path):
    """GPT-2's Conv1D layers with fan_in_fan_out=False (peft corrects it to True, warning): same logits both ways."""
    quiet(round_trip, "gpt2", tmp_path, target_modules=["c_attn", "c_proj"], fan_in_fan_out=False, use_dora=True)


def test_feature_extraction_adapter_on_the_bare_model(tmp_path):
    """task_type FEATURE_EXTRACTION: peft wraps the bare LlamaModel (no head); lorakit loads its file on one."""
    def bare():
        torch.manual_seed(0)
        return tf.LlamaModel(tf.LlamaConfig(num_key_value_heads=2, **SMALL)).eval()

    theirs = peft.get_peft_model(bare(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=QV,
                                                         task_type="FEATURE_EXTRACTION")).eval()
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    with torch.no_grad():
        expected = theirs(input_ids=IDS).last_hidden_state
    ours = bare()
    lorakit.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        assert_close(ours(input_ids=IDS).last_hidden_state, expected)
    lorakit.save_adapter(ours, tmp_path / "ours")
    again = peft.PeftModel.from_pretrained(bare(), tmp_path / "ours").eval()
    with torch.no_grad():
        assert_close(again(input_ids=IDS).last_hidden_state, expected)


TASK_MODELS = {  # task_type -> (model class, config, targets); SEQ_CLS is test_peft_sweep's
    "TOKEN_CLS": (tf.LlamaForTokenClassification, lambda: tf.LlamaConfig(num_key_value_heads=2, num_labels=3,
                                                                         pad_token_id=0, **SMALL), QV),
    "QUESTION_ANS": (tf.LlamaForQuestionAnswering, lambda: tf.LlamaConfig(num_key_value_heads=2, pad_token_id=0, **SMALL), QV),
    "SEQ_2_SEQ_LM": (tf.T5ForConditionalGeneration, lambda: tf.T5Config(vocab_size=100, d_model=32, d_ff=48, num_layers=2,
                                                                        num_heads=4, d_kv=8, decoder_start_token_id=0),
                     ["q", "v"]),
}


@pytest.mark.parametrize("task", list(TASK_MODELS))
def test_task_types_with_their_heads_both_ways(task, tmp_path):
    """Already agreed: peft's task wrappers (a head copy as modules_to_save for TOKEN_CLS / QUESTION_ANS, an
    encoder-decoder for SEQ_2_SEQ_LM) load with peft's outputs, and lorakit's file names the same task for peft."""
    model_class, config, targets = TASK_MODELS[task]

    def make():
        torch.manual_seed(0)
        return model_class(config()).eval()

    def outputs(model):
        with torch.no_grad():
            out = model(input_ids=IDS, **({"decoder_input_ids": IDS} if task == "SEQ_2_SEQ_LM" else {}))
        return out.start_logits if task == "QUESTION_ANS" else out.logits

    theirs = peft.get_peft_model(make(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task)).eval()
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    ours = make()
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert_close(outputs(ours), outputs(theirs))
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert json.loads((tmp_path / "ours" / CONFIG_NAME).read_text())["task_type"] == task
    assert_close(outputs(peft.PeftModel.from_pretrained(make(), tmp_path / "ours").eval()), outputs(theirs))


def test_base_named_by_a_relative_path_or_not_at_all(tmp_path, monkeypatch, capsys):
    """peft writes base_model_name_or_path as the model was loaded (a relative folder, or null for a model built in
    memory). ``lorakit generate`` with --model runs either, quietly; without --model, a relative name that is a
    folder here is given back as the --model to pass."""
    from test_train_helpers import make_model_folder

    make_model_folder(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    theirs = quiet(peft.get_peft_model, tf.AutoModelForCausalLM.from_pretrained("base"),
                   peft.LoraConfig(r=4, target_modules=QV))
    theirs.save_pretrained("adapter")
    assert json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())["base_model_name_or_path"] == "base"
    capsys.readouterr()
    run = ["generate", "--model", str(tmp_path / "base"), "--adapter", "adapter", "--max-new-tokens", "1", "a"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "names another base" warning for the same folder
        assert main(run) == 0
    assert main(["generate", "--adapter", "adapter", "--max-new-tokens", "1", "a"]) == 2
    assert "pass --model base" in capsys.readouterr().err
    data = json.loads((tmp_path / "adapter" / CONFIG_NAME).read_text())
    (tmp_path / "adapter" / CONFIG_NAME).write_text(json.dumps({k: v for k, v in data.items() if k != "base_model_name_or_path"}))
    assert main(run) == 0


# -- fields from another peft version ---------------------------------------------------------------------------------
def test_fields_of_a_newer_peft_that_are_off_warn_instead_of_refusing(tmp_path):
    """A newer peft writes every field it has, most of them off. An object of settings that are all off (as peft's
    runtime_config {"ephemeral_gpu_offload": false}) was refused as an "unknown field"; such fields are now named in
    one warning and ignored. A field that switches something on is still refused in one line."""
    ids = IDS
    theirs = peft_saved("llama", tmp_path, target_modules=QV)
    edit_config(tmp_path, peft_version="0.25.0", new_method_config=None, use_new_method=False,
                new_runtime={"offload": False, "cache": None}, new_tokens=[])
    ours = build("llama")
    with pytest.warns(UserWarning, match=r"ignored field\(s\) lorakit does not know, all off \('new_method_config', "
                                         r"'use_new_method', 'new_runtime', 'new_tokens'; saved by peft 0\.25\.0") as record:
        lorakit.load_adapter(ours, tmp_path)
    assert len([w for w in record if "ignored field" in str(w.message)]) == 1
    assert_close(logits(ours, ids), logits(theirs, ids))
    edit_config(tmp_path, new_runtime={"offload": True})
    assert "unknown field 'new_runtime'={'offload': True} (saved by peft 0.25.0" in refusal(tmp_path)


# -- refused, in one line that names the field --------------------------------------------------------------------------
def test_fields_lorakit_cannot_apply_are_refused_by_name(tmp_path):
    peft_saved("llama", tmp_path / "a", target_modules=QV)
    cases = [  # (config changes, words of the one-line refusal)
        # peft itself cannot load it without Megatron installed; the layers are Megatron's
        (dict(megatron_config={"tensor_model_parallel_size": 2}), "PEFT option megatron_config="),
        (dict(arrow_config={"top_k": 2, "router_temperature": 1.0}), "arrow_config=.*Arrow's routing of each token"),
        # peft reads {} as ArrowConfig() with its default settings: on (lorakit took it for "off" and loaded it)
        (dict(arrow_config={}), r"arrow_config=\{\} is not supported .*Arrow's routing"),
        (dict(kasa_config={"beta": 0.0001}, use_dora=True), "kasa_config together with use_dora=True"),
        (dict(use_bdlora={"nblocks": 0, "target_modules_bd_a": ["q_proj"]}), "use_bdlora.nblocks must be a positive"),
        (dict(use_qalora="yes"), "use_qalora must be true or false, got 'yes'"),
        (dict(velora_config=[4]), "velora_config must be an object of settings"),
    ]
    for changes, words in cases:
        folder = edit_config(tmp_path / "a", **{"megatron_config": None, "arrow_config": None, "kasa_config": None,
                                                "use_dora": False, "use_bdlora": None, "use_qalora": False,
                                                "velora_config": None, **changes})
        message = refusal(folder)
        assert re.search(words, message), message
    # from the config alone (no tensors) these cannot be read: said with what can
    with pytest.raises(lorakit.LorakitError, match="velora_config=.* cannot be part of a LoraConfig; lorakit.load_adapter"):
        lorakit.LoraConfig.from_peft_dict({"r": 4, "target_modules": QV, "velora_config": {"num_groups": 4}})


def test_a_lora_ga_adapter_is_refused_with_the_conversion_to_use(tmp_path):
    """LoRA-GA's init (from gradients of data) rewrote the base; peft's own load falls back to the plain init on the
    original base, so its logits are not the trained model's either: lorakit refuses, saying how peft converts it."""
    quiet(peft_saved, "llama", tmp_path, target_modules=QV, init_lora_weights="lora_ga",
          lora_ga_config=lora_config.LoraGAConfig())
    message = refusal(tmp_path)
    assert "init_lora_weights='lora_ga' rewrote the base weights" in message
    assert "path_initial_model_for_weight_conversion" in message


# -- the reverse: adapters lorakit makes, read by peft 0.21 --------------------------------------------------------------
LORAKIT_MADE = [  # (model, LoraConfig fields) for each variant: the options lorakit writes into adapter_config.json
    ("llama", dict(target_modules=["q_proj", "v_proj", "embed_tokens", "down_proj"], rank_pattern={"down_proj": 2},
                   alpha_pattern={r"layers\.1\..*": 3.0})),
    ("gpt2", dict(target_modules="all-linear", exclude_modules=r".*\.1\.mlp\..*", modules_to_save=["ln_f"])),
    ("llama-tied", dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[1], layers_pattern="layers",
                        init="gaussian")),
    ("llama", dict(target_modules=["q_proj", "up_proj"], init="pissa")),
]


@pytest.mark.parametrize("variant", ["lora", "rslora", "dora", "rsdora"])
def test_lorakit_adapters_of_each_variant_load_in_peft(variant, tmp_path):
    """Already agreed: each variant with per-module patterns and an embedding, GPT-2's Conv1D with a regex exclude and
    a whole copy, chosen layers with the gaussian init, and PiSSA: peft's from_pretrained gives lorakit's logits."""
    for index, (kind, fields) in enumerate(LORAKIT_MADE):
        model = build(kind)
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=8, variant=variant, **fields))
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for _, parameter in lorakit.lora_parameters(model):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        expected = logits(model, IDS)
        assert (expected - logits(build(kind), IDS)).abs().max() > 1e-2, (kind, fields)
        lorakit.save_adapter(model, tmp_path / str(index))
        assert_close(logits(from_peft(kind, tmp_path / str(index)), IDS), expected, msg=f"{kind} {fields}")
