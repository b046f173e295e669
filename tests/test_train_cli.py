"""``lorakit train`` / ``lorakit eval`` from the command line: help, config files, bad input (one line, exit 2, no
traceback), the evaluation report, and the default demo end to end on the embedded model (few steps)."""

from __future__ import annotations

import argparse
import json

import pytest
import yaml

from lorakit.cli import main
from lorakit.errors import LorakitError
from lorakit.train import cli as train_cli
from lorakit.train.config import FIELDS, TrainConfig, read_config_file
from test_train_helpers import run_cli, task_records, tiny_data, tiny_folder, write_jsonl  # noqa: F401 (fixtures)

FAST = ["--rank", "4", "--batch-size", "4", "--no-progress", "--eval-examples", "2", "--max-new-tokens", "4",
        "--samples", "1"]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    train_cli.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_help_documents_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name, field in FIELDS.items():
        if field.metadata.get("cli") is not False:
            assert "--" + name.replace("_", "-") in text, name
    for flag in ("--config", "--resume", "--loraplus-ratio", "--grad-accum", "--quantize", "--tensorboard"):
        assert flag in text


def test_config_file_then_flags(tmp_path):
    (tmp_path / "run.yaml").write_text("rank: 8\nlr: 0.001\nmax-steps: 30\ntargets: [q_proj, v_proj]\n")
    (tmp_path / "run.toml").write_text("[train]\nrank = 4\nvariant = 'dora'\n")
    config, _, _ = train_cli.config_from_args(_parse("--config", str(tmp_path / "run.yaml"), "--lr", "0.005"))
    assert (config.rank, config.lr, config.max_steps, config.targets) == (8, 0.005, 30, ["q_proj", "v_proj"])
    assert config.lora_config().target_modules == ["q_proj", "v_proj"]
    config, _, _ = train_cli.config_from_args(_parse("--config", str(tmp_path / "run.toml")))
    assert (config.rank, config.variant, config.batch_size) == (4, "dora", TrainConfig().batch_size)
    (tmp_path / "bad.yaml").write_text("rnak: 8\n")
    with pytest.raises(LorakitError, match=r"bad.yaml: unknown option 'rnak'; did you mean 'rank'\?"):
        read_config_file(tmp_path / "bad.yaml")
    (tmp_path / "typo.yaml").write_text("rank: eight\n")
    with pytest.raises(LorakitError, match=r"option 'rank' has the wrong type"):
        read_config_file(tmp_path / "typo.yaml")


def test_resolved_config_is_reusable(tmp_path):
    from lorakit.train.config import dump_yaml

    config = TrainConfig(rank=8, loraplus_ratio=16.0, data=["a.jsonl"])
    (tmp_path / "config.yaml").write_text(dump_yaml(config))
    again = TrainConfig(**read_config_file(tmp_path / "config.yaml"))
    assert again == config.replace(lr=config.learning_rate)


BAD_INPUTS = [
    ("missing", None, "data file not found: .*missing.jsonl"),
    ("malformed", ['{"prompt": "a b : ", "completion": "b a"}', '{"prompt": "a", '], r"train.jsonl:2: malformed JSON"),
    ("unknown field", [{"prompt": "a : ", "completion": "a", "answer": "x"}], r"train.jsonl:1: unknown field 'answer'"),
    ("empty completion", [{"prompt": "copy a : ", "completion": "  "}], r"train.jsonl:1: empty completion"),
    ("chat without assistant", [{"messages": [{"role": "user", "content": "copy a"}]}],
     r"train.jsonl:1: the chat does not end with an assistant turn"),
    ("too long", [{"prompt": "copy " + "a " * 40 + ": ", "completion": "a"}] * 4, r"longer than max_length=16"),
]


