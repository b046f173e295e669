"""Host memory of ``lorakit train --fsdp`` while the base loads: every process at once against lorakit's way.

Before FSDP2 shards the base, each process reads the whole checkpoint into CPU memory. When the file is stored in
the dtype it loads in, transformers maps the safetensors files and the processes share those pages; otherwise each
process makes a private whole copy, and N processes loading at once hold N copies together (8 x a 70B base
converted to bf16: 1.1 TB of host memory). ``lorakit.train.runner.load_sharded`` (what ``lorakit train --fsdp``
runs) loads at once in the first case and in turn in the second: each process loads, injects the adapter and
keeps its shard before the next begins. Both ways run here, one launch each, on the same saved Llama-shaped
checkpoint with random weights, through the same lorakit functions:

* ``together``: every process ``load_model`` -> ``prepare_model`` (inject the adapter) -> ``apply_fsdp`` at once;
* ``lorakit``: ``load_sharded``.

The launcher samples the summed proportional set size (``/proc/PID/smaps_rollup`` Pss) of the worker processes every
10 ms and reports its peak, with the wall time until every process holds its shard. CPU and gloo: the effect is on
host memory, which is the same on a GPU machine (there the shards then move to the GPUs).

    python bench/fsdp_host_memory.py --procs 4 --layers 6 --checkpoint-dtype float32   # loads copy: in turn
    python bench/fsdp_host_memory.py --procs 4 --layers 6                              # bf16 file: mapped, at once

Writes $OUT/fsdp_host_memory_<checkpoint dtype>.json (bench/results/ when $OUT is unset) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(folder: str, mode: str, out: str) -> None:
    import torch
    import torch.distributed as dist

    sys.path.insert(0, str(ROOT))
    from lorakit.train import runner
    from lorakit.train.config import TrainConfig
    from lorakit.train.distributed import apply_fsdp
    from lorakit.train.loop import prepare_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    config = TrainConfig(model=folder, rank=16, fsdp=True, dtype="bfloat16")
    device = torch.device("cpu")
    start = time.monotonic()
    if mode == "together":
        model, _ = runner.load_model(config, device)
        torch.manual_seed(config.seed)
        prepare_model(model, config)
        apply_fsdp(model, device)
    else:
        model, _ = runner.load_sharded(config, device)
    dist.barrier()
    seconds = time.monotonic() - start
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps({"seconds": seconds}))
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def pss_bytes(pid: int) -> int:
    """Proportional set size: memory shared by several processes (the checkpoint's page-cache pages that safetensors
    maps into each of them) counts once over all of them, where summing resident sizes would count it per process."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child, *descendants(child)]
    return found


def launch(folder: Path, mode: str, procs: int, scratch: Path) -> dict:
    out = scratch / f"{mode}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
               __file__, "--worker", str(folder), mode, str(out)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    launcher_pids: set[int] = {process.pid}
    peak = 0
    while process.poll() is None:
        pids = descendants(process.pid)
        launcher_pids.update(p for p in pids if not p_is_worker(p))
        peak = max(peak, sum(pss_bytes(p) for p in pids if p not in launcher_pids))
        time.sleep(0.01)
    if process.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{process.stderr.read()[-3000:]}")
    return {"mode": mode, "processes": procs, "peak_host_gib": round(peak / 2**30, 2),
            "seconds": round(json.loads(out.read_text())["seconds"], 1)}


def p_is_worker(pid: int) -> bool:
    try:
        return "--worker" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return True  # gone: counts nothing either way


def save_checkpoint(folder: Path, layers: int, hidden: int, dtype: str) -> float:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
                         num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256),
                         vocab_size=32000, tie_word_embeddings=False, max_position_embeddings=2048)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(folder)
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1}, unk_token="<unk>")),
                                        eos_token="</s>", pad_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(folder)
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--checkpoint-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                        help="the saved weights' dtype; the processes load bfloat16 either way (float32 files: a copy)")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        checkpoint_gib = save_checkpoint(scratch / "base", args.layers, args.hidden, args.checkpoint_dtype)
        rows = [launch(scratch / "base", mode, args.procs, scratch) for mode in ("together", "lorakit")]
    import torch

    for row in rows:
        row.update(checkpoint_gib=round(checkpoint_gib, 2), checkpoint_dtype=args.checkpoint_dtype, torch=torch.__version__.split("+")[0],
                   date=time.strftime("%Y-%m-%d"), cpus=os.cpu_count())
    print(f"\ncheckpoint {checkpoint_gib:.2f} GiB ({args.checkpoint_dtype}), {args.procs} processes, CPU/gloo, loaded as bf16")
    print(f"{'load':<10} {'peak host GiB':>14} {'seconds':>8}")
    for row in rows:
        print(f"{row['mode']:<10} {row['peak_host_gib']:>14.2f} {row['seconds']:>8.1f}")
    target = Path(os.environ.get("OUT") or ROOT / "bench" / "results") / f"fsdp_host_memory_{args.checkpoint_dtype}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(rows, indent=1) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
