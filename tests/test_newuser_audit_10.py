"""Tenth new-user audit: hostile files and first-time mistakes the earlier audits missed (regressions).

Each test pins one finding: an adapter name that would make ``save_pretrained`` write outside its folder, float8 or
non-matrix adapter tensors, JSON that Python's parser gives up on (deep nesting, 5,000-digit numbers) in data files
and config.json, a long document in one CSV cell, and more below. Every refusal is one LorakitError line.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

import lorakit
from lorakit.cli import main
from lorakit.errors import LorakitError
from cli_helpers import cli_error
from test_serve_support import make_adapter
from test_train_helpers import tiny_folder  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def base(tiny_folder):  # noqa: F811 (fixture)
    return lorakit.load_base(str(tiny_folder))[0]


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory) -> Path:
    return make_adapter(base, tmp_path_factory.mktemp("a") / "adapter", seed=3)


def _copy(adapter: Path, tmp_path: Path, name: str = "copy") -> Path:
    target = tmp_path / name
    shutil.copytree(adapter, target)
    return target


def _rewrite_tensors(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    path = folder / "adapter_model.safetensors"
    save_file(change(load_file(path)), path)


def test_an_adapter_name_cannot_make_save_pretrained_write_outside_its_folder(base, adapter, tmp_path):
    """save_pretrained writes adapter NAME into folder/NAME: '/abs/path' used to land at /abs/path, 'a/b' nested."""
    escape = tmp_path / "escaped"
    for name in [str(escape), "a/b", "a\\b", "x\x00y"]:
        with pytest.raises(LorakitError, match="slash, a backslash or a control character"):
            lorakit.inject(base, lorakit.LoraConfig(r=2, target_modules=["q_proj"]), adapter=name)
        with pytest.raises(LorakitError, match="slash, a backslash or a control character"):
            lorakit.load_adapter(base, adapter, adapter=name)
    assert lorakit.adapter_names(base) == [] and not escape.exists()
    lorakit.load_adapter(base, adapter, adapter="one")
    try:
        with pytest.raises(LorakitError, match="new adapter's name .*slash"):
            lorakit.combine_adapters(base, {"one": 1.0}, name=str(escape))
    finally:
        lorakit.delete_adapter(base, "one")
    assert not escape.exists()


def test_float8_adapter_tensors_are_one_line(base, adapter, tmp_path, capsys):
    """float8 tensors used to reach torch.isfinite, which raised NotImplementedError (a traceback in inspect too)."""
    folder = _copy(adapter, tmp_path)
    _rewrite_tensors(folder, lambda t: {k: v.to(torch.float8_e4m3fn) for k, v in t.items()})
    with pytest.raises(LorakitError, match="float8_e4m3fn; adapter weights must be float32, float16 or bfloat16"):
        lorakit.load_adapter(base, folder)
    assert lorakit.adapter_names(base) == []
    assert "float8_e4m3fn" in cli_error(capsys, main(["inspect", str(folder)]))


def test_inspect_of_a_tensor_that_is_not_a_matrix_is_one_line(adapter, tmp_path, capsys):
    """A scalar lora_A used to end inspect with IndexError (load_adapter already named its shape)."""
    folder = _copy(adapter, tmp_path)
    _rewrite_tensors(folder, lambda t: {k: (torch.tensor(1.0) if "q_proj.lora_A" in k else v) for k, v in t.items()})
    line = cli_error(capsys, main(["inspect", str(folder)]))
    assert "q_proj.lora_A.weight' has shape (), not (rank, in_features)" in line


def test_json_that_pythons_parser_gives_up_on_is_one_line_in_data_files(tmp_path):
    """A 5,000-digit number raised ValueError and '[[[[...' RecursionError, both as tracebacks."""
    from lorakit.train.sources import read_many

    good = json.dumps({"prompt": "a", "completion": "b"})
    cases = {
        "digits.jsonl": (good + '\n{"prompt": ' + "9" * 5000 + ', "completion": "x"}\n', "digits.jsonl:2: a value"),
        "deepline.jsonl": (good + '\n{"prompt": ' + "[" * 5000 + "]" * 5000 + "}\n", "deepline.jsonl:2: arrays"),
        "array.jsonl": ("[" * 100_000 + "]" * 100_000, "array.jsonl: arrays or objects nested deeper"),
        "array.json": ("[" * 100_000 + "]" * 100_000, "array.json: arrays or objects nested deeper"),
    }
    for name, (text, expected) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(LorakitError, match="this is not a training record") as caught:
            read_many(tmp_path / name)
        assert str(caught.value).startswith(expected) and "\n" not in str(caught.value)


def test_a_long_document_in_one_csv_cell_reads(tmp_path):
    """The csv module's 128 KiB cell limit refused a long-context CSV as 'malformed CSV; check quoting'."""
    from lorakit.train.sources import read_many

    long_text = "word " * 60_000  # 300 KB in one cell, as long-context data holds whole documents
    (tmp_path / "long.csv").write_text(f'prompt,completion\n"{long_text}",b\nx,y\n')
    (tmp_path / "long.tsv").write_text(f"text\n{long_text}\nshort\n")
    csv_records, tsv_records = read_many(tmp_path / "long.csv"), read_many(tmp_path / "long.tsv")
    assert [r.fields["prompt"] for r in csv_records] == [long_text, "x"]
    assert [r.fields["text"] for r in tsv_records] == [long_text, "short"]


