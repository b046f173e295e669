"""Training on 2 CPU processes (torchrun, gloo): data parallel and FSDP2 give the adapter of one process with the
same global batch; a torchrun group killed with SIGKILL and resumed with torchrun ends bit-identical to one never
stopped; bad process counts and resumes are refused in one line."""

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
from safetensors import safe_open

from conftest import assert_close
from lorakit.errors import LorakitError
from test_train_helpers import REPO, run_cli, task_records, tiny_data, tiny_folder, tiny_tokenizer  # noqa: F401

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# one launch trains twice (data parallel, then FSDP2 on a fresh model): torchrun start-up is most of the cost
SCRIPT = '''
import os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import torch.distributed as dist
from conftest import tiny_llama
from test_train_helpers import task_records, tiny_tokenizer
from lorakit.train.config import TrainConfig
from lorakit.train.data import build_dataset
from lorakit.train.loop import train
dist.init_process_group("gloo")
tok = tiny_tokenizer()
data = build_dataset(task_records(32, seed=3), tok, max_length=32)
for name, fsdp in (("ddp", False), ("fsdp", True)):
    model = tiny_llama(seed=0, vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2)
    train(model, tok, data, TrainConfig(**{settings!r}, batch_size=2, global_batch=8, fsdp=fsdp,
                                        out=os.path.join({out!r}, name)))
import gc
gc.collect()  # FSDP2's cycles hold the group: free them while it lives (lorakit.train.runner.distributed_group)
dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)  # no interpreter teardown, where gloo can abort a finished worker (lorakit.cli._exit_without_teardown)
'''
SETTINGS = dict(rank=4, max_steps=3, progress=False, save_every=0, eval_examples=0, lr=5e-3, variant="dora",
                modules_to_save=["lm_head"])


