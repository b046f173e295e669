"""Audit 12 of what happens during and around a training run: resume exactness (grad accumulation, mid-epoch,
several epochs, LoRA+, dropout, packing, cosine warmup), interruption safety of checkpoints and the final adapter,
bad training dynamics (NaN, early stopping, validation numbers) and what the run reports.

Every run here is a tiny random Llama trained a few steps in-process on CPU, so bit-for-bit comparisons hold."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.train import checkpoint as ckpt
from lorakit.train import loop
from lorakit.train.config import TrainConfig
from lorakit.train.data import build_dataset
from lorakit.train.loop import train
from test_train_helpers import SMALL, task_records, tiny_data, tiny_folder, tiny_tokenizer  # noqa: F401 (fixtures)
from test_train_helpers import lora_state as _lora_state, tiny_train_model as _model


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def records():
    return task_records(24, seed=3)


CURVE_KEYS = ("step", "loss", "lr", "grad_norm", "epoch", "supervised_tokens", "tokens")


def _curve(run: Path):
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [tuple(l.get(k) for k in CURVE_KEYS) for l in lines if l["kind"] == "train"]


class Stop(Exception):
    pass


def _stop_at(step_to_stop: int):
    def on_step(step, entry):
        if step == step_to_stop:
            raise Stop
    return on_step


# -- 1. resume exactness -------------------------------------------------------------------------------------------
RESUME_CASES = {
    # 24 rows, batch 4: 6 micro-batches per epoch, 3 steps per epoch with grad_accum 2; stopped at step 3 (an epoch's
    # end), resumed from the checkpoint of step 2, in the middle of the first epoch, for 2 epochs
    "accum-mid-epoch-loraplus-dropout-cosine-val": dict(
        grad_accum=2, epochs=2.0, loraplus_ratio=8.0, dropout=0.3, schedule="cosine", warmup_steps=2,
        min_lr_ratio=0.1, save_every=2, stop=3, eval_every=2, early_stopping_patience=5),
    "pack-accum-dropout-epochs": dict(pack=True, max_length=48, batch_size=2, grad_accum=2, dropout=0.1, epochs=3.0,
                                      save_every=2, stop=3),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_is_bit_identical_adapter_and_curve(case, tok, records, tmp_path):
    options = dict(RESUME_CASES[case])
    stop = options.pop("stop")
    config = TrainConfig(**{**SMALL, **options})
    ds = build_dataset(records, tok, max_length=config.max_length, pack=config.pack)
    val = build_dataset(task_records(8, seed=9), tok, max_length=32) if config.eval_every else None
    straight, entries = _model(), []
    whole = train(straight, tok, ds, config, val_data=val,  # no run folder: what it would log, from on_step
                  on_step=lambda step, entry: entries.append(tuple(entry.get(k) for k in CURVE_KEYS)))
    assert whole.steps > stop + 1

    with pytest.raises(Stop):
        train(_model(), tok, ds, config, out=tmp_path / "cut", val_data=val, on_step=_stop_at(stop))
    torch.manual_seed(1234)
    resumed = _model()
    again = train(resumed, tok, ds, config, out=tmp_path / "cut", val_data=val, resume=tmp_path / "cut")
    assert again.steps == whole.steps and again.train_loss == whole.train_loss
    assert again.val_losses == whole.val_losses and again.best_step == whole.best_step
    a, b = _lora_state(straight), _lora_state(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert entries == _curve(tmp_path / "cut")  # loss, lr, gradient norm, data position: the same at every step


# -- 2. interruption safety: a full disk ----------------------------------------------------------------------------
def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")  # as a write() raises it: no file name


class _FillingHandle:
    """metrics.jsonl's handle: the third line finds the disk full."""

    def __init__(self, handle, counter):
        self.handle, self.counter = handle, counter

    def write(self, text):
        self.counter["lines"] += 1
        if self.counter["lines"] >= 3:
            _disk_full()
        return self.handle.write(text)

    def flush(self):
        self.handle.flush()

    def close(self):
        self.handle.close()


