"""Adapters saved by the real peft package (0.21) with LoraConfig options the other peft tests leave out, and hostile
adapter folders (audit 13): each defect found is a regression test here; the options that already agreed are
checked once in ``test_more_peft_options_both_ways`` so they stay that way.

Each round trip (``test_peft_sweep.round_trip``): peft builds the adapter on a tiny random model with random non-zero
weights; lorakit loads the saved folder into a fresh base (peft's logits), saves it back for peft (same logits) and
merges (same logits, and peft's merge_and_unload's where peft's merge is right).
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
from lorakit.io import CONFIG_NAME, WEIGHTS_NAME
from model_helpers import logits
from test_peft_sweep import SMALL, build, randomize_peft, round_trip

IDS = torch.tensor([[1, 5, 9, 17, 33, 64, 99], [2, 4, 8, 16, 32, 63, 98]])


def gemma3() -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, **SMALL)).eval()


MORE = {  # tiny models of families test_peft_sweep does not build
    "olmo": lambda: tf.OlmoForCausalLM(tf.OlmoConfig(num_key_value_heads=2, **SMALL)),
    "qwen2moe": lambda: tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        num_key_value_heads=2, moe_intermediate_size=16, shared_expert_intermediate_size=24, num_experts=4,
        num_experts_per_tok=2, **SMALL)),
    "gemma3": lambda: tf.Gemma3ForCausalLM(tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, **SMALL)),
}


def make(kind: str) -> torch.nn.Module:
    if kind not in MORE:
        return build(kind)
    torch.manual_seed(0)
    return MORE[kind]().eval()


def both_ways(kind, tmp_path, dtype=None, **options):
    """peft's adapter (saved in ``dtype`` when given) -> lorakit (peft's logits) -> lorakit's file -> peft (same
    logits); lorakit's merge gives peft's merge_and_unload."""
    theirs = peft.get_peft_model(make(kind).to(dtype or torch.float32), peft.LoraConfig(r=4, lora_alpha=8, **options),
                                 autocast_adapter_dtype=False).eval()
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "peft")
    theirs = peft.PeftModel.from_pretrained(make(kind), tmp_path / "peft").eval()  # float32, as the model below
    expected = logits(theirs, IDS)
    assert (expected - logits(make(kind), IDS)).abs().max() > 1e-2  # the adapter matters
    ours = make(kind)
    lorakit.load_adapter(ours, tmp_path / "peft")
    assert_close(logits(ours, IDS), expected)
    lorakit.save_adapter(ours, tmp_path / "ours")
    assert_close(logits(peft.PeftModel.from_pretrained(make(kind), tmp_path / "ours").eval(), IDS), expected)
    lorakit.merge_and_unload(ours)
    assert_close(logits(ours, IDS), logits(theirs.merge_and_unload(), IDS))


AGREEING = {  # options that agreed when audit 13 tried them; kept so they stay that way
    "olmo-regex-rank-and-alpha-patterns": ("olmo", dict(target_modules=["q_proj", "k_proj", "down_proj"],
                                                        rank_pattern={r"layers\.[01]\.self_attn\.(q|k)_proj": 2},
                                                        alpha_pattern={r"^model\.layers\.1\..*": 2.5})),
    "full-path-targets-and-excludes": ("llama", dict(target_modules=["model.layers.0.self_attn.q_proj", "self_attn.v_proj",
                                                                     "layers.1.mlp.down_proj"],
                                                     exclude_modules=["layers.1.self_attn.v_proj"])),
    "layers-pattern-list": ("llama", dict(target_modules=["q_proj", "v_proj"], layers_to_transform=[1],
                                          layers_pattern=["h", "layers"])),
    "gpt2-conv1d-dora-rslora-rank-pattern": ("gpt2", dict(target_modules=["c_attn", "c_fc", "c_proj"], use_dora=True,
                                                          use_rslora=True, fan_in_fan_out=True, rank_pattern={"c_fc": 2})),
    "eva-redistributed-ranks": ("mistral", dict(target_modules=["q_proj", "v_proj"], init_lora_weights="eva",
                                                rank_pattern={"model.layers.0.self_attn.q_proj": 2, "v_proj": 6})),
    "pissa-rslora-patterns": ("llama", dict(target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights="pissa",
                                            use_rslora=True, rank_pattern={"up_proj": 2}, alpha_pattern={"v_proj": 3})),
    "gemma3-all-linear-exclude-rslora": ("gemma3", dict(target_modules="all-linear", exclude_modules=["o_proj"],
                                                        rank_pattern={"^model.layers.0.mlp.*": 2}, use_rslora=True)),
    # peft warns that the pattern matched no module, yet applies it to the expert parameters (as lorakit does)
    "moe-expert-parameters-rank-pattern-router-whole": ("qwen2moe", dict(
        target_modules=[], target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        rank_pattern={"down_proj": 2}, modules_to_save=["gate"])),
    # (not with an embedding target: peft then loads its bfloat16 copy of the embedding over the float32 base)
    "bfloat16-file-on-a-float32-model": ("llama", dict(target_modules=["q_proj", "v_proj"], use_dora=True,
                                                       dtype=torch.bfloat16)),
}


@pytest.mark.parametrize("case", list(AGREEING))
def test_more_peft_options_both_ways(case, tmp_path):
    kind, options = AGREEING[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes (unmatched patterns, eva without data, tied embeddings)
        both_ways(kind, tmp_path, **options)


def test_peft_adapter_folder_of_two_adapters_switched_mixed_and_deleted(tmp_path):
    """peft's folder of two named adapters (one/, two/) with trained token rows (whole copies in lorakit): each
    loaded by name gives peft's logits; a mixed batch gives peft's ``adapter_names=`` forward; after deleting one,
    the other still does, and saves back for peft."""
    theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"],
                                                                 trainable_token_indices=[2]), adapter_name="one")
    theirs.add_adapter("two", peft.LoraConfig(r=2, lora_alpha=6, target_modules=["v_proj"],
                                              trainable_token_indices=[1, 5]))
    randomize_peft(theirs)
    theirs.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} >= {"one", "two"}
    ours = build("llama")
    for name in ("one", "two"):
        lorakit.load_adapter(ours, tmp_path / name, adapter=name)
    expected = {}
    for name in ("one", "two"):
        theirs.set_adapter(name)
        lorakit.set_adapter(ours, name)
        expected[name] = logits(theirs, IDS)
        assert_close(logits(ours, IDS), expected[name], msg=name)
    rows = ["two", None, "one"]
    with lorakit.mixed_batch(ours, rows), torch.no_grad():
        mixed = ours(torch.cat([IDS, IDS[:1]])).logits
    with torch.no_grad():
        assert_close(mixed, theirs(torch.cat([IDS, IDS[:1]]), adapter_names=["two", "__base__", "one"]).logits)
    lorakit.delete_adapter(ours, "one")
    lorakit.set_adapter(ours, "two")
    assert_close(logits(ours, IDS), expected["two"])
    lorakit.save_adapter(ours, tmp_path / "ours", adapter="two")
    assert_close(logits(peft.PeftModel.from_pretrained(build("llama"), tmp_path / "ours").eval(), IDS), expected["two"])


# -- modules_to_save of a tied embedding or head with ensure_weight_tying -------------------------------------------
@pytest.mark.parametrize("saved", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_a_trained_copy_of_a_tied_embedding_with_ensure_weight_tying(saved, tmp_path):
    """peft's ensure_weight_tying on a tied model with modules_to_save naming the embedding or the head: peft trains
    one copy, used by both (it rewrites ["lm_head"] as ["model.embed_tokens"]), and saves it twice, as the
    embedding's and as lm_head.weight. lorakit refused the head's as "a full copy of lm_head.weight (peft's
    save_embedding_layers) that differs from this model's". (peft's own merge_and_unload is not compared: it is off
    on tied weights.)"""
    round_trip("llama-tied", tmp_path, target_modules=["q_proj"], modules_to_save=saved, ensure_weight_tying=True,
               peft_merge_ok=False)


def test_a_trained_copy_of_gemma3s_scaled_tied_embedding(tmp_path):
    """The same on Gemma 3, whose embedding scales its output (Gemma3TextScaledWordEmbedding) and whose head is tied."""
    theirs = peft.get_peft_model(gemma3(), peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
                                                           ensure_weight_tying=True)).eval()
    with torch.no_grad():
        theirs.base_model.model.model.embed_tokens.modules_to_save["default"].weight.add_(0.05 * torch.randn(100, 32))
    theirs.save_pretrained(tmp_path)
    ours = gemma3()
    lorakit.load_adapter(ours, tmp_path)
    assert_close(logits(ours, IDS), logits(theirs, IDS))
    assert (logits(ours, IDS) - logits(gemma3(), IDS)).abs().max() > 1e-2


# -- saving over an adapter folder: both files or neither ------------------------------------------------------------
@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt(), "no hard links"])
def test_a_save_that_fails_halfway_leaves_the_previous_adapter_whole(failure, tmp_path, monkeypatch):
    """save_adapter replaced the weights, then wrote the config: a failure in between (a full disk, Ctrl-C) left the
    new weights beside the old config, a pair that loads without a word with the old alpha (here 8 for 32: the
    update off by 4x). Now the previous pair stays, byte for byte, and no temporary file is left. Where the file
    system has no hard links (no copy of the old weights to put back) the stale config goes: refused, not wrong."""
    import os

    no_links = failure == "no hard links"
    failure = OSError(28, "No space left on device") if no_links else failure

    def adapted(alpha):
        model = build("llama")
        lorakit.inject(model, lorakit.LoraConfig(r=4, alpha=alpha, target_modules=["q_proj"]))
        with torch.no_grad():
            for _, p in lorakit.lora_parameters(model):
                p.add_(0.3 * torch.randn_like(p))
        return model

    old, new = adapted(8), adapted(32)
    lorakit.save_adapter(old, tmp_path / "adapter")
    before = {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()}
    real = os.replace

    def config_rename_fails(src, dst, *args, **kwargs):
        if str(dst).endswith(CONFIG_NAME):
            raise failure
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", config_rename_fails)
    if no_links:
        def link_refused(*args, **kwargs):
            raise OSError(1, "Operation not permitted")

        monkeypatch.setattr(os, "link", link_refused)
    with pytest.raises(type(failure)) if isinstance(failure, KeyboardInterrupt) else pytest.raises(
            lorakit.LorakitError, match=r"cannot save the adapter to .*: No space left on device; choose a folder"):
        lorakit.save_adapter(new, tmp_path / "adapter")
    monkeypatch.undo()
    if no_links:
        assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [WEIGHTS_NAME]
        assert f"{CONFIG_NAME} not found" in refusal(tmp_path / "adapter")
        return
    assert {p.name: p.read_bytes() for p in (tmp_path / "adapter").iterdir()} == before
    again = build("llama")
    lorakit.load_adapter(again, tmp_path / "adapter")
    assert_close(logits(again, IDS), logits(old, IDS))


# -- hostile folders ------------------------------------------------------------------------------------------------
@pytest.fixture
def adapter_folder(tmp_path):
    model = build("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    return lorakit.save_adapter(model, tmp_path / "adapter")


def refusal(folder, **options) -> str:
    model = build("llama")
    with pytest.raises(lorakit.LorakitError) as error:
        lorakit.load_adapter(model, folder, **options)
    assert "\n" not in str(error.value) and not lorakit.adapter_names(model)
    return str(error.value)


@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME])
@pytest.mark.parametrize("points_to", ["nowhere", "itself"])
def test_a_broken_link_is_named_as_a_link_when_links_are_refused(name, points_to, adapter_folder):
    """With follow_symlinks=False (a server's adapter folders) a dangling link, or one that points to itself, was
    reported as "adapter_model.safetensors not found; ... it holds adapter_model.safetensors" (or the config "not
    found"), where the user sees the file. It is refused as the link it is, as a link to a real file is."""
    target = adapter_folder / name
    target.unlink()
    target.symlink_to(target if points_to == "itself" else adapter_folder / "gone")
    assert f"{target} is a symbolic link, refused here (follow_symlinks=False)" in refusal(adapter_folder,
                                                                                           follow_symlinks=False)
    followed = refusal(adapter_folder)  # followed: where it points, or that it is a loop
    assert ("leads back to itself" if points_to == "itself" else "which does not exist") in followed


@pytest.mark.parametrize("options, words", [
    (dict(layers_to_transform=[5], layers_pattern="layers"), r"layers_to_transform \(2\) takes out every one, leaving "
                                                             r"nothing to adapt: \[5\] names no layer of these modules "
                                                             r"\(their layers: 0, 1\); choose among those"),
    (dict(layers_to_transform=[0], layers_pattern="h"), r"layers_pattern 'h' is no part of their paths \(such as "
                                                        r"model\.layers\.0\.self_attn\.q_proj\); name the part before "
                                                        r"the layer number"),
])
def test_layers_to_transform_that_leaves_nothing_says_which_field_is_wrong(options, words, tmp_path):
    """A GPT-2 adapter's layers_pattern "h" on a Llama, or a layer number the model lacks (a 2-layer model's layer 5),
    was refused with "... layers_to_transform (2) takes out every one ...; narrow layers_to_transform or widen
    target_modules", advice that cannot help: the file's pattern or its numbers do not fit this model."""
    model = build("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    (tmp_path / CONFIG_NAME).write_text(json.dumps({**config, **options}))
    assert re.search(words, refusal(tmp_path))


@pytest.mark.parametrize("options", [dict(modules_to_save=["embed_tokens", "lm_head"]), dict(modules_to_save=["lm_head"]),
                                     dict(trainable_token_indices=[100, 101]), dict(target_modules=["q_proj", "lm_head"]),
                                     dict(target_modules=["embed_tokens"], save_embedding_layers=False)])
def test_copies_from_a_resized_vocabulary_say_to_resize_the_base(options, tmp_path):
    """A user adds two tokens (model.resize_token_embeddings(102)) and trains copies of the embedding and head, the
    new rows (trainable_token_indices), or LoRA on the head or embedding (without peft's full copy): on the original
    base the refusal said only "has shape (102, 32), but this model's ... is (100, 32)", "a delta ... for 2 token ids
    up to 101" or "the adapter was made for a different model or rank"; the LoRA-on-embedding case with the full copy
    already said to resize the base. Now all of them do, and the resized base loads the adapter with peft's logits."""
    options = {"target_modules": ["q_proj"], **options}
    save_embedding_layers = options.pop("save_embedding_layers", "auto")
    def resized():
        model = build("llama")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.resize_token_embeddings(102, mean_resizing=False)
        return model

    theirs = peft.get_peft_model(resized(), peft.LoraConfig(r=4, **options)).eval()
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path, save_embedding_layers=save_embedding_layers)
    # lorakit.load_adapter resizes a plain base for peft's whole saved copies (test_newuser_audit_14_tokenizers);
    # without the resize, or with no whole copy in the file, the refusal says to resize the base
    said = refusal(tmp_path, resize_vocabulary=False)
    assert re.search(r"resize_token_embeddings\((102|N)\)|resized to 102 tokens \(its saved .*lorakit merge", said)
    ours = resized()
    lorakit.load_adapter(ours, tmp_path)
    assert_close(logits(ours, IDS), logits(theirs, IDS))


# -- several active adapters ------------------------------------------------------------------------------------------
def test_two_active_adapters_with_copies_of_one_module_are_refused(tmp_path):
    """set_adapter(model, ["one", "two"]) when both hold a whole trained copy of lm_head (modules_to_save, or peft's
    trainable tokens): lorakit ran the last one's copy without a word (peft refuses several active modules_to_save
    adapters). Refused by name, with the active adapters unchanged; LoRA layers still sum when one copy is active."""
    for name, options in (("one", dict(target_modules=["q_proj"], modules_to_save=["lm_head"])),
                          ("two", dict(target_modules=["v_proj"], modules_to_save=["lm_head"])),
                          ("three", dict(target_modules=["k_proj"]))):
        theirs = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, **options)).eval()
        randomize_peft(theirs)
        theirs.save_pretrained(tmp_path / name)
    ours = build("llama")
    for name in ("one", "two", "three"):
        lorakit.load_adapter(ours, tmp_path / name, adapter=name)
    lorakit.set_adapter(ours, "two")
    with pytest.raises(lorakit.LorakitError, match=r"adapters 'one' and 'two' both hold a whole trained copy of lm_head.*"
                                                   r"activate one of them.*mixed_batch"):
        lorakit.set_adapter(ours, ["one", "two"])
    assert lorakit.active_adapters(ours) == ["two"]
    lorakit.set_adapter(ours, ["one", "three"])  # one copy, two LoRAs: peft's sum of the two
    theirs = peft.PeftModel.from_pretrained(build("llama"), tmp_path / "one", adapter_name="one")
    theirs.load_adapter(tmp_path / "three", adapter_name="three")
    theirs.base_model.set_adapter(["one", "three"])
    assert_close(logits(ours, IDS), logits(theirs.eval(), IDS))