def test_config_json_that_pythons_parser_gives_up_on_is_one_line(tiny_folder, tmp_path):  # noqa: F811 (fixture)
    """load_base on a config.json with a 5,000-digit number or deep nesting used to end in a traceback."""
    for name, value in [("digits", "9" * 5000), ("deep", "[" * 100_000 + "]" * 100_000)]:
        folder = tmp_path / name
        shutil.copytree(tiny_folder, folder)
        (folder / "config.json").write_text('{"model_type": "llama", "x": ' + value + "}")
        with pytest.raises(LorakitError, match="config.json: nested too deep or holds a number too long to read"):
            lorakit.load_base(str(folder))


def test_a_config_field_of_the_wrong_type_is_blamed_on_config_json(tiny_folder, tmp_path):  # noqa: F811 (fixture)
    """hidden_size "64" (a string) was reported as 'cannot load the tokenizer ...: Validation error for field'."""
    folder = shutil.copytree(tiny_folder, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "hidden_size": str(config["hidden_size"])}))
    with pytest.raises(LorakitError) as caught:
        lorakit.load_base(str(folder))
    message = str(caught.value)
    assert message.startswith(f"{folder / 'config.json'}: Validation error for field 'hidden_size'") and "\n" not in message
    assert "tokenizer" not in message


def test_weights_of_another_shape_than_config_json_name_the_tensor(tiny_folder, tmp_path):  # noqa: F811 (fixture)
    """An edited vocab_size said only 'You set ignore_mismatched_sizes to False ... look at the above report!' (the
    report itself was muted)."""
    folder = shutil.copytree(tiny_folder, tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "vocab_size": config["vocab_size"] + 8}))
    with pytest.raises(LorakitError) as caught:
        lorakit.load_base(str(folder))
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    assert f"is ({vocab}, {hidden}) in the weights but config.json makes it ({vocab + 8}, {hidden})" in str(caught.value)
    assert "above report" not in str(caught.value)


def test_a_seed_torch_cannot_take_is_refused_before_loading(capsys, tmp_path):
    """--seed 2**64 passed the check and ended the run with 'ValueError: Overflow when unpacking long long'."""
    code = main(["train", "--model", str(tmp_path / "never-read"), "--seed", str(2**64), "--out", str(tmp_path / "run")])
    assert cli_error(capsys, code) == f"lorakit train: error: --seed must be below 2**64 (e.g. 42), got {2**64}"
    assert not (tmp_path / "run").exists()
    from lorakit.train import TrainConfig

    assert TrainConfig(seed=2**64 - 1).seed == 2**64 - 1  # the largest seed torch takes still works


