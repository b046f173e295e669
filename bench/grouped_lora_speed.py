"""Decode-shaped multi-LoRA: the grouped kernels (one shrink + expand pair per input) vs the per-projection SGMV path.

For the Llama-3.1-8B and Llama-3.2-1B projection groups of one layer (q,k,v share the input; gate,up share it; o; down),
64 rows each with its own adapter slot of 64, r=16, bf16:
  1. copy bandwidth (a 1 GiB device-to-device copy: bytes read + written over the time, as bench/multi_adapter.py);
  2. a small sweep of ``lorakit.kernels.triton.grouped_lora.CONFIGS`` (shrink tiles, then expand tiles; the sum over
     the 8B groups), keeping the fastest for the checks and timings below (``--no-sweep`` keeps the defaults);
  3. checks (with the kept tiles): the grouped kernels and the reference (bf16) each compared with a float32 truth
     (the reference on float32 copies): the kernels' error must be within 2x the bf16 reference's own error (floored
     at bf16's unit roundoff); rows with slot -1 must stay bit-identical (NaN sentinels); one call replayed from a
     CUDA graph must equal the eager call bit for bit; the exit status is 1 when a check fails;
  4. per group: GPU time of one call from a CUDA graph of 10 calls (median of the replays), for the grouped pair and
     for ``multi_lora_add_`` once per projection (device-built row plan, built once per step outside the timing);
     the bandwidth bound = (A + B bytes of the adapters the rows use + x + 2 y) / copy bandwidth; host time per
     eager call. Per layer = the sum of the four groups.

Usage (about a minute on an H200; the smoke run checks the script on the CPU under the Triton interpreter):

    python bench/grouped_lora_speed.py
    TRITON_INTERPRET=1 python bench/grouped_lora_speed.py --device cpu --tiny

Writes ``$OUT/grouped_lora_speed.json`` (or bench/results/ when $OUT is unset).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from bench_common import copy_bandwidth, graph_seconds, sync  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

# (group, K, out_splits) of one decoder layer
GROUPS = {
    "8b": [("qkv", 4096, [4096, 1024, 1024]), ("o", 4096, [4096]), ("gate_up", 4096, [14336, 14336]), ("down", 14336, [4096])],
    "1b": [("qkv", 2048, [2048, 512, 512]), ("o", 2048, [2048]), ("gate_up", 2048, [8192, 8192]), ("down", 8192, [2048])],
    "tiny": [("qkv", 72, [40, 24, 24]), ("o", 40, [40]), ("gate_up", 40, [50, 50]), ("down", 50, [40])],
}
SWEEP = {
    # the first of each list is the default in lorakit/kernels/triton/grouped_lora.py
    "shrink": [dict(block_k=512, num_warps=8, programs_per_sm=2, max_tile=32768),
               dict(block_k=512, num_warps=8, programs_per_sm=3, max_tile=32768),
               dict(block_k=256, num_warps=8, programs_per_sm=3, max_tile=16384)],
    "expand": [dict(block_n=256, num_warps=4, iters=1), dict(block_n=256, num_warps=4, iters=4),
               dict(block_n=128, num_warps=4, iters=8), dict(block_n=512, num_warps=8, iters=4),
               dict(block_n=256, num_warps=8, iters=8), dict(block_n=1024, num_warps=8, iters=2)],
}
RESULTS: dict = {"checks": [], "rows": [], "sweep": []}


def log(*args):
    print(*args, flush=True)






def host_seconds(fn, device) -> float:
    """Host time per eager call (Python + launches; the launches queue asynchronously)."""
    n = 30 if device.type == "cuda" else 2
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        fn()
    seconds = (time.perf_counter() - start) / n
    sync(device)
    return seconds


class Group:
    """One projection group's operands: per-projection stacks (for SGMV) and the grouped buffers built from them."""

    def __init__(self, name, K, splits, rows, slots, rank, device, dtype, seed=0):
        from lorakit.kernels.grouped_lora import grouped_stack

        gen = torch.Generator(device="cpu").manual_seed(seed)
        self.name, self.K, self.splits, self.N = name, K, list(splits), sum(splits)
        self.As = [(torch.randn(slots, rank, K, generator=gen) / K**0.5).to(device, dtype) for _ in splits]
        self.Bs = [(torch.randn(slots, n, rank, generator=gen) / rank**0.5).to(device, dtype) for n in splits]
        self.scalings = [torch.full((slots,), 2.0, device=device) for _ in splits]
        self.ranks = [torch.full((slots,), rank, dtype=torch.int32, device=device) for _ in splits]
        self.A, self.B, self.scaling, self.rank = grouped_stack(self.As, self.Bs, self.scalings, self.ranks)
        self.x = torch.randn(rows, K, generator=gen).to(device, dtype)
        self.y = torch.zeros(rows, self.N, device=device, dtype=dtype)
        self.slot_of_row = torch.randperm(slots, generator=gen)[:rows].to(device, torch.int32)  # distinct slots
        self.bounds = [0] + torch.tensor(splits).cumsum(0).tolist()

    def grouped(self, y=None, slot_of_row=None):
        from lorakit.kernels.grouped_lora import grouped_lora_add_

        return grouped_lora_add_(self.y if y is None else y, self.x, self.A, self.B, self.scaling, self.rank,
                                 self.slot_of_row if slot_of_row is None else slot_of_row, self.splits)

    def sgmv(self, plan):
        from lorakit.kernels.multi_lora import multi_lora_add_

        for g in range(len(self.splits)):
            multi_lora_add_(self.y[:, self.bounds[g] : self.bounds[g + 1]], self.x, self.As[g], self.Bs[g],
                            self.scalings[g], self.ranks[g], plan)

    def bound_bytes(self) -> int:
        """A + B bytes of the adapters the rows use (distinct slots, full rank) + x read + y read and written."""
        used = self.slot_of_row.numel()
        esize = self.A.element_size()
        adapters = used * sum(a.shape[1] * self.K + b.shape[1] * b.shape[2] for a, b in zip(self.As, self.Bs)) * esize
        return adapters + self.x.numel() * self.x.element_size() + 2 * self.y.numel() * self.y.element_size()