@pytest.mark.parametrize("case,lines,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_one_clear_line(case, lines, message, tmp_path, tiny_folder, capsys):
    data = tmp_path / ("missing.jsonl" if lines is None else "train.jsonl")
    if lines is not None:
        write_jsonl(data, lines)
    code = main(["train", "--model", str(tiny_folder), "--data", str(data), "--out", str(tmp_path / "run"),
                 "--max-length", "16", "--overflow", "error", *FAST])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("lorakit train: error: ")
    import re

    assert re.search(message, last), last
    assert "Traceback" not in err


def test_overlong_examples_are_dropped_or_truncated_and_counted(tmp_path, tiny_folder, capsys):
    records = task_records(8, seed=5) + [{"text": " ".join(["a", "b", "c"] * 12)}] * 2
    data = write_jsonl(tmp_path / "train.jsonl", records)
    for overflow, expected in (("drop", "2 dropped, 0 truncated at max_length=24"),
                               ("truncate", "0 dropped, 2 truncated at max_length=24")):
        code = main(["train", "--model", str(tiny_folder), "--data", str(data), "--out", str(tmp_path / overflow),
                     "--max-length", "24", "--overflow", overflow, "--max-steps", "1", "--eval-examples", "0",
                     "--rank", "2", "--batch-size", "2", "--no-progress"])
        out = capsys.readouterr().out
        assert code == 0 and expected in out
        results = json.loads((tmp_path / overflow / "results.json").read_text())
        assert (results["dropped_examples"], results["truncated_examples"]) == ((2, 0) if overflow == "drop" else (0, 2))


def test_a_fresh_run_never_overwrites_another(tmp_path, tiny_folder, tiny_data, capsys):
    train_path, _ = tiny_data
    out = tmp_path / "run"
    out.mkdir()
    (out / "something").write_text("keep me")
    code = main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--out", str(out), *FAST])
    assert code == 2 and "already holds files" in capsys.readouterr().err
    assert (out / "something").read_text() == "keep me"
    code = main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--resume", "--out",
                 str(tmp_path / "nothing-here")])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_unavailable_device_or_tensorboard_is_a_clear_error(tmp_path, tiny_folder, tiny_data, capsys, monkeypatch):
    import sys

    train_path, _ = tiny_data
    code = main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--out", str(tmp_path / "a"),
                 "--device", "cuda", *FAST])
    assert code == 2 and "no CUDA GPU" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if tensorboard were not installed
    code = main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--out", str(tmp_path / "b"),
                 "--tensorboard", "--max-steps", "1", *FAST])
    assert code == 2 and "pip install tensorboard" in capsys.readouterr().err


def test_train_then_eval_report_the_same_loss(tmp_path, tiny_folder, tiny_data, capsys):
    train_path, val_path = tiny_data
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--val-data", str(val_path),
                 "--out", str(out), "--max-steps", "4", "--eval-every", "4", "--lr", "1e-2", *FAST])
    printed = capsys.readouterr().out
    assert code == 0
    assert "before training (2 held-out examples): exact match" in printed and "before -> " in printed
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 4 and results["exact_match_before"] is not None and "exact_match_after" in results
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["max_steps"] == 4 and saved["lr"] == 1e-2 and saved["out"] == str(out)
    code = main(["eval", "--model", str(tiny_folder), "--adapter", str(out / "adapter"), "--data", str(val_path),
                 "--max-new-tokens", "4", "--json", str(tmp_path / "eval.json")])
    assert code == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["loss"] == pytest.approx(results["best_val_loss"], rel=1e-6)
    assert report["perplexity"] == pytest.approx(2.718281828 ** report["loss"], rel=1e-6)
    assert 0.0 <= report["exact_match"] <= 1.0 and report["scored_examples"] == 8
    code = main(["eval", "--model", str(tiny_folder), "--data", str(val_path), "--no-generate"])
    assert code == 0 and "no adapter" in capsys.readouterr().out


def test_entry_point_subprocess_prints_no_traceback(tmp_path, tiny_folder):
    bad = write_jsonl(tmp_path / "bad.jsonl", ['{"text": ""}'])
    result = run_cli("train", "--model", str(tiny_folder), "--data", str(bad), "--out", str(tmp_path / "r"), *FAST)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == "lorakit train: error: bad.jsonl:1: empty text: field 'text' has no text; fill it or drop the record"
    assert "Traceback" not in result.stderr


def test_default_demo_end_to_end(tmp_path):
    """`lorakit train` with no data arguments: the embedded model and task, cut to 3 steps and 4 held-out examples."""
    result = run_cli("train", "--max-steps", "3", "--eval-examples", "4", "--max-new-tokens", "24", "--samples", "2",
                     "--out", str(tmp_path / "demo"), cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "lorakit train: lora of smollm2-135m" in out and "training data: 400 examples" in out
    assert "held-out exact match:" in out and "before ->" in out and "after (4 examples)" in out
    assert "done in" in out
    assert "step 3/3: loss=" in result.stderr and "\r" not in result.stderr  # a pipe, not a terminal: plain lines
    assert "tok/s=" in result.stderr and "loss=" in result.stderr
    demo = tmp_path / "demo"
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "metrics.jsonl", "loss_curve.png",
                 "config.yaml", "results.json", "checkpoints/latest"):
        assert (demo / name).is_file(), name
    results = json.loads((demo / "results.json").read_text())
    assert results["steps"] == 3 and results["eval_examples"] == 4
    assert 0.03 < results["trainable_share"] < 0.04  # rank 16 on the 7 projections: ~3.5%