def _fill_disk(where: str, monkeypatch):
    import builtins

    import lorakit.io as io
    import lorakit.train.report as report
    import lorakit.train.runner as runner

    real_bytes, real_text = io.atomic_write_bytes, runner.atomic_write_text
    if where == "checkpoint adapter":  # the second checkpoint's PEFT adapter folder
        monkeypatch.setattr(io, "atomic_write_bytes", lambda path, data: _disk_full() if "step-000004" in str(path)
                            else real_bytes(path, data))
    elif where == "final adapter":
        monkeypatch.setattr(io, "atomic_write_bytes", lambda path, data: _disk_full() if "checkpoints" not in str(path)
                            else real_bytes(path, data))
    elif where == "metrics line":
        counter = {"lines": 0}
        monkeypatch.setattr(report, "open", lambda *a, **k: _FillingHandle(builtins.open(*a, **k), counter),
                            raising=False)
    elif where == "results.json":
        monkeypatch.setattr(runner, "atomic_write_text", lambda path, text: _disk_full()
                            if str(path).endswith("results.json") else real_text(path, text))


@pytest.mark.parametrize("where, said", [
    ("checkpoint adapter", "writing checkpoint {run}/checkpoints/step-000004 failed (No space left on device); the "
                           "previous checkpoint {run}/checkpoints/step-000002 is still valid. Free disk space and resume "
                           "with --resume"),
    ("final adapter", "writing {run}/adapter failed (No space left on device); free disk space and continue with "
                      "--resume {run} (from step-000004)"),
    ("metrics line", "writing {run}/metrics.jsonl failed (No space left on device) at step 3; free disk space and "
                     "continue the run with --resume"),
    ("results.json", "writing {run}/results.json failed (No space left on device); the training finished and its "
                     "adapter is saved in {run}/adapter"),
])
def test_a_full_disk_is_one_line_and_the_run_resumes(where, said, tiny_folder, tiny_data, tmp_path, monkeypatch, capsys):
    """Each write of a run meeting a full disk: one line naming the file the user knows (not a hidden temporary
    folder, not a traceback), the last checkpoint intact, and --resume finishing the run once there is room.
    Before: the adapter writes said 'cannot save the adapter to RUN/.adapter.x1y2.tmp: ...; choose a folder you
    can write', a metrics line or results.json a traceback."""
    from lorakit.cli import main
    from lorakit.io import load_adapter

    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_folder), "--data", str(tiny_data[0]), "--max-steps", "4", "--save-every",
            "2", "--rank", "4", "--batch-size", "4", "--eval-examples", "0", "--no-progress", "--out", str(run)]
    with monkeypatch.context() as patch:
        _fill_disk(where, patch)
        code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1] == "lorakit train: error: " + said.format(run=run)
    assert not [p for p in run.rglob(".*") if p.name != ".gitignore"]  # no hidden temporary file or folder left
    assert ckpt.latest_checkpoint(run / "checkpoints") is not None
    if where != "results.json":
        assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert (run / "results.json").is_file() or where == "results.json"
    load_adapter(_model(), run / "adapter")


def test_a_full_disk_for_the_loss_curve_keeps_the_run(tiny_folder, tiny_data, tmp_path, monkeypatch, capsys):
    """The PNG is a picture of metrics.jsonl: failing to write it says so and the run ends normally (its adapter and
    results.json written), without a hidden .loss_curve.png.tmp left or a 'curve:' pointing at no file."""
    import matplotlib.figure

    from lorakit.cli import main

    run = tmp_path / "run"
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", _disk_full)
    assert main(["train", "--model", str(tiny_folder), "--data", str(tiny_data[0]), "--max-steps", "2", "--rank", "4",
                 "--batch-size", "4", "--eval-examples", "0", "--no-progress", "--out", str(run)]) == 0
    captured = capsys.readouterr()
    assert (f"writing {run}/loss_curve.png failed (No space left on device); no loss curve, the same numbers are in "
            f"{run}/metrics.jsonl") in captured.err
    assert "curve:" not in captured.out and (run / "results.json").is_file() and (run / "adapter").is_dir()
    assert not list(run.glob(".*"))


# -- 2. interruption safety: SIGKILL inside a write -----------------------------------------------------------------
KILL_INSIDE = """
import os, signal, sys
import lorakit.io as io
from lorakit.cli import main
real = io.atomic_write_bytes
def write(path, data):
    if sys.argv[1] in str(path):
        os.kill(os.getpid(), signal.SIGKILL)  # dies with the file half-way: nothing after this runs
    return real(path, data)
io.atomic_write_bytes = write
main(sys.argv[2:])
"""


