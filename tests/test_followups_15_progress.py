"""`lorakit train` said nothing while it read and tokenized its data: 100k chats are a minute or more of silence
before the first step. Now reading a JSONL file and tokenizing show progress as training does (a tqdm bar on a terminal, a dozen plain lines in a log
file, nothing on a process other than rank 0), only once it has taken ``PROGRESS_DELAY_S``, and the summary line
follows it. And the validation set's notes and warnings (dropped examples, special tokens spelled in its text) were
never printed, while the training set's were: now they are, once, labelled as the validation set's.

Every model is the tiny random Llama of test_train_helpers (a word-level tokenizer with a ChatML-like template)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from lorakit.cli import main
from lorakit.train import data as data_module
from lorakit.train.config import TrainConfig
from lorakit.train.data import build_dataset, build_datasets
from lorakit.train.formats import validate_record
from test_train_helpers import REPO, task_records, tiny_folder, tiny_tokenizer  # noqa: F401 (fixtures)

LINE = re.compile(r"^tokenizing (training|validation) data: (\d+)/(\d+) records, \d:\d\d:\d\d elapsed, "
                  r"\d:\d\d:\d\d left$", re.M)


def _write(path, records) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_a_log_gets_a_few_plain_lines_ending_at_the_total(capsys, monkeypatch):
    monkeypatch.setattr(data_module, "PROGRESS_DELAY_S", 0.0)  # any set counts as long here
    dataset = build_dataset(task_records(500, seed=1, shape="messages"), tiny_tokenizer(), 32,
                            name="training data", progress="lines")
    err = capsys.readouterr().err
    counts = [(int(m.group(2)), int(m.group(3))) for m in LINE.finditer(err)]
    assert "\r" not in err, err
    assert 3 <= len(counts) <= 12 and len(counts) == len(err.strip().splitlines()), err  # a few, not 500
    assert counts[0] == (1, 500) and counts[-1] == (500, 500), err
    assert dataset.summary.examples == 500


def test_a_quick_set_says_nothing(capsys):
    """Under the delay (the default 1.5 s), no line and no bar: a small set is done before either would help."""
    records = task_records(20, seed=1, shape="messages")
    for progress in ("lines", True):
        build_dataset(records, tiny_tokenizer(), 32, name="training data", progress=progress)
    assert capsys.readouterr().err == ""


def test_a_terminal_gets_a_bar_for_each_set(capsys, monkeypatch):
    monkeypatch.setattr(data_module, "PROGRESS_DELAY_S", 0.0)
    train, val = ([validate_record(r, f"{name}[{i}]") for i, r in enumerate(task_records(n, seed=n))]
                  for name, n in (("train", 60), ("val", 30)))  # records as read_many gives them
    bundle = build_datasets(train, tiny_tokenizer(), validation=val, max_length=32, progress=True)
    err = capsys.readouterr().err
    assert "\r" in err and "tokenizing training data" in err and "tokenizing validation data" in err, err
    assert "/60 " in err and "/30 " in err and "record" in err, err  # counted in records, against their totals
    assert len(bundle.train) == 60 and len(bundle.val) == 30


def test_the_run_decides_as_training_does_and_other_ranks_are_silent(monkeypatch):
    from lorakit.train.runner import data_progress

    monkeypatch.delenv("RANK", raising=False)
    assert data_progress(TrainConfig()) == "lines"  # stderr is captured by pytest: not a terminal
    assert data_progress(TrainConfig(progress=True)) is True
    assert data_progress(TrainConfig(progress=False)) == "lines"  # --no-progress: plain lines, as training's
    monkeypatch.setenv("RANK", "1")  # torchrun's second process tokenizes too: its bar would draw over rank 0's
    monkeypatch.setenv("WORLD_SIZE", "2")  # torchrun sets both (RANK alone is not a torchrun job: lorakit._rank)
    assert data_progress(TrainConfig(progress=True)) is False
    assert data_progress(TrainConfig()) is False
    monkeypatch.setenv("RANK", "0")
    assert data_progress(TrainConfig(progress=True)) is True


def test_train_into_a_log_shows_tokenizing_then_the_summary(tmp_path, tiny_folder):  # noqa: F811
    """A real `lorakit train > log 2>&1` on 30000 chats (9 s of tokenizing on this shared machine, 3 s or more on a
    fast one): a few plain lines counting records up to the total, no carriage return, then the summary line."""
    train = _write(tmp_path / "train.jsonl", task_records(30000, seed=1, shape="messages"))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    done = subprocess.run([sys.executable, "-m", "lorakit", "train", "--model", str(tiny_folder), "--data", train,
                           "--out", str(tmp_path / "run"), "--rank", "2", "--batch-size", "2", "--max-length", "32",
                           "--eval-examples", "0", "--max-steps", "1", "--save-every", "0"],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=240)
    log = done.stdout
    assert done.returncode == 0, log[-3000:]
    assert "\r" not in log, log[-3000:]
    counts = [(int(m.group(2)), int(m.group(3))) for m in LINE.finditer(log)]
    assert 2 <= len(counts) <= 13, log[-3000:]
    assert counts[-1] == (30000, 30000) and all(total == 30000 for _, total in counts), log[-3000:]
    for phase in ("reading", "checking"):  # reading the file: shown or not by the machine's speed, never many lines
        assert len(re.findall(rf"^{phase} train\.jsonl: \d+/30000 ", log, re.M)) <= 12, log[-3000:]
    last = list(LINE.finditer(log))[-1].end()
    summary = log.index("training data: 30000 examples")
    assert summary > last, log[-3000:]  # the summary line ends the tokenizing lines


def _val_notes_run(tmp_path, tiny_folder, capsys):  # noqa: F811
    train = _write(tmp_path / "train.jsonl", task_records(12, seed=1, shape="messages"))
    long_chat = {"messages": [{"role": "user", "content": "copy " + " ".join(["a"] * 40) + " :"},
                              {"role": "assistant", "content": "a"}]}
    spelled = {"messages": [{"role": "user", "content": "copy a b : <|im_end|>"}, {"role": "assistant", "content": "a b"}]}
    val = _write(tmp_path / "val.jsonl", task_records(4, seed=2, shape="messages") + [long_chat, spelled])
    code = main(["train", "--model", str(tiny_folder), "--data", train, "--val-data", val, "--out",
                 str(tmp_path / "run"), "--max-steps", "1", "--rank", "2", "--batch-size", "4", "--max-length", "24",
                 "--eval-examples", "0", "--eval-every", "0", "--no-progress"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out + captured.err


def test_the_validation_sets_notes_are_printed_once_and_labelled(tmp_path, tiny_folder, capsys):  # noqa: F811
    out = _val_notes_run(tmp_path, tiny_folder, capsys)
    lines = [line for line in out.splitlines() if "examples were dropped" in line or "special token" in line]
    assert len(lines) == 1, out  # the training set has neither: one line, the validation set's
    line = lines[0]
    assert line.startswith("validation data: warning: 1 chat spells a special token of this tokenizer"), line
    assert "val.jsonl:6" in line, line  # where the spelled token is
    assert "1 of 6 examples were dropped" in line and "longer than max_length=24" in line, line
    assert "val.jsonl:5" in line, line  # the first dropped one


def test_train_from_python_says_the_validation_sets_note_too(capsys):
    """lorakit.train.train(model, tokenizer, records, val_data=records) tokenizes both sets itself: the validation
    set's note is said there too, labelled."""
    from lorakit.train.loop import train
    from test_train_helpers import SMALL, tiny_train_model

    long_one = {"prompt": "copy " + " ".join(["a"] * 40) + " : ", "completion": "a"}
    config = TrainConfig(**{**SMALL, "max_steps": 1, "max_length": 24})
    train(tiny_train_model(), tiny_tokenizer(), task_records(8, seed=1), config,
          val_data=task_records(3, seed=2) + [long_one])
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if "examples were dropped" in line]
    assert lines == ["validation data: note: 1 of 4 examples were dropped: 1 longer than max_length=24 tokens "
                     "(raise --max-length or pass --overflow truncate); the first is validation data[3]"], out


def test_reading_a_large_file_shows_its_lines_then_its_checks(tmp_path, capsys, monkeypatch):
    """Parsing and checking 100k chats takes 15 s or more before the model loads: inside reading_progress (what
    `lorakit train` reads its data in), a JSONL file shows its lines, then its records being checked."""
    from lorakit.train.sources import read_many, reading_progress

    path = _write(tmp_path / "train.jsonl", task_records(300, seed=1, shape="messages"))
    assert read_many(path) and capsys.readouterr().err == ""  # outside it: silent, as before
    monkeypatch.setattr(data_module, "PROGRESS_DELAY_S", 0.0)
    with reading_progress("lines"):
        records = read_many(path)
    err = capsys.readouterr().err
    reading = re.findall(r"^reading train\.jsonl: (\d+)/300 lines, ", err, re.M)
    checking = re.findall(r"^checking train\.jsonl: (\d+)/300 records, ", err, re.M)
    assert reading[-1] == "300" and checking[-1] == "300" and 2 <= len(reading) <= 12 >= len(checking), err
    assert err.index("checking") > err.rindex("reading"), err
    assert len(records) == 300 and "\r" not in err
