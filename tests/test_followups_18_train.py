"""``lorakit train`` and ``lorakit.train.train`` with data and habits the earlier audits did not try (eighteenth audit).

Each test's docstring says what was wrong. In short: train() from Python changed the model before reading the data
(1), appended a new run to an earlier run's folder (2), trained a ``datasets.Dataset``'s null-filled structs and
refused ``pd.read_parquet``'s numpy cells (3-4), and ignored TrainConfig's data / val_fraction / val_data (7, 11);
build_datasets refused a list of dicts (5); repeated records split by --val-fraction leaked unwarned (6); a chat
template that writes today's date broke a resume the next day (8); Mac CSVs (9), Hub ids and URLs (10), half-renamed
records (12), an ``out`` that is a file (13), Git LFS pointers (14) and runs started in the same second (15).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lorakit.errors import LorakitError
from lorakit.train import TrainConfig, train
from test_train_helpers import SMALL, task_records, tiny_folder, tiny_tokenizer, tiny_train_model  # noqa: F401


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _trainable_shapes(model) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bad", ["empty completion", "too few rows"])
def test_bad_data_from_python_leaves_the_model_untouched(tok, bad):
    import lorakit

    model = tiny_train_model()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    records = task_records(8) + [{"prompt": "copy a : ", "completion": " "}] if bad == "empty completion" else \
        task_records(2)
    with pytest.raises(LorakitError, match="empty completion|fewer than one micro-batch"):
        train(model, tok, records, TrainConfig(**{**SMALL, "rank": 4, "max_steps": 1}))
    assert lorakit.adapter_names(model) == []
    assert model.state_dict().keys() == before.keys()  # no adapter tensors were added
    # the next call, data fixed, trains an adapter of its own config (rank 8), not one left by the failed call
    train(model, tok, task_records(8), TrainConfig(**{**SMALL, "rank": 8, "max_steps": 1}), log=lambda line: None)
    shapes = _trainable_shapes(model)
    assert shapes and all(8 in shape for shape in shapes.values()), shapes


def test_a_new_run_into_an_earlier_runs_folder_is_refused(tok, tmp_path):
    config = TrainConfig(**{**SMALL, "max_steps": 3, "save_every": 0})
    train(tiny_train_model(), tok, task_records(16), config, out=tmp_path, log=lambda line: None)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(LorakitError, match=r"holds an earlier run \(checkpoints/, adapter/\); pass resume=") as error:
        train(tiny_train_model(), tok, task_records(16), config.replace(max_steps=4), out=tmp_path)
    assert "\n" not in str(error.value)
    assert (tmp_path / "metrics.jsonl").read_text() == metrics  # the earlier run's curve is its own
    # resume= continues it; a folder holding only other files (the data) starts a run as before
    assert train(tiny_train_model(), tok, task_records(16), config.replace(max_steps=4), out=tmp_path,
                 resume=tmp_path, log=lambda line: None).steps == 4
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / "train.jsonl").write_text("{}\n")
    assert train(tiny_train_model(), tok, task_records(16), config, out=tmp_path / "fresh",
                 log=lambda line: None).steps == 3


def _weather_and_search_chats() -> list[dict]:
    """Two tool-calling chats whose calls and schemas have different parameters: a table of both (Parquet, a
    datasets.Dataset) has one struct type per column, the union, so each row reads back with the other's as null."""
    def chat(name: str, arguments: dict) -> dict:
        schema = {"type": "object", "properties": {key: {"type": "string"} for key in arguments}}
        return {"messages": [
            {"role": "user", "content": "What now?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call12345", "type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": "call12345", "content": "21 degrees"},
            {"role": "assistant", "content": "It is 21 degrees."}],
            "tools": [{"type": "function", "function": {"name": name, "parameters": schema}}]}

    return [chat("get_weather", {"city": "Paris"}), chat("search", {"query": "fox"})]


