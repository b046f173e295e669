"""Moving a one-process recipe to `torchrun --nproc_per_node 2` (CPU, gloo), as a user would.

* the README's multi-GPU command, copied with only --nproc_per_node changed, trains; SIGTERM sent to one process
  (a scheduler preempting it) stops every process at the same step and rank 0 names the checkpoint and the torchrun
  command that resumes it (before: that process alone exited, torchrun killed rank 0 with a signal, and the user read
  only torchrun's ChildFailedError); that command resumes it; SIGKILL of one process (the out-of-memory killer) is
  said by rank 0 in one line with the checkpoint (before: a gloo traceback, or nothing);
* a mistake every process makes (data packed into fewer rows than a batch) is said in one line also when rank 1
  reaches it first (before: rank 1 exited, torchrun killed rank 0 before it printed, and no lorakit line was left);
  Ctrl-C still ends every process at once;
* QLoRA (an NF4 base) under data parallel, and FSDP2, both with packing on a data set that does not divide into the
  micro-batches (35 rows), give the adapter of one process with the same global batch, and the rows each epoch
  leaves out are said.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open

from conftest import assert_close
from test_train_helpers import REPO, task_records, tiny_folder, tiny_tokenizer, write_jsonl  # noqa: F401

TESTS = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]


def _adapter(folder: Path) -> dict:
    with safe_open(str(folder / "adapter_model.safetensors"), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


def _readme_command() -> list[str]:
    """The README's "Many GPUs" command, as its words."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index("## Many GPUs"):]
    line = re.search(r"```bash\n(torchrun [^\n]+)\n```", section).group(1)
    return line.split()


def _workers(pid: int) -> dict[int, int]:
    """{RANK: pid} of the worker processes torchrun (``pid``) started (Linux /proc)."""
    found = {}
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            try:
                env = dict(kv.split("=", 1) for kv in Path(f"/proc/{child}/environ").read_text().split("\0") if "=" in kv)
            except OSError:
                continue
            if "RANK" in env:
                found[int(env["RANK"])] = child
    return found


def _train_lines(metrics: Path) -> int:
    return sum('"kind": "train"' in l for l in metrics.read_text().splitlines()) if metrics.is_file() else 0


