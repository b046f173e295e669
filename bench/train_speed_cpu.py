"""LoRA training speed and memory on a CPU: lorakit against PEFT, the setting of ANCHORS.md's CPU row.

SmolLM2-135M-Instruct (the embedded model, float32), LoRA r=16 / alpha 32 on the seven projections, batch 4 x 256
tokens, AdamW at 2e-4. The timing runs both systems in one process, their steps interleaved (lorakit, peft,
lorakit, ...), so that a busy machine slows both alike; each peak resident set comes from a child
process that runs two steps of one system alone (its VmHWM). A step is what each system's user runs:

* ``peft``: ``get_peft_model``, then ``model(input_ids, labels=labels).loss.backward()`` and ``optimizer.step()``
  (transformers computes the full float32 logits and their cross-entropy);
* ``lorakit``: ``inject``, then ``lorakit.train.loop.accumulate_gradients`` (what ``lorakit train`` calls: on a
  CPU the output head runs only on the supervised positions) and ``optimizer.step()``.

Two kinds of rows: ``text`` (every token supervised) and ``chat`` (the second half of each row supervised, as
an assistant answer after its prompt). Both systems start from the same adapter (lorakit's init, copied into PEFT's
layers, on the same base), and the losses of their first step must agree: the check that both train the same
thing.

    python bench/train_speed_cpu.py                       # ~6 min on 2 idle cores
    python bench/train_speed_cpu.py --steps 3 --data text --threads 2

Writes $OUT/train_speed_cpu.json (bench/results/ when $OUT is unset) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def batch_for(data: str, vocab: int, batch: int, length: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, vocab, (batch, length), generator=generator)
    labels = ids.clone()
    if data == "chat":
        labels[:, : length // 2] = -100  # the prompt half is not supervised
    return ids, labels


def make_step(system: str, data: str, args: argparse.Namespace):
    """``(step, first_loss)``: one optimizer step of ``system`` on its own copy of the model, and its first loss."""
    import torch

    import lorakit
    from lorakit.train.loop import accumulate_gradients

    torch.manual_seed(0)
    model, _ = lorakit.load_base("smollm2-135m", dtype=torch.float32)
    model.train()
    ids, labels = batch_for(data, model.config.vocab_size, args.batch, args.length)
    torch.manual_seed(0)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules=TARGETS))
    if system == "lorakit":
        tokens = int((labels[:, 1:] != -100).sum())

        def step_loss() -> float:
            return accumulate_gradients(model, [{"input_ids": ids, "labels": labels}], tokens, torch.device("cpu")) / tokens
    else:
        import peft

        ours = {n.replace(".adapters.default", "").replace(".base_layer", ""): p.detach().clone()
                for n, p in model.named_parameters() if "lora_" in n}
        model = lorakit.merge_and_unload(model)  # B = 0: the base unchanged, lorakit's layers gone
        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS))
        with torch.no_grad():  # the same starting adapter as lorakit's run
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(ours[name.replace("base_model.model.", "").replace(".default.weight", "")])

        def step_loss() -> float:
            loss = model(input_ids=ids, labels=labels).loss
            loss.backward()
            return float(loss.detach())

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4)
    losses = []

    def step() -> None:
        losses.append(step_loss())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, losses


def run_memory_child(system: str, data: str, args: argparse.Namespace) -> dict:
    """Two steps of one system in this process: its peak resident set alone."""
    import torch

    torch.set_num_threads(args.threads)
    step, losses = make_step(system, data, args)
    step()
    step()
    return dict(system=system, data=data, peak_rss_gb=round(peak_rss_bytes() / 2**30, 2), first_loss=losses[0])


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux (``ru_maxrss`` would carry over the parent's peak, which
    survives fork + exec), else ``ru_maxrss`` (bytes on macOS)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def time_both(data: str, args: argparse.Namespace) -> dict:
    """Both systems in this process, their steps interleaved (lorakit, peft, lorakit, ...), so that whatever else
    runs on the machine slows both alike; the first step of each warms up and is not timed."""
    import torch

    torch.set_num_threads(args.threads)
    steps = {s: make_step(s, data, args) for s in ("lorakit", "peft")}
    times: dict[str, list[float]] = {s: [] for s in steps}
    for _ in range(args.steps + 1):
        for system, (step, _) in steps.items():
            started = time.perf_counter()
            step()
            times[system].append(time.perf_counter() - started)
    return {s: dict(step_seconds=[round(t, 3) for t in times[s][1:]], first_loss=steps[s][1][0]) for s in steps}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per system and data kind (after one warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--data", default="text,chat", help="comma list of text, chat")
    parser.add_argument("--child", nargs=2, metavar=("SYSTEM", "DATA"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_memory_child(*args.child, args)))
        return 0

    import torch
    import transformers

    summary, ok = [], True
    for data in args.data.split(","):
        timed = time_both(data, args)
        memory = {}
        for system in ("lorakit", "peft"):
            command = [sys.executable, __file__, "--child", system, data, "--threads", str(args.threads),
                       "--batch", str(args.batch), "--length", str(args.length)]
            done = subprocess.run(command, capture_output=True, text=True)
            if done.returncode != 0:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            memory[system] = json.loads(done.stdout.strip().splitlines()[-1])
        median = {s: statistics.median(timed[s]["step_seconds"]) for s in timed}
        loss_gap = abs(timed["lorakit"]["first_loss"] - timed["peft"]["first_loss"])
        ok &= loss_gap < 1e-3
        row = dict(data=data, lorakit_s=round(median["lorakit"], 3), peft_s=round(median["peft"], 3),
                   speedup=round(median["peft"] / median["lorakit"], 3),
                   lorakit_tokens_per_s=round(args.batch * args.length / median["lorakit"], 1),
                   peft_tokens_per_s=round(args.batch * args.length / median["peft"], 1),
                   lorakit_peak_gb=memory["lorakit"]["peak_rss_gb"], peft_peak_gb=memory["peft"]["peak_rss_gb"],
                   first_loss_gap=loss_gap, lorakit_steps=timed["lorakit"]["step_seconds"],
                   peft_steps=timed["peft"]["step_seconds"])
        summary.append(row)
        print(f"{data}: lorakit {row['lorakit_s']:.2f} s/step, peft {row['peft_s']:.2f} s/step", flush=True)
    record = dict(date=time.strftime("%Y-%m-%d"), machine=f"{platform.machine()}, {os.cpu_count()} cores",
                  threads=args.threads, torch=torch.__version__, transformers=transformers.__version__,
                  python=platform.python_version(), command="python bench/train_speed_cpu.py " + " ".join(sys.argv[1:]),
                  batch=args.batch, length=args.length, rows=summary, checks_ok=ok)
    out = Path(os.environ.get("OUT") or REPO / "bench" / "results") / "train_speed_cpu.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=out.parent, delete=False, suffix=".tmp") as handle:
        json.dump(record, handle, indent=1)
    os.replace(handle.name, out)
    print("\n| data | lorakit s/step | PEFT s/step | speed-up | lorakit peak GB | PEFT peak GB | first-loss gap |")
    print("|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['data']} | {s['lorakit_s']:.2f} | {s['peft_s']:.2f} | {s['speedup']:.2f}x | "
              f"{s['lorakit_peak_gb']:.2f} | {s['peft_peak_gb']:.2f} | {s['first_loss_gap']:.1e} |")
    print(f"written {out}; checks {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