def test_a_datasets_dataset_or_a_parquet_dataframe_trains_as_its_parquet_file(tmp_path):
    """3. train(model, tok, datasets.Dataset) rendered the union's nulls: the model learnt get_weather's call as
    {"city": "Paris", "query": null} and its schema with a "query": null property (the file readers drop them).
    4. train(model, tok, pd.read_parquet(...)) refused every chat with tool calls: pandas gives list cells as numpy
    arrays, at every depth, and "tool_calls must be a non-empty list" was said of a non-empty array.
    Both now train exactly the rows the Parquet file itself gives."""
    import datasets
    import pandas as pd

    from lorakit.train.data import build_dataset
    from lorakit.train.loop import as_dataset
    from lorakit.train.sources import read_many
    from test_train_tool_calls import family

    tok = family("qwen2.5")
    table = datasets.Dataset.from_list(_weather_and_search_chats())
    assert table[0]["messages"][1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "query": None}
    table.to_parquet(tmp_path / "chats.parquet")
    expected = build_dataset(read_many(tmp_path / "chats.parquet"), tok, 1024).rows
    assert "null" not in tok.decode(expected[0]["input_ids"])
    config = TrainConfig(max_length=1024)
    for data in (table, pd.read_parquet(tmp_path / "chats.parquet")):
        assert as_dataset(data, tok, config, "training data", False).rows == expected, type(data).__name__
    with pytest.raises(LorakitError, match=r"^training data row 1: the column 'completion' holds numbers \(5\), not "
                                           r"text; convert it"):
        as_dataset(pd.DataFrame([{"prompt": "a ", "completion": "b"}, {"prompt": "c ", "completion": 5}]), tok, config,
                   "training data", False)


def test_build_datasets_takes_what_train_takes():
    """5. build_datasets(records) with a list of dicts (what train() takes, and its docstring's "lists of records")
    raised TypeError: expected str, bytes or os.PathLike object, not dict."""
    import pandas as pd

    from lorakit.train.data import build_datasets

    tok, records = tiny_tokenizer(), task_records(6)
    bundle = build_datasets(records, tok, validation=pd.DataFrame(task_records(2, seed=1)), max_length=32)
    assert (len(bundle.train), len(bundle.val)) == (6, 2)
    with pytest.raises(LorakitError, match=r"^training data\[6\]: field 'completion' must be a string, got int 3"):
        build_datasets([*records, {"prompt": "a ", "completion": 3}], tok)


def test_a_held_out_split_of_repeated_records_is_warned():
    """6. --data a.jsonl --data a.jsonl --val-fraction 0.2 (the note says a file given twice weighs it up) held out one
    copy of most records and trained on the other: 14 of the 16 validation examples were training examples, and
    only a validation set that was wholly inside the training set was warned about."""
    from lorakit.train.data import build_datasets, validation_in_training

    tok, records = tiny_tokenizer(), task_records(40, seed=1)
    bundle = build_datasets(records + records, tok, val_fraction=0.2, max_length=32)
    said = validation_in_training(bundle.train, bundle.val)
    assert said is not None and said.startswith("validation data: 14 of its 16 examples are also in the training data")
    assert validation_in_training(*build_datasets(records, tok, val_fraction=0.2, max_length=32).__dict__.values()) \
        is None  # distinct records held out: nothing to say
    few = build_datasets(records, tok, validation=records[:3] + task_records(4, seed=2), max_length=32)
    assert validation_in_training(few.train, few.val) is None  # 3 of 7: duplicates real data has, not worth a line


def test_train_from_python_honours_the_configs_validation_options(tmp_path):
    """7. train(model, tok, records, TrainConfig(val_fraction=0.2, early_stopping_patience=2)) ran without any
    validation set, without a word: val_fraction (and val_data files) are lorakit train's options, which train()
    ignored. It now holds out the same records as `lorakit train --val-fraction` (same seed), reads val_data files,
    and refuses early stopping that could never happen."""
    import torch

    from lorakit.train.batches import Collator
    from lorakit.train.data import build_datasets, pad_id_for
    from lorakit.train.evaluate import dataset_loss
    from test_train_helpers import write_jsonl

    tok, records = tiny_tokenizer(), task_records(20, seed=3)
    config = TrainConfig(**{**SMALL, "max_steps": 2, "eval_every": 1, "val_fraction": 0.2, "max_length": 32})
    said: list[str] = []
    model = tiny_train_model()
    result = train(model, tok, records, config, log=said.append)
    assert [step for step, _ in result.val_losses] == [1, 2]
    assert any(line.startswith("training data: 16 examples") for line in said), said
    held_out = build_datasets(records, tok, val_fraction=0.2, seed=config.seed, max_length=32).val  # the CLI's split
    loss, _ = dataset_loss(model, held_out, 8, Collator(pad_id_for(tok)), torch.device("cpu"))
    assert loss == pytest.approx(result.val_losses[-1][1], rel=1e-6)
    # val_data files in the config are read; early stopping without any validation set is refused
    write_jsonl(tmp_path / "val.jsonl", task_records(4, seed=8))
    files = config.replace(val_fraction=None, val_data=[str(tmp_path / "val.jsonl")])
    assert len(train(tiny_train_model(), tok, records, files, log=lambda line: None).val_losses) == 2
    with pytest.raises(LorakitError, match=r"^early_stopping_patience=2 needs a validation set; pass val_data="):
        train(tiny_train_model(), tok, records, config.replace(val_fraction=None, early_stopping_patience=2))