def judge(label, err_fast, err_ref, dtype, factor=2.0) -> bool:
    floor = torch.finfo(dtype).eps / 2
    allowed = factor * max(err_ref, floor)
    ok = err_fast <= allowed
    log(f"CHECK {label}: kernels err {err_fast:.3e}, reference err {err_ref:.3e} ({dtype} both) (vs the truth, relative to its max; "
        f"allowed {allowed:.3e}) {'ok' if ok else 'MISMATCH'}")
    RESULTS["checks"].append(dict(check=label, fast_err=err_fast, reference_err=err_ref, allowed=allowed, ok=ok))
    return ok


def check_group(group: Group, device, dtype) -> bool:
    """Kernels and reference vs a truth in a wider dtype; -1 rows untouched; graph replay == eager."""
    from lorakit.kernels.grouped_lora import grouped_lora_add_reference

    truth_dtype = torch.float32 if dtype != torch.float32 else torch.float64
    slot_of_row = group.slot_of_row.clone()
    slot_of_row[::7] = -1  # some rows without adapter
    idle = slot_of_row < 0
    y0 = torch.zeros_like(group.y)
    y0[idle] = float("nan")
    args = (group.x, group.A, group.B, group.scaling, group.rank, slot_of_row, group.splits)
    fast = group.grouped(y0.clone(), slot_of_row)
    ref = grouped_lora_add_reference(y0.clone(), *args)
    wide = [t.to(truth_dtype) for t in (group.x, group.A, group.B)]
    truth = grouped_lora_add_reference(y0.to(truth_dtype), *wide, group.scaling, group.rank, slot_of_row, group.splits)
    live = ~idle
    scale = truth[live].abs().max().item()
    err = lambda t: (t[live].to(truth_dtype) - truth[live]).abs().max().item() / scale  # noqa: E731
    ok = judge(f"{group.name} K={group.K} out={group.splits} {dtype}", err(fast), err(ref), dtype)
    untouched = bool(torch.isnan(fast[idle]).all())
    ok &= untouched
    RESULTS["checks"].append(dict(check=f"{group.name} rows without adapter untouched", ok=untouched))
    if device.type == "cuda":  # one call captured and replayed must equal the eager call bit for bit
        y = y0.clone()
        group.grouped(y, slot_of_row)  # warm-up (compiles) outside the capture
        y.copy_(y0)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            group.grouped(y, slot_of_row)
        y.copy_(y0)
        g.replay()
        torch.cuda.synchronize()
        same = bool(torch.equal(y[live], fast[live]) and torch.isnan(y[idle]).all())
        log(f"CHECK {group.name}: graph replay == eager: {same}")
        RESULTS["checks"].append(dict(check=f"{group.name} graph replay equals eager", ok=same))
        ok &= same
    return ok


