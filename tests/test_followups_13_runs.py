"""Follow-ups 13 on training runs, eval and data formats: eval of a checkpoint's adapter reads its run's config,
a resumed old run decides its progress display as a fresh one does, TensorBoard shows each step of a resumed run
once, and role/content chats may name their roles as ShareGPT, Gemini and Gemma do. Tiny random Llama folders
(tests/test_train_helpers.py), runs of a few steps on CPU."""

from __future__ import annotations

import json
import shutil
import sys

import pytest

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.train.formats import validate_record
from test_train_helpers import tiny_data, tiny_folder, write_jsonl  # noqa: F401 (fixtures)

FAST = ["--rank", "4", "--batch-size", "4", "--eval-examples", "0", "--samples", "0"]


@pytest.fixture(scope="module")
def run_with_checkpoints(tmp_path_factory, tiny_folder, tiny_data):
    """A run at --max-length 10 (examples are 7-13 tokens, so validation drops some) of 4 steps with a checkpoint
    and a validation at steps 2 and 4."""
    import contextlib
    import io

    train_path, val_path = tiny_data
    out = tmp_path_factory.mktemp("runs") / "run"
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        code = main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--val-data", str(val_path),
                     "--out", str(out), "--max-length", "10", "--max-steps", "4", "--eval-every", "2",
                     "--save-every", "2", "--no-progress", *FAST])
    assert code == 0
    return out


def _val_losses(run) -> dict[int, float]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["val_loss"] for e in lines if e.get("kind") == "val"}


# -- 1. eval of an adapter anywhere in a run folder reads the run's config ------------------------------------------
def test_eval_of_a_checkpoint_adapter_uses_its_runs_config(tmp_path, run_with_checkpoints, tiny_folder, tiny_data,
                                                           capsys, monkeypatch):
    """RUN/checkpoints/step-000002/adapter was scored by the run at step 2 (max_length 10, overflow drop): eval of it
    must score the same examples, get the run's step-2 validation loss, and say in one line which config it read.
    Before, only RUN/adapter and RUN/best found RUN/config.yaml, and the checkpoint was scored at 128 tokens."""
    run, (_, val_path) = run_with_checkpoints, tiny_data
    monkeypatch.chdir(run.parent)  # the config is named as the user would type it, relative to here
    checkpoint = run / "checkpoints" / "step-000002" / "adapter"
    code = main(["eval", "--model", str(tiny_folder), "--adapter", str(checkpoint), "--data", str(val_path),
                 "--no-generate", "--json", str(tmp_path / "step2.json")])
    printed = capsys.readouterr().out
    assert code == 0
    told = [line for line in printed.splitlines() if line.startswith("from the adapter's run:")]
    assert told == ["from the adapter's run: --max-length 10, --overflow drop (read from run/config.yaml, as the run "
                    "scored its validation loss; --max-length / --overflow to change)"], printed
    report = json.loads((tmp_path / "step2.json").read_text())
    assert report["dropped"] > 0 and report["run_config"] == str((run / "config.yaml").resolve())
    assert report["loss"] == pytest.approx(_val_losses(run)[2], rel=1e-6)


def test_only_a_runs_own_layout_finds_its_config(tmp_path, run_with_checkpoints):
    """The run folder is one level above RUN/adapter, RUN/best (or any sibling), three above a checkpoint's adapter;
    a config.yaml that is not a run's (a user's own, above a copied adapter) is not read as one."""
    from lorakit.train.eval_cli import run_config, run_folder

    run = run_with_checkpoints
    for adapter in (run / "adapter", run / "best", run / "checkpoints" / "step-000004" / "adapter"):
        assert run_folder(str(adapter)) == run.resolve()
        assert run_config(str(adapter))[1]["max_length"] == 10
    # a checkpoint adapter copied out of its run, under a folder with an unrelated config.yaml
    copied = tmp_path / "project" / "checkpoints" / "step-000002" / "adapter"
    shutil.copytree(run / "checkpoints" / "step-000002" / "adapter", copied)
    (tmp_path / "project" / "config.yaml").write_text("max_length: 4\noverflow: truncate\n")
    assert run_folder(str(copied)) is None and run_config(str(copied)) == (None, {})
    # the step folder must be a checkpoint's (step-NNNNNN under checkpoints/), not any folder three levels down
    other = tmp_path / "run2" / "exports" / "step-000002" / "adapter"
    shutil.copytree(run / "adapter", other)
    shutil.copy(run / "config.yaml", tmp_path / "run2" / "config.yaml")
    assert run_folder(str(other)) is None
    assert run_folder(str(tmp_path / "run2" / "adapter")) == (tmp_path / "run2").resolve()


