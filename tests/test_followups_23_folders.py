"""Follow-ups, session 23: other people's model folders and hostile adapter files given to the CLI.

What tests/test_newuser_audit_*_models.py, *_hostile.py, test_cli_paths_audit.py and test_model_folders.py leave
out. Each test failed on the code before its fix.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from cli_helpers import cli_error
from test_serve_support import make_adapter, tiny_hf_folder


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("folders")
    base = tiny_hf_folder(root / "base")
    make_adapter(AutoModelForCausalLM.from_pretrained(base), root / "adapter", seed=1)
    return root


def _unigram_tokenizer():
    """A small Unigram (SentencePiece-style, as T5's or ALBERT's) fast tokenizer: not BPE, so not GGUF's."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.Unigram())
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=60, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tokenizer.train_from_iterator(["hello world this is a test of many words", "the quick brown fox"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


@pytest.mark.parametrize("kind", ["unigram", "past-the-embedding"])
def test_a_tokenizer_gguf_cannot_hold_is_refused_before_the_merge(root, tmp_path, capsys, monkeypatch, kind):
    """``lorakit merge --format gguf`` checked the model's family before any work, but the tokenizer only once the
    merge was done (minutes on a large model on a CPU), and the refusal ("GGUF export supports BPE tokenizers; this
    one is 'Unigram'", "the tokenizer has 362 tokens but the model's embedding only 360") said nothing of what to do.
    Now both are said before merging, with the way out."""
    from transformers import AutoTokenizer

    import lorakit.export
    from lorakit.cli import main

    model = shutil.copytree(root / "base", tmp_path / "model")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (model / name).unlink()
    if kind == "unigram":
        _unigram_tokenizer().save_pretrained(model)
        words = "GGUF export supports BPE tokenizers; this one is 'Unigram'; merge without --format gguf"
    else:
        tokenizer = AutoTokenizer.from_pretrained(root / "base")
        tokenizer.add_special_tokens({"additional_special_tokens": ["<tool>", "</tool>"]})  # the model not resized
        tokenizer.save_pretrained(model)
        words = (f"the tokenizer has {len(tokenizer)} tokens but the model's embedding only {len(tokenizer) - 2} rows"
                 " (tokens added to the tokenizer without resizing the model); resize the base")

    def no_merge(*args, **kwargs):
        raise AssertionError("merged before the tokenizer was checked")

    monkeypatch.setattr(lorakit.export, "merge_model", no_merge)
    out = tmp_path / "merged"
    line = cli_error(capsys, main(["merge", "--model", str(model), "--adapter", str(root / "adapter"), "--out", str(out),
                                   "--format", "gguf"]))
    assert words in line, line
    assert not out.exists()


def test_gguf_export_of_a_bpe_tokenizer_still_writes(root, tmp_path):
    """The early check passes what write_gguf writes (the tiny BPE tokenizer of every GGUF test)."""
    import lorakit
    from lorakit.export import export_merged

    model, tokenizer = lorakit.load_base(str(root / "base"))
    lorakit.load_adapter(model, root / "adapter")
    export_merged(model, tokenizer, "default", tmp_path / "m", gguf_type="f16")
    assert (tmp_path / "m" / "m-f16.gguf").stat().st_size > 0


def _edited(adapter: Path, folder: Path, **change) -> Path:
    shutil.copytree(adapter, folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, **change}))
    return folder


@pytest.mark.parametrize("damage", ["targets", "shapes"])
@pytest.mark.parametrize("command", ["generate", "merge", "combine", "eval"])
def test_an_adapter_that_does_not_fit_its_own_base_is_not_sent_back_to_that_base(root, tmp_path, capsys, monkeypatch,
                                                                                 damage, command):
    """An adapter whose own files disagree with the base its adapter_config.json names (a hand-edited r or
    target_modules, tensors from another save) was told "...; pass --model /abs/base" while --model was that very
    folder, written as a relative path: advice that only goes round in a circle. Now the line says that base is the
    one loaded, so the adapter's files are what changed."""
    from lorakit.cli import main

    adapter = root / "adapter"
    if damage == "targets":
        broken = _edited(adapter, tmp_path / "broken", target_modules=["foo_proj"])
    else:
        broken = _edited(adapter, tmp_path / "broken", r=5, lora_alpha=10)
    assert json.loads((broken / "adapter_config.json").read_text())["base_model_name_or_path"] == str(root / "base")
    monkeypatch.chdir(root)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "the cat sat"}) + "\n")
    extra = {"generate": ["--adapter", str(broken), "Hi"],
             "merge": ["--adapter", str(broken), "--out", str(tmp_path / "out")],
             "combine": ["--adapter", f"{broken}=0.5", "--out", str(tmp_path / "out")],
             "eval": ["--adapter", str(broken), "--data", str(data), "--no-progress"]}[command]
    line = cli_error(capsys, main([command, "--model", "base", *extra]))  # relative: the same folder as the named one
    assert "pass --model" not in line, line
    assert line.endswith("that is the base loaded (--model base): the adapter does not fit the model it was saved for "
                         "(its files edited or mixed with another save's, or that base changed since); save the adapter "
                         "again from its run"), line
    assert not (tmp_path / "out").exists()


