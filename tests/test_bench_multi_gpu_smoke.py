"""bench/multi_gpu.py on the CPU: its --smoke run (torchrun, gloo) saves each launch's adapter through lorakit's
torchrun save path and the launcher's one-process check (lorakit.load_adapter and peft.PeftModel.from_pretrained on
a rebuilt base) passes, also with 2 processes holding real FSDP2 shards; and the check fails, in one line, on an
adapter that changes nothing, on a saved adapter that is not the trained one, and on a file missing tensors."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "multi_gpu.py"
CPU = torch.device("cpu")


def _smoke(tmp_path: Path, *extra: str) -> list[dict]:
    env = {**os.environ, "OUT": str(tmp_path), "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(SCRIPT), "--smoke", *extra], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| adapter check |" in done.stdout
    return json.loads((tmp_path / "multi_gpu_smoke.json").read_text())


def test_smoke_checks_the_saved_adapter_of_both_cases(tmp_path):
    rows = _smoke(tmp_path)
    assert [(r["case"], r["gpus"]) for r in rows] == [("ddp-tiny", 1), ("fsdp-tiny", 1)]
    for row in rows:
        assert "error" not in row, row
        assert row["adapter_check"] == "ok", row


def test_smoke_fsdp_on_two_processes_checks_the_gathered_adapter(tmp_path):
    """Two processes each hold half of every weight: the gathered adapter and the base rebuilt whole must match."""
    rows = _smoke(tmp_path, "--cases", "fsdp-tiny", "--gpus", "2")
    assert [(r["case"], r["gpus"], r["adapter_check"]) for r in rows] == [("fsdp-tiny", 2, "ok")]


# -- the check itself, in this process (one rank, no process group: save_result writes directly) -----------------
@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(SCRIPT.parent))  # the script imports bench_common as its sibling
    try:
        spec = importlib.util.spec_from_file_location("bench_multi_gpu", SCRIPT)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return module


def _saved(bench, folder: Path, zero_b: bool = False):
    model = bench.build_model("tiny", "ddp", CPU, 64, ckpt=False)
    if zero_b:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.zero_()
    bench.save_adapter_and_reference(model, str(folder), CPU, None, sharded=False)
    return model


def test_check_passes_on_the_adapter_as_saved(bench, tmp_path):
    _saved(bench, tmp_path)
    assert bench.adapter_check("tiny", 64, str(tmp_path), smoke=True) == "ok"


def test_check_fails_on_an_adapter_that_changes_nothing(bench, tmp_path):
    _saved(bench, tmp_path, zero_b=True)
    result = bench.adapter_check("tiny", 64, str(tmp_path), smoke=True)
    assert result.startswith("failed: the adapter does not change the logits"), result


def test_check_fails_when_the_saved_adapter_is_not_the_trained_one(bench, tmp_path):
    """The workers' reference comes from a model whose adapter moved on after the save (a stale save)."""
    model = _saved(bench, tmp_path)
    with torch.no_grad():
        model.get_submodule("model.layers.1.mlp.down_proj").adapters["default"].lora_B.add_(0.05)
    save_file({"logits": bench.probe_logits(model, 1000, CPU, None)}, str(tmp_path / bench.REFERENCE_FILE))
    result = bench.adapter_check("tiny", 64, str(tmp_path), smoke=True)
    assert result.startswith("failed: lorakit's logits and the trained model's"), result


def test_check_fails_on_a_file_missing_tensors(bench, tmp_path):
    _saved(bench, tmp_path)
    weights = tmp_path / bench.ADAPTER_DIR / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    dropped = next(k for k in tensors if "lora_B" in k)
    del tensors[dropped]
    save_file(tensors, str(weights))
    result = bench.adapter_check("tiny", 64, str(tmp_path), smoke=True)
    assert result.startswith("failed: LorakitError:") and "\n" not in result, result


def test_tolerances_are_read_from_the_one_table(bench):
    from conftest import TOLERANCE

    for dtype in (torch.float32, torch.bfloat16):
        assert bench.tolerance(dtype) == TOLERANCE[dtype]


def test_a_failed_check_exits_non_zero_after_writing_the_results(bench, tmp_path, monkeypatch):
    rows = {"ddp-tiny": "ok", "fsdp-tiny": "failed: the adapter does not change the logits"}

    def fake_launch(case, spec, gpus, args):
        return {"case": case, "gpus": gpus, "batch_per_gpu": 2, "seq": 64, "tokens_per_s_per_gpu": 1.0,
                "tokens_per_s": 1.0, "peak_gib_per_gpu": 0.0, "adapter_check": rows[case]}

    monkeypatch.setattr(bench, "launch", fake_launch)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["multi_gpu.py", "--smoke"])
    with pytest.raises(SystemExit) as exited:
        bench.main()
    assert exited.value.code not in (0, None) and "fsdp-tiny" in str(exited.value.code)
    written = json.loads((tmp_path / "multi_gpu_smoke.json").read_text())
    assert [r["adapter_check"] for r in written] == [rows["ddp-tiny"], rows["fsdp-tiny"]]
