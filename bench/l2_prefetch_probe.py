"""Does pulling a small GEMM's weight into L2 during the kernel before it pay, at decode's M=64?

bench/skinny_gemm_probe.py found the small decode GEMMs far from the bandwidth bound (1B q/k/v 37%, o 31%; 8B o
65%) with cuBLAS and Triton alike: a fixed ramp-up and drain cost per kernel. The o projection follows attention,
which streams the KV cache. This times, in CUDA graphs of 20 rounds that rotate over enough weight copies to defeat
the L2 (so every round reads its weight from DRAM):

    serial   : reduce(KV stand-in) ; mm(x, W_o^T)
    prefetch : side stream reads W_o into L2 (evict_last) while the reduction runs ; join ; mm(x, W_o^T)
    hot      : mm(x, W^T) on one W again and again (the L2-resident best case)

    python bench/l2_prefetch_probe.py        # prints a table, writes $OUT/l2_prefetch_probe.json
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import copy_bandwidth, graph_seconds  # noqa: E402


@triton.jit
def _prefetch(w_ptr, n, flag_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(w_ptr + offs, mask=offs < n, other=0.0, eviction_policy="evict_last")
    s = tl.sum(v.to(tl.float32), axis=0)
    if s == 1.2345e30:  # never: keeps the load from being removed
        tl.store(flag_ptr, s)


def prefetch(w: torch.Tensor, flag: torch.Tensor, block: int = 8192) -> None:
    n = w.numel()
    _prefetch[(triton.cdiv(n, block),)](w, n, flag, BLOCK=block, num_warps=8)


CASES = {  # name: (N, K of the weight, bytes of the KV stand-in read before it)
    "8b o after attention": (4096, 4096, 64 * 512 * 8 * 128 * 2 * 2),
    "8b q/k/v after down": (6144, 4096, 14336 * 4096 * 2),
    "1b o after attention": (2048, 2048, 64 * 512 * 8 * 64 * 2 * 2),
    "1b q/k/v after down": (3072, 2048, 8192 * 2048 * 2),
    "1b down after swiglu": (2048, 8192, 64 * 8192 * 2 * 3),
}


def main() -> int:
    device = torch.device("cuda")
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth(device)
    side = torch.cuda.Stream()
    flag = torch.zeros(1, device=device)
    rows = []
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; M = 64, bf16")
    print("| case | W MB | before MB | before alone us | mm cold us | serial us | with prefetch us | mm hot us |")
    print("|---|---|---|---|---|---|---|---|")
    for name, (N, K, before_bytes) in CASES.items():
        copies = max(3, -(-192 * 2**20 // (N * K * 2)))
        ws = [torch.randn(N, K, device=device, dtype=dtype) for _ in range(copies)]
        kvs = [torch.randn(before_bytes // 2, device=device, dtype=dtype) for _ in range(2)]
        x = torch.randn(64, K, device=device, dtype=dtype)
        out = torch.empty(64, N, device=device, dtype=dtype)
        red = torch.empty((), device=device, dtype=torch.float32)
        turn, kv_turn = itertools.cycle(range(copies)), itertools.cycle(range(2))

        def before():
            torch.sum(kvs[next(kv_turn)], dim=0, dtype=torch.float32, out=red)

        def mm_cold():
            torch.mm(x, ws[next(turn)].t(), out=out)

        def serial():
            before()
            mm_cold()

        def with_prefetch():
            w = ws[next(turn)]
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                prefetch(w, flag)
            before()
            torch.cuda.current_stream().wait_stream(side)
            torch.mm(x, w.t(), out=out)

        def mm_hot():
            torch.mm(x, ws[0].t(), out=out)

        t = {label: graph_seconds(fn, device, calls=20) for label, fn in
             (("before", before), ("cold", mm_cold), ("serial", serial), ("prefetch", with_prefetch), ("hot", mm_hot))}
        rows.append(dict(case=name, weight_mb=round(N * K * 2 / 2**20, 1), before_mb=round(before_bytes / 2**20, 1),
                         **{f"{k}_us": round(v * 1e6, 2) for k, v in t.items()}))
        print(f"| {name} | {N * K * 2 / 2**20:.0f} | {before_bytes / 2**20:.0f} | {t['before'] * 1e6:.1f} | "
              f"{t['cold'] * 1e6:.1f} | {t['serial'] * 1e6:.1f} | {t['prefetch'] * 1e6:.1f} | {t['hot'] * 1e6:.1f} |",
              flush=True)
        ws = kvs = None  # free before the next case (closures above read these names)
        torch.cuda.empty_cache()
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "l2_prefetch_probe.json"), "w") as fh:
        json.dump(dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                       date=time.strftime("%Y-%m-%d"), bandwidth=bandwidth, rows=rows), fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