def test_an_adapter_on_another_folder_is_still_sent_to_its_own_base(root, tmp_path, capsys):
    """The other base's folder, not the loaded one: the fix stays "pass --model <its base>"."""
    from lorakit.cli import main

    other = shutil.copytree(root / "base", tmp_path / "other")
    broken = _edited(root / "adapter", tmp_path / "broken", r=5)
    line = cli_error(capsys, main(["generate", "--model", str(other), "--adapter", str(broken), "Hi"]))
    assert line.endswith(f"pass --model {root / 'base'}"), line


def test_same_model_compares_folders_names_and_ids(tmp_path, monkeypatch):
    from lorakit.commands._args import _same_model

    (tmp_path / "runs" / "x" / "adapter").mkdir(parents=True)
    (tmp_path / "models" / "base").mkdir(parents=True)
    (tmp_path / "models" / "base" / "config.json").write_text("{}")
    (tmp_path / "here").mkdir()
    (tmp_path / "here" / "models" / "base").mkdir(parents=True)  # the same relative name, another folder
    (tmp_path / "here" / "models" / "base" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "here")
    adapter = tmp_path / "runs" / "x" / "adapter"
    assert _same_model("smollm2-135m", "smollm2-135m", adapter)
    assert _same_model("org/tiny", "org/tiny", adapter)  # a Hub id (no such folder here)
    assert not _same_model("org/tiny", "org/other", adapter)
    # trained in tmp_path as models/base: that folder, found above the adapter, is not ./models/base here
    assert not _same_model("models/base", "models/base", adapter)
    assert _same_model("models/base", str(tmp_path / "models" / "base"), adapter)
    assert _same_model(str(tmp_path / "here" / "models" / "base"), "models/base", None)


def test_weights_the_model_leaves_unread_are_said_by_the_16_bit_load_as_by_the_4_bit_one(root, tmp_path):
    """A checkpoint holding tensors the model config.json describes never reads (layers past an edited
    num_hidden_layers, another model's weights): the NF4 loader warned "N tensor(s) in the checkpoint are not used
    by the model", the ordinary 16-bit load (generate, merge, quantize, train) muted transformers' load report and
    said nothing, so the truncated model ran in silence. Both say it now."""
    from safetensors.torch import load_file, save_file

    import lorakit
    from lorakit.cli import main

    folder = shutil.copytree(root / "base", tmp_path / "model")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.2.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"].clone()  # 3 layers
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    said = "tensor(s) in the checkpoint are not used by the model, e.g. 'model.layers.2.mlp.up_proj.weight'"
    with pytest.warns(UserWarning) as caught:  # the CLI prints it as one "warning: ..." line
        assert main(["generate", "--model", str(folder), "--max-new-tokens", "1", "Hi"]) == 0
    assert f"{folder}: 1 {said}; check that config.json belongs to these weights" in [str(w.message) for w in caught]
    for quantize in (None, "nf4"):
        with pytest.warns(UserWarning, match=r"1 " + re.escape(said)):
            lorakit.load_base(str(folder), quantize=quantize)


def test_a_whole_checkpoint_loads_without_that_warning(root):
    import warnings

    import lorakit

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakit.load_base(str(root / "base"))


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_the_vision_tower_a_text_model_leaves_unread_is_not_warned_about(tmp_path, quantize):
    """Llama 3.2 Vision builds as its text model (MllamaForCausalLM), by design leaving the vision tower unread (train
    and merge say so in their own note): the NF4 load warned "41 tensor(s) in the checkpoint are not used by the
    model" on every load, and the 16-bit load must not start to."""
    import warnings

    import lorakit
    from test_followups_17_models import _mllama

    folder = tmp_path / "mllama"
    _mllama().save_pretrained(folder)
    tiny_hf_folder(tmp_path / "words")  # any tokenizer: the test reads no text
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tmp_path / "words" / name, folder / name)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model, _ = lorakit.load_base(str(folder), quantize=quantize)
    assert type(model).__name__ == "MllamaForCausalLM"


