"""Progress output follows where stderr goes: a redrawn tqdm bar on a terminal, plain ``step N/M: ...`` lines when
stderr is a log file (nohup, CI, SLURM), where the bar's carriage-return redraws read as one endless line of garbage.
``--progress`` / ``--no-progress`` given explicitly still force one or the other.

Under pytest, stderr is captured (not a terminal), so the default here is the plain lines; a fake terminal is a
captured stderr whose ``isatty`` says True. Every run is a tiny random Llama trained 3 steps on CPU."""

from __future__ import annotations

import io
import json
import re
import sys

import pytest
import torch

from conftest import tiny_llama
from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.train.config import TrainConfig, check_values
from lorakit.train.data import build_dataset
from lorakit.train.loop import show_bar, train
from test_train_helpers import task_records, tiny_folder, tiny_tokenizer  # noqa: F401 (fixtures)

LINE = re.compile(r"^step (\d+)/3: loss=\d+\.\d{4} lr=\S+ tok/s=\d+, \d:\d\d:\d\d elapsed, \d:\d\d:\d\d left$", re.M)


@pytest.fixture(scope="module")
def dataset():
    return build_dataset(task_records(12, seed=3), tiny_tokenizer(), max_length=32)


def _train(dataset, **options) -> None:
    model = tiny_llama(seed=0, vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2)
    config = TrainConfig(rank=2, batch_size=4, max_steps=3, eval_examples=0, save_every=0, **options)
    train(model, tiny_tokenizer(), dataset, config)  # log=None: the default, print to stderr


def _fake_terminal(monkeypatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_show_bar_follows_the_stream_unless_told():
    assert show_bar(None, _Stream(tty=True)) is True
    assert show_bar(None, _Stream(tty=False)) is False
    assert show_bar(True, _Stream(tty=False)) is True  # --progress into a log: the user asked for it
    assert show_bar(False, _Stream(tty=True)) is False
    assert show_bar(None, object()) is False  # a replaced stderr without isatty: no bar rather than a crash
    closed = io.StringIO()
    closed.close()  # isatty on a closed file raises ValueError
    assert show_bar(None, closed) is False


def test_default_into_a_log_prints_plain_lines_and_no_carriage_return(dataset, capsys):
    assert not sys.stderr.isatty()
    _train(dataset)
    err = capsys.readouterr().err
    assert "\r" not in err, err
    assert [int(m.group(1)) for m in LINE.finditer(err)] == [1, 2, 3], err  # first, every tenth (of 3: each), last
    assert "training:" not in err  # the bar's description


def test_default_on_a_terminal_draws_the_bar(dataset, capsys, monkeypatch):
    _fake_terminal(monkeypatch)
    _train(dataset)
    err = capsys.readouterr().err
    assert "\r" in err and "training:" in err and "3/3 steps" in err, err
    assert not LINE.search(err), err


def test_no_progress_wins_on_a_terminal(dataset, capsys, monkeypatch):
    _fake_terminal(monkeypatch)
    _train(dataset, progress=False)
    err = capsys.readouterr().err
    assert "\r" not in err and "training:" not in err
    assert [int(m.group(1)) for m in LINE.finditer(err)] == [1, 2, 3], err


def test_progress_wins_into_a_log(dataset, capsys):
    _train(dataset, progress=True)
    err = capsys.readouterr().err
    assert "\r" in err and "3/3 steps" in err, err
    assert not LINE.search(err), err


def test_flags_and_config_files_give_three_states():
    from lorakit.train.cli import config_from_args
    from lorakit.cli import build_parser

    parser = build_parser(only="train")
    for flags, expected in (([], None), (["--progress"], True), (["--no-progress"], False)):
        config = config_from_args(parser.parse_args(["train", *flags]))[0]
        assert config.progress is expected, flags
    assert TrainConfig().progress is None
    assert check_values({"progress": None}, "run.yaml") == {"progress": None}  # a resolved config.yaml passes back
    assert check_values({"progress": False}, "run.yaml") == {"progress": False}
    with pytest.raises(LorakitError, match=r"run.yaml: option 'progress' has the wrong type: 'no' \(expected true "
                                           r"or false or null\)"):
        check_values({"progress": "no"}, "run.yaml")


def _cli_train(tmp_path, tiny_folder):  # noqa: F811
    paths = []
    for name, seed in (("train", 1), ("val", 2)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in task_records(12, seed=seed)))
        paths.append(str(path))
    return main(["train", "--model", str(tiny_folder), "--data", paths[0], "--val-data", paths[1], "--out",
                 str(tmp_path / "run"), "--max-steps", "3", "--rank", "2", "--batch-size", "4", "--eval-examples",
                 "8", "--eval-batch-size", "2", "--max-new-tokens", "2", "--samples", "0", "--eval-every", "0"])


def test_cli_run_into_a_log_has_no_bar(tmp_path, tiny_folder, capsys):  # noqa: F811
    """`lorakit train ... > train.log 2>&1` without --no-progress: plain lines from the loop, and no bar from the
    scoring before and after training either (the runner passes the same rule to the generation scorer)."""
    code = _cli_train(tmp_path, tiny_folder)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "\r" not in captured.err + captured.out, captured.err
    assert [int(m.group(1)) for m in LINE.finditer(captured.err)] == [1, 2, 3], captured.err


def test_cli_run_on_a_terminal_has_the_bars(tmp_path, tiny_folder, capsys, monkeypatch):  # noqa: F811
    _fake_terminal(monkeypatch)
    code = _cli_train(tmp_path, tiny_folder)
    err = capsys.readouterr().err
    assert code == 0, err
    assert "generating" in err and "training:" in err and "\r" in err, err  # scoring's bar (its steps), then training's
    assert not LINE.search(err), err


def test_cli_eval_into_a_log_has_no_bar(tmp_path, tiny_folder, capsys):  # noqa: F811
    """`lorakit eval ... > eval.log`: its loss and generation scoring follow the same rule as train's."""
    assert _cli_train(tmp_path, tiny_folder) == 0
    capsys.readouterr()
    code = main(["eval", "--model", str(tiny_folder), "--adapter", str(tmp_path / "run" / "adapter"), "--data",
                 str(tmp_path / "val.jsonl"), "--max-new-tokens", "2", "--batch-size", "4"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "\r" not in captured.err + captured.out, captured.err
    assert "exact match" in captured.out


@pytest.mark.parametrize("tty", [False, True])
def test_writing_4bit_shards_has_a_bar_only_on_a_terminal(tmp_path, monkeypatch, tty):
    """`lorakit quantize` of a large model drew its 'writing 4-bit shards' bar into a log file too."""
    import tqdm.auto

    from lorakit.models.quantized_saving import _write_weights

    made = []

    class Recorder:
        def __init__(self, **kwargs):
            made.append(kwargs)

        def update(self, n):
            made.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: tty)
    assert _write_weights({"w": torch.ones(4, 8)}, tmp_path, "5GB", progress=True) == 4 * 8 * 4
    assert (tmp_path / "model.safetensors").is_file()
    assert made == ([{"total": 128, "desc": "writing 4-bit shards", "unit": "B", "unit_scale": True, "leave": False,
                      "dynamic_ncols": True, "delay": 2.0, "file": sys.stderr}, 128] if tty else [])