def sweep(groups, device):
    """Shrink configs (with the default expand), then expand configs (with the best shrink); keep the fastest."""
    from lorakit.kernels.triton import grouped_lora as tg

    for kind, candidates in SWEEP.items():
        default = dict(tg.CONFIGS[kind])
        results = []
        for config in candidates:
            tg.CONFIGS[kind] = config
            try:
                total = sum(graph_seconds(g.grouped, device) for g in groups)
            except Exception as error:  # a config the compiler refuses (e.g. out of registers) is skipped
                log(f"FAIL sweep {kind} {config}: {type(error).__name__}: {str(error).splitlines()[0][:200]}")
                total = float("inf")
            results.append((total, config))
            RESULTS["sweep"].append(dict(kind=kind, config=config, us=total * 1e6))
            log(f"SWEEP {kind:6s} {config}: {total * 1e6:8.1f} us (all groups)")
        best = min(results, key=lambda r: r[0])
        tg.CONFIGS[kind] = best[1] if best[0] < float("inf") else default
        log(f"SWEEP {kind}: keeping {tg.CONFIGS[kind]}")
    RESULTS["configs"] = {k: dict(v) for k, v in tg.CONFIGS.items()}
    log(f"CONFIGS = {RESULTS['configs']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (CPU smoke run under TRITON_INTERPRET=1)")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--slots", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--no-sweep", action="store_true", help="keep the CONFIGS as they are")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the Triton interpreter has no bf16
    models = ["tiny"] if args.tiny else ["8b", "1b"]
    if args.tiny:
        args.rows, args.slots, args.rank = min(args.rows, 6), min(args.slots, 8), min(args.rank, 16)
        for kind in SWEEP:
            SWEEP[kind] = SWEEP[kind][:2]
    t0 = time.time()
    from lorakit.kernels._triton import triton_usable
    from lorakit.kernels.multi_lora import plan_rows_device

    ok = triton_usable(torch.zeros(1, device=device))
    if not ok:
        log("the Triton kernels cannot run here (set TRITON_INTERPRET=1 on the CPU): the timings would be the reference's")
    groups = {m: [Group(n, K, s, args.rows, args.slots, args.rank, device, dtype, seed=i)
                  for i, (n, K, s) in enumerate(GROUPS[m])] for m in models}
    RESULTS["setup"] = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", dtype=str(dtype),
                            rows=args.rows, slots=args.slots, rank=args.rank, torch=torch.__version__)
    with torch.no_grad():
        bandwidth = copy_bandwidth(device)
        RESULTS["copy_bandwidth_bytes_per_s"] = bandwidth
        log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
        if not args.no_sweep:
            sweep(groups[models[0]], device)  # the 8B groups (issue #7's target): fewer compiles than both models
        for m in models:  # after the sweep: the checks cover the tiles that are timed below
            for group in groups[m]:
                ok &= check_group(group, device, dtype)
        for m in models:
            plan = plan_rows_device(groups[m][0].slot_of_row)  # built once per step by the SGMV path, not timed
            for group in groups[m]:
                bound = group.bound_bytes() / bandwidth
                row = dict(model=m, group=group.name, K=group.K, out_splits=group.splits, bound_us=bound * 1e6)
                for system, fn in (("grouped", group.grouped), ("sgmv", lambda g=group: g.sgmv(plan))):
                    seconds = graph_seconds(fn, device)
                    row[f"{system}_us"] = seconds * 1e6
                    row[f"{system}_fraction_of_bound"] = bound / seconds
                    row[f"{system}_host_us"] = host_seconds(fn, device) * 1e6
                RESULTS["rows"].append(row)
                log(f"ROW {m} {group.name:8s} K={group.K:5d} out={group.splits}: grouped {row['grouped_us']:8.1f} us "
                    f"({row['grouped_fraction_of_bound']:.3f} of bound), sgmv {row['sgmv_us']:8.1f} us "
                    f"({row['sgmv_fraction_of_bound']:.3f}), bound {bound * 1e6:7.1f} us")
    layers = {}
    for m in models:
        rows = [r for r in RESULTS["rows"] if r["model"] == m]
        layer = {k: sum(r[k] for r in rows) for k in ("grouped_us", "sgmv_us", "bound_us", "grouped_host_us", "sgmv_host_us")}
        layer["grouped_fraction_of_bound"] = layer["bound_us"] / layer["grouped_us"]
        layer["sgmv_fraction_of_bound"] = layer["bound_us"] / layer["sgmv_us"]
        layers[m] = layer
    RESULTS["per_layer"] = layers
    RESULTS["checks_ok"] = bool(ok)
    RESULTS["seconds"] = time.time() - t0

    log("\n| model | group | grouped us | sgmv us | bound us | grouped / bound | sgmv / bound | speedup |")
    log("|---|---|---|---|---|---|---|---|")
    for r in RESULTS["rows"]:
        log(f"| {r['model']} | {r['group']} {r['K']}->{r['out_splits']} | {r['grouped_us']:.1f} | {r['sgmv_us']:.1f} | "
            f"{r['bound_us']:.1f} | {r['grouped_fraction_of_bound']:.1%} | {r['sgmv_fraction_of_bound']:.1%} | "
            f"{r['sgmv_us'] / r['grouped_us']:.2f}x |")
    for m, layer in layers.items():
        log(f"| {m} | per layer (4 groups) | {layer['grouped_us']:.1f} | {layer['sgmv_us']:.1f} | {layer['bound_us']:.1f} | "
            f"{layer['grouped_fraction_of_bound']:.1%} | {layer['sgmv_fraction_of_bound']:.1%} | "
            f"{layer['sgmv_us'] / layer['grouped_us']:.2f}x |")
    log("host us per layer (eager): " + ", ".join(f"{m} grouped {l['grouped_host_us']:.0f} / sgmv {l['sgmv_host_us']:.0f}"
                                                   for m, l in layers.items()))
    log(f"checks: {'all ok' if ok else 'FAILED'}; {RESULTS['seconds']:.0f} s")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "grouped_lora_speed.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(RESULTS, f, indent=1)
    os.replace(tmp, path)
    log(f"wrote {path}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