@pytest.mark.parametrize("inside", ["checkpoints/.step-000004", "run/.adapter"])
def test_sigkill_while_writing_keeps_the_run_resumable(inside, tiny_folder, tiny_data, tmp_path):
    """A process killed while it writes a checkpoint (its PEFT adapter, after the tensors) or the final adapter:
    the previous checkpoint stays the latest and loads, --resume ends the run, no temporary folder stays, and
    --keep-checkpoints 2 holds exactly 2 checkpoints at the end."""
    import os
    import signal
    import subprocess
    import sys

    from lorakit.cli import main
    from lorakit.io import load_adapter
    from test_train_helpers import REPO

    run = tmp_path / "run"
    args = ["train", "--model", str(tiny_folder), "--data", str(tiny_data[0]), "--max-steps", "5", "--save-every", "2",
            "--keep-checkpoints", "2", "--rank", "4", "--batch-size", "4", "--eval-examples", "0", "--no-progress",
            "--out", str(run)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_INSIDE, inside, *args], env=env, capture_output=True,
                            text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    latest = ckpt.latest_checkpoint(run / "checkpoints")
    expected = "step-000002" if "step" in inside else "step-000005"
    assert latest.name == expected and not (run / "adapter").exists()
    assert list(run.rglob(".*.tmp"))  # the kill left its temporary folder behind ...
    load_adapter(_model(), latest / "adapter")  # ... and the checkpoint before it whole

    assert main(["train", "--resume", "--out", str(run), "--no-progress"]) == 0
    assert not list(run.rglob(".*.tmp")) and not list(run.rglob(".*.old"))  # ... which the resume cleaned away
    steps = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert steps == ["latest", "step-000004", "step-000005"]
    final = _model()
    load_adapter(final, run / "adapter")
    from_checkpoint = _model()
    load_adapter(from_checkpoint, run / "checkpoints" / "step-000005" / "adapter")
    assert all(torch.equal(a, b) for a, b in zip(_lora_state(final).values(), _lora_state(from_checkpoint).values()))


# -- 3. bad training dynamics ---------------------------------------------------------------------------------------
def _poisoned(poison: set[int], first_step: int):
    """A model whose forward is NaN during the given (1-based) optimizer steps, and the on_step that tracks them."""
    model = _model()
    now = {"step": first_step}

    def hook(module, args, output):
        if now["step"] not in poison:
            return output
        return (output[0] * float("nan"),) + tuple(output[1:]) if isinstance(output, tuple) else output * float("nan")

    model.model.layers[0].register_forward_hook(hook)

    def on_step(step, entry):
        now["step"] = step + 1
    return model, on_step


def test_max_bad_steps_counts_in_a_row_across_a_resume_and_logs_the_last_step(tok, records, tmp_path):
    """NaN at steps 4, 5, 6 with --max-bad-steps 3 stops at step 6, whether or not the run was resumed from the
    checkpoint of step 4 (one bad step in a row then). Before: the count restarted at 0 on resume, so the resumed
    run trained on to the end; and the metrics line of the step that stopped the run was never written."""
    ds = build_dataset(records, tok, max_length=32)
    config = TrainConfig(**{**SMALL, "max_steps": 8, "save_every": 4, "max_bad_steps": 3})
    said = r"3 steps in a row had a NaN or infinite loss \(last at step 6\); lower --lr"
    model, on_step = _poisoned({4, 5, 6}, first_step=1)
    with pytest.raises(LorakitError, match=said):
        train(model, tok, ds, config, out=tmp_path / "straight", on_step=on_step)
    lines = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [(l["step"], l.get("skipped")) for l in lines][3:] == [(4, "non-finite loss"), (5, "non-finite loss"),
                                                                   (6, "non-finite loss")]

    model, on_step = _poisoned({4, 5, 6}, first_step=1)

    def stop_after_5(step, entry):
        on_step(step, entry)
        if step == 5:
            raise Stop
    with pytest.raises(Stop):
        train(model, tok, ds, config, out=tmp_path / "cut", on_step=stop_after_5)
    model, on_step = _poisoned({4, 5, 6}, first_step=5)
    with pytest.raises(LorakitError, match=said):
        train(model, tok, ds, config, out=tmp_path / "cut", resume=tmp_path / "cut", on_step=on_step)


