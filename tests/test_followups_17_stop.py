"""How a training run ends when a user or a scheduler stops it (lorakit/train/stopping.py).

Before, Ctrl-C or SIGTERM during ``lorakit train`` (or ``lorakit.train.train``) wrote no checkpoint where it stopped:
everything since the last periodic checkpoint was lost (``--save-every`` unset: the whole run, its folder removed),
and under torchrun the processes stopped together at a step but saved nothing there either. Now:

* the first signal stops at a step boundary and saves a checkpoint there, in the periodic checkpoints' format: a
  step cut in its forward/backward is abandoned (data position and random states put back, so the resume is
  bit-identical with dropout on), the optimizer update is never cut in two (a signal as it starts lets it finish),
  and a validation cut midway is run again on resume; the library raises ``TrainingInterrupted`` naming the
  checkpoint, the CLI prints one line with the checkpoint and the resume command and ends with 130 (Ctrl-C) or 143
  (SIGTERM, as ``lorakit serve`` does; it was 130);
* a second Ctrl-C while saving stops at once: no half-written checkpoint, the previous one stays ``latest``;
* under torchrun, SIGTERM to one process mid-step (twice, as Slurm and torchrun deliver it): both finish that step,
  stop at the same boundary, rank 0 saves there, and the resume ends bit-identical to a run never stopped; Ctrl-C
  of torchrun (passed on to each worker) is said at once by rank 0 and ends the same way, with one hint line;
* a stop between the two renames that replace ``best/`` puts the previous one back.

Signals are real (``signal.raise_signal`` from a hook inside the step, ``os.kill`` from outside or from a worker).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit._signals import by_sigterm, sigterm_as_interrupt
from lorakit.train import loop
from lorakit.train.checkpoint import find_checkpoint, read_state
from lorakit.train.config import TrainConfig
from lorakit.train.data import build_dataset
from lorakit.train.loop import train
from lorakit.train.stopping import TrainingInterrupted
from test_train_helpers import (REPO, SMALL, lora_state, task_records, tiny_data, tiny_folder,  # noqa: F401
                                tiny_tokenizer, tiny_train_model)

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
       "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def dataset(tok):
    return build_dataset(task_records(32, seed=3), tok, max_length=32)


def _metrics(run: Path, kind: str) -> list[dict]:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in e.items() if k not in ("tokens_per_s", "step_seconds")} for e in lines if e["kind"] == kind]


def _signal_in_forward(model, signum: int, call: int, evaluating: bool = False):
    """Raise ``signum`` for real in the ``call``-th forward of the decoder (training forwards, or validation ones)."""
    calls = [0]

    def hook(module, args):
        if module.training == evaluating:
            return
        calls[0] += 1
        if calls[0] == call:
            signal.raise_signal(signum)

    return model.model.register_forward_pre_hook(hook)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# the runs the library tests stop and resume: 2 micro-batches a step (a stop can cut one in two), dropout (the random
# states must be put back), a periodic checkpoint at step 2 (the stop saves a later one)
CONFIG = TrainConfig(**{**SMALL, "max_steps": 5, "grad_accum": 2, "dropout": 0.1, "save_every": 2})


@pytest.fixture(scope="module")
def straight(dataset, tok, tmp_path_factory):
    """(run folder, trainable tensors) of the CONFIG run never stopped."""
    out = tmp_path_factory.mktemp("straight")
    model = tiny_train_model()
    train(model, tok, dataset, CONFIG, out=out)
    return out, lora_state(model)


# -- the library: train() ---------------------------------------------------------------------------------------------
def test_ctrl_c_inside_a_step_saves_the_step_before_and_resumes_bit_identical(dataset, tok, tmp_path, straight):
    """Ctrl-C in step 4's second micro-batch (its data read, dropout drawn): checkpoint step 3 (the periodic one is
    step 2); the resume ends on the uninterrupted run's losses and adapter, bit for bit."""
    model = tiny_train_model()
    _signal_in_forward(model, signal.SIGINT, call=8)  # 2 forwards a step: step 4, second micro-batch
    with pytest.raises(KeyboardInterrupt) as stopped:  # (the old code's: not a TrainingInterrupted)
        train(model, tok, dataset, CONFIG, out=tmp_path / "run")
    error = stopped.value
    assert isinstance(error, TrainingInterrupted) and error.step == 3 and error.signum == signal.SIGINT, repr(error)
    assert error.checkpoint == find_checkpoint(tmp_path / "run") == tmp_path / "run" / "checkpoints" / "step-000003"
    assert str(error) == (f"training stopped by Ctrl-C at step 3 of 5; saved checkpoint {error.checkpoint} (continue "
                          f"with train(..., resume={str(tmp_path / 'run')!r}))")
    assert not [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp")]
    assert len(_metrics(tmp_path / "run", "train")) == 3  # the abandoned step wrote nothing

    resumed = tiny_train_model()
    assert train(resumed, tok, dataset, CONFIG, out=tmp_path / "run", resume=tmp_path / "run").steps == 5
    assert _metrics(tmp_path / "run", "train") == _metrics(straight[0], "train")
    assert _same(straight[1], lora_state(resumed))


def test_a_stop_in_the_first_step_saves_nothing(dataset, tok, tmp_path):
    """Nothing trained yet: no step-0 checkpoint (the CLI then removes a new run's folder, as before)."""
    model = tiny_train_model()
    _signal_in_forward(model, signal.SIGINT, call=1)
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(model, tok, dataset, TrainConfig(**{**SMALL, "max_steps": 3}), out=tmp_path)
    assert isinstance(stopped.value, TrainingInterrupted) and stopped.value.checkpoint is None, repr(stopped.value)
    assert str(stopped.value) == "training stopped by Ctrl-C at step 0 of 3; nothing saved (no step done yet)"
    assert not (tmp_path / "checkpoints").exists()


def test_sigterm_as_the_update_starts_lets_it_finish_then_saves(dataset, tok, tmp_path, straight):
    """SIGTERM as step 3's optimizer update begins: the update is not cut in two; it ends, step 3 is saved."""
    updates = [0]

    def before_update(optimizer, args, kwargs):
        updates[0] += 1
        if updates[0] == 3:
            signal.raise_signal(signal.SIGTERM)

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    hook = register_optimizer_step_pre_hook(before_update)
    try:
        with sigterm_as_interrupt(), pytest.raises(KeyboardInterrupt) as stopped:  # as `lorakit train` runs it
            train(tiny_train_model(), tok, dataset, CONFIG, out=tmp_path / "run")
    finally:
        hook.remove()
    error = stopped.value
    assert isinstance(error, TrainingInterrupted) and by_sigterm(error), repr(error)
    assert error.step == 3 and error.checkpoint.name == "step-000003"
    assert str(error).startswith("training stopped by SIGTERM at step 3 of 5; saved checkpoint ")
    resumed = tiny_train_model()
    train(resumed, tok, dataset, CONFIG, out=tmp_path / "run", resume=tmp_path / "run")
    assert _metrics(tmp_path / "run", "train") == _metrics(straight[0], "train")
    assert _same(straight[1], lora_state(resumed))


def test_a_stop_during_validation_validates_again_on_resume(dataset, tok, tmp_path):
    """Ctrl-C inside step 2's validation: checkpoint step 2 marked pending_validation; the resume validates step 2
    first, so losses, the best adapter and the metrics lines are the uninterrupted run's."""
    val = build_dataset(task_records(8, seed=5), tok, max_length=32)
    config = TrainConfig(**{**SMALL, "max_steps": 4, "eval_every": 2, "eval_batch_size": 4})
    straight = train(tiny_train_model(), tok, dataset, config, val_data=val, out=tmp_path / "straight")

    model = tiny_train_model()
    _signal_in_forward(model, signal.SIGINT, call=2, evaluating=True)  # step 2's validation, second batch
    with pytest.raises(KeyboardInterrupt) as stopped:  # (the old code's: not a TrainingInterrupted)
        train(model, tok, dataset, config, val_data=val, out=tmp_path / "run")
    assert isinstance(stopped.value, TrainingInterrupted) and stopped.value.step == 2, repr(stopped.value)
    state = read_state(stopped.value.checkpoint)
    assert state["pending_validation"] is True and state["val_losses"] == []
    assert _metrics(tmp_path / "run", "val") == []

    resumed = train(tiny_train_model(), tok, dataset, config, val_data=val, out=tmp_path / "run", resume=tmp_path / "run")
    assert resumed.val_losses == straight.val_losses and len(straight.val_losses) == 2
    assert (resumed.best_step, resumed.best_val_loss) == (straight.best_step, straight.best_val_loss)
    assert _metrics(tmp_path / "run", "val") == _metrics(tmp_path / "straight", "val")
    assert _same(*(load_file(str(tmp_path / name / "best" / "adapter_model.safetensors")) for name in ("run", "straight")))


def test_a_second_ctrl_c_while_saving_stops_at_once_and_keeps_the_previous_checkpoint(dataset, tok, tmp_path,
                                                                                     monkeypatch, straight):
    """Ctrl-C in step 4, then Ctrl-C again while step 3's checkpoint is being written: a plain KeyboardInterrupt at
    once, no half-written checkpoint, `latest` still step 2 (whole: the run resumes from it, bit-identical)."""
    from lorakit.train import checkpoint as ckpt

    write, seen = ckpt._write_safetensors, []

    def write_then_ctrl_c(path, tensors):
        seen.append(f"{path.parent.name}/{path.name}")
        if path.parent.name.startswith(".step-000003") and path.name == "optimizer.safetensors":
            signal.raise_signal(signal.SIGINT)  # half of the checkpoint is written by now
        write(path, tensors)

    monkeypatch.setattr(ckpt, "_write_safetensors", write_then_ctrl_c)
    model = tiny_train_model()
    _signal_in_forward(model, signal.SIGINT, call=7)  # step 4's first micro-batch
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(model, tok, dataset, CONFIG, out=tmp_path)
    assert not isinstance(stopped.value, TrainingInterrupted)
    assert any(name.startswith(".step-000003") for name in seen)  # the stop did start to save step 3
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step-000002"]  # no hidden .step-000003.*.tmp
    monkeypatch.setattr(ckpt, "_write_safetensors", write)
    resumed = tiny_train_model()
    train(resumed, tok, dataset, CONFIG, out=tmp_path, resume=tmp_path)
    assert _same(straight[1], lora_state(resumed))


def test_a_stop_between_the_two_renames_of_best_puts_the_previous_best_back(dataset, tok, tmp_path, monkeypatch):
    """best/ is replaced by two renames (best -> .best.old, the new one -> best): an interrupt between them left no
    best/ at all, and the next run removed .best.old. Now the previous best/ goes back, and the checkpoint written
    at the stop has the validation to do again (its state untouched by the cut save)."""
    losses = iter([2.0, 1.5, 1.5, 1.5])  # step 1, step 2 (cut), step 2 again on resume, step 3
    monkeypatch.setattr(loop, "dataset_loss", lambda *a, **k: (next(losses), 10))
    val = build_dataset(task_records(4, seed=5), tok, max_length=32)
    rename, cut = os.replace, []

    def interrupt_between(src, dst):
        if not cut and Path(dst).name == "best" and Path(dst).with_name(".best.old").is_dir():
            cut.append(dst)
            raise KeyboardInterrupt  # as a Ctrl-C landing right after best/ was moved aside
        rename(src, dst)

    monkeypatch.setattr(os, "replace", interrupt_between)
    config = TrainConfig(**{**SMALL, "max_steps": 3, "eval_every": 1})
    with pytest.raises(KeyboardInterrupt) as stopped:
        train(tiny_train_model(), tok, dataset, config, val_data=val, out=tmp_path)
    monkeypatch.setattr(os, "replace", rename)
    assert cut and isinstance(stopped.value, TrainingInterrupted) and stopped.value.step == 2
    assert (tmp_path / "best" / "adapter_model.safetensors").is_file() and not list(tmp_path.glob(".best*"))
    state = read_state(stopped.value.checkpoint)
    assert (state["pending_validation"], state["best_step"], state["val_losses"]) == (True, 1, [[1, 2.0]])
    result = train(tiny_train_model(), tok, dataset, config, val_data=val, out=tmp_path, resume=tmp_path)
    assert (result.best_step, result.val_losses) == (2, [(1, 2.0), (2, 1.5), (3, 1.5)])


def test_under_torchrun_a_signal_is_said_at_once_and_a_repeated_one_is_the_same(capfd):
    """Several processes: the first signal is only noted (the loop stops at the next step) and rank 0 says so at
    once: a step can take minutes, and a user who saw nothing pressed Ctrl-C again, which stops without saving. The
    same signal again within 2 s is the same one (Slurm signals every process, torchrun then passes its own on);
    another one stops at once. The previous handlers come back."""
    from lorakit.train.stopping import StopRequest

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with StopRequest(together=True, announce=True) as stop:
        assert signal.getsignal(signal.SIGTERM) == stop._handler  # (else the SIGTERM below would end pytest)
        signal.raise_signal(signal.SIGTERM)
        signal.raise_signal(signal.SIGTERM)
        assert (stop.signum, stop.signals, stop.acted) == (signal.SIGTERM, 1, False)
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    assert capfd.readouterr().err == ("\nSIGTERM: every process stops at the end of this step and saves a checkpoint "
                                      "there (SIGTERM again stops at once, without saving)\n")


# -- the command ------------------------------------------------------------------------------------------------------
def _args(tiny_folder: Path, data: Path, run: Path, steps: int) -> list[str]:  # noqa: F811
    return ["train", "--model", str(tiny_folder), "--data", str(data), "--out", str(run), "--rank", "2",
            "--batch-size", "2", "--no-progress", "--eval-examples", "0", "--max-steps", str(steps)]


def test_ctrl_c_of_lorakit_train_saves_says_how_to_resume_and_ends_130(tiny_folder, tiny_data, tmp_path, monkeypatch,
                                                                       capsys):
    """No --save-every: before, the run was removed ("interrupted before its first checkpoint")."""
    from lorakit.cli import main

    run = tmp_path / "run"
    calls, accumulate = [0], loop.accumulate_gradients

    def ctrl_c_in_step_3(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            signal.raise_signal(signal.SIGINT)
        return accumulate(*args, **kwargs)

    monkeypatch.setattr(loop, "accumulate_gradients", ctrl_c_in_step_3)
    assert main(_args(tiny_folder, tiny_data[0], run, 6)) == 130
    err = capsys.readouterr().err
    said = [l for l in err.splitlines() if l.startswith("training ")]
    checkpoint = run / "checkpoints" / "step-000002"
    assert said == [f"training stopped by Ctrl-C at step 2 of 6, saved there; the last checkpoint is {checkpoint}; "
                    f"continue with: lorakit train --resume {run}"], err[-2000:]
    assert err.rstrip().splitlines()[-1] == "lorakit train: interrupted" and "Traceback" not in err
    monkeypatch.setattr(loop, "accumulate_gradients", accumulate)
    assert main(["train", "--resume", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == 6


# -- torchrun ---------------------------------------------------------------------------------------------------------
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
SCRIPT = '''
import os, signal, sys, json, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import torch.distributed as dist
from test_train_helpers import lora_state, task_records, tiny_tokenizer, tiny_train_model
from lorakit.train.config import TrainConfig
from lorakit.train.data import build_dataset
from lorakit.train.loop import train
from lorakit.train.stopping import TrainingInterrupted
dist.init_process_group("gloo")
rank = dist.get_rank()
tok = tiny_tokenizer()
data = build_dataset(task_records(32, seed=3), tok, max_length=32)
config = TrainConfig(rank=4, alpha=8.0, batch_size=2, grad_accum=2, max_steps=6, save_every=0, dropout=0.1, lr=5e-3,
                     eval_examples=0, progress=False)
out = {out!r}
straight = tiny_train_model()
train(straight, tok, data, config, out=os.path.join(out, "straight"))
model, calls = tiny_train_model(), [0]
def sigterm_rank1_in_step_3(module, args):
    calls[0] += 1
    if rank == 1 and calls[0] == 6:  # step 3, second micro-batch: this process alone, mid-step; twice, as a
        os.kill(os.getpid(), signal.SIGTERM)  # Slurm preemption delivers it (to every process of the job, and
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun passes its own on)
model.model.register_forward_pre_hook(sigterm_rank1_in_step_3)
report = {{}}
try:
    train(model, tok, data, config, out=os.path.join(out, "run"))
except TrainingInterrupted as error:
    report = dict(step=error.step, checkpoint=str(error.checkpoint), signum=int(error.signum), everywhere=error.everywhere)
resumed = tiny_train_model()
result = train(resumed, tok, data, config, out=os.path.join(out, "run"), resume=os.path.join(out, "run"))
a, b = lora_state(straight), lora_state(resumed)
report["same"] = all(torch.equal(a[k], b[k]) for k in a)
report["steps"] = result.steps
# a Ctrl-C torchrun passes on to each process may reach one after the step's all-reduce: rank 0's SIGINT comes in
# step 2, rank 1's only while rank 0 saves; every process got one, so none waits for rank 0 to say it (lorakit.cli)
import lorakit.train.loop as loop
gather = loop.gather_objects
def sigint_rank1_late(obj):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGINT)
    return gather(obj)
model, calls = tiny_train_model(), [0]
def sigint_rank0_in_step_2(module, args):
    calls[0] += 1
    if rank == 0 and calls[0] == 3:
        os.kill(os.getpid(), signal.SIGINT)
model.model.register_forward_pre_hook(sigint_rank0_in_step_2)
loop.gather_objects = sigint_rank1_late
try:
    train(model, tok, data, config, out=os.path.join(out, "late"))
except TrainingInterrupted as error:
    report["late"] = [error.step, int(error.signum), error.everywhere]
os.write(1, f"REPORT {{rank}} {{json.dumps(report)}}\\n".encode())  # one write: the processes share stdout
dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # no interpreter teardown, where gloo can abort a finished worker (lorakit.cli._exit_without_teardown)
'''


def test_torchrun_sigterm_to_one_process_stops_both_at_one_step_saves_there_and_resumes_bit_identical(tmp_path):
    """Before: the processes stopped together but nothing was saved at that step (no --save-every: nothing at all),
    and the SIGTERM delivered twice (scheduler and torchrun) stopped the process it reached on the spot. Then a
    signal every process gets, one of them late, is known to be everywhere (no process waits 20 s for rank 0)."""
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), out=str(tmp_path)))
    done = subprocess.run([*TORCHRUN, str(script)], env=ENV, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    reports = dict(line.split(" ", 2)[1:] for line in done.stdout.splitlines() if line.startswith("REPORT "))
    assert sorted(reports) == ["0", "1"], done.stdout[-3000:] + done.stderr[-3000:]
    r0, r1 = json.loads(reports["0"]), json.loads(reports["1"])
    checkpoint = tmp_path / "run" / "checkpoints" / "step-000003"
    # both finished step 3 (the signal came in it) and stopped before step 4; rank 0 wrote the checkpoint
    assert r0 == {"step": 3, "checkpoint": str(checkpoint), "signum": signal.SIGTERM, "everywhere": False,
                  "same": True, "steps": 6, "late": [2, signal.SIGINT, True]}, done.stderr[-3000:]
    assert r1 == r0
    assert read_state(checkpoint)["step"] == 3 and read_state(checkpoint)["identity"]["processes"] == 2
    assert _metrics(tmp_path / "run", "train") == _metrics(tmp_path / "straight", "train")


def test_ctrl_c_of_torchrun_stops_both_processes_at_one_step_and_saves_there(tiny_folder, tiny_data, tmp_path):  # noqa: F811
    """Ctrl-C at the terminal reaches torchrun, which passes SIGINT on to each worker (they run in their own sessions).
    Before: each worker stopped wherever the signal found it and nothing was saved there. Now rank 0 says at once
    that they stop at the end of the step, both stop at one step, rank 0 saves it and names the torchrun command."""
    from test_followups_16_distributed import _workers

    run = tmp_path / "run"
    group = subprocess.Popen([*TORCHRUN, "-m", "lorakit", *_args(tiny_folder, tiny_data[0], run, 100000)], env=ENV,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics, deadline = run / "metrics.jsonl", time.monotonic() + 180
    try:
        while time.monotonic() < deadline and group.poll() is None and (
                not metrics.is_file() or metrics.read_text().count('"kind": "train"') < 2):
            time.sleep(0.05)
        group.send_signal(signal.SIGINT)
        _, err = group.communicate(timeout=90)
    finally:
        if group.poll() is None:
            for pid in [*_workers(group.pid).values(), group.pid]:
                os.kill(pid, signal.SIGKILL)
            group.communicate()
    step = len(_metrics(run, "train"))
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest.name == f"step-{step:06d}" and read_state(latest)["step"] == step >= 2, (latest, step, err[-3000:])
    assert ("Ctrl-C: every process stops at the end of this step and saves a checkpoint there (Ctrl-C again stops at "
            "once, without saving)") in err, err[-3000:]
    said = [line for line in err.splitlines() if line.startswith(("training ", "lorakit train:"))]
    assert said == [f"training stopped by Ctrl-C at step {step} of 100000, saved there; the last checkpoint is {latest}; "
                    f"continue with: torchrun --nproc_per_node 2 -m lorakit train --resume {run}",
                    "lorakit train: interrupted"], err[-3000:]
    assert not [p for p in run.rglob("*") if p.name.endswith(".tmp")] and not (run / "adapter").exists()
