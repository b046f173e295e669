"""What a user loses when a run goes wrong, and what --resume then does (follow-ups 24, resume).

- A run extended past its finish (``--resume --max-steps 5`` after 3 steps) whose final adapter write failed (a full
  disk; a kill there does the same) after its last checkpoint: the advised ``--resume`` said "nothing to do; the
  run's results are in results.json" and left the 3-step adapter and results in place.
- A run folder whose ``checkpoints/latest`` pointer is missing or names a deleted folder was "no checkpoint (the run
  stopped before its first checkpoint); start it again with --overwrite" (which deletes the checkpoints); a damaged
  checkpoint's error now names the earlier complete one to resume from.
- ``train(..., resume=RUN)`` from Python without ``out`` (the form TrainingInterrupted's message gives) trained to
  the end and wrote nothing: no checkpoint, no metrics, no adapter.
- ``lorakit train --resume RUN/checkpoints`` said the run's config.yaml was missing.
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import LorakitError
from lorakit.train import TrainConfig, train
from lorakit.train import loop
from lorakit.train.checkpoint import find_checkpoint
from test_train_helpers import tiny_data, tiny_folder, tiny_tokenizer, tiny_train_model, task_records  # noqa: F401

CLI = ["--rank", "4", "--lr", "1e-2", "--batch-size", "4", "--eval-examples", "0", "--no-progress"]
PY = dict(rank=4, batch_size=4, eval_examples=0, progress=False, lr=1e-2, save_every=2)


def _train_steps(run: Path) -> list[int]:
    return [e["step"] for e in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if e["kind"] == "train"]


def _same(a: Path, b: Path) -> bool:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_resume_after_the_final_adapter_write_failed_on_an_extended_run_writes_it(tiny_folder, tiny_data, tmp_path,
                                                                                  monkeypatch, capsys):
    from lorakit.cli import main

    train_path, val_path = tiny_data
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--val-data", str(val_path),
                 "--max-steps", "3", "--save-every", "0", "--out", str(run), *CLI]) == 0
    before = load_file(run / "adapter" / "adapter_model.safetensors")

    real = loop._atomic_folder

    def full_disk_on_the_final_adapter(final, write, again="try again"):
        if final == run / "adapter":
            def failing(tmp):
                write(tmp)
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(final, failing, again)
        return real(final, write, again)

    monkeypatch.setattr(loop, "_atomic_folder", full_disk_on_the_final_adapter)
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--max-steps", "5"]) == 2
    said = capsys.readouterr().err.strip().splitlines()[-1]
    assert "No space left on device" in said and f"--resume {run}" in said and "step-000005" in said
    monkeypatch.setattr(loop, "_atomic_folder", real)

    assert main(["train", "--resume", str(run)]) == 0  # what the line said; config.yaml now holds max_steps 5
    said = capsys.readouterr()
    assert "the run's results are in" not in said.out + said.err  # the old answer, over the 3-step adapter and results
    assert json.loads((run / "results.json").read_text())["steps"] == 5
    assert _same(run / "adapter", run / "checkpoints" / "step-000005" / "adapter")
    after = load_file(run / "adapter" / "adapter_model.safetensors")
    assert not all(torch.equal(before[k], after[k]) for k in before)
    # and now it is finished: the short answer again
    assert main(["train", "--resume", str(run)]) == 0
    said = capsys.readouterr()
    assert "nothing to do" in said.out and "the run's results are in" in said.out


def test_resume_without_a_usable_latest_pointer_and_a_damaged_checkpoint(tmp_path):
    tok, records = tiny_tokenizer(), task_records(32, seed=1)
    config = TrainConfig(**PY, max_steps=6, dropout=0.1, schedule="constant", warmup_steps=0)  # lr alike at 4 and 6
    straight = train(tiny_train_model(), tok, records, config, out=tmp_path / "straight", log=lambda line: None)
    run = tmp_path / "run"
    train(tiny_train_model(), tok, records, config.replace(max_steps=4), out=run, log=lambda line: None)
    checkpoints = run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000002", "step-000004"]

    (checkpoints / "latest").unlink()  # a kill between the rename and the pointer, or a copy of the step folders
    assert find_checkpoint(run) == checkpoints / "step-000004"
    (checkpoints / "latest").write_text("step-000009\n")  # names a folder since deleted
    assert find_checkpoint(run) == checkpoints / "step-000004"

    # a damaged file in the newest: the error names the earlier complete checkpoint, which resumes
    (checkpoints / "latest").write_text("step-000004\n")
    with open(checkpoints / "step-000004" / "optimizer.safetensors", "r+b") as handle:
        handle.truncate(40)
    with pytest.raises(LorakitError, match=r"damaged \(SafetensorError\); resume from the earlier checkpoint "
                                           r".*step-000002 instead") as error:
        train(tiny_train_model(), tok, records, config, out=run, resume=run, log=lambda line: None)
    assert "\n" not in str(error.value)
    resumed = train(tiny_train_model(), tok, records, config, out=run, resume=checkpoints / "step-000002",
                    log=lambda line: None)
    assert resumed.train_loss == straight.train_loss and _train_steps(run) == list(range(1, 7))
    assert _same(run / "adapter", tmp_path / "straight" / "adapter")


def test_python_resume_alone_continues_in_the_runs_folder(tmp_path):
    tok, records = tiny_tokenizer(), task_records(32, seed=1)
    run = tmp_path / "run"
    train(tiny_train_model(), tok, records, TrainConfig(**PY, max_steps=2), out=run, log=lambda line: None)
    result = train(tiny_train_model(), tok, records, TrainConfig(**PY, max_steps=4), resume=run, log=lambda line: None)
    assert result.steps == 4 and result.adapter_dir == run / "adapter"
    assert find_checkpoint(run) == run / "checkpoints" / "step-000004"
    assert _train_steps(run) == [1, 2, 3, 4]
    assert _same(run / "adapter", run / "checkpoints" / "step-000004" / "adapter")


def test_resume_given_the_runs_checkpoints_folder(tiny_folder, tiny_data, tmp_path, capsys):
    from lorakit.cli import main

    train_path, _ = tiny_data
    run = tmp_path / "run"
    assert main(["train", "--model", str(tiny_folder), "--data", str(train_path), "--max-steps", "2",
                 "--save-every", "0", "--out", str(run), *CLI]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run / "checkpoints") + "/", "--max-steps", "3"]) == 0
    err = capsys.readouterr().err
    assert f"resuming from {run / 'checkpoints' / 'step-000002'} at step 2 of 3" in err
    assert json.loads((run / "results.json").read_text())["steps"] == 3
    assert not (run / "checkpoints" / "config.yaml").exists()