# -- 2. a resumed old run: progress decided at run time, as a fresh run's ----------------------------------------
def test_resuming_an_old_run_decides_progress_as_a_fresh_run(tmp_path, tiny_folder, tiny_data, capsys, monkeypatch):
    """A config.yaml written before progress could be left to the run time holds the old default, "progress:
    true". Resumed into a log file (stderr not a terminal) it must print plain step lines,
    not a tqdm bar's carriage-return redraws; on a terminal, the bar. An explicit --no-progress still wins."""
    train_path, _ = tiny_data
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--out", str(run),
                 "--max-steps", "2", "--save-every", "2", "--no-progress", *FAST]) == 0
    config = run / "config.yaml"
    old = [line for line in config.read_text().splitlines(keepends=True) if not line.startswith("progress:")]
    saved = "progress: true\n"
    config.write_text("".join(old) + saved)  # as the run's version of lorakit wrote it
    capsys.readouterr()

    assert main(["train", "--resume", "--out", str(run), "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "step 4/4: loss=" in err and "\r" not in err and "training:" not in err, err

    config.write_text("".join(old) + saved)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # the same resume at a terminal: the bar
    assert main(["train", "--resume", str(run / "checkpoints" / "step-000002"), "--out", str(run),
                 "--max-steps", "4"]) == 0
    err = capsys.readouterr().err
    assert "training:" in err and "step 4/4: loss=" not in err, err

    config.write_text("".join(old) + saved)
    assert main(["train", "--resume", str(run / "checkpoints" / "step-000002"), "--out", str(run),
                 "--max-steps", "4", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "step 4/4: loss=" in err and "training:" not in err, err


# -- 3. TensorBoard: a resumed run's steps show once -------------------------------------------------------------
def test_tensorboard_of_a_resumed_run_has_each_step_once(tmp_path, tiny_data):
    """A run of 6 steps resumed from its step-3 checkpoint writes steps 4-6 again into a second event file. Read
    back with TensorBoard's own reader, every step must appear once (the resumed values), as in metrics.jsonl; the
    stopped run's steps 4-6 are hidden by the purge event the resumed writer starts with."""
    pytest.importorskip("torch.utils.tensorboard", reason="tensorboard is optional (pip install tensorboard)")
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator",
                                      reason="tensorboard is optional (pip install tensorboard)")
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train
    from test_train_helpers import SMALL, tiny_tokenizer, tiny_train_model

    records = [json.loads(line) for line in tiny_data[0].read_text().splitlines()]
    out = tmp_path / "run"
    config = TrainConfig(**{**SMALL, "save_every": 3, "max_steps": 6, "tensorboard": True, "lr": 1e-2})
    train(tiny_train_model(), tiny_tokenizer(), records, config, out=out, log=lambda message: None)
    # the resumed run differs from the first after step 3 (another lr), so a step shown twice would show it
    resumed = config.replace(lr=5e-2)
    train(tiny_train_model(), tiny_tokenizer(), records, resumed, out=out, resume=out / "checkpoints" / "step-000003",
          log=lambda message: None)

    files = sorted((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2  # one per writer: the stopped run's and the resumed one's
    events = accumulator.EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    shown = [(e.step, e.value) for e in events.Scalars("train/loss")]
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [(e["step"], e["loss"]) for e in metrics if e.get("kind") == "train"]
    assert [step for step, _ in shown] == [1, 2, 3, 4, 5, 6]
    assert [value for _, value in shown] == pytest.approx([loss for _, loss in logged], rel=1e-6)


# -- 4. role/content chats with other tools' role names ---------------------------------------------------------
@pytest.mark.parametrize("user, assistant", [("human", "gpt"), ("Human", "GPT"), ("user", "model"),
                                             ("user", "chatbot")])
def test_role_aliases_read_as_user_and_assistant(user, assistant):
    """ShareGPT's speaker names in role/content form (a half-converted export), Gemini's and Gemma's "model",
    Cohere's "Chatbot": the chat trains as user / assistant turns."""
    record = validate_record({"messages": [{"role": "system", "content": "Be brief."},
                                           {"role": user, "content": "hi"}, {"role": assistant, "content": "hello"}]},
                             "chats.jsonl:3")
    assert [m["role"] for m in record["messages"]] == ["system", "user", "assistant"]
    # the same under ShareGPT's key (many Hub datasets put role/content turns there)
    record = validate_record({"conversations": [{"role": user, "content": "hi"}, {"role": assistant, "content": "yo"}]})
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]


def test_an_unknown_role_is_one_line_naming_the_record_and_the_roles():
    with pytest.raises(LorakitError) as caught:
        validate_record({"messages": [{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}]},
                        "chats.jsonl:7")
    message = str(caught.value)
    assert "\n" not in message and message.startswith("chats.jsonl:7: messages[1] has role 'bot'; expected one of "
                                                      "system, user, assistant, tool")
    assert "human = user" in message and "gpt = assistant" in message and "model = assistant" in message


def test_train_cli_reads_a_file_of_aliased_roles(tmp_path, tiny_folder, capsys):
    """End to end: a JSONL of human/gpt role/content chats trains (it was refused at its first line)."""
    chat = {"messages": [{"role": "human", "content": "copy a b :"}, {"role": "gpt", "content": "a b"}]}
    data = write_jsonl(tmp_path / "chats.jsonl", [chat] * 8)
    code = main(["train", "--model", str(tiny_folder), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-steps", "1", "--no-progress", *FAST])
    assert code == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").is_file()


# -- hostile data files --------------------------------------------------------------------------------------------
def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    """dict(zip(header, cells)) kept the last of two 'prompt' columns: the first column's text was dropped without a
    word. Empty names (the trailing ',,' of a spreadsheet export) may repeat: those columns are ignored."""
    from lorakit.train.sources import read_records

    twice = tmp_path / "twice.csv"
    twice.write_text("prompt,prompt,completion\nsystem says,copy a b :,a b\n", encoding="utf-8")
    with pytest.raises(LorakitError) as caught:
        read_records(twice)
    assert str(caught.value) == ("twice.csv:1: the header names 'prompt' twice (columns 1 and 2); each row would keep "
                                 "only the last: rename or remove one")
    trailing = tmp_path / "trailing.csv"
    trailing.write_text("prompt,completion,,\r\ncopy a b :,a b,,\r\n", encoding="utf-8")
    assert [dict(r.fields) for r in read_records(trailing)] == [{"prompt": "copy a b :", "completion": "a b"}]


def test_a_parquet_table_with_a_column_twice_is_named_as_such(tmp_path):
    """pyarrow can write two columns of one name but not read them back; that was 'not a readable Parquet file
    (Multiple matches for FieldRef.Name(prompt) ...)', as if the file were damaged."""
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from lorakit.train.sources import read_records

    path = tmp_path / "twice.parquet"
    pq.write_table(pa.table([pa.array(["a"]), pa.array(["b"]), pa.array(["c"])],
                            names=["prompt", "prompt", "completion"]), path)
    with pytest.raises(LorakitError, match=r"twice\.parquet: the table has two columns named 'prompt'; rename or "
                                           r"remove one$"):
        read_records(path)


@pytest.mark.parametrize("header", ["prompt,completion", "prompt\tcompletion", "Prompt;Completion"])
def test_a_csv_saved_as_jsonl_says_to_rename_it(tmp_path, header):
    """A spreadsheet export named .jsonl failed with "malformed JSON (Expecting value at column 1); one object per
    line", which does not say that the file is a table that reads fine under its right name."""
    from lorakit.train.sources import read_records

    sep = header[len("prompt")]
    data = tmp_path / "export.jsonl"
    data.write_text(f"{header}\ncopy a b :{sep}a b\n", encoding="utf-8")
    with pytest.raises(LorakitError, match=r"^export\.jsonl:1: malformed JSON .*; this line is a CSV header \(prompt, "
                                           r"completion\), not JSON: name the file \.csv \(or \.tsv for tabs\)"):
        read_records(data)
    renamed = data.rename(tmp_path / ("export.tsv" if sep == "\t" else "export.csv"))
    assert [r.shape for r in read_records(renamed)] == ["prompt_completion"]


def test_a_data_file_given_twice_is_noted(tmp_path, tiny_folder, tiny_data, capsys, monkeypatch):
    """`--data train.jsonl ./train.jsonl` trained every record twice per epoch without a word (the summary only
    showed twice the count). It may be meant (weighing a file up), so it is a note, not a refusal; eval too."""
    from lorakit.train.sources import repeated_note

    train_path, val_path = tiny_data
    monkeypatch.chdir(train_path.parent)
    assert repeated_note(["train.jsonl", "val.jsonl"], "--data") is None
    code = main(["train", "--model", str(tiny_folder), "--data", "train.jsonl", "./train.jsonl", "--out",
                 str(tmp_path / "run"), "--max-steps", "1", "--no-progress", *FAST])
    out = capsys.readouterr().out
    assert code == 0
    assert ("note: --data gives train.jsonl 2 times; each is read that many times over, its records weighed up "
            "against the rest: give a file once unless that is meant") in out, out
    assert "training data: 96 examples" in out
    code = main(["eval", "--model", str(tiny_folder), "--data", "val.jsonl", str(val_path), "--no-generate"])
    out = capsys.readouterr().out
    assert code == 0 and "note: --data gives val.jsonl 2 times" in out, out


def test_the_data_summary_counts_examples_and_records_apart():
    """A dropped record made the summary read "8 examples (9 prompt_completion)", two counts of one thing that
    disagree; when examples and records differ, it now says which is which (and 1 example is singular)."""
    from lorakit.train.data import DataSummary

    same = DataSummary(examples=9, shapes={"prompt_completion": 9}, max_length=32)
    assert str(same).startswith("9 examples (9 prompt_completion), 0 dropped")
    dropped = DataSummary(examples=8, dropped=1, shapes={"prompt_completion": 9}, max_length=32)
    assert str(dropped).startswith("8 examples (from 9 records: 9 prompt_completion), 1 dropped")
    one = DataSummary(examples=1, dropped=2, shapes={"text": 1, "messages": 2}, max_length=32)
    assert str(one).startswith("1 example (from 3 records: 2 messages, 1 text), 2 dropped")


def test_a_pipe_as_data_is_one_line_not_a_hang_or_a_type_puzzle(tmp_path, capsys):
    """`--data <(zcat data.jsonl.gz)` is /dev/fd/63: it was refused as "unsupported data file type '(none)'", and a
    named pipe with a data file's name (no writer) hung the read forever. Both are named for what they are."""
    import os

    fifo = tmp_path / "train.jsonl"
    os.mkfifo(fifo)
    for path in (fifo, "/dev/null"):
        code = main(["eval", "--data", str(path), "--no-generate"])
        err = capsys.readouterr().err.strip()
        assert code == 2 and err.count("\n") == 0, err
        assert err.startswith(f"lorakit eval: error: {path} is a pipe or a device (shell process substitution <(...)?)")
        assert "save the records first" in err


@pytest.mark.parametrize("config", [None, ""])
def test_resuming_a_run_without_its_config_is_refused_before_loading(tmp_path, run_with_checkpoints, capsys, config,
                                                                     monkeypatch):
    """A run folder whose config.yaml was deleted (or emptied) resumed with the defaults: the default base model
    loaded (minutes for a real one) only to be refused by the checkpoint's fingerprint, and the refused resume left
    a config.yaml of defaults behind. Now one line before anything loads, and the folder is left as it was."""
    import lorakit.train.runner as runner

    run = tmp_path / "run"
    shutil.copytree(run_with_checkpoints, run)
    if config is None:
        (run / "config.yaml").unlink()
    else:
        (run / "config.yaml").write_text(config)
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    code = main(["train", "--resume", "--out", str(run), "--max-steps", "6"])
    err = capsys.readouterr().err.strip()
    state = "missing" if config is None else "empty (it names no model)"
    assert code == 2 and err == (f"lorakit train: error: cannot resume from {run}: its config.yaml, which keeps the "
                                 f"run's options (model, data, adapter settings), is {state}; put it back, or give "
                                 "them again with the run's original values: lorakit train --resume --out RUN "
                                 "--model ... --data ...")
    assert (run / "config.yaml").exists() == (config is not None)


def test_eval_of_a_runs_adapter_without_data_scores_the_runs_validation_data(tmp_path, run_with_checkpoints,
                                                                            tiny_folder, tiny_data, capsys):
    """Without --data, eval of a run's adapter scored the embedded task's held-out set, whatever the adapter had
    learnt (here it failed: the orders are longer than the run's max_length; with a real model it printed a loss of
    the wrong task). It now scores what the run validated on: its --val-data, or the very records its
    --val-fraction held out (so eval's loss is the run's validation loss), and a run that held out nothing is told
    to give --data."""
    train_path, val_path = tiny_data
    code = main(["eval", "--model", str(tiny_folder), "--adapter", str(run_with_checkpoints / "adapter"),
                 "--no-generate", "--json", str(tmp_path / "val.json")])
    out = capsys.readouterr().out
    told = [line for line in out.splitlines() if line.startswith("from the adapter's run:")]  # one line says it all
    assert code == 0 and told == [f"from the adapter's run: --val-data {val_path}, --max-length 10, --overflow drop "
                                  f"(read from {run_with_checkpoints / 'config.yaml'}, as the run scored its validation "
                                  "loss; --data / --max-length / --overflow to change)"], out
    report = json.loads((tmp_path / "val.json").read_text())
    assert report["data"] == [str(val_path)]
    assert report["loss"] == pytest.approx(_val_losses(run_with_checkpoints)[4], rel=1e-6)

    held = tmp_path / "held"
    assert main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--val-fraction", "0.25",
                 "--out", str(held), "--max-steps", "2", "--eval-every", "2", "--seed", "3", "--no-progress",
                 *FAST]) == 0
    capsys.readouterr()
    code = main(["eval", "--model", str(tiny_folder), "--adapter", str(held / "adapter"), "--no-generate",
                 "--json", str(tmp_path / "held.json")])
    out = capsys.readouterr().out
    assert code == 0 and (f"from the adapter's run: the 12 records its --val-fraction 0.25 held out of {train_path} "
                          "(seed 3), --max-length 128, --overflow drop (read from ") in out, out
    report = json.loads((tmp_path / "held.json").read_text())
    assert report["loss"] == pytest.approx(_val_losses(held)[2], rel=1e-6) and report["data"] == [str(train_path)]
    assert report["data_from_run"] == f"the 12 records its --val-fraction 0.25 held out of {train_path} (seed 3)"

    none = tmp_path / "none"
    assert main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--out", str(none),
                 "--max-steps", "1", "--no-progress", *FAST]) == 0
    capsys.readouterr()
    code = main(["eval", "--model", str(tiny_folder), "--adapter", str(none / "adapter"), "--no-generate"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.endswith("held out no validation data (no --val-data or --val-fraction), so it has no "
                                      "records it did not train on to score; give them with --data"), err


def test_a_runs_data_not_found_from_here_is_one_line(tmp_path, monkeypatch):
    """config.yaml keeps the data paths as typed where the run started; from another folder they are not found,
    which is said with the path and the fix rather than as a bare "data file not found"."""
    from lorakit.train.eval_cli import run_validation_data

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model: m\nout: run\nrank: 4\nlr: 0.001\ndata: [train.jsonl]\n"
                                     "val_data: [data/val.jsonl]\n")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LorakitError) as caught:
        run_validation_data(str(run / "adapter"))
    assert str(caught.value) == ("the adapter's run read --val-data data/val.jsonl (run/config.yaml), which is not "
                                 "found from this folder (the run started elsewhere?); give the records to score "
                                 "with --data")


def test_eval_of_a_full_runs_model_reads_the_run_as_an_adapter_does(tmp_path, tiny_folder, tiny_data, capsys):
    """--full leaves RUN/model instead of an adapter; eval --model RUN/model reads the run's config as eval of a
    run's adapter does (max_length, overflow, validation data), so it reports the run's validation loss. A model
    folder outside a run reads nothing."""
    train_path, val_path = tiny_data
    run = tmp_path / "full"
    assert main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--val-data", str(val_path),
                 "--full", "--out", str(run), "--max-steps", "2", "--eval-every", "2", "--max-length", "10",
                 "--no-progress", "--batch-size", "4", "--eval-examples", "0", "--samples", "0"]) == 0
    capsys.readouterr()
    code = main(["eval", "--model", str(run / "model"), "--no-generate", "--json", str(tmp_path / "full.json")])
    out = capsys.readouterr().out
    assert code == 0
    assert f"from the model's run: --val-data {val_path}, --max-length 10, --overflow drop (read from " in out, out
    assert json.loads((tmp_path / "full.json").read_text())["loss"] == pytest.approx(_val_losses(run)[2], rel=1e-6)
    code = main(["eval", "--model", str(tiny_folder), "--data", str(val_path), "--no-generate"])
    out = capsys.readouterr().out
    assert code == 0 and "'s run" not in out, out