def test_resuming_a_run_that_stopped_early_trains_no_further(tok, records, tmp_path, monkeypatch, capsys):
    """Validation losses 2.0, 1.5, 1.7, 1.6, 1.55 with patience 3 stop the run at step 5 (best/ from step 2). A
    --resume of it (the same command, e.g. after a crash of the job that followed) is where the run ended, as for a
    completed run. Before: it trained on from step 5 and moved the final adapter past the stop."""
    ds = build_dataset(records, tok, max_length=32)
    losses = iter([2.0, 1.5, 1.7, 1.6, 1.55, 1.0, 0.9, 0.95, 0.96, 0.97])
    monkeypatch.setattr(loop, "dataset_loss", lambda *a, **k: (next(losses), 10))
    config = TrainConfig(**{**SMALL, "max_steps": 10, "eval_every": 1, "early_stopping_patience": 3})
    first = train(_model(), tok, ds, config, val_data=ds, out=tmp_path)
    assert (first.stopped, first.steps, first.best_step) == ("early_stopping", 5, 2)
    from safetensors.torch import load_file

    adapter = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    capsys.readouterr()
    again = train(_model(), tok, ds, config, val_data=ds, out=tmp_path, resume=tmp_path)
    assert (again.stopped, again.steps, again.best_step, again.best_val_loss) == ("early_stopping", 5, 2, 1.5)
    assert again.train_loss == first.train_loss and again.val_losses == first.val_losses
    now = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert now.keys() == adapter.keys() and all(torch.equal(now[k], adapter[k]) for k in now)
    assert "where the run stopped early at step 5: no better validation loss for 3 validations (best at step 2); " \
           "nothing to do (raise --early-stopping-patience to train further)" in capsys.readouterr().err
    raised = train(_model(), tok, ds, config.replace(early_stopping_patience=5), val_data=ds, out=tmp_path,
                   resume=tmp_path)
    assert (raised.stopped, raised.steps, raised.best_step) == ("completed", 10, 7)  # a higher patience goes on


def test_validation_loss_during_training_equals_lorakit_eval_of_the_saved_adapters(tiny_folder, tiny_data, tmp_path,
                                                                                    capsys):
    """--eval-every's numbers are those `lorakit eval` gives for the adapter saved at that step: the last one for
    adapter/, the best one for best/ (same loss to the last bit)."""
    from lorakit.cli import main

    run = tmp_path / "run"
    val = tiny_data[1]
    assert main(["train", "--model", str(tiny_folder), "--data", str(tiny_data[0]), "--val-data", str(val),
                 "--max-steps", "4", "--eval-every", "2", "--rank", "4", "--batch-size", "4", "--lr", "1e-2",
                 "--eval-examples", "0", "--no-progress", "--out", str(run)]) == 0
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    vals = {l["step"]: l["val_loss"] for l in lines if l["kind"] == "val"}
    results = json.loads((run / "results.json").read_text())
    assert sorted(vals) == [2, 4] and results["best_val_loss"] == min(vals.values())
    for folder, expected in (("adapter", vals[4]), ("best", vals[results["best_step"]])):
        assert main(["eval", "--model", str(tiny_folder), "--adapter", str(run / folder), "--data", str(val),
                     "--no-generate", "--json", str(tmp_path / f"{folder}.json")]) == 0
        assert json.loads((tmp_path / f"{folder}.json").read_text())["loss"] == expected


# -- 4. what the user sees ------------------------------------------------------------------------------------------
def test_no_progress_prints_plain_progress_lines_for_logs(tok, records, tmp_path):
    """--no-progress ("for logs") printed nothing from the first step to the end: a batch job's log showed no loss,
    rate or time left for hours. Now a plain line at the first and last step and every tenth of the run, with the
    time left from the steps of this call (a resume's are not counted)."""
    import re

    ds = build_dataset(records, tok, max_length=32)
    config = TrainConfig(**{**SMALL, "max_steps": 20, "save_every": 10})
    said: list[str] = []

    def stop_at_12(step, entry):
        if step == 12:
            raise Stop
    with pytest.raises(Stop):
        train(_model(), tok, ds, config, out=tmp_path, log=said.append, on_step=stop_at_12)
    line = re.compile(r"step (\d+)/20: loss=\d+\.\d{4} lr=\d\.\d\de-\d\d tok/s=\d+, (\d:\d\d:\d\d) elapsed, "
                      r"(\d:\d\d:\d\d) left$")
    steps = [int(line.match(s).group(1)) for s in said if line.match(s)]
    assert steps == [1, 3, 5, 7, 9, 11], said
    said.clear()
    train(_model(), tok, ds, config, out=tmp_path, resume=tmp_path, log=said.append)
    matches = [line.match(s) for s in said if line.match(s)]
    assert [int(m.group(1)) for m in matches] == [11, 13, 15, 17, 19, 20]
    assert matches[-1].group(3) == "0:00:00"