def test_a_template_that_writes_todays_date_resumes_the_next_day(tmp_path, monkeypatch):
    """8. Llama 3.2's chat template writes "Today Date: 01 Dec 2026" (transformers' strftime_now) into every chat: a run
    stopped at 23:59 and resumed at 00:01 tokenized other rows and was refused as "other training data (data:
    fingerprint ... then, ... now)"; lorakit eval's loss of a run's validation set moved from day to day too. Chats
    are rendered with one fixed date (TEMPLATE_DATE) now; inference (lorakit generate / serve) keeps the real one."""
    import datetime

    from transformers.utils import chat_template_utils

    from conftest import tiny_llama
    from lorakit.train.data import TEMPLATE_DATE, render
    from test_serve_support import CHATML, make_tokenizer

    def day(when: datetime.datetime) -> type:
        class Clock(datetime.datetime):
            @classmethod
            def now(cls, tz=None):
                return when
        return Clock

    tok = make_tokenizer()  # byte-level BPE: the date's digits are tokens of their own
    tok.chat_template = ("{%- set date_string = strftime_now('%d %b %Y') -%}<|im_start|>system\nToday Date: "
                         "{{ date_string }}<|im_end|>\n" + CHATML)
    records = task_records(16, shape="messages")
    config = TrainConfig(**{**SMALL, "max_steps": 4, "save_every": 1, "max_length": 96})

    def stop_at_2(step, entry):
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(chat_template_utils, "datetime", day(datetime.datetime(2026, 12, 1, 23, 59)))
    with pytest.raises(KeyboardInterrupt):
        train(tiny_llama(vocab_size=len(tok)), tok, records, config, out=tmp_path, on_step=stop_at_2,
              log=lambda line: None)
    monkeypatch.setattr(chat_template_utils, "datetime", day(datetime.datetime(2026, 12, 2, 0, 1)))
    assert train(tiny_llama(vocab_size=len(tok)), tok, records, config, out=tmp_path, resume=tmp_path,
                 log=lambda line: None).steps == 4
    text, _ = render(records[0], tok)
    assert text.startswith(f"<|im_start|>system\nToday Date: {TEMPLATE_DATE:%d %b %Y}<|im_end|>")
    assert tok.apply_chat_template(records[0]["messages"], tokenize=False).startswith(
        "<|im_start|>system\nToday Date: 02 Dec 2026")  # outside training, the template's clock is the real one


@pytest.mark.parametrize("name,text", [
    ("semicolons.csv", "prompt;completion\rHello, world;fine\rfoo;bar;baz\r"),  # Excel in a European locale
    ("excel.csv", "sep=;\rprompt;completion\rHello, world;fine\rfoo;bar;baz\r"),  # Excel's separator line
    ("tabs.csv", "prompt\tcompletion\rHello, world\tfine\rfoo\tbar\tbaz\r"),  # tab-separated under a .csv name
])
def test_a_csv_with_mac_line_ends_reads_its_separator(tmp_path, name, text):
    """9. A CSV whose lines end in a lone carriage return (Excel for Mac's "CSV (Macintosh)") was all one first line
    to the separator check: a ";" or tab separator, or a sep= line, was not found in it, and every such file was
    refused with "the header line names no known field ('prompt;completion')"."""
    from lorakit.train.sources import read_many

    path = tmp_path / name
    path.write_text(text.replace("\rfoo;bar;baz\r", "\r").replace("\rfoo\tbar\tbaz\r", "\r"), encoding="utf-8",
                    newline="")
    assert [dict(record.fields) for record in read_many(path)] == [{"prompt": "Hello, world", "completion": "fine"}]
    path.write_text(text, encoding="utf-8", newline="")  # a bad row is still named by its line
    line = 4 if name == "excel.csv" else 3
    with pytest.raises(LorakitError, match=rf"^{name}:{line}: 3 cells but the header has 2$"):
        read_many(path)