def test_eval_on_the_runs_own_training_file_is_warned(tmp_path, run_with_checkpoints, tiny_folder, tiny_data, capsys,
                                                      monkeypatch):
    """`lorakit eval --adapter RUN/adapter --data train.jsonl` scored the records the adapter trained on without a
    word (train warns of a validation file that is its training file); the numbers look good and mean little."""
    train_path, val_path = tiny_data
    monkeypatch.chdir(train_path.parent)
    adapter = str(run_with_checkpoints / "adapter")
    code = main(["eval", "--model", str(tiny_folder), "--adapter", adapter, "--data", "./train.jsonl", "--no-generate"])
    out = capsys.readouterr().out
    assert code == 0
    warned = [line for line in out.splitlines() if line.startswith("warning:")]
    assert len(warned) == 1 and warned[0].startswith("warning: --data ./train.jsonl is the run's training data ("), out
    assert "all its records were trained on, so the scores show what it memorised" in warned[0]
    code = main(["eval", "--model", str(tiny_folder), "--adapter", adapter, "--data", str(val_path), "--no-generate"])
    out = capsys.readouterr().out
    assert code == 0 and "warning:" not in out, out
    # a run that held out a fraction of the file: most of it, not all, was trained on
    from lorakit.train.eval_cli import trained_on_warning

    run = tmp_path / "held"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text(f"model: m\nout: held\nrank: 4\nlr: 0.001\ndata: [{train_path}]\n"
                                     "val_fraction: 0.1\n")
    warning = trained_on_warning(str(run / "adapter"), [str(train_path)])
    assert "all its records but the 10% held out (--val-fraction 0.1) were trained on" in warning, warning