def test_an_empty_out_is_named_as_empty(adapter, tiny_folder, capsys, monkeypatch, tmp_path):  # noqa: F811 (fixture)
    """--out "" (an unset shell variable) read as the current folder: '--out  already exists; ... pass --overwrite',
    and --overwrite would then have aimed at the current folder."""
    monkeypatch.chdir(tmp_path)
    for command in (["merge", "--model", str(tiny_folder), "--adapter", str(adapter)],
                    ["combine", "--model", str(tiny_folder), "--adapter", str(adapter)],
                    ["quantize", "--model", str(tiny_folder)]):
        line = cli_error(capsys, main([*command, "--out", "", "--overwrite"]))
        assert line.endswith("error: --out is empty; give the output folder's name, e.g. --out merged"), line
    assert list(tmp_path.iterdir()) == []


def test_combine_names_each_input_folder_once(adapter, tiny_folder, capsys):  # noqa: F811 (fixture)
    """An --out inside an input adapter printed the folder twice ('the adapter folder A A')."""
    line = cli_error(capsys, main(["combine", "--model", str(tiny_folder), "--adapter", str(adapter),
                                   "--out", str(adapter / "inner")]))
    assert line.endswith(f"sits inside the adapter folder {adapter}; choose a folder outside it"), line


def test_eval_json_never_replaces_an_input(adapter, tiny_folder, capsys, tmp_path):  # noqa: F811 (fixture)
    """lorakit eval --data d.jsonl --json d.jsonl replaced the data file with the results."""
    data = tmp_path / "d.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    before = data.read_bytes()
    common = ["eval", "--model", str(tiny_folder), "--adapter", str(adapter), "--data", str(data), "--no-generate"]
    for target in (data, adapter / "adapter_config.json", tiny_folder / "config.json"):
        line = cli_error(capsys, main([*common, "--json", str(target)]))
        assert "is or sits inside the input" in line and "choose another file" in line, line
    assert data.read_bytes() == before and json.loads((adapter / "adapter_config.json").read_text())["r"] == 4


def test_inject_argument_types_are_one_line_and_leave_the_model_as_it_was(base, adapter):
    """trainable="yes" raised TypeError after the layers were wrapped, leaving a half-made adapter behind; peft's
    LoraConfig, a dict or a dtype name raised AttributeError / TypeError from deep inside."""
    import peft

    before = {name: p.requires_grad for name, p in base.named_parameters()}
    cases = [
        (lambda: lorakit.load_adapter(base, adapter, adapter="x", trainable="yes"), "trainable must be True or False"),
        (lambda: lorakit.inject(base, lorakit.LoraConfig(r=2), adapter="x", trainable=1), "got 1"),
        (lambda: lorakit.inject(base, peft.LoraConfig(r=2), adapter="x"),
         "got peft.tuners.lora.config.LoraConfig; pass lorakit.LoraConfig.from_peft_dict(config.to_dict())"),
        (lambda: lorakit.inject(base, {"r": 2}, adapter="x"), "pass lorakit.LoraConfig(**config)"),
        (lambda: lorakit.inject(base, lorakit.LoraConfig(r=2), adapter="x", dtype="float16"),
         "dtype must be a floating-point torch.dtype"),
        (lambda: lorakit.inject(base, lorakit.LoraConfig(r=2), adapter="x", dtype=torch.int8), "got torch.int8"),
    ]
    for call, expected in cases:
        with pytest.raises(LorakitError, match=expected.replace("(", r"\(").replace(")", r"\)").replace("*", r"\*")):
            call()
        assert lorakit.adapter_names(base) == []
        assert {name: p.requires_grad for name, p in base.named_parameters()} == before