@pytest.mark.parametrize("name", [WEIGHTS_NAME, CONFIG_NAME])
def test_a_link_to_a_proc_file_is_not_asked_to_be_read_again(name, adapter_folder):
    """A link to a /proc file (size 0 on disk, content when read) was "changed while it was read (0 bytes expected,
    1 read); try again", which fails the same way every time."""
    (adapter_folder / name).unlink()
    (adapter_folder / name).symlink_to("/proc/self/status")
    message = refusal(adapter_folder)
    assert "reports a size of 0 bytes but has content" in message and "try again" not in message


def test_a_weights_file_longer_than_its_header_says_is_refused_before_it_is_read(adapter_folder, monkeypatch):
    """A weights file padded far past its tensors (a sparse file of gigabytes; a copy that appended to an old file)
    was read whole into memory before safetensors found it "not fully covered". The header says how long the file
    must be: checked first, reading only the header."""
    import lorakit.io as io

    weights = adapter_folder / WEIGHTS_NAME
    true_size = weights.stat().st_size
    with open(weights, "r+b") as handle:
        handle.truncate(true_size + 2 ** 31)  # sparse: no disk space used
    reads = []
    real = io._read_exactly
    monkeypatch.setattr(io, "_read_exactly", lambda path, handle, size: reads.append(size) or real(path, handle, size))
    message = refusal(adapter_folder)
    assert f"not a valid safetensors file: it is {true_size + 2 ** 31:,} bytes, but its header describes {true_size:,}" \
        in message
    assert all(size < 2 ** 20 for size in reads)  # the config only, not the 2 GiB


