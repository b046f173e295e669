"""End-to-end `lorakit train` on a GPU: a random-weight model of the embedded model's shape, the embedded task.

Checks that the CLI path (bf16 autocast, fused kernels, checkpoints, report) runs on CUDA for LoRA, DoRA and QLoRA,
and that the loss falls. Random weights: the numbers say nothing about quality, only that the path works.

    python bench/train_cuda_smoke.py ASSETS_DIR      # ASSETS_DIR holds config.json + tokenizer files of a model
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import torch


def main() -> int:
    assets = sys.argv[1]
    out = os.environ.get("OUT", "/tmp/out")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(assets)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    folder = "/tmp/smoke-model"
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(assets).save_pretrained(folder)
    rows = []
    for name, extra in (("lora", []), ("dora", ["--variant", "dora"]), ("qlora", ["--quantize", "nf4"]),
                        ("lora+loraplus+ckpt", ["--loraplus-ratio", "16", "--gradient-checkpointing"])):
        run = os.path.join("/tmp/smoke-runs", name)
        command = [sys.executable, "-m", "lorakit", "train", "--model", folder, "--out", run, "--overwrite",
                   "--max-steps", "40", "--no-progress", "--device", "cuda", "--lr", "2e-3", *extra]
        start = time.time()
        done = subprocess.run(command, capture_output=True, text=True)
        seconds = time.time() - start
        metrics = []
        path = os.path.join(run, "metrics.jsonl")
        if os.path.exists(path):
            metrics = [json.loads(line) for line in open(path)]
        losses = [m["loss"] for m in metrics if "loss" in m and m.get("kind", "train") in ("train", "step")]
        row = {"case": name, "rc": done.returncode, "seconds": round(seconds, 1),
               "first_loss": losses[0] if losses else None, "last_loss": losses[-1] if losses else None,
               "adapter_saved": os.path.exists(os.path.join(run, "adapter", "adapter_model.safetensors"))}
        rows.append(row)
        print("ROW", json.dumps(row), flush=True)
        if done.returncode != 0:
            print(done.stdout[-3000:], done.stderr[-3000:], sep="\n")
    os.makedirs(out, exist_ok=True)
    json.dump(rows, open(os.path.join(out, "train_cuda_smoke.json"), "w"), indent=1)
    return 0 if all(r["rc"] == 0 and r["adapter_saved"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