def test_trl_conversational_prompt_completion_records_train_the_completion_only():
    """TRL's {"prompt": [turns], "completion": [turns]} was refused as "field 'prompt' must be a string"; it reads as
    one chat whose earlier assistant turns (in the prompt) are masked, as TRL masks them."""
    from lorakit.train.data import build_dataset
    from lorakit.train.formats import validate_record
    from test_train_helpers import tiny_tokenizer

    prompt = [{"role": "user", "content": "copy a b"}, {"role": "assistant", "content": "a b"},
              {"role": "user", "content": "reverse c d"}]
    completion = [{"role": "assistant", "content": "d c"}]
    trl = validate_record({"prompt": prompt, "completion": completion}, "trl.jsonl:1")
    chat = validate_record({"messages": [*prompt[:1], {**prompt[1], "weight": 0}, *prompt[2:], *completion]}, "c:1")
    assert trl.fields == chat.fields and trl.fields["unsupervised"] == (1,)
    tokenizer = tiny_tokenizer()
    got, expected = (build_dataset([r], tokenizer, max_length=64)[0] for r in (trl, chat))
    assert got["input_ids"] == expected["input_ids"] and got["labels"] == expected["labels"]
    learnt = [t for t, label in zip(got["input_ids"], got["labels"]) if label != -100]
    assert tokenizer.convert_ids_to_tokens(learnt)[:2] == ["d", "c"]
    with pytest.raises(LorakitError, match="unknown field 'id2'; a conversational prompt-completion record"):
        validate_record({"prompt": prompt, "completion": completion, "id2": 1}, "trl.jsonl:2")


def test_comma_separated_module_names_are_several_names(base):
    """--targets q_proj,v_proj (peft's habit; --target-parameters already took commas) was refused as one name that
    'matches no module (did you mean v_proj?)'; a regular expression with a comma stays whole."""
    from lorakit.train import TrainConfig
    from lorakit.train.runner import check_module_names

    config = TrainConfig(targets=["q_proj, v_proj"], exclude=["k_proj,o_proj"], modules_to_save=["lm_head,embed_tokens"])
    assert (config.targets, config.exclude, config.modules_to_save) == (
        ["q_proj", "v_proj"], ["k_proj", "o_proj"], ["lm_head", "embed_tokens"])
    check_module_names(base, config)  # the pre-check before training used to refuse these
    assert config.lora_config().target_modules == ["q_proj", "v_proj"]
    regex = r".*layers\.[0-9]{1,2}\.self_attn\.q_proj"
    assert TrainConfig(targets=[regex]).lora_config().target_modules == regex


def test_generate_refuses_template_options_with_no_chat(capsys, tiny_folder):  # noqa: F811 (fixture)
    """--no-chat --chat-template-kwargs '{...}' ignored the options without a word."""
    code = main(["generate", "--model", str(tiny_folder), "--no-chat",
                 "--chat-template-kwargs", '{"enable_thinking": false}', "hi"])
    assert cli_error(capsys, code) == ("lorakit generate: error: --chat-template-kwargs sets options of the chat "
                                       "template, which --no-chat turns off; drop one")


def test_an_unwritable_embedded_model_cache_is_named_before_converting(monkeypatch, tmp_path):
    """LORAKIT_CACHE (or ~/.cache) that cannot be written failed only after the ~15 s conversion, with a raw
    NotADirectoryError / PermissionError from the Python API."""
    from lorakit.models import embedded

    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "a-file" / "cache"))
    monkeypatch.setattr(embedded, "gguf_path", lambda: tmp_path / "model.gguf")  # never read: the check comes first
    with pytest.raises(LorakitError, match=r"cannot write the embedded model's cache .*a-file/cache/smollm2-135m "
                                           r"\(Not a directory\); set LORAKIT_CACHE to a writable folder"):
        embedded.converted_folder()


def test_saving_to_an_empty_path_writes_nothing_into_the_current_folder(base, adapter, monkeypatch, tmp_path):
    """save_adapter(model, "") and model.save_pretrained("") (an unset variable) wrote the adapter into the current
    folder without a word; save_quantized(..., "") said '. already exists'."""
    monkeypatch.chdir(tmp_path)
    tokenizer = object()  # never reached: the path is checked first
    lorakit.load_adapter(base, adapter)
    try:
        for call in (lambda: lorakit.save_adapter(base, ""), lambda: base.save_pretrained(" "),
                     lambda: lorakit.save_quantized(base, tokenizer, "")):
            with pytest.raises(LorakitError, match=r"empty \(''\); give the folder to write"):
                call()
    finally:
        lorakit.delete_adapter(base, "default")
    assert list(tmp_path.iterdir()) == []


