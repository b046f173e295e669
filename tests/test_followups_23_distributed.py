"""The README's "Many GPUs" workflow tried on a CPU with gloo, as a new user would.

* a RANK left in the environment without torchrun's WORLD_SIZE (an earlier `export RANK=1`, a scheduler setting it
  for another tool) made every lorakit command silent, its errors included: `lorakit generate` exited 2 without a
  word, `lorakit train` trained without printing its run folder or result; RANK counts only under WORLD_SIZE > 1 now;
* WORLD_SIZE > 1 that torchrun did not set up (no RANK / MASTER_ADDR) was torch's ValueError traceback; a RANK past
  WORLD_SIZE, and on GPUs more processes per machine than GPUs, are refused in one line too;
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from test_train_helpers import REPO, task_records, tiny_folder, write_jsonl  # noqa: F401

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
for _name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(_name, None)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _lorakit(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", *args], env={**ENV, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=180)


def test_a_stale_rank_without_world_size_does_not_silence_lorakit(tmp_path, tiny_folder):  # noqa: F811
    """RANK=1 alone is not a torchrun job: the error and the run's own lines are printed (before: nothing)."""
    done = _lorakit("generate", "--model", str(tmp_path / "nope"), "hi", env={"RANK": "1"})
    assert done.returncode == 2 and done.stderr.startswith("lorakit generate: error: "), done.stderr[-2000:]
    data = write_jsonl(tmp_path / "train.jsonl", task_records(6, seed=1))
    done = _lorakit("train", "--model", str(tiny_folder), "--data", str(data), "--batch-size", "2", "--max-steps",
                    "1", "--rank", "2", "--out", str(tmp_path / "run"), "--no-progress", env={"RANK": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"adapter: {tmp_path / 'run' / 'adapter'}" in done.stdout, done.stdout
    assert (tmp_path / "run" / "adapter" / "adapter_model.safetensors").is_file()
    # torchrun's other processes stay silent: the same command, with WORLD_SIZE=2, from a process that is not rank 0
    from lorakit._rank import speaks

    assert speaks()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("RANK", "1")
        assert speaks()  # no WORLD_SIZE
        patch.setenv("WORLD_SIZE", "2")
        assert not speaks()
        patch.setenv("RANK", "0")
        assert speaks()


def test_a_world_size_torchrun_did_not_set_is_one_line(tmp_path, tiny_folder, monkeypatch):  # noqa: F811
    """WORLD_SIZE=2 alone: torch's "environment variable RANK expected, but not set" traceback before."""
    data = write_jsonl(tmp_path / "train.jsonl", task_records(6, seed=1))
    done = _lorakit("train", "--model", str(tiny_folder), "--data", str(data), "--max-steps", "1",
                    "--out", str(tmp_path / "run"), env={"WORLD_SIZE": "2"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.strip().splitlines()[-1] == (
        "lorakit train: error: WORLD_SIZE=2 is set but RANK, MASTER_ADDR, MASTER_PORT are not: launch several "
        "processes with torchrun --nproc_per_node 2 -m lorakit train ..., or unset WORLD_SIZE to train on one")
    assert not (tmp_path / "run").exists()

    from lorakit.train.runner import check_torchrun_environment

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500")):
        monkeypatch.setenv(name, value)
    with pytest.raises(LorakitError, match=r"^RANK=2 is not a process of WORLD_SIZE=2 \(0 to 1\)"):
        check_torchrun_environment()
    monkeypatch.setenv("RANK", "1")
    check_torchrun_environment()
    # on a machine with one GPU, `torchrun --nproc_per_node 2` (before: CUDA's "invalid device ordinal" traceback
    # from the second process, which torch.cuda.set_device gave)
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(LorakitError, match=r"^2 processes on this machine \(torchrun --nproc_per_node 2\) but it has "
                                           r"1 GPU \(CUDA_VISIBLE_DEVICES counts\): one process per GPU"):
        check_torchrun_environment()
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_torchrun_environment()


def test_a_refused_resume_of_a_named_checkpoint_suggests_that_checkpoint(tmp_path):
    """`lorakit train --resume RUN/checkpoints/step-000002` of a 2-process run on one process: the command offered
    named RUN alone (before), which resumes from the run's latest checkpoint, not the one asked for."""
    import json

    from lorakit.train.checkpoint import FORMAT
    from lorakit.train.distributed import check_resume_processes

    run = tmp_path / "run"
    for step in (2, 4):
        folder = run / "checkpoints" / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "state.json").write_text(json.dumps({"format": FORMAT, "step": step, "identity": {"processes": 2}}))
    (run / "checkpoints" / "latest").write_text("step-000004")
    with pytest.raises(LorakitError) as named:
        check_resume_processes(run / "checkpoints" / "step-000002", run, 1)
    assert str(named.value).startswith(f"cannot resume from {run / 'checkpoints' / 'step-000002'}: it was trained on "
                                       "2 processes and this is 1 process"), named.value
    assert (f"resume with `torchrun --nproc_per_node 2 -m lorakit train --resume "
            f"{run / 'checkpoints' / 'step-000002'}`") in str(named.value)
    with pytest.raises(LorakitError, match=f"resume with `torchrun --nproc_per_node 2 -m lorakit train --resume {run}`"):
        check_resume_processes(run, run, 1)  # the run folder: its latest, as before


def test_commands_other_than_train_under_torchrun_are_refused_once(tmp_path, tiny_folder):  # noqa: F811
    """`torchrun -m lorakit merge` ran the whole merge in each process: one wrote the folder, the other failed on
    "already exists" after it, and torchrun reported the run as failed; eval and generate printed everything twice.
    Now one line, from rank 0, and nothing written."""
    done = subprocess.run([*TORCHRUN, "-m", "lorakit", "merge", "--model", str(tiny_folder), "--adapter",
                           str(tmp_path / "adapter"), "--out", str(tmp_path / "merged")], env=ENV, capture_output=True,
                          text=True, timeout=180)
    said = [line for line in done.stderr.splitlines() if line.startswith("lorakit")]
    assert done.returncode != 0 and said[0] == (
        "lorakit merge: error: torchrun started 2 copies of lorakit merge, each doing all of the work and writing the "
        "same files: run lorakit merge without torchrun (lorakit train alone spreads over processes)"), done.stderr
    assert len([line for line in said if "error" in line]) == 1, said
    assert not (tmp_path / "merged").exists()


def test_a_resume_with_another_global_batch_is_refused_before_loading_naming_it(tmp_path):
    """`torchrun ... lorakit train --resume RUN --global-batch 4` of a run trained without accumulation was refused
    only once the model had loaded, as "another --grad-accum (grad_accum: 1 then, 2 now)", an option the user had not
    typed; now before loading, naming --global-batch. A --global-batch giving the run's own accumulation resumes."""
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import check_resume_options

    saved = {"batch_size": 1, "grad_accum": 1, "global_batch": None}
    with pytest.raises(LorakitError) as refused:
        check_resume_options(saved, TrainConfig(batch_size=1, global_batch=4), tmp_path)
    assert str(refused.value) == (
        f"cannot resume from {tmp_path}: another gradient accumulation (1 micro-batch per optimizer step then, 4 now: "
        "--global-batch 4 / (--batch-size 1 x 1 process)); resume with the run's original settings, or start a new "
        "run with another --out")
    with pytest.raises(LorakitError, match=r"\(2 micro-batches per optimizer step then, 1 now: --grad-accum 1\)"):
        check_resume_options({"batch_size": 2, "grad_accum": 1, "global_batch": 4}, TrainConfig(batch_size=2), tmp_path)
    check_resume_options(saved, TrainConfig(batch_size=1, global_batch=1), tmp_path)  # the same accumulation
    check_resume_options({"batch_size": 2, "grad_accum": 1, "global_batch": 4},
                         TrainConfig(batch_size=2, grad_accum=2), tmp_path)


ONE_RANK_MISTAKE = '''
import os, sys, time
from pathlib import Path
import lorakit.cli
import lorakit.train.runner as runner
lorakit.cli.RANK0_GRACE_S = 3.0
read_data = runner.read_data


def late_missing(config):  # rank 1's --data is missing on its node, found once rank 0 is past its data
    config_yaml = Path(config.out) / "config.yaml"
    deadline = time.monotonic() + 120
    while not config_yaml.is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # rank 0 into the training loop's first collective
    return read_data(config.replace(data=[str(Path(config.data[0]).with_name("missing.jsonl"))]))


if os.environ["RANK"] == "1":
    runner.read_data = late_missing
sys.exit(lorakit.cli.main())
'''


def test_a_mistake_of_one_process_alone_is_said(tmp_path, tiny_folder):  # noqa: F811
    """A mistake one process alone makes (its --data missing on its node, say: seen with a 20 s grace): that process
    destroyed its process group as it failed, rank 0's collective failed at once, rank 0 said "another process ...
    ended (killed, or out of memory)" and torchrun ended the failing process while it waited to say why: the cause
    was never printed. Now the group stays up while it waits, it says its mistake, and then rank 0 finds it gone."""
    data = write_jsonl(tmp_path / "train.jsonl", task_records(8, seed=1))
    script = tmp_path / "one_rank.py"
    script.write_text(ONE_RANK_MISTAKE)
    done = subprocess.run([*TORCHRUN, str(script), "train", "--model", str(tiny_folder), "--data", str(data),
                           "--batch-size", "2", "--max-steps", "2", "--rank", "2", "--no-progress", "--out",
                           str(tmp_path / "run")], env=ENV, capture_output=True, text=True, timeout=180)
    said = [line for line in done.stderr.splitlines() if line.startswith("lorakit train: error:")]
    assert done.returncode != 0 and said[:1] == [
        f"lorakit train: error: data file not found: {tmp_path / 'missing.jsonl'}; check the path (JSONL, CSV or a "
        "datasets folder) (process 1 of 2)"], done.stderr[-3000:]
    assert not (tmp_path / "run").exists()
