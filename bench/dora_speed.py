"""DoRA on one GPU: lorakit vs PEFT, training step and prefill, on a Llama-3.2-1B-shaped bf16 model (random weights).

DoRA (r=16, alpha=32, dropout 0) on the seven projections; both systems get the same base (same seed) and the same
adapter (lorakit's, saved and read by ``peft.PeftModel.from_pretrained``), so their logits are compared first.

- train: forward + backward + AdamW on batch x seq tokens (``--batch 4 --seq 1024``); tokens/s from the median step
  (CUDA events), peak memory from ``torch.cuda.max_memory_allocated``.
- prefill: one eval forward of 8 x 512 tokens, no gradient (ms).

``LORAKIT_ROOT`` picks the lorakit checkout to import (default: this one), so two builds can be compared in one
device call (``LORAKIT_ROOT=/path/to/old python bench/dora_speed.py --tag old``).

    python bench/dora_speed.py [--tag NAME] [--batch 4] [--seq 1024] [--device cuda]

JSON rows {case, system, tag, tokens_per_s | ms, peak_gib, max_rel_logits} go to $OUT/dora_speed_<tag>.json (or
bench/results/ when $OUT is unset).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.environ.get("LORAKIT_ROOT") or os.path.dirname(HERE))
sys.path.insert(1, HERE)
from bench_common import ALPHA, LLAMA_SHAPES, RANK, TARGETS, time_steps  # noqa: E402


def make_base(shape: dict, device: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            return LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)


def lorakit_model(shape: dict, device: str, folder: str):
    """The base with a DoRA adapter whose B is not zero (a DoRA at init is the base), saved to ``folder``."""
    import lorakit

    model = make_base(shape, device)
    lorakit.inject(model, lorakit.LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS, variant="dora"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 1e-3)
    lorakit.save_adapter(model, folder)
    try:
        from lorakit.models.fast import use_fast_kernels

        use_fast_kernels(model, require_cuda=(device == "cuda"))
    except Exception as error:  # noqa: BLE001 (an older build's signature: the eager layers then)
        print(f"use_fast_kernels: {error}", flush=True)
    return model


def peft_model(shape: dict, device: str, folder: str):
    from peft import PeftModel

    return PeftModel.from_pretrained(make_base(shape, device), folder, is_trainable=True)


def measure(model, device: str, batch: int, seq: int, vocab: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    ids = torch.randint(0, vocab, (batch, seq), device=device, generator=torch.Generator(device).manual_seed(0))
    model.train()

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    torch.cuda.reset_peak_memory_stats() if device == "cuda" else None
    median, low, high, _ = time_steps(step, device, warm=3, reps=8)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    del optimizer
    model.eval()
    prompt = torch.randint(0, vocab, (8, 512), device=device, generator=torch.Generator(device).manual_seed(1))

    def prefill():
        with torch.no_grad():
            model(input_ids=prompt)

    prefill_s = time_steps(prefill, device, warm=2, reps=8)[0]
    return {"train_tokens_per_s": batch * seq / median, "train_step_ms": median * 1e3, "train_min_ms": low * 1e3,
            "train_max_ms": high * 1e3, "peak_gib": peak, "prefill_ms": prefill_s * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tag", default="now")
    parser.add_argument("--shape", choices=sorted(LLAMA_SHAPES), default="1b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    shape = LLAMA_SHAPES[args.shape] if args.device == "cuda" else dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        check = torch.randint(0, shape["vocab_size"], (2, 64), device=args.device)
        ours = lorakit_model(shape, args.device, folder)
        with torch.no_grad():
            ours.eval()
            ours_logits = ours(input_ids=check).logits.float()
        results = {"lorakit": measure(ours, args.device, args.batch, args.seq, shape["vocab_size"])}
        del ours
        gc.collect()
        torch.cuda.empty_cache() if args.device == "cuda" else None
        theirs = peft_model(shape, args.device, folder)
        with torch.no_grad():
            theirs.eval()
            theirs_logits = theirs(input_ids=check).logits.float()
        results["peft"] = measure(theirs, args.device, args.batch, args.seq, shape["vocab_size"])
        del theirs
    rel = float((ours_logits - theirs_logits).abs().max() / theirs_logits.abs().max())
    import lorakit

    print(f"lorakit from {os.path.dirname(lorakit.__file__)}", flush=True)
    for system, figures in results.items():
        rows.append({"case": f"dora_{args.shape}_b{args.batch}x{args.seq}", "system": system, "tag": args.tag,
                     "max_rel_logits": rel, **figures})
    out = os.environ.get("OUT") or os.path.join(HERE, "results")
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, f"dora_speed_{args.tag}.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(rows, handle, indent=1)
    os.replace(path + ".tmp", path)
    print(f"{'system':8} {'tag':6} {'train tok/s':>12} {'step ms':>8} {'peak GiB':>9} {'prefill ms':>10}  "
          f"lorakit vs peft logits (max rel) {rel:.2e}")
    for row in rows:
        peak = f"{row['peak_gib']:.2f}" if row["peak_gib"] is not None else "-"
        print(f"{row['system']:8} {row['tag']:6} {row['train_tokens_per_s']:12,.0f} {row['train_step_ms']:8.1f} "
              f"{peak:>9} {row['prefill_ms']:10.2f}")


if __name__ == "__main__":
    main()