def test_a_failed_save_to_a_new_folder_leaves_no_folder(tmp_path, monkeypatch):
    """save_adapter to runs/new/adapter on a full disk left the empty folders it had made (runs/new/adapter), which
    later read as an adapter folder without its files."""
    import os

    model = build("llama")
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    (tmp_path / "runs").mkdir()

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(lorakit.LorakitError, match="No space left on device"):
        lorakit.save_adapter(model, tmp_path / "runs" / "new" / "adapter")
    assert list((tmp_path / "runs").iterdir()) == []


def test_a_rank_pattern_of_thousands_of_unused_keys_is_warned_in_a_short_line():
    """The warning about rank_pattern keys that match no module listed every key: a hostile (or generated)
    adapter_config.json with 5,000 of them printed a warning line of 50 KB."""
    model = build("llama")
    patterns = {f"layers\\.9\\.x{i}_proj": 2 for i in range(5000)}
    with pytest.warns(UserWarning, match=r"rank_pattern keys \['layers\\\\.9\\\\.x0_proj', .* and 4995 more match "
                                         r"none") as said:
        lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], rank_pattern=patterns))
    assert all(len(str(w.message)) < 600 for w in said)


@pytest.mark.parametrize("extra", [dict(target_modules=[f"x{i}_proj" for i in range(20000)]),
                                   dict(target_modules=["q_proj"] + [f"x{i}_proj" for i in range(20000)]),
                                   dict(target_modules="|".join(f"x{i}_proj" for i in range(20000))),
                                   dict(target_modules=["q_proj"], modules_to_save=[f"x{i}_norm" for i in range(20000)])])