@pytest.mark.parametrize("layout", ["finished", "stopped", "full"])
@pytest.mark.parametrize("command", ["generate", "merge", "eval", "quantize", "train"])
def test_a_training_run_given_as_the_model_names_its_adapter_and_base(root, tmp_path, capsys, monkeypatch, layout,
                                                                      command):
    """``lorakit generate --model runs/mine`` (the folder train just named) said "runs/mine has no config.json; give
    a Hugging Face model folder", naming neither the run's adapter nor the base to pass with it. Now the line names
    both (a run stopped before its end: its latest checkpoint's adapter; a --full run: RUN/model), before anything
    loads."""
    from lorakit.cli import main

    def no_loading(*args, **kwargs):
        raise AssertionError("loaded before the mistake was found")

    monkeypatch.setattr("lorakit.load_base", no_loading)
    run = tmp_path / "run"
    if layout == "finished":
        shutil.copytree(root / "adapter", run / "adapter")
        shutil.copytree(root / "adapter", run / "best")
        adapter = run / "adapter"
    elif layout == "stopped":
        for step in ("step-000010", "step-000020"):
            shutil.copytree(root / "adapter", run / "checkpoints" / step / "adapter")
        adapter = run / "checkpoints" / "step-000020" / "adapter"
    else:
        (run / "model").mkdir(parents=True)
        (run / "model" / "config.json").write_text("{}")
    (run / "config.yaml").write_text("model: base\n")
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "the cat sat"}) + "\n")
    extra = {"generate": ["Hi"], "merge": ["--adapter", str(root / "adapter"), "--out", str(tmp_path / "out")],
             "eval": ["--data", str(data)], "quantize": ["--out", str(tmp_path / "out")],
             "train": ["--data", str(data), "--out", str(tmp_path / "out")]}[command]
    line = cli_error(capsys, main([command, "--model", str(run), *extra]))
    if layout == "full":
        assert line.endswith(f"--model {run} is a training run's folder, not a model; the model it trained is "
                             f"{run / 'model'}: pass that as --model"), line
    else:
        assert line.endswith(f"--model {run} is a training run's folder, not a base model; --model takes the base it "
                             f"was trained on (its adapter_config.json names {str(root / 'base')!r}), and the run's "
                             f"adapter is {adapter} (for --adapter)"), line
    assert not (tmp_path / "out").exists()


def test_a_folder_without_config_json_that_is_no_run_is_told_as_before(tmp_path, capsys):
    from lorakit.cli import main

    (tmp_path / "empty").mkdir()
    line = cli_error(capsys, main(["generate", "--model", str(tmp_path / "empty"), "Hi"]))
    assert line.endswith(f"{tmp_path / 'empty'} has no config.json; give a Hugging Face model folder (config.json, "
                         "safetensors weights, tokenizer files)"), line


@pytest.mark.parametrize("given", ["model", "default"])
def test_a_base_name_too_long_for_a_path_is_the_adapters_fault_not_an_os_error(root, tmp_path, capsys, monkeypatch,
                                                                                 given):
    """A hostile or mangled adapter_config.json whose base_model_name_or_path is longer than a file name may be
    (255 bytes): the refusal of an adapter that does not fit asked the system whether that name is a folder, and the
    system's ENAMETOOLONG came out as the whole command's error, "lorakit generate: error: aaaa...: File name too
    long", the adapter's real fault unsaid. Now the usual line, with the name cut short."""
    from lorakit.cli import main

    long_name = "a" * 5000
    broken = _edited(root / "adapter", tmp_path / "broken", base_model_name_or_path=long_name,
                     **({"r": 5} if given == "model" else {}))
    if given == "model":  # the base loads, then the adapter (rank 4 in the file, 5 in its config) does not fit it
        line = cli_error(capsys, main(["generate", "--model", str(root / "base"), "--adapter", str(broken), "Hi"]))
        assert "has shape (4, 32), but module model.layers.0.self_attn.q_proj needs (5, 32)" in line, line
        assert line.endswith("; pass --model with a local folder of 'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa..."
                             "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa'"), line
    else:  # no --model: refused by the base it names, before anything loads
        monkeypatch.setattr("lorakit.load_base", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
        line = cli_error(capsys, main(["generate", "--adapter", str(broken), "Hi"]))
        assert line.endswith("not on the default --model smollm2-135m; pass --model with a local folder of that base")
    assert "File name too long" not in line and len(line) < 1000, line


def test_a_training_run_given_to_load_base_names_load_adapter(root, tmp_path):
    import lorakit

    shutil.copytree(root / "adapter", tmp_path / "run" / "adapter")
    with pytest.raises(lorakit.LorakitError) as caught:
        lorakit.load_base(str(tmp_path / "run"))
    assert str(caught.value).endswith(f"and the run's adapter is {tmp_path / 'run' / 'adapter'} (for "
                                      "lorakit.load_adapter)"), caught.value