def test_an_empty_data_path_is_named_instead_of_reading_the_current_folder(capsys, monkeypatch, tmp_path):
    """read_many("") read every data file under the current folder; lorakit train --data '' said '--out runs/...
    sits inside the training data ; choose a folder outside it'."""
    from lorakit.train.sources import read_many

    monkeypatch.chdir(tmp_path)
    (tmp_path / "other.jsonl").write_text(json.dumps({"text": "not meant for training"}) + "\n")
    with pytest.raises(LorakitError, match=r"a data path is empty \(''\)"):
        read_many("")
    for flags in (["--data", ""], ["--data", "other.jsonl", "--val-data", " "]):
        line = cli_error(capsys, main(["train", *flags, "--max-steps", "1"]))
        assert line.endswith("holds an empty path (''); give a data file or a folder of them, e.g. train.jsonl"), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.jsonl"]


def test_targets_all_taken_out_by_another_field_say_which(base):
    """LoraConfig(target_modules=["q_proj"], modules_to_save=["q_proj"]) said "target_modules ['q_proj'] matched no
    module; ... modules are named: ..., q_proj, ..." (q_proj listed as existing); exclude_modules likewise."""
    cases = [(dict(target_modules=["q_proj"], modules_to_save=["q_proj"]), "modules_to_save (2) takes out every one"),
             (dict(exclude_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
              "target_modules 'all-linear' matches 14 modules, but exclude_modules (14) takes out every one"),
             (dict(target_modules=["q_proj"], layers_to_transform=[7]), "layers_to_transform (2) takes out every one")]
    for fields, expected in cases:
        with pytest.raises(LorakitError, match=re.escape(expected)):
            lorakit.inject(base, lorakit.LoraConfig(r=2, **fields), adapter="x")
        assert lorakit.adapter_names(base) == []


def test_a_rank_or_alpha_pattern_that_matches_nothing_is_warned(base):
    """rank_pattern={"q_projj": 8} (a typo) trained every module at the default rank without a word (peft too)."""
    from lorakit.inject import lora_layers

    with pytest.warns(UserWarning, match=r"rank_pattern keys \['q_projj'\] match none of this adapter's modules") as got:
        lorakit.inject(base, lorakit.LoraConfig(r=2, rank_pattern={"q_projj": 8, "v_proj": 4}), adapter="x")
    try:
        assert got[0].filename == __file__  # pointed at the caller's line
        assert {layer.adapters["x"].rank for layer in lora_layers(base).values()} == {2, 4}
    finally:
        lorakit.delete_adapter(base, "x")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # patterns that match warn nothing
        lorakit.inject(base, lorakit.LoraConfig(r=2, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 8.0}), adapter="y")
    lorakit.delete_adapter(base, "y")


