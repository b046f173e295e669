"""Device memory of served adapters: does the static decoder hold each adapter once?

Builds a random-weight Llama shape in bf16, injects N rank-16 adapters on all seven projections, builds a
``StaticDecoder`` and decodes one step with every row on its own adapter (which stacks every adapter into the
decoder's slots). Reports, after freeing what nothing references:

    allocated        torch.cuda.memory_allocated at each stage (GB)
    unique adapter   bytes of the distinct storages behind the model's lora_A / lora_B and the decoder's stacks

``LORAKIT_ROOT`` picks the lorakit checkout to import (default: this one), so two versions can be compared in one
device call. Prints one line per stage and a JSON line, and writes $OUT/adapter_memory_<shape>_<label>.json.

    python bench/adapter_memory_check.py --shape 1b --adapters 64 --label new
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.environ.get("LORAKIT_ROOT") or os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import lorakit  # noqa: E402  (first: multi_adapter puts this checkout ahead on sys.path when imported)
from bench_common import write_json  # noqa: E402
from multi_adapter import adapter_bytes, lorakit_model, make_model  # noqa: E402


def gb(n: int) -> float:
    return round(n / 1e9, 3)


def unique_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("1b", "8b"), default="1b")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--label", default="current")
    args = parser.parse_args()
    from lorakit.decoding import StaticDecoder

    print(f"{args.label}: lorakit from {os.path.dirname(lorakit.__file__)}", flush=True)

    device, dtype, n = torch.device("cuda"), torch.bfloat16, args.adapters
    stages = {}

    def stage(name):
        gc.collect()
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        stages[name] = gb(torch.cuda.memory_allocated())
        print(f"{args.label}: {name}: {stages[name]:.3f} GB allocated", flush=True)

    model, cfg = make_model(args.shape, device, dtype)
    stage("base model")
    lorakit_model(model, n, dtype)
    stage(f"{n} adapters injected")
    decoder = StaticDecoder(model, max_batch=n, max_len=64, adapter_slots=n)
    rows, names = list(range(n)), [f"a{i}" for i in range(n)]
    logits = decoder.prefill(rows, [[1 + i % 50, 2, 3, 4] for i in rows], names)
    decoder.step(rows, logits.argmax(-1).tolist(), names)
    stage("decoder built, one step on every adapter")
    lora = [p for _, p in lorakit.lora_parameters(model)]
    stacks = [t for layer in decoder.adapters.layers for s in layer.values() for t in (s.A, s.B)]
    record = dict(label=args.label, shape=args.shape, adapters=n, device=torch.cuda.get_device_name(),
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"), allocated_gb=stages,
                  adapter_bytes_each_gb=gb(adapter_bytes(cfg, dtype)),
                  model_lora_unique_gb=gb(unique_bytes(lora)), stacks_gb=gb(unique_bytes(stacks)),
                  all_adapter_storage_gb=gb(unique_bytes(lora + stacks)))
    print(record, flush=True)
    out = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out, exist_ok=True)
    write_json(os.path.join(out, f"adapter_memory_{args.shape}_{args.label}.json"), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
