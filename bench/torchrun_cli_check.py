"""`lorakit train` itself under torchrun on the GPUs of one machine: data parallel and --fsdp, 1 and N processes.

bench/multi_gpu.py times lorakit's distributed training functions; this script runs the user's command line, as the
README's "Many GPUs" section writes it, end to end: a small random Llama folder (the tokenizer of --tokenizer-from,
e.g. a copy of SmolLM2's folder without weights), a chat JSONL file, then for each mode
`torchrun --standalone --nproc_per_node N -m lorakit train ... --global-batch G` at 1 and N processes. Then, in
this process, each saved adapter is loaded with lorakit and with PEFT, and:

- the N-process adapter matches the 1-process one (same global batch, so the same training up to bf16 reduction
  order): relative difference of the adapter tensors and of the adapted logits;
- lorakit's and PEFT's logits for the same adapter agree;
- the adapter moved the logits away from the base.

Usage (a GPU machine; gloo on CPUs works too but slowly):
    python bench/torchrun_cli_check.py --tokenizer-from .gpu_assets/smol [--procs 2] [--steps 12]
Writes $OUT/torchrun_cli_check.json (bench/results/ when $OUT is unset) and prints a table. Exits non-zero when a
check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # lorakit from this checkout (the GPU image has no installed copy)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def make_model_folder(folder: Path, tokenizer_from: Path) -> None:
    """A random Llama (4 layers, hidden 256) saved in bf16 with the tokenizer files of ``tokenizer_from``."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                         tie_word_embeddings=True, torch_dtype="bfloat16")
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)


def make_data(path: Path, n: int = 96) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(n):
            a, b = i % 13 + 2, i % 7 + 3
            handle.write(json.dumps({"messages": [{"role": "user", "content": f"What is {a} times {b}?"},
                                                  {"role": "assistant", "content": f"{a} times {b} is {a * b}."}]}) + "\n")


def train(model: Path, data: Path, out: Path, procs: int, fsdp: bool, args) -> dict:
    command = ["torchrun", "--standalone", "--nproc_per_node", str(procs), "-m", "lorakit", "train",
               "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", str(args.steps),
               "--batch-size", str(args.global_batch // args.procs), "--global-batch", str(args.global_batch),
               "--lr", "1e-3", "--seed", "0", "--eval-every", "0"]
    if fsdp:
        command.append("--fsdp")
    command += args.extra.split()
    start = time.time()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=args.timeout)
    seconds = time.time() - start
    ok = done.returncode == 0 and (out / "adapter" / "adapter_config.json").exists()
    if not ok:
        print(f"!! {' '.join(command)} failed (exit {done.returncode})\n{done.stderr[-3000:]}", flush=True)
    return {"procs": procs, "fsdp": fsdp, "ok": ok, "seconds": round(seconds, 1), "exit": done.returncode,
            "stderr_tail": done.stderr[-600:]}


def adapted_logits(model_dir: Path, adapter: Path, ids):
    """(lorakit logits, PEFT logits, base logits, the adapter's tensors) in float32 on the GPU (or CPU)."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    import lorakit

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        plain = base(input_ids=ids.to(device)).logits.float().cpu()
        lorakit.load_adapter(base, adapter)
        mine = base(input_ids=ids.to(device)).logits.float().cpu()
    theirs_base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(theirs_base, adapter).eval()
        peft_logits = theirs(input_ids=ids.to(device)).logits.float().cpu()
    return mine, peft_logits, plain, load_file(str(adapter / "adapter_model.safetensors"))


def rel(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-from", required=True, type=Path)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--timeout", type=int, default=240)
    parser.add_argument("--modes", default="ddp,fsdp", help="comma-separated: ddp, fsdp")
    parser.add_argument("--extra", default="", help="more lorakit train arguments, e.g. '--max-grad-norm 0'")
    args = parser.parse_args()
    import torch

    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="torchrun_cli_"))
    model, data = work / "model", work / "train.jsonl"
    make_model_folder(model, args.tokenizer_from)
    make_data(data)
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(1))
    rows, failed = [], []
    for fsdp in [mode == "fsdp" for mode in args.modes.split(",")]:
        runs = {}
        for procs in (1, args.procs):
            out = work / f"{'fsdp' if fsdp else 'ddp'}_{procs}"
            runs[procs] = row = train(model, data, out, procs, fsdp, args)
            row["mode"] = "fsdp" if fsdp else "ddp"
            if row["ok"]:
                mine, peft_logits, plain, tensors = adapted_logits(model, out / "adapter", ids)
                row.update(lorakit_vs_peft=rel(mine, peft_logits), adapter_moves_logits=rel(mine, plain))
                row["_logits"], row["_tensors"] = mine, tensors
            rows.append(row)
        one, many = runs[1], runs[args.procs]
        if one["ok"] and many["ok"]:
            keys = sorted(one["_tensors"])
            diffs = {k: rel(many["_tensors"][k].float(), one["_tensors"][k].float()) for k in keys}
            many["tensors_vs_1_process"] = max(diffs.values())
            many["worst_tensors"] = dict(sorted(diffs.items(), key=lambda kv: -kv[1])[:6])
            many["best_tensors"] = dict(sorted(diffs.items(), key=lambda kv: kv[1])[:3])
            print(f"{many['mode']}: worst {many['worst_tensors']}\nbest {many['best_tensors']}", flush=True)
            many["logits_vs_1_process"] = rel(many["_logits"], one["_logits"])
    for row in rows:
        row.pop("_logits", None)
        row.pop("_tensors", None)
        checks = [row["ok"], row.get("lorakit_vs_peft", 1) < 1e-4, row.get("adapter_moves_logits", 0) > 1e-3]
        if row["procs"] > 1:  # bf16 training: the reduction order differs, the training must not
            checks.append(row.get("logits_vs_1_process", 1) < 0.05)
        row["checks_ok"] = all(checks)
        if not row["checks_ok"]:
            failed.append(f"{row['mode']} x{row['procs']}")
    result = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
              "gpus": torch.cuda.device_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
              "command": " ".join(sys.argv), "rows": rows}
    (out_dir / "torchrun_cli_check.json").write_text(json.dumps(result, indent=1))
    print("| mode | processes | exit | seconds | lorakit vs PEFT logits | adapter moves logits | tensors vs 1 process "
          "| logits vs 1 process | ok |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['mode']} | {r['procs']} | {r['exit']} | {r['seconds']} | {r.get('lorakit_vs_peft', float('nan')):.2e} "
              f"| {r.get('adapter_moves_logits', float('nan')):.2e} | {r.get('tensors_vs_1_process', float('nan')):.2e} "
              f"| {r.get('logits_vs_1_process', float('nan')):.2e} | {'ok' if r['checks_ok'] else 'FAILED'} |")
    shutil.rmtree(work, ignore_errors=True)
    if failed:
        sys.exit("failed: " + ", ".join(failed))


if __name__ == "__main__":
    main()