def test_tokens_and_tokens_per_second_count_real_tokens_of_packed_rows(tok, tmp_path):
    """Packed rows carry a (B, 1, T, T) mask, so the token count fell back to B x T: the padding of the shorter row
    was counted as input (results.json tokens, metrics tokens and tokens_per_s too high)."""
    ds = build_dataset(task_records(38, seed=5), tok, max_length=24, pack=True)
    lengths = [len(row["input_ids"]) for row in ds.rows]
    assert len(ds) % 2 == 0 and len(set(lengths)) > 1  # two rows of different lengths in some batch: padding
    result = train(_model(), tok, ds, TrainConfig(**{**SMALL, "batch_size": 2, "pack": True, "max_length": 24}),
                   out=tmp_path)
    assert result.tokens == sum(lengths)
    lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert sum(l["tokens"] for l in lines if l["kind"] == "train") == sum(lengths)


def test_a_nan_validation_loss_is_never_the_best(tok, records, tmp_path, monkeypatch, capsys):
    """A first validation loss of NaN (a half-precision overflow on the validation set) became the best for good:
    'val_loss < nan' is never true, so best/ kept the NaN-scoring adapter and early stopping fired on a run that
    was improving."""
    ds = build_dataset(records, tok, max_length=32)
    losses = iter([float("nan"), 2.0, 1.5, 1.7])
    monkeypatch.setattr(loop, "dataset_loss", lambda *a, **k: (next(losses), 10))
    config = TrainConfig(**{**SMALL, "max_steps": 4, "eval_every": 1, "early_stopping_patience": 2})
    result = train(_model(), tok, ds, config, val_data=ds, out=tmp_path)
    assert (result.stopped, result.steps, result.best_step, result.best_val_loss) == ("completed", 4, 3, 1.5)
    vals = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"val"' in l]
    assert [(v["val_loss"], v["best"]) for v in vals] == [(None, False), (2.0, True), (1.5, True), (1.7, False)]
    assert "step 1: validation loss nan (not finite: not a best)" in capsys.readouterr().err


def test_sigterm_stops_the_run_as_ctrl_c_does(tiny_folder, tiny_data, tmp_path):
    """SIGTERM (a scheduler's preemption or time limit, `timeout`, `kill PID`) killed the run on the spot: exit -15,
    no word of the checkpoint to resume from. Now it stops as Ctrl-C does (the resume command said), with status
    143 (128 + SIGTERM, as `lorakit serve` ends; 130 is Ctrl-C's)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from test_train_helpers import REPO

    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", "train", "--model", str(tiny_folder), "--data",
                                str(tiny_data[0]), "--out", str(run), "--rank", "2", "--batch-size", "2",
                                "--no-progress", "--eval-examples", "0", "--max-steps", "100000", "--save-every", "2"],
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (run / "checkpoints" / "latest").is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    try:
        _, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    assert process.returncode == 143 and "Traceback" not in err, err[-3000:]
    assert err.rstrip().splitlines()[-1] == "lorakit train: stopped by SIGTERM", err[-3000:]
    checkpoint = ckpt.find_checkpoint(run)
    # the checkpoint is at the step it stopped at (written there, tests/test_followups_17_stop.py), not an earlier one
    step = ckpt.read_state(checkpoint)["step"]
    assert step == (run / "metrics.jsonl").read_text().count('"kind": "train"'), err[-3000:]
    assert (f"training stopped by SIGTERM at step {step} of 100000, saved there; the last checkpoint is {checkpoint}; "
            f"continue with: lorakit train --resume {run}") in err, err[-3000:]
    assert not list(run.rglob(".*.tmp"))
