"""LoRA vs full fine-tuning on the embedded task: held-out exact match, trainable share, time, peak memory.

Both methods run the same ``lorakit train`` pipeline (same data, steps, batch, schedule, evaluation) in their own
child process, so each peak memory figure is that method's alone: ``torch.cuda.max_memory_allocated`` on CUDA,
the process's peak resident set (``ru_maxrss``) on CPU. Full fine-tuning trains every weight in float32 (bf16
autocast on CUDA) with its own learning rate (LoRA's 2e-3 would wreck a full model).

    python bench/lora_vs_full.py                          # CPU, the default demo's settings (~10-15 min on 2 cores)
    python bench/lora_vs_full.py --device cuda --steps 150 # one GPU
    python bench/lora_vs_full.py --methods lora,dora,loraplus,full --steps 40

Writes the rows as JSON to $OUT/lora_vs_full_<device>.json (bench/results/ when $OUT is unset), prints a table, and
replaces its own marked section of docs/PERFORMANCE.md (--no-docs to leave the file alone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# method -> TrainConfig overrides (on top of the demo defaults)
METHODS = {
    "lora": {},
    "dora": {"variant": "dora"},
    "loraplus": {"loraplus_ratio": 16.0, "lr": 5e-4},
    "full": {"full": True},
}
DOC_START = "<!-- lora_vs_full:start -->"
DOC_END = "<!-- lora_vs_full:end -->"


def run_child(method: str, args: argparse.Namespace, json_path: Path) -> None:
    """One method, in this process: the same run as ``lorakit train`` plus peak memory."""
    import torch

    from lorakit.train.config import TrainConfig
    from lorakit.train.runner import run_training

    overrides = dict(METHODS[method])
    if method == "full":
        overrides["lr"] = args.full_lr
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(out=str(Path(tmp) / method), max_steps=args.steps, eval_examples=args.eval_examples,
                             device=args.device, progress=False, save_every=0, samples=0, seed=args.seed, **overrides)
        started = time.perf_counter()
        summary = run_training(config)
        summary["wall_seconds"] = round(time.perf_counter() - started, 1)
    summary["method"] = method
    summary["lr"] = config.learning_rate
    if torch.cuda.is_available() and config.device != "cpu":
        summary["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        summary["peak_kind"] = "cuda max_memory_allocated"
        summary["device_name"] = torch.cuda.get_device_name()
    else:
        summary["peak_memory_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)  # KiB
        summary["peak_kind"] = "process peak RSS"
        summary["device_name"] = platform.processor() or platform.machine()
    summary["torch"] = torch.__version__
    summary["threads"] = torch.get_num_threads()
    json_path.write_text(json.dumps(summary, indent=2))


def table(rows: list[dict]) -> str:
    lines = ["| method | lr | steps | exact match before -> after | trainable | train time (s) | total time (s) | peak memory (GiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        before = "-" if r.get("exact_match_before") is None else f"{100 * r['exact_match_before']:.1f}%"
        after = "-" if r.get("exact_match_after") is None else f"{100 * r['exact_match_after']:.1f}%"
        lines.append(f"| {r['method']} | {r['lr']:g} | {r['steps']} | {before} -> {after} | "
                     f"{r['trainable_parameters']:,} ({100 * r['trainable_share']:.2f}%) | {r['train_seconds']:.0f} | "
                     f"{r['wall_seconds']:.0f} | {r['peak_memory_gib']:.2f} ({r['peak_kind']}) |")
    return "\n".join(lines)


def update_docs(rows: list[dict], command: str) -> None:
    path = REPO / "docs" / "PERFORMANCE.md"
    first = rows[0]
    section = "\n".join([
        DOC_START,
        "## LoRA vs full fine-tuning on the embedded task",
        "",
        f"SmolLM2-135M-Instruct on the embedded `orders` task (400 training chats, exact match of greedy generations on "
        f"{first.get('eval_examples', '?')} held-out ones), the default `lorakit train` settings for LoRA (rank 16, "
        f"alpha 32, all linear layers, batch 8, cosine schedule) and the same steps, data and evaluation for full "
        f"fine-tuning. Measured {time.strftime('%Y-%m-%d')} on {first['device']} ({first['device_name']}, torch "
        f"{first['torch']}, {first['threads']} threads); each method in its own process. Command: `{command}`. "
        "Raw rows: `bench/results/lora_vs_full_<device>.json`.",
        "",
        table(rows),
        DOC_END,
    ])
    text = path.read_text(encoding="utf-8") if path.is_file() else "# lorakit performance\n"
    if DOC_START in text and DOC_END in text:
        head, rest = text.split(DOC_START, 1)
        text = head + section + rest.split(DOC_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + section + "\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="lora,full", help="comma-separated: " + ", ".join(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per method (default: the demo's)")
    parser.add_argument("--eval-examples", type=int, default=60, help="held-out examples scored (default 60)")
    parser.add_argument("--full-lr", type=float, default=1e-4, help="learning rate of full fine-tuning (default 1e-4)")
    parser.add_argument("--device", choices=("cuda", "cpu", "mps"), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-docs", action="store_true", help="do not touch docs/PERFORMANCE.md")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-json", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        run_child(args.child, args, Path(args.child_json))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method {unknown[0]!r}; choose from {', '.join(METHODS)}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            json_path = Path(tmp) / f"{method}.json"
            child = [sys.executable, __file__, "--child", method, "--child-json", str(json_path),
                     "--eval-examples", str(args.eval_examples), "--full-lr", str(args.full_lr), "--seed", str(args.seed)]
            if args.steps:
                child += ["--steps", str(args.steps)]
            if args.device:
                child += ["--device", args.device]
            print(f"== {method}", flush=True)
            subprocess.run(child, check=True)
            rows.append(json.loads(json_path.read_text()))
    out_dir = Path(os.environ.get("OUT") or REPO / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    out_file = out_dir / f"lora_vs_full_{rows[0]['device']}.json"
    out_file.write_text(json.dumps(rows, indent=2) + "\n")
    print()
    print(table(rows))
    print(f"\nrows: {out_file}")
    if not args.no_docs:
        update_docs(rows, "python bench/lora_vs_full.py " + " ".join(sys.argv[1:]))
        print("docs/PERFORMANCE.md: section updated")
    return 0


if __name__ == "__main__":
    sys.exit(main())