def test_a_hub_dataset_id_or_a_url_as_data_says_what_to_do(tmp_path, monkeypatch):
    """10. --data tatsu-lab/alpaca (as --model takes org/name) was "data file not found ...; check the path", and
    --data https://host/x.jsonl was "data file not found: https:/host/x.jsonl" (one slash: the path as Path() reads
    it). The id is now told how to download it, or where the cache holds it; the URL, that lorakit reads local files."""
    import pandas as pd

    from lorakit.models import hub_cache
    from lorakit.train.sources import read_many

    monkeypatch.setattr(hub_cache, "hub_cache_root", lambda: tmp_path / "hub")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LorakitError, match=r"^data file not found: tatsu-lab/alpaca; if it is a Hugging Face dataset "
                                           r"id, lorakit downloads nothing: hf download --repo-type dataset "
                                           r"tatsu-lab/alpaca --local-dir alpaca, then"):
        read_many("tatsu-lab/alpaca")
    with pytest.raises(LorakitError, match=r"^data https://example\.com/x\.jsonl is a URL; lorakit reads local files "
                                           r"and downloads nothing: download it first \(e\.g\. curl -LO "):
        read_many("https://example.com/x.jsonl")
    snapshot = tmp_path / "hub" / "datasets--tatsu-lab--alpaca" / "snapshots" / "abc123"
    (snapshot / "data").mkdir(parents=True)
    pd.DataFrame([{"instruction": "Say hi", "input": "", "output": "hi"}]).to_parquet(
        snapshot / "data" / "train-00000-of-00001.parquet")
    with pytest.raises(LorakitError) as error:
        read_many("tatsu-lab/alpaca")
    said = str(error.value)
    assert said == (f"data file not found: tatsu-lab/alpaca; the Hugging Face dataset tatsu-lab/alpaca is in the local "
                    f"cache: give its files, --data {snapshot / 'data'}")
    assert len(read_many(said.rsplit("--data ", 1)[1])) == 1  # and that path reads
    with pytest.raises(LorakitError, match=r"^data file not found: data/train\.jsonl; check the path"):
        read_many("data/train.jsonl")  # a file name: no word of the Hub


def test_train_from_python_reads_the_configs_data_files(tmp_path):
    """11. train(model, tok, config=TrainConfig(data=["train.jsonl"])) raised TypeError (train_data missing), and
    train(model, tok, None, config) "'NoneType' object is not iterable": the config's data files are read now, as
    lorakit train reads them; with neither, one line says what to give."""
    from test_train_helpers import write_jsonl

    tok = tiny_tokenizer()
    write_jsonl(tmp_path / "train.jsonl", task_records(12))
    config = TrainConfig(**{**SMALL, "max_steps": 2, "data": [str(tmp_path / "train.jsonl")], "val_fraction": 0.25})
    said: list[str] = []
    result = train(tiny_train_model(), tok, config=config, log=said.append)
    assert result.steps == 2 and result.val_losses and any(line.startswith("training data: 9 examples") for line in said)
    with pytest.raises(LorakitError, match=r"^train\(\) was given no training data: pass the records \(train_data\), "
                                           r"or data=\[files\] in the TrainConfig$"):
        train(tiny_train_model(), tok, None, config.replace(data=None))


@pytest.mark.parametrize("record,fix", [
    ({"prompt": "2+2=", "output": "4"}, "rename 'output' to 'completion'"),
    ({"prompt": "2+2=", "target": "4"}, "rename 'target' to 'completion'"),
    ({"input": "2+2=", "completion": "4"}, "rename 'input' to 'prompt'"),
    ({"query": "2+2=", "completion": "4"}, "rename 'query' to 'prompt'"),
    ({"prompt": "2+2=", "completion": "4", "response": "four"}, "remove it"),  # the completion is there already
])
def test_a_half_renamed_record_is_told_to_rename_not_to_remove(record, fix):
    """12. {"prompt", "output"} (two tools' names mixed) was told "unknown field 'output'; ... remove it": removing it
    loses the answer, and the next run says "missing field 'completion'". The other tools' names for the missing
    field (formats.PROMPT_LIKE, COMPLETION_LIKE) are renamed now, as a typo of it is."""
    from lorakit.train.formats import validate_record

    with pytest.raises(LorakitError) as error:
        validate_record(record, "t.jsonl:1")
    assert str(error.value).endswith(f"a prompt_completion record has only 'prompt', 'completion': {fix}"), error.value


