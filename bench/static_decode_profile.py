"""Where the GPU time of one ``StaticDecoder`` step goes, by kernel family (torch.profiler on eager steps).

Builds a random-weight bf16 Llama shape, injects ``--adapters`` adapters (r=16 on the seven projections, each row
its own adapter round robin), fills every cache row to ``--context`` tokens, then profiles ``--steps`` eager steps
(the kernels are the ones the CUDA graph replays; eager only adds host gaps, which are not counted here) and times
the graph-captured step. Prints per-family GPU microseconds per step, the bytes each family must move and its
fraction of the copy bandwidth, and writes ``$OUT/static_decode_profile_<shape>.json`` (bench/results/ without OUT).

    python bench/static_decode_profile.py --shape 8b --adapters 64
    TRITON_INTERPRET=1 python bench/static_decode_profile.py --shape tiny --device cpu --steps 1   # smoke test
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from bench_common import ALPHA, LLAMA_SHAPES, RANK, TARGETS, copy_bandwidth, random_llama, time_fn, write_json  # noqa: E402

SHAPES = {**{k: LLAMA_SHAPES[k] for k in ("1b", "8b")},
          "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256)}

# kernel name fragments -> family (first match wins; names differ between cuBLAS / Triton / aten versions)
FAMILIES = [("grouped lora shrink", ("_shrink",)), ("grouped lora expand", ("_expand",)),
            ("attention", ("flash_decode", "_decode_attn", "combine")), ("rope + kv store", ("rope",)),
            ("rmsnorm", ("rmsnorm", "rms_norm")), ("swiglu", ("swiglu",)),
            ("gemm", ("gemm", "sm90", "cutlass", "nvjet", "xmma", "splitk", "cublas"))]


def family(name: str) -> str:
    low = name.lower()
    for label, keys in FAMILIES:
        if any(k in low for k in keys):
            return label
    return "other"


SHRINK_CANDIDATES = [dict(block_k=512, num_warps=8, programs_per_sm=2), dict(block_k=512, num_warps=8, programs_per_sm=1),
                     dict(block_k=512, num_warps=8, programs_per_sm=3), dict(block_k=512, num_warps=4, programs_per_sm=2),
                     dict(block_k=256, num_warps=4, programs_per_sm=2), dict(block_k=256, num_warps=4, programs_per_sm=4),
                     dict(block_k=1024, num_warps=8, programs_per_sm=1)]
EXPAND_CANDIDATES = [dict(block_n=256, num_warps=4), dict(block_n=128, num_warps=4), dict(block_n=128, num_warps=2),
                     dict(block_n=512, num_warps=4), dict(block_n=512, num_warps=8), dict(block_n=64, num_warps=2)]


def sweep_configs(decoder, rows, tokens, names, device, grouped_lora, rounds: int = 3) -> dict:
    """Graph step time per candidate tile config: shrink candidates with the current expand, then expand
    candidates with the best shrink. The candidates are timed in ``rounds`` interleaved rounds and ranked by their
    median (one step's time drifts by ~5% within a process: host work is part of it). Leaves the best in
    ``grouped_lora.CONFIGS``; returns every timing."""
    def timed(kind, cand):
        grouped_lora.CONFIGS[kind] = dict(grouped_lora.CONFIGS[kind], **cand)
        decoder.drop_graphs()  # recapture with the new tiles
        for row in rows:
            decoder.lengths[row] = decoder.max_len - 16
        seconds = time_fn(lambda: decoder.step(rows, tokens, names), device, warm=2, reps=10, budget_s=1.5)
        print(f"sweep {kind} {cand}: {seconds * 1e3:.3f} ms", flush=True)
        return seconds

    out = {}
    for kind, candidates in (("shrink", SHRINK_CANDIDATES), ("expand", EXPAND_CANDIDATES)):
        runs = [[] for _ in candidates]
        for _ in range(rounds):
            for i, cand in enumerate(candidates):
                runs[i].append(timed(kind, cand))
        times = [(statistics.median(r), cand) for r, cand in zip(runs, candidates)]
        best = min(times, key=lambda t: t[0])
        grouped_lora.CONFIGS[kind] = dict(grouped_lora.CONFIGS[kind], **best[1])
        out[kind] = dict(best=best[1], best_ms=round(best[0] * 1e3, 3),
                         all=[dict(cand, ms=round(t * 1e3, 3), runs_ms=[round(x * 1e3, 3) for x in r])
                              for (t, cand), r in zip(times, runs)])
        print(f"sweep {kind}: best {best[1]} at {best[0] * 1e3:.3f} ms", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    parser.add_argument("--adapters", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sweep", action="store_true",
                        help="also time graph steps over a few grouped-LoRA tile configs (shrink, then expand; the "
                             "pair now runs beside the GEMMs, so the kernels-alone optimum may not hold) and report the best")
    parser.add_argument("--grouped-configs", default=None,
                        help="a grouped_lora_speed.json: use the tile configs its sweep kept (else the defaults)")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.shape == "tiny":
        args.batch, args.context = min(args.batch, 4), min(args.context, 8)

    import lorakit
    from lorakit.decoding import StaticDecoder
    from lorakit.kernels.triton import grouped_lora

    if args.grouped_configs:
        with open(args.grouped_configs) as fh:
            grouped_lora.CONFIGS.update(json.load(fh)["configs"])

    model = random_llama(SHAPES[args.shape], device, dtype)
    for i in range(args.adapters):
        lorakit.inject(model, lorakit.LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS), adapter=f"a{i}",
                       trainable=False, dtype=dtype)
    decoder = StaticDecoder(model, max_batch=args.batch, max_len=args.context + args.steps + 16)
    rows = list(range(args.batch))
    names = [f"a{i % args.adapters}" for i in rows] if args.adapters else [None] * args.batch
    with torch.no_grad():
        decoder.k_cache.normal_()
        decoder.v_cache.normal_()
    for row in rows:  # every row holds `context` tokens (random K/V: the cost does not depend on the values)
        decoder.active[row], decoder.lengths[row] = True, args.context
    tokens = [1] * args.batch
    graph = decoder.use_graph
    decoder.use_graph = False
    decoder.step(rows, tokens, names)  # loads the adapters, compiles the kernels
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(args.steps):
            decoder.step(rows, tokens, names)
        if device.type == "cuda":
            torch.cuda.synchronize()
    per_family: dict = collections.defaultdict(lambda: [0.0, 0])
    other: list = []  # (us per step, kernels per step, name) of kernels no family claims, to see what they are
    for event in prof.key_averages():
        gpu_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0) or 0
        if device.type != "cuda" or gpu_us <= 0 or event.key.startswith(("aten::", "cuda", "Memcpy", "Memset")):
            continue
        fam = per_family[family(event.key)]
        if family(event.key) == "other":
            other.append((gpu_us / args.steps, event.count / args.steps, event.key[:90]))
        fam[0] += gpu_us / args.steps
        fam[1] += event.count // args.steps
    decoder.use_graph = graph
    for row in rows:
        decoder.lengths[row] = args.context
    step_s = time_fn(lambda: decoder.step(rows, tokens, names), device, warm=2, reps=10, budget_s=5.0)
    bandwidth = copy_bandwidth(device)
    parts = decoder.parts
    esize = torch.tensor([], dtype=dtype).element_size()
    L, d, f = len(parts.layers), parts.hidden, parts.intermediate
    kv = parts.kv_heads * parts.head_dim
    adapter_bytes = min(args.adapters, args.batch) * L * RANK * esize * sum(
        i + o for i, o in [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)])
    bytes_by_family = {
        "gemm": sum(p.numel() * p.element_size() for n, p in model.named_parameters()
                    if "lora_" not in n and "embed_tokens" not in n and "norm" not in n),
        "attention": 2 * L * args.batch * args.context * kv * esize,
        "grouped lora shrink": adapter_bytes / 2, "grouped lora expand": adapter_bytes / 2,
    }
    total = sum(v[0] for v in per_family.values())
    result = dict(shape=args.shape, adapters=args.adapters, grouped_configs=grouped_lora.CONFIGS, batch=args.batch, context=args.context,
                  device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", torch=torch.__version__,
                  date=time.strftime("%Y-%m-%d"), graph_step_ms=round(step_s * 1e3, 3),
                  profiled_gpu_ms_per_step=round(total / 1e3, 3), bandwidth_bytes_per_s=bandwidth, families={})
    print(f"\n{args.shape}, {args.adapters} adapters, {args.batch} rows x {args.context} context: graph step "
          f"{step_s * 1e3:.2f} ms; kernels {total / 1e3:.2f} ms per step (profiled, eager)")
    print("| family | kernels / step | GPU us / step | share | bytes | of copy bandwidth |\n|---|---|---|---|---|---|")
    for name, (us, count) in sorted(per_family.items(), key=lambda kv_: -kv_[1][0]):
        moved = bytes_by_family.get(name)
        frac = (moved / bandwidth) / (us / 1e6) if moved and us else None
        result["families"][name] = dict(kernels=count, us=round(us, 1), bytes=moved, fraction=frac and round(frac, 3))
        print(f"| {name} | {count} | {us:.0f} | {us / max(total, 1e-9):.1%} | "
              f"{'' if moved is None else f'{moved / 1e9:.2f} GB'} | {'' if frac is None else f'{frac:.1%}'} |")
    if args.sweep:
        result["sweep"] = sweep_configs(decoder, rows, tokens, names, device, grouped_lora)
    result["other_kernels"] = [dict(us=round(us, 1), per_step=n, name=name) for us, n, name in sorted(other, reverse=True)[:15]]
    for row in result["other_kernels"]:
        print(f"  other: {row['per_step']:6.1f} / step {row['us']:8.1f} us  {row['name']}")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"static_decode_profile_{args.shape}_{args.adapters}.json")
    write_json(path, result)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