def _adapter(folder: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def test_data_parallel_and_fsdp_match_one_process(tmp_path):
    """2 processes x batch 2 x accumulation 2 (from --global-batch 8) == 1 process x batch 4 x accumulation 2, for
    DoRA + a fully trained lm_head: gradients are summed over processes (bucketed all-reduce; FSDP2 reduce-scatter
    with divide factor 1) and the FSDP2 adapter is gathered into the same PEFT folder."""
    from conftest import tiny_llama
    from lorakit.train.config import TrainConfig
    from lorakit.train.data import build_dataset
    from lorakit.train.loop import train

    script = tmp_path / "two.py"
    script.write_text(SCRIPT.format(tests=str(TESTS), settings=SETTINGS, out=str(tmp_path)))
    two = subprocess.run([*TORCHRUN, str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    # a user under torchrun is told the layout and the global batch it makes (data parallel said nothing before);
    # FSDP2's 4 sharded units: 2 layers, the decoder, the untied head
    for layout in ("data parallel over 2 processes", "FSDP2 over 2 processes, 4 sharded units"):
        assert (f"{layout}: global batch 8 rows per optimizer step (--batch-size 2 x 2 accumulation x 2 processes)"
                in two.stderr), two.stderr[-2000:]
    assert two.stderr.count("trainable parameters:") == 2  # rank 0 alone logs (once per run)

    tok = tiny_tokenizer()
    model = tiny_llama(seed=0, vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2)
    train(model, tok, build_dataset(task_records(32, seed=3), tok, max_length=32),
          TrainConfig(**SETTINGS, batch_size=4, grad_accum=2, out=str(tmp_path / "one")))
    one = _adapter(tmp_path / "one" / "adapter")
    assert any(k.endswith("lora_B.weight") and float(t.abs().max()) > 0 for k, t in one.items())
    assert any("lora_magnitude_vector" in k for k in one) and any("lm_head" in k for k in one)
    for name in ("ddp", "fsdp"):
        got = _adapter(tmp_path / name / "adapter")
        assert got.keys() == one.keys(), name
        for key in one:
            assert got[key].shape == one[key].shape, (name, key)
            assert_close(got[key], one[key])
        config = json.loads((tmp_path / name / "adapter" / "adapter_config.json").read_text())
        assert config["r"] == 4 and config["use_dora"] is True
        losses = [json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        reference = [json.loads(l)["loss"] for l in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
        assert losses == pytest.approx(reference, rel=1e-5)


def _train_losses(run: Path) -> list[tuple[int, float | None]]:
    lines = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    return [(l["step"], l.get("loss")) for l in lines if l["kind"] == "train"]


def _descendants(pid: int) -> list[int]:
    """Child processes of ``pid``, recursively (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *_descendants(child)]
    return found


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        try:
            if Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z"):
                return  # a zombie: dead, waiting for its (killed) parent's reaper
        except (OSError, IndexError):
            return
        time.sleep(0.01)


def test_fsdp_sigkill_then_torchrun_resume_is_bit_identical(tmp_path, tiny_folder, tiny_data, capsys):
    """A 2-process FSDP2 run with adapter dropout (per-process random states) is killed with SIGKILL between
    checkpoints, resumed with torchrun, and ends bit-identical to the same run never stopped: sharded adapter and
    AdamW moments are gathered into the checkpoint and re-sharded on resume. Resuming with 1 process or another
    --rank is refused in one line."""
    train_path, _ = tiny_data
    args = ["-m", "lorakit", "train", "--model", str(tiny_folder), "--data", str(train_path), "--max-steps", "7",
            "--batch-size", "2", "--global-batch", "8", "--save-every", "3", "--dropout", "0.1", "--rank", "4",
            "--lr", "1e-2", "--eval-examples", "0", "--no-progress", "--fsdp"]
    straight = subprocess.run([*TORCHRUN, *args, "--out", str(tmp_path / "straight")], env=ENV, capture_output=True,
                              text=True, timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]

    killed = tmp_path / "killed"
    group = subprocess.Popen([*TORCHRUN, *args, "--out", str(killed)], env=ENV, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    metrics, deadline = killed / "metrics.jsonl", time.monotonic() + 240
    try:
        while time.monotonic() < deadline and group.poll() is None:
            if metrics.is_file() and sum('"kind": "train"' in l for l in metrics.read_text().splitlines()) >= 4:
                break
            time.sleep(0.005)
    finally:
        workers = _descendants(group.pid)  # torchrun starts its workers in their own sessions: kill each by id
        for pid in [*workers, group.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        group.wait()
        for pid in workers:
            _wait_gone(pid)
    assert group.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert (killed / "checkpoints" / "latest").read_text().strip() in ("step-000003", "step-000006")
    assert not (killed / "adapter").exists()

    # another process count: refused before any change, in one line (rank 0 alone prints it)
    one = run_cli("train", "--resume", "--out", str(killed))
    assert one.returncode == 2
    assert one.stderr.strip().splitlines()[-1].startswith("lorakit train: error: cannot resume from ")
    assert "trained on 2 processes and this is 1 process" in one.stderr  # and said before the model loads:
    assert "trainable parameters" not in one.stderr and "torchrun --nproc_per_node 2 -m lorakit train --resume" in one.stderr

    resumed = subprocess.run([*TORCHRUN, "-m", "lorakit", "train", "--resume", "--out", str(killed)], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stderr.count("resuming from") == 1
    a, b = _adapter(tmp_path / "straight" / "adapter"), _adapter(killed / "adapter")
    assert a.keys() == b.keys() and len(a) > 0
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit
    assert _train_losses(tmp_path / "straight") == _train_losses(killed)


def test_resume_with_another_rank_is_refused():
    """run_identity / check_identity name the rank change (the adapter fingerprint alone would not say which)."""
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import check_identity

    saved = {"processes": 2, "rank": 4}
    with pytest.raises(LorakitError, match=r"another --rank \(rank: 4 then, 8 now\)"):
        check_identity(saved, {"processes": 2, "rank": 8}, Path("ckpt"))
    with pytest.raises(LorakitError, match=r"another number of processes .*2 then, 4 now"):
        check_identity(saved, {"processes": 4, "rank": 4}, Path("ckpt"))
    check_identity({"processes": 2}, {"processes": 2, "rank": 8}, Path("ckpt"))  # older checkpoints lack "rank"
    assert TrainConfig(global_batch=8).global_batch == 8


def test_global_batch_must_divide_over_processes():
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import accumulation_steps

    config = TrainConfig(batch_size=2, global_batch=12)
    assert [accumulation_steps(config, n) for n in (1, 2, 3, 6)] == [6, 3, 2, 1]
    with pytest.raises(LorakitError, match=r"--global-batch 12 is not a multiple of --batch-size 2 x 4 processes = 8"):
        accumulation_steps(config, 4)
    with pytest.raises(LorakitError, match="give --global-batch or --grad-accum, not both"):
        TrainConfig(global_batch=8, grad_accum=2)
    with pytest.raises(LorakitError, match="--fsdp .* --full"):
        TrainConfig(fsdp=True, full=True)


def test_gradient_buckets_and_fsdp_refusals(monkeypatch):
    """Bucketing groups gradients by dtype and size (one all-reduce per bucket; a missing gradient joins as zeros);
    --fsdp without torchrun and on an NF4 base are refused in one line."""
    import torch.distributed as dist
    from torch import nn

    from conftest import tiny_llama
    from lorakit.train import distributed

    calls = []
    monkeypatch.setattr(distributed, "world", lambda: (0, 2))
    monkeypatch.setattr(distributed, "all_reduce_sum", lambda t: calls.append(t.numel()) or t.mul_(2))
    params = [nn.Parameter(torch.ones(3, 5)), nn.Parameter(torch.ones(7)), nn.Parameter(torch.ones(2, dtype=torch.float64)),
              nn.Parameter(torch.ones(4))]
    for p in params[:3]:
        p.grad = torch.full_like(p, 1.5)
    assert distributed.all_reduce_gradients(params, bucket_bytes=1 << 20) == 3  # float32, float64, float32 again
    assert calls == [22, 2, 4]
    assert all(torch.equal(p.grad, torch.full_like(p, 3.0)) for p in params[:3])
    assert torch.equal(params[3].grad, torch.zeros(4))
    calls.clear()
    assert distributed.all_reduce_gradients(params[:2], bucket_bytes=60) == 2  # 60 bytes of float32 per bucket
    assert calls == [15, 7]

    monkeypatch.undo()
    assert not dist.is_initialized()
    with pytest.raises(LorakitError, match="--fsdp needs several processes: launch with torchrun"):
        distributed.apply_fsdp(tiny_llama(), torch.device("cpu"))
    from lorakit.quant.nf4 import NF4Linear

    model = tiny_llama()
    layer = model.model.layers[0].self_attn
    layer.q_proj = NF4Linear.from_linear(layer.q_proj)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    with pytest.raises(LorakitError, match="--fsdp cannot shard the NF4 base .*uint8 buffers"):
        distributed.apply_fsdp(model, torch.device("cpu"))


LOAD_SCRIPT = '''
import json, os, sys, time, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import torch.distributed as dist
from lorakit.errors import LorakitError
from lorakit.train import runner
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import fsdp_units, full
from lorakit.train.loop import prepare_model
dist.init_process_group("gloo")
rank, spans = dist.get_rank(), []
real_load = runner.load_model
def timed_load(config, device):
    start = time.monotonic()
    loaded = real_load(config, device)
    time.sleep(0.2)  # a load long enough that two at once would overlap for sure
    spans.append((start, time.monotonic()))
    return loaded
runner.load_model = timed_load
config = TrainConfig(model={folder!r}, rank=4, fsdp=True, seed=3, dtype="bfloat16")  # the file is float32: a copy
model, tokenizer = runner.load_sharded(config, torch.device("cpu"))
q = model.model.layers[0].self_attn.q_proj
sharded = {{"base": full(q.base_layer.weight), "A": full(q.adapters["default"].lora_A)}}
whole, _ = real_load(config, torch.device("cpu"))
torch.manual_seed(config.seed)
prepare_model(whole, config)
q1 = whole.model.layers[0].self_attn.q_proj
try:
    runner.load_sharded(config.replace(targets=["q_prj"]), torch.device("cpu"))
    error = None
except LorakitError as e:
    error = str(e)
json.dump({{"spans": spans, "units": fsdp_units(model), "local_rows": q.base_layer.weight.to_local().shape[0],
           "base_equal": torch.equal(sharded["base"], q1.base_layer.weight),
           "A_equal": torch.equal(sharded["A"], q1.adapters["default"].lora_A), "error": error}},
          open(os.path.join({out!r}, f"rank{{rank}}.json"), "w"))
dist.destroy_process_group()
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
'''


def test_fsdp_processes_load_the_base_one_at_a_time(tmp_path, tiny_folder):
    """--fsdp with a load that copies the weights (a float32 file loaded as bfloat16): each process loads the whole
    base, injects the adapter and keeps its shard in turn, so the host holds one whole copy at a time (the loads'
    time spans do not overlap); the shards are the loaded weights and the adapter is the one a single process
    injects with the same seed; a mistake on process 0 stops both processes with the same one-line error instead
    of leaving process 1 waiting. (A load in the file's own dtype maps the file and runs at once: the other
    torchrun tests in this file take that path.)"""
    script = tmp_path / "load.py"
    script.write_text(LOAD_SCRIPT.format(tests=str(TESTS), folder=str(tiny_folder), out=str(tmp_path)))
    done = subprocess.run([*TORCHRUN, str(script)], env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    (start0, end0), (start1, end1) = ranks[0]["spans"][0], ranks[1]["spans"][0]
    assert end0 <= start1, "process 1 loaded while process 0 still held its whole copy"
    for got in ranks:
        assert got["units"] == 4 and got["base_equal"] and got["A_equal"]
        assert got["error"] is not None and "--targets 'q_prj' matches no module" in got["error"]
    assert ranks[0]["local_rows"] + ranks[1]["local_rows"] == 32  # q_proj's 32 rows, split over the two processes


def test_fsdp_loads_in_the_training_devices_dtype(tiny_folder):
    """--fsdp loads on the CPU before sharding: the weights still get the training device's dtype (bfloat16 for
    CUDA, not the CPU's float32), and the file's dtype decides whether the processes must load in turn."""
    from lorakit.train.config import TrainConfig
    from lorakit.train.runner import load_dtype, stored_dtype

    config = TrainConfig(model=str(tiny_folder))
    assert load_dtype(config, torch.device("cuda", 1)) == torch.bfloat16
    assert load_dtype(config, torch.device("cpu")) == torch.float32
    assert load_dtype(config.replace(dtype="fp16"), torch.device("cuda")) == torch.float16
    assert stored_dtype(str(tiny_folder)) == torch.float32
    assert stored_dtype(str(tiny_folder / "missing")) is None