def _signal_rank1(args: list[str], run: Path, sig: signal.Signals, after: int) -> str:
    """Launch ``torchrun ... ARGS``, send ``sig`` to rank 1 alone once metrics.jsonl holds ``after`` train lines;
    the group's stderr (it must end within a minute of the signal)."""
    group = subprocess.Popen([*TORCHRUN, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and group.poll() is None and _train_lines(run / "metrics.jsonl") < after:
            time.sleep(0.02)
        workers = _workers(group.pid)
        assert sorted(workers) == [0, 1], (workers, group.poll())
        os.kill(workers[1], sig)
        sent = time.monotonic()
        _, err = group.communicate(timeout=120)
    finally:
        if group.poll() is None:
            for pid in [*_workers(group.pid).values(), group.pid]:
                os.kill(pid, signal.SIGKILL)
            group.communicate()
    assert group.returncode != 0 and time.monotonic() - sent < 60, "the processes did not stop together"
    return err


def test_readme_command_then_sigterm_and_sigkill_of_one_process_name_the_resume_command(tmp_path, tiny_folder):
    """SIGTERM to rank 1 (preemption): every process stops at the next step, rank 0 names the checkpoint; the
    command it prints resumes the run; SIGKILL of rank 1 there (the out-of-memory killer): rank 0 says so in one line
    with the checkpoint (before: killed by torchrun's SIGTERM in its teardown, it said nothing)."""
    words = _readme_command()
    assert words[:3] == ["torchrun", "--nproc_per_node", "4"] and words[3:6] == ["-m", "lorakit", "train"], words
    data = write_jsonl(tmp_path / "train.jsonl", task_records(64, seed=1))
    args = [{"./llama-3.1-8b": str(tiny_folder), "train.jsonl": str(data)}.get(w, w) for w in words[3:]]
    run = tmp_path / "run"
    # a run long enough to be stopped: checkpoints every 2 steps
    err = _signal_rank1([*args, "--epochs", "1000", "--save-every", "2", "--eval-examples", "0", "--out", str(run)],
                        run, signal.SIGTERM, after=3)
    # the README's command trains as the README says: 4 x 2 x 2 processes
    assert "data parallel over 2 processes: global batch 16 rows per optimizer step (--batch-size 4 x 2 accumulation" \
           " x 2 processes)" in err, err[-3000:]
    hints = [l for l in err.splitlines() if l.startswith("training ")]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    command = f"torchrun --nproc_per_node 2 -m lorakit train --resume {run}"
    step = _train_lines(run / "metrics.jsonl")  # rank 0 saved a checkpoint at the step they all stopped at
    assert latest == f"step-{step:06d}" and step >= 3, (latest, step)
    assert hints == [f"training stopped by SIGTERM at step {step} of 4000, saved there; the last checkpoint is "
                     f"{run / 'checkpoints' / latest}; continue with: {command}"], err[-3000:]
    assert err.count("lorakit train: stopped by SIGTERM") == 1, err[-3000:]
    # nothing half-written: the checkpoints are whole, no temporary folder is left, no adapter was saved
    leftovers = [p.name for p in run.rglob("*") if "tmp" in p.name]
    assert not leftovers and not (run / "adapter").exists(), leftovers
    assert (run / "checkpoints" / latest / "state.json").is_file()

    done = _train_lines(run / "metrics.jsonl")
    err = _signal_rank1(command.split()[3:], run, signal.SIGKILL, after=done + 3)
    assert err.count("resuming from") == 1, err[-3000:]
    latest = (run / "checkpoints" / "latest").read_text().strip()
    said = [l for l in err.splitlines() if l.startswith("lorakit train:")]
    assert len(said) == 1 and said[0].startswith("lorakit train: error: another process of this run ended after step "), \
        err[-3000:]
    assert said[0].endswith(f"; the last checkpoint is {run / 'checkpoints' / latest}; continue with: {command}"), said
    assert int(latest.split("-")[1]) > done  # the resumed run went on from where it stopped


SLOW_RANK0 = '''
import os, sys, time
from lorakit.train import preflight
if os.environ["RANK"] == "0":  # rank 0 behind rank 1 after they joined the group (it writes the run folder, prints)
    check = preflight.check_batch_fits
    def slow_check(*args, **kwargs):
        time.sleep(2)
        return check(*args, **kwargs)
    preflight.check_batch_fits = slow_check
from lorakit.cli import main
sys.argv = ["lorakit", *sys.argv[1:]]
sys.exit(main())
'''


def test_a_mistake_rank1_reaches_first_is_still_said_once(tmp_path, tiny_folder):
    """35 short rows packed into 3 rows cannot fill --batch-size 4: both processes find it, rank 1 first."""
    script = tmp_path / "slow_rank0.py"
    script.write_text(SLOW_RANK0)
    data = write_jsonl(tmp_path / "train.jsonl", task_records(35, seed=1))
    done = subprocess.run([*TORCHRUN, str(script), "train", "--model", str(tiny_folder), "--data", str(data), "--pack",
                           "--batch-size", "4", "--out", str(tmp_path / "run")], env=ENV, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode != 0
    said = [l for l in done.stderr.splitlines() if l.startswith("lorakit train: error:")]
    assert said == ["lorakit train: error: --batch-size 4 x 2 processes is more than the 3 packed training rows; use "
                    "--batch-size 1 or less"], done.stderr[-3000:]  # said by rank 0, once: rank 1 waited for it
    assert not (tmp_path / "run").exists()  # the failed new run leaves no folder behind


FAILING = '''
import sys, time
import lorakit.cli
import lorakit.train.cli as command  # train: torchrun refuses the other commands
from lorakit.errors import LorakitError
lorakit.cli.RANK0_GRACE_S = 3.0
def fail(args):
    raise {error}
command.run = fail
sys.argv = ["lorakit", "train"]
print(time.time(), file=sys.stderr, flush=True)  # the CLI ends in os._exit under torchrun: timed from outside
lorakit.cli.main()
'''


def test_rank1_waits_for_rank0_on_a_mistake_not_on_ctrl_c(tmp_path):
    """Rank 1 alone (rank 0 silent): a mistake is said by rank 1 after the grace, naming the process; Ctrl-C (which
    torchrun passes to every process, and then waits for each) ends rank 1 at once without a word, as before."""
    env = {**ENV, "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    for error, code in (("LorakitError('the data is wrong')", 2), ("KeyboardInterrupt()", 130)):
        script = tmp_path / "fail.py"
        script.write_text(FAILING.format(error=error))
        done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
        waited = time.time() - float(done.stderr.split()[0])
        lines = done.stderr.strip().splitlines()[1:]
        assert done.returncode == code, done.stderr[-2000:]
        if code == 2:
            assert lines == ["lorakit train: error: the data is wrong (process 1 of 2)"] and waited >= 3.0, lines
        else:
            assert lines == [] and waited < 3.0, (lines, waited)


TWO = '''
import os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import torch.distributed as dist
from conftest import tiny_llama
from test_train_helpers import task_records, tiny_tokenizer
from lorakit.quant.quantize import quantize
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
dist.init_process_group("gloo")
tok = tiny_tokenizer()
for name, fsdp in (("nf4", False), ("fsdp", True)):
    model = tiny_llama(seed=0, vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2)
    if not fsdp:
        quantize(model)
    train(model, tok, task_records(35, seed=1), TrainConfig(**{settings!r}, batch_size=2, global_batch=8, fsdp=fsdp,
                                                             out=os.path.join({out!r}, name)))
# process 1 killed outright after step 2 (no word, no clean exit): process 0 says so, naming the last checkpoint
from lorakit.errors import LorakitError
def die(step, entry):
    if step == 2 and dist.get_rank() == 1:
        os._exit(9)
try:
    train(tiny_llama(seed=0, vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2), tok,
          task_records(35, seed=1), TrainConfig(rank=4, max_steps=5, progress=False, save_every=1, eval_examples=0,
                                                 batch_size=2), out=os.path.join({out!r}, "killed"), on_step=die)
    said = None
except LorakitError as error:
    said = str(error)
open(os.path.join({out!r}, f"said{{dist.get_rank()}}.txt"), "w").write(repr(said))
sys.stdout.flush(); sys.stderr.flush()
os._exit(0)
'''
SETTINGS = dict(rank=4, max_steps=2, progress=False, save_every=0, eval_examples=0, lr=5e-3, pack=True, max_length=32)


def _train_one(tmp_path: Path, name: str, tok) -> None:
    """The one-process reference of ``name`` (the same global batch: micro-batches of 4, accumulation 2)."""
    from conftest import tiny_llama
    from lorakit.quant.quantize import quantize
    from lorakit.train.config import TrainConfig
    from lorakit.train.loop import train

    model = tiny_llama(seed=0, vocab_size=32, hidden_size=32, intermediate_size=40, num_hidden_layers=2)
    if name == "nf4":
        quantize(model)
    train(model, tok, task_records(35, seed=1),
          TrainConfig(**SETTINGS, batch_size=4, grad_accum=2, out=str(tmp_path / f"one-{name}")))


def test_qlora_data_parallel_and_fsdp_with_packing_and_a_ragged_set_match_one_process(tmp_path):
    """35 rows packed into 13, micro-batches of 2 x 2 processes: one packed row is left out of each epoch, the same
    one as for one process with micro-batches of 4 (the shuffle is over the whole set, then split by rank), and the
    user is told so: 2 steps x 2 accumulation are 4 micro-batches, past the epoch's 3 (the note compared the steps,
    not the micro-batches, with the epoch and said nothing)."""
    script = tmp_path / "two.py"
    script.write_text(TWO.format(tests=str(TESTS), settings=SETTINGS, out=str(tmp_path)))
    # two processes started by hand (torchrun's agent would end process 0 as soon as process 1 dies)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, str(script)], stderr=subprocess.PIPE, text=True,
                              env={**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}) for rank in (0, 1)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert procs[0].returncode == 0, errs[0][-3000:]
    assert procs[1].returncode == 9, errs[1][-3000:]
    assert errs[0].count("each epoch trains on 12 of the 13 rows") == 2 and "each epoch" not in errs[1], errs[0][-3000:]
    killed = tmp_path / "killed"
    assert (tmp_path / "said0.txt").read_text() == repr(
        f"another process of this run ended after step 2 (its own error, if it had one, is printed above; else it was "
        f"killed or ran out of memory: torchrun's report names it); the "
        f"last checkpoint is {killed / 'checkpoints' / 'step-000001'}; continue with: torchrun --nproc_per_node 2 -m "
        f"lorakit train --resume {killed}")
    tok = tiny_tokenizer()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers: on a loaded 2-core machine more threads made these runs 2-5x slower
    try:
        for name in ("nf4", "fsdp"):
            _train_one(tmp_path, name, tok)
    finally:
        torch.set_num_threads(threads)
    for name in ("nf4", "fsdp"):
        one, got = _adapter(tmp_path / f"one-{name}" / "adapter"), _adapter(tmp_path / name / "adapter")
        assert got.keys() == one.keys() and any(float(t.abs().max()) > 0 for k, t in one.items() if "lora_B" in k)
        for key in one:
            assert_close(got[key], one[key], msg=f"{name} {key}")
        losses = [json.loads(l)["loss"] for l in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        reference = [json.loads(l)["loss"] for l in (tmp_path / f"one-{name}" / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 2 and all(abs(a - b) < 1e-5 * abs(b) for a, b in zip(losses, reference)), (losses, reference)