def test_config_files_that_their_parsers_give_up_on_are_one_line(capsys, tmp_path):
    """lorakit train --config with nesting deeper than the stack or a 5,000-digit number ended in a RecursionError or
    ValueError traceback, in YAML, TOML and JSON alike."""
    deep = "[" * 100_000 + "]" * 100_000
    files = {"deep.yaml": f"rank: {deep}\n", "digits.yaml": "rank: " + "9" * 5000 + "\n", "deep.toml": f"rank = {deep}\n",
             "deep.json": '{"rank": ' + deep + "}", "digits.json": '{"rank": ' + "9" * 5000 + "}"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        line = cli_error(capsys, main(["train", "--config", str(tmp_path / name)]))
        assert line == (f"lorakit train: error: {tmp_path / name}: nested too deep or holds a number too long to read; "
                        "a config file holds option names and plain values"), line


def test_train_takes_a_dataframe_and_names_a_dict_or_a_bad_record_by_index():
    """train(model, tok, df) refused a pandas DataFrame ('<record>: expected an object ..., got a string': iterating
    gives the column names), a DatasetDict or one dict the same way, and a bad dict in a list was '<record>' with no
    index."""
    import pandas as pd
    from lorakit.train import TrainConfig
    from lorakit.train.loop import as_dataset
    from test_train_helpers import tiny_tokenizer

    tokenizer, config = tiny_tokenizer(), TrainConfig()
    records = [{"prompt": "copy a b : ", "completion": "a b"}, {"prompt": "reverse c d : ", "completion": "d c"}]
    from_frame = as_dataset(pd.DataFrame(records), tokenizer, config, "training data", pack=False)
    assert from_frame.rows == as_dataset(records, tokenizer, config, "training data", pack=False).rows
    with pytest.raises(LorakitError, match=r"training data: a dict of splits \(train, test\); pass one split, e.g. "
                                           r"data\['train'\]"):
        as_dataset({"train": records, "test": records}, tokenizer, config, "training data", pack=False)
    with pytest.raises(LorakitError, match=r"training data: one dict \(prompt, completion\); pass a list of records"):
        as_dataset({"prompt": ["a"], "completion": ["b"]}, tokenizer, config, "training data", pack=False)
    with pytest.raises(LorakitError, match=r"^training data\[2\]: field 'completion' must be a string, got int 5"):
        as_dataset([*records, {"prompt": "a", "completion": 5}], tokenizer, config, "training data", pack=False)


def test_a_record_encoded_twice_says_so(tmp_path):
    """json.dumps(json.dumps(record)) per line read as '... got a string' with no hint of why."""
    from lorakit.train.sources import read_many

    (tmp_path / "twice.jsonl").write_text(json.dumps(json.dumps({"prompt": "a", "completion": "b"})) + "\n")
    with pytest.raises(LorakitError, match=r"^twice.jsonl:1: .*got a string holding a JSON object: the record was "
                                           r"encoded twice \(json.dumps of json.dumps\); encode it once$"):
        read_many(tmp_path / "twice.jsonl")


def test_a_python_printed_dict_per_line_says_so(tmp_path):
    """print(record) per line (single quotes) was 'malformed JSON (Expecting property name ...); one object per line'."""
    from lorakit.train.sources import read_many

    (tmp_path / "printed.jsonl").write_text(str({"prompt": "a", "completion": "b"}) + "\n")
    with pytest.raises(LorakitError, match=r"^printed.jsonl:1: malformed JSON \(.*\); single quotes are Python's print\(\) "
                                           r"of a dict, not JSON: write each record with json.dumps$"):
        read_many(tmp_path / "printed.jsonl")


def test_a_pipe_or_device_where_an_adapter_file_goes_is_named(adapter, tmp_path, capsys):
    """A FIFO or a link to /dev/zero in place of an adapter file was reported as 'not found'."""
    import os

    fifo, device = tmp_path / "fifo", tmp_path / "device"
    shutil.copytree(adapter, fifo)
    (fifo / "adapter_model.safetensors").unlink()
    os.mkfifo(fifo / "adapter_model.safetensors")
    shutil.copytree(adapter, device)
    (device / "adapter_config.json").unlink()
    (device / "adapter_config.json").symlink_to("/dev/zero")
    for folder, name in ((fifo, "adapter_model.safetensors"), (device, "adapter_config.json")):
        line = cli_error(capsys, main(["inspect", str(folder)]))
        assert line.endswith(f"{folder / name} is not a regular file (a pipe, socket or device); it must be the file "
                             "itself"), line


def test_serve_refuses_a_bad_or_busy_port_before_loading(capsys, tmp_path):
    """`lorakit serve --port 99999` was an OverflowError traceback from bind() after the model had loaded, and a busy
    port failed only then too: both are one line before anything loads (the model name here does not exist)."""
    import socket

    pytest.importorskip("fastapi")
    args = ["serve", "--model", str(tmp_path / "no-model"), "--adapters", str(tmp_path)]
    code = main(args + ["--port", "99999"])
    assert "--port must be between 0 and 65535, got 99999" in cli_error(capsys, code)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(args + ["--host", "127.0.0.1", "--port", str(port)])
        line = cli_error(capsys, code)
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line


def test_serve_names_an_adapters_file_as_a_file(tmp_path):
    """--adapters pointing at a file said 'does not exist'."""
    from lorakit.serve.pool import AdapterPool

    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(LorakitError, match="is a file, not a folder"):
        AdapterPool(torch.nn.Linear(2, 2), path, model_lock=None)
