"""Gradients of LoRA under ``use_fast_kernels(compile="layers")`` against eager, one variant per row, on CUDA.

A random Mixtral (4 layers, 8 experts, bf16 weights, bf16 autocast) with LoRA on q_proj and, optionally, expert
LoRA (``target_parameters``); per variant: the compiled step's loss and every adapter gradient against the eager
step's (relative max difference; a gradient that is all zeros where eager's is not reads 1.0). Variants: gradient
checkpointing on/off, the fused LoRA Function or the reference (``LORAKIT_DISABLE_TRITON=1``, read per call), the
inductor or aot_eager backend, with or without expert LoRA.

    python bench/compile_grad_probe.py            # writes $OUT/compile_grad_probe.json (bench/results/ without $OUT)
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = [  # (name, checkpointing, reference LoRA op, backend, expert LoRA)
    ("bench setting", True, False, "inductor", True),
    ("no checkpointing", False, False, "inductor", True),
    ("reference op", True, True, "inductor", True),
    ("aot_eager", True, False, "aot_eager", True),
    ("q_proj only", True, False, "inductor", False),
]


def run(checkpointing: bool, reference: bool, backend: str, experts: bool) -> dict:
    import torch
    from transformers import MixtralConfig, MixtralForCausalLM

    import lorakit
    from lorakit.models.fast import disable_fast_kernels, use_fast_kernels

    os.environ["LORAKIT_DISABLE_TRITON"] = "1" if reference else "0"
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = MixtralConfig(vocab_size=32, num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2,
                           hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_local_experts=8,
                           max_position_embeddings=128)
    model = MixtralForCausalLM(config).to(device="cuda", dtype=torch.bfloat16)
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"] if experts else None
    lorakit.inject(model, lorakit.LoraConfig(r=4, target_modules=["q_proj"], target_parameters=targets))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(4, 32, (2, 64), generator=torch.Generator().manual_seed(1)).cuda()

    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        return float(out.loss), {n: p.grad.float().clone() if p.grad is not None else None
                                 for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager = step()
    use_fast_kernels(model, compile="layers", compile_backend=backend)
    start = time.time()
    step()
    loss, grads = step()
    disable_fast_kernels(model)
    rows = {}
    for name, truth in eager.items():
        got = grads[name]
        if got is None or truth is None:
            rows[name] = None if got is None else -1.0
            continue
        rows[name] = float((got - truth).abs().max() / truth.abs().max().clamp_min(1e-12))
    q = [v for k, v in rows.items() if "q_proj" in k]
    other = [v for k, v in rows.items() if "q_proj" not in k]
    return {"loss_rel": abs(loss - eager_loss) / abs(eager_loss), "seconds": round(time.time() - start, 1),
            "q_proj_worst": max((v for v in q if v is not None), default=None), "q_proj_none": sum(v is None for v in q),
            "experts_worst": max((v for v in other if v is not None), default=None),
            "worst": sorted(((v, k) for k, v in rows.items() if v is not None), reverse=True)[:3]}


def main() -> None:
    import torch

    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0), "rows": []}
    for name, *variant in VARIANTS:
        try:
            row = {"variant": name, **run(*variant)}
        except Exception as error:  # a variant that fails is a finding, not the end of the probe
            row = {"variant": name, "error": f"{type(error).__name__}: {str(error)[:300]}"}
        print(row, flush=True)
        results["rows"].append(row)
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_grad_probe.json").write_text(json.dumps(results, indent=1))
    print("\n| variant | loss rel | q_proj grads worst rel | expert grads worst rel |\n|---|---|---|---|")
    for row in results["rows"]:
        print(f"| {row['variant']} | {row.get('loss_rel', row.get('error'))} | {row.get('q_proj_worst')} | "
              f"{row.get('experts_worst')} |")


if __name__ == "__main__":
    main()