def test_an_out_that_is_a_file_is_one_line_before_the_model_changes(tok, tmp_path):
    """13. train(..., out=FILE) (or a folder under a file) raised FileExistsError / NotADirectoryError from the
    metrics log, after the adapter was injected; now one line first, the model untouched."""
    import lorakit

    (tmp_path / "notes.txt").write_text("mine")
    config = TrainConfig(**{**SMALL, "max_steps": 1})
    for out, said in ((tmp_path / "notes.txt", "is a file"), (tmp_path / "notes.txt" / "run", "is inside ")):
        model = tiny_train_model()
        with pytest.raises(LorakitError, match=rf"^out='{out}' {said}.*; give a folder for the run$"):
            train(model, tok, task_records(8), config, out=out)
        assert lorakit.adapter_names(model) == []
    assert (tmp_path / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("name", ["train.jsonl", "train-00000-of-00001.parquet", "data-00000-of-00001.arrow",
                                  "train.csv"])
def test_a_git_lfs_pointer_is_said_to_be_one(tmp_path, name):
    """14. `git clone` of a Hugging Face dataset without git-lfs leaves pointer files in place of the data: read as
    data they were "malformed JSON (Expecting value at column 1); one object per line", "not a readable Parquet file
    (... Parquet magic bytes not found in footer ...)" or a CSV header error."""
    from lorakit.train.sources import read_many

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / name).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:4d7a214614ab2935c943"
                                          "f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 24246638\n")
    with pytest.raises(LorakitError, match=rf"^{tmp_path / 'data' / name}: a Git LFS pointer, not the data \(the "
                                           r"repository was cloned without git-lfs\); fetch the files: git lfs"):
        read_many(tmp_path / "data")


def test_a_datasets_folder_of_lfs_pointers_is_said_to_be_one(tmp_path):
    """14b. The same for a save_to_disk folder whose .arrow files are pointers: it was "not a folder written by
    datasets' save_to_disk (Expected to read 1936876918 metadata bytes, but only read 62)"."""
    import datasets

    from lorakit.train.sources import read_many

    datasets.Dataset.from_list(task_records(4)).save_to_disk(str(tmp_path / "saved"))
    assert len(read_many(tmp_path / "saved")) == 4
    for arrow in (tmp_path / "saved").glob("*.arrow"):
        arrow.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 10\n")
    with pytest.raises(LorakitError, match=r"data-00000-of-00001\.arrow: a Git LFS pointer, not the data"):
        read_many(tmp_path / "saved")


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch, tiny_folder, capsys):
    """15. Without --out a run is runs/<date-time>, named to the second and made only once its data was read: two
    runs started in the same second (a sweep's `lorakit train --lr ... &` in a loop) were given one folder, and each
    wrote its checkpoints, metrics and adapter over the other's. The folder is claimed as it is named now (-2, -3
    after a taken name), and removed again when the run fails before its first checkpoint."""
    import time

    from lorakit.cli import main
    from lorakit.train import runner
    from test_train_helpers import write_jsonl

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(time, "strftime", lambda fmt, *when: "20261201-120000")  # every run in one second
    first, _ = runner.resolve_run_folder(None, None, False)
    second, _ = runner.resolve_run_folder(None, None, False)
    assert (first, second) == (Path("runs/20261201-120000"), Path("runs/20261201-120000-2"))
    assert first.is_dir() and second.is_dir()
    write_jsonl(tmp_path / "bad.jsonl", ['{"prompt": "a", "completion": "b"}', '{"prompt": '])
    code = main(["train", "--model", str(tiny_folder), "--data", "bad.jsonl", "--no-progress"])
    assert code == 2 and "bad.jsonl:2: malformed JSON" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["20261201-120000", "20261201-120000-2"]
    for folder in (first, second):
        folder.rmdir()
    code = main(["train", "--model", str(tiny_folder), "--data", "bad.jsonl", "--no-progress"])
    assert code == 2 and not (tmp_path / "runs").exists()  # nothing left, runs/ included, as before
