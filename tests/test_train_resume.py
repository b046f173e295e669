"""Resume after SIGKILL: a real ``lorakit train`` process killed at an awkward step (between checkpoints, with
gradient accumulation and adapter dropout, so the data position and the random state both matter) and resumed
with ``--resume`` ends with an adapter bit-identical to the run that was never stopped."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from test_train_helpers import REPO, run_cli, tiny_data, tiny_folder  # noqa: F401 (fixtures)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _train_steps(run: Path) -> list[tuple[int, float | None]]:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(l["step"], l.get("loss")) for l in lines if l["kind"] == "train"]


def test_sigkill_then_resume_is_bit_identical(tmp_path, tiny_folder, tiny_data, capsys):
    train_path, val_path = tiny_data
    args = ["train", "--model", str(tiny_folder), "--data", str(train_path), "--val-data", str(val_path),
            "--max-steps", "9", "--batch-size", "4", "--grad-accum", "2", "--save-every", "3", "--eval-every", "4",
            "--dropout", "0.1", "--rank", "4", "--lr", "1e-2", "--eval-examples", "0", "--no-progress"]
    straight = run_cli(*args, "--out", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-2000:]

    # the same run, killed with SIGKILL once step 5 is logged (checkpoints at 3 and 6: it dies between them)
    killed_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lorakit", *args, "--out", str(killed_dir)], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed_dir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if metrics.is_file() and sum('"kind": "train"' in l for l in metrics.read_text().splitlines()) >= 5:
                break
            time.sleep(0.005)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    latest = (killed_dir / "checkpoints" / "latest").read_text().strip()
    assert latest in ("step-000003", "step-000006")
    assert not (killed_dir / "adapter").exists()

    resumed = run_cli("train", "--resume", "--out", str(killed_dir))  # the run's own config.yaml supplies the rest
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {killed_dir / 'checkpoints' / latest}" in resumed.stderr

    a, b = _tensors(tmp_path / "straight" / "adapter"), _tensors(killed_dir / "adapter")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit
    assert _train_steps(tmp_path / "straight") == _train_steps(killed_dir)  # same losses, no duplicated steps

    # resuming with another batch setting is refused with the reason, and changes nothing
    from lorakit.cli import main

    assert main(["train", "--resume", str(killed_dir), "--batch-size", "2"]) == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("lorakit train: error: cannot resume from ")
    assert "another --batch-size (batch_size: 4 then, 2 now)" in last
    assert _tensors(killed_dir / "adapter").keys() == a.keys()
