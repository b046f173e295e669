"""Follow-ups of audit 12 on ``lorakit train`` / ``lorakit eval``: eval of a run's adapter scores the examples the run
scored (its max_length / overflow), data messages name the CLI flags, and batch sizes beyond the data are refused
before the model loads. Tiny random Llama folders (tests/test_train_helpers.py), runs of a few steps on CPU."""

from __future__ import annotations

import json

import pytest

from lorakit.cli import main
from test_train_helpers import task_records, tiny_data, tiny_folder, write_jsonl  # noqa: F401,F811 (fixtures)

FAST = ["--rank", "4", "--batch-size", "4", "--no-progress", "--eval-examples", "0", "--samples", "0"]


def test_eval_of_a_runs_adapter_uses_the_runs_max_length_and_overflow(tmp_path, tiny_folder, tiny_data, capsys):
    """Trained at --max-length 10 (examples are 7-13 tokens), the run's validation loss leaves out the longer
    validation examples; eval of RUN/adapter without --max-length must leave out the same ones and report the same
    loss, say where its max_length came from, and an explicit --max-length still wins."""
    train_path, val_path = tiny_data
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--val-data", str(val_path),
                 "--out", str(out), "--max-length", "10", "--max-steps", "2", "--eval-every", "2", *FAST])
    capsys.readouterr()
    assert code == 0
    run_loss = json.loads((out / "results.json").read_text())["best_val_loss"]
    for folder in ("adapter", "best"):
        code = main(["eval", "--model", str(tiny_folder), "--adapter", str(out / folder), "--data", str(val_path),
                     "--no-generate", "--json", str(tmp_path / f"{folder}.json")])
        printed = capsys.readouterr().out
        assert code == 0
        assert "from the adapter's run: --max-length 10, --overflow drop" in printed, printed
        report = json.loads((tmp_path / f"{folder}.json").read_text())
        assert report["dropped"] > 0 and report["loss"] == pytest.approx(run_loss, rel=1e-6)
    code = main(["eval", "--model", str(tiny_folder), "--adapter", str(out / "adapter"), "--data", str(val_path),
                 "--no-generate", "--max-length", "32", "--json", str(tmp_path / "explicit.json")])
    printed = capsys.readouterr().out
    assert code == 0 and "--max-length 10" not in printed and "from the adapter's run: --overflow drop" in printed
    report = json.loads((tmp_path / "explicit.json").read_text())
    assert report["dropped"] == 0 and report["loss"] != pytest.approx(run_loss, rel=1e-6)


def _last_error(capsys, code: int) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    return err.strip().splitlines()[-1]


def test_data_messages_name_the_flags_a_user_typed(tmp_path, tiny_folder, capsys):
    """An overlong example under --overflow error said "raise max_length or choose overflow='drop'": Python
    parameters, not the flags typed. data.py cannot tell the CLI from Python, so it names both."""
    from lorakit.errors import LorakitError
    from lorakit.train.data import split_records, tokenize_example
    from test_train_helpers import tiny_tokenizer

    data = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "copy " + "a " * 20 + ": ", "completion": "a"}] * 4)
    line = _last_error(capsys, main(["train", "--model", str(tiny_folder), "--data", str(data), "--out",
                                     str(tmp_path / "run"), "--max-length", "16", "--overflow", "error", *FAST]))
    assert "longer than max_length=16" in line and "raise --max-length" in line, line
    assert "--overflow drop" in line and "--overflow truncate" in line, line
    with pytest.raises(LorakitError, match=r"max_length in Python.*overflow='drop'"):
        tokenize_example({"prompt": "copy " + "a " * 20 + ": ", "completion": "a"}, tiny_tokenizer(), max_length=8,
                         overflow="error")
    with pytest.raises(LorakitError, match=r"keep any for training; lower --val-fraction"):
        split_records(task_records(1), 0.5)


BATCH_CASES = [  # the 48 records of tiny_data's train.jsonl
    (["--batch-size", "4", "--global-batch", "256"],
     "--global-batch 256 is more than the 48 training examples: one optimizer step would go through them 5.3 times; "
     "use --global-batch 48 or less (a multiple of --batch-size 4)"),
    (["--batch-size", "4", "--grad-accum", "20"],
     "--batch-size 4 x --grad-accum 20 = 80 examples per optimizer step is more than the 48 training examples: one "
     "optimizer step would go through them 1.7 times; use --grad-accum 12 or less"),
    (["--batch-size", "64"], "--batch-size 64 is more than the 48 training examples; use --batch-size 48 or less"),
    (["--batch-size", "4", "--val-fraction", "0.95"],
     "--val-fraction 0.95 holds out 46 of 48 records, leaving 2 for training, fewer than one batch (--batch-size 4); "
     "lower --val-fraction (e.g. 0.1) or add data"),
    (["--batch-size", "4", "--global-batch", "44", "--val-fraction", "0.1"],
     "--global-batch 44 is more than the 43 training examples (after --val-fraction 0.1 holds out 5): one optimizer "
     "step would go through them 1.0 times; use --global-batch 40 or less (a multiple of --batch-size 4)"),
]


@pytest.mark.parametrize("flags,message", BATCH_CASES, ids=["global-batch", "grad-accum", "batch-size", "val-fraction",
                                                            "global-batch-after-split"])
def test_a_batch_larger_than_the_data_is_refused_before_the_model_loads(flags, message, tmp_path, tiny_folder,
                                                                         tiny_data, capsys, monkeypatch):
    """--global-batch 256 on 48 records trained without a word, each step cycling the data 5 times."""
    from lorakit.train import runner

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the batch was checked against the data")

    monkeypatch.setattr(runner, "load_model", no_load)
    line = _last_error(capsys, main(["train", "--model", str(tiny_folder), "--data", str(tiny_data[0]), "--out",
                                     str(tmp_path / "run"), "--no-progress", "--eval-examples", "0", *flags]))
    assert line == "lorakit train: error: " + message
    assert not (tmp_path / "run").exists()


def test_a_global_batch_larger_than_the_packed_rows_is_refused_before_training(tmp_path, tiny_folder, tiny_data,
                                                                               capsys):
    """48 records of 7-13 tokens packed into rows of 64 tokens make fewer rows than records: known after
    tokenizing, checked then, before the first step."""
    line = _last_error(capsys, main(["train", "--model", str(tiny_folder), "--data", str(tiny_data[0]), "--out",
                                     str(tmp_path / "run"), "--pack", "--max-length", "64", "--batch-size", "2",
                                     "--global-batch", "40", "--no-progress", "--eval-examples", "0"]))
    assert "--global-batch 40 is more than the " in line and " packed training rows: one optimizer step" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