def test_a_config_listing_thousands_of_names_gives_a_short_line(extra, adapter_folder):
    """target_modules of thousands of names that match nothing (a generated or hostile adapter_config.json) were
    quoted whole: a 200 KB error line, or two such warnings when one name matched; modules_to_save's unknown names
    likewise (from inject: a file's are dropped as peft drops them). Now quoted as other file values are (the first
    few, shortened)."""
    config = json.loads((adapter_folder / CONFIG_NAME).read_text())
    (adapter_folder / CONFIG_NAME).write_text(json.dumps({**config, **extra}))
    model = build("llama")
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        try:
            if "modules_to_save" in extra:
                lorakit.inject(model, lorakit.LoraConfig(r=2, **extra))
            else:
                lorakit.load_adapter(model, adapter_folder)
        except lorakit.LorakitError as error:
            said.append(error)
    assert said and all(len(str(getattr(w, "message", w))) < 600 for w in said)


def test_an_adapter_saved_from_a_torch_compiled_base_loads(tmp_path):
    """peft.get_peft_model(torch.compile(model), ...) saves every key with torch.compile's wrapper in it
    (base_model.model._orig_mod.model.layers...); lorakit refused them as "saved from a model that holds this one as
    '_orig_mod': load that model class", which no model class is. The wrapper's name is dropped when the key does
    not match as it is: the same logits as peft gives for the file without it."""
    from safetensors.torch import load_file, save_file

    theirs = peft.get_peft_model(torch.compile(build("llama")), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize_peft(theirs)
    theirs.save_pretrained(tmp_path / "compiled")
    tensors = load_file(tmp_path / "compiled" / WEIGHTS_NAME)
    assert all("._orig_mod." in key for key in tensors)
    (tmp_path / "plain").mkdir()
    save_file({key.replace("_orig_mod.", ""): value for key, value in tensors.items()}, tmp_path / "plain" / WEIGHTS_NAME)
    (tmp_path / "plain" / CONFIG_NAME).write_text((tmp_path / "compiled" / CONFIG_NAME).read_text())
    expected = logits(peft.PeftModel.from_pretrained(build("llama"), tmp_path / "plain").eval(), IDS)
    ours = build("llama")
    lorakit.load_adapter(ours, tmp_path / "compiled")
    assert_close(logits(ours, IDS), expected)
    assert (expected - logits(build("llama"), IDS)).abs().max() > 1e-2
