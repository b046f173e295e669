"""LoRA on fused MoE experts (``--target-parameters``) through ``lorakit train`` on a GPU, checked against PEFT.

The CPU tests (tests/test_moe_experts.py) check the math in float32/float16/bfloat16 against peft and a per-expert
reference. This runs the user's path on CUDA: a random Mixtral folder (bf16, 8 experts, top-2) with the tokenizer
of ``--tokenizer-from``, ``lorakit train`` with attention targets plus the expert stacks, then:

- the loss fell;
- the saved adapter loads in lorakit and in PEFT with the same logits (float32 on the GPU), and moves them;
- ``lorakit merge`` writes a folder whose logits equal the unmerged adapter's.

Usage (a GPU machine; the CPU works too, slowly):
    python bench/moe_cuda_check.py --tokenizer-from .gpu_assets/smol [--steps 12]
Writes $OUT/moe_cuda_check.json (bench/results/ when $OUT is unset), prints a table, exits non-zero on a failed check.
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
sys.path.insert(0, str(ROOT / "bench"))
from torchrun_cli_check import TOKENIZER_FILES, make_data, rel  # noqa: E402

EXPERTS = "mlp.experts.gate_up_proj,mlp.experts.down_proj"


def make_mixtral_folder(folder: Path, tokenizer_from: Path) -> None:
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                           num_attention_heads=8, num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2,
                           max_position_embeddings=1024, tie_word_embeddings=False,
                           pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
                           bos_token_id=tokenizer.bos_token_id)
    MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)


def lorakit_cli(*arguments: str, timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lorakit", *arguments], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer-from", required=True, type=Path)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--timeout", type=int, default=300)
    args = parser.parse_args()

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import lorakit

    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="moe_cuda_"))
    model_dir, data, run, merged = work / "model", work / "train.jsonl", work / "run", work / "merged"
    make_mixtral_folder(model_dir, args.tokenizer_from)
    make_data(data)
    started = time.time()
    done = lorakit_cli("train", "--model", str(model_dir), "--data", str(data), "--out", str(run),
                       "--max-steps", str(args.steps), "--batch-size", "8", "--lr", "1e-3", "--seed", "0",
                       "--eval-every", "0", "--no-progress", "--targets", "q_proj", "k_proj", "v_proj", "o_proj",
                       "--target-parameters", EXPERTS, timeout=args.timeout)
    seconds = round(time.time() - started, 1)
    if done.returncode != 0:
        print(done.stderr[-4000:])
        return 1
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    done_merge = lorakit_cli("merge", "--model", str(model_dir), "--adapter", str(run / "adapter"), "--out",
                             str(merged), "--dtype", "fp32", timeout=args.timeout)
    if done_merge.returncode != 0:
        print(done_merge.stderr[-4000:])
        return 1

    ids = torch.randint(0, 1000, (2, 24), generator=torch.Generator().manual_seed(1)).to(device)

    def load(folder):
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()

    with torch.no_grad():
        base = load(model_dir)
        plain = base(input_ids=ids).logits.float()
        lorakit.load_adapter(base, run / "adapter")
        mine = base(input_ids=ids).logits.float()
        theirs = PeftModel.from_pretrained(load(model_dir), run / "adapter").eval()(input_ids=ids).logits.float()
        folded = load(merged)(input_ids=ids).logits.float()
    config = json.loads((run / "adapter" / "adapter_config.json").read_text())
    row = dict(device=torch.cuda.get_device_name(0) if device == "cuda" else "cpu", torch=torch.__version__,
               date=time.strftime("%Y-%m-%d"), command=" ".join(sys.argv), train_seconds=seconds,
               first_loss=losses[0] if losses else None, last_loss=losses[-1] if losses else None,
               target_parameters=config.get("target_parameters"), lorakit_vs_peft=rel(mine, theirs),
               merged_vs_unmerged=rel(folded, mine), adapter_moves_logits=rel(mine, plain),
               train_log_tail=done.stderr[-800:])
    checks = {"loss fell": bool(losses) and losses[-1] < losses[0],
              "experts in the file": sorted(config.get("target_parameters") or []) == sorted(EXPERTS.split(",")),
              "lorakit = PEFT": row["lorakit_vs_peft"] < 1e-4, "merged = unmerged": row["merged_vs_unmerged"] < 1e-4,
              "adapter moves logits": row["adapter_moves_logits"] > 1e-3}
    row["checks"] = checks
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results") / "moe_cuda_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(row, indent=1))
    print("| check | value | ok |\n|---|---|---|")
    print(f"| loss (first -> last) | {row['first_loss']:.4f} -> {row['last_loss']:.4f} | {checks['loss fell']} |")
    print(f"| lorakit vs PEFT logits | {row['lorakit_vs_peft']:.2e} | {checks['lorakit = PEFT']} |")
    print(f"| merged vs unmerged logits | {row['merged_vs_unmerged']:.2e} | {checks['merged = unmerged']} |")
    print(f"| adapter moves logits | {row['adapter_moves_logits']:.2e} | {checks['adapter moves logits']} |")
    print(f"| target_parameters in the file | {row['target_parameters']} | {checks['experts in the file']} |")
    print(f"train: {seconds} s for {args.steps} steps; written {out}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