def test_a_checkpoints_template_options_come_from_its_run(tmp_path):
    """lorakit generate reads (through run_template_kwargs) the chat template options of a checkpoint's
    run the same way: RUN/checkpoints/step-N/adapter was read as having none."""
    from lorakit.train.eval_cli import run_template_kwargs

    run = tmp_path / "run"
    checkpoint = run / "checkpoints" / "step-000010" / "adapter"
    checkpoint.mkdir(parents=True)
    (run / "config.yaml").write_text("model: m\nout: run\nrank: 4\nlr: 0.001\n"
                                     "chat_template_kwargs: {enable_thinking: false}\n")
    assert run_template_kwargs(str(checkpoint)) == {"enable_thinking": False}
    assert run_template_kwargs(str(run / "checkpoints" / "step-000010")) == {}  # not an adapter of the run's layout


def test_resuming_from_another_folder_names_where_the_runs_paths_are_found(tmp_path, tiny_folder, capsys,
                                                                            monkeypatch):
    """config.yaml keeps --data as typed where the run started (it is reusable with --config). A resume from another
    folder failed on "data file not found: train.jsonl", saying nothing of the run; it now names the run, the path
    and the folder above the run it is found from, before anything loads. Given again, the resume goes on."""
    import lorakit.train.runner as runner
    from test_train_helpers import task_records

    project = tmp_path / "project"
    project.mkdir()
    write_jsonl(project / "train.jsonl", task_records(16, seed=1))
    monkeypatch.chdir(project)
    assert main(["train", "--model", str(tiny_folder), "--data", "train.jsonl", "--out", "runs/mine", "--max-steps",
                 "1", "--save-every", "1", "--no-progress", *FAST]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    capsys.readouterr()
    real_load = runner.load_model
    monkeypatch.setattr(runner, "load_model", lambda *a, **k: pytest.fail("the model loaded"))
    run = project / "runs" / "mine"
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "2"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"lorakit train: error: cannot resume from {run}: its config.yaml names --data train.jsonl, not found from "
        f"this folder ({elsewhere}); the run's paths are as typed where it started: they are found from {project}: "
        "cd there and resume, or give --data again")
    monkeypatch.setattr(runner, "load_model", real_load)
    assert main(["train", "--resume", "--out", str(run), "--max-steps", "2", "--data",
                 str(project / "train.jsonl")]) == 0


def test_a_runs_data_pattern_counts_as_found(tmp_path, monkeypatch):
    """A config file may give --data as a pattern (data/*.jsonl, which lorakit expands itself); the resume check
    finds it through what it matches, not as a file of that name."""
    from lorakit.train.runner import check_saved_paths

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    check_saved_paths(tmp_path / "runs" / "mine", {"data": ["data/*.jsonl"]}, {})  # nothing raised
    with pytest.raises(LorakitError, match=r"names --data data/\*\.csv, not found from this folder"):
        check_saved_paths(tmp_path / "runs" / "mine", {"data": ["data/*.csv"]}, {})
    check_saved_paths(tmp_path / "runs" / "mine", {"data": ["data/*.csv"]}, {"data": ["x.jsonl"]})  # given again
