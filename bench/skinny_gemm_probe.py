"""Can a Triton weight-streaming GEMM beat cuBLAS at decode's M=64? The decode step's GEMMs (x (64, K) @ W^T,
W (N, K) bf16) are bound by reading W; the static decoder's profile has cuBLAS at ~84% of the copy bandwidth.

For each projection shape of the Llama-3.1-8B and -3.2-1B decoders this times torch.mm (cuBLAS) and a plain Triton
kernel (lorakit's rows GEMM: one program per BLOCK_N output columns streams its W rows over all of K; the 64 rows of
x come from L2) over a small grid of tiles and pipeline depths, each in a CUDA graph of 20 calls that rotate over enough copies of
W to defeat the 60 MB L2, and checks the Triton result against torch.mm in float32.

    python bench/skinny_gemm_probe.py            # prints a table, writes $OUT/skinny_gemm_probe.json
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import copy_bandwidth, graph_seconds  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from lorakit.kernels.triton.rows_gemm import rows_gemm  # noqa: E402


def skinny_mm(x, w, out, block_n, block_k, num_warps, num_stages):
    """lorakit's weight-streaming GEMM (``lorakit.kernels.triton.rows_gemm``) with one candidate tile, no PDL."""
    return rows_gemm(x, w, out=out, config=(block_n, block_k, num_warps, num_stages), pdl=False, prefetch=False)


SHAPES = {  # name: (N, K)
    "8b q/k/v": (6144, 4096), "8b o": (4096, 4096), "8b gate/up": (28672, 4096), "8b down": (4096, 14336),
    "8b lm_head": (128256, 4096),
    "1b q/k/v": (3072, 2048), "1b o": (2048, 2048), "1b gate/up": (16384, 2048), "1b down": (2048, 8192),
    "1b lm_head": (128256, 2048),
}
CONFIGS = list(itertools.product((16, 32, 64), (128, 256), (4, 8), (3, 4)))  # block_n, block_k, warps, stages


def main() -> int:
    device = torch.device("cuda")
    dtype = torch.bfloat16
    bandwidth = copy_bandwidth(device)
    M = 64
    rows = []
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; M = {M}, bf16")
    print("| shape | N x K | W MB | cuBLAS us | of bound | best Triton us | of bound | config (block_n, block_k, warps, stages) | max rel err |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, (N, K) in SHAPES.items():
        w_bytes = N * K * 2
        copies = max(2, -(-256 * 2**20 // w_bytes))
        ws = [torch.randn(N, K, device=device, dtype=dtype) / K**0.5 for _ in range(copies)]
        x = torch.randn(M, K, device=device, dtype=dtype)
        out = torch.empty(M, N, device=device, dtype=dtype)
        bound = w_bytes / bandwidth
        turn = itertools.cycle(range(copies))

        def cublas():
            torch.mm(x, ws[next(turn)].t(), out=out)

        t_cublas = graph_seconds(cublas, device, calls=20)
        truth = (x.float() @ ws[0].float().t())
        best = None
        for cfg in CONFIGS:
            try:
                got = skinny_mm(x, ws[0], torch.empty_like(out), *cfg)
                err = ((got.float() - truth).abs().max() / truth.abs().max()).item()
                t = graph_seconds(lambda: skinny_mm(x, ws[next(turn)], out, *cfg), device, calls=20)
            except Exception as error:  # a config that does not fit (shared memory): skip it
                print(f"  {name} {cfg}: {type(error).__name__}", flush=True)
                continue
            if best is None or t < best[0]:
                best = (t, cfg, err)
        t_best, cfg, err = best
        rows.append(dict(shape=name, N=N, K=K, weight_mb=round(w_bytes / 2**20, 1), cublas_us=round(t_cublas * 1e6, 2),
                         cublas_fraction=round(bound / t_cublas, 3), triton_us=round(t_best * 1e6, 2),
                         triton_fraction=round(bound / t_best, 3), config=cfg, max_rel_err=err))
        print(f"| {name} | {N} x {K} | {w_bytes / 2**20:.0f} | {t_cublas * 1e6:.1f} | {bound / t_cublas:.1%} | "
              f"{t_best * 1e6:.1f} | {bound / t_best:.1%} | {cfg} | {err:.1e} |", flush=True)
        ws = x = out = None  # free before the next shape (closures above read these names)
        torch.cuda.empty_cache()
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    record = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                  date=time.strftime("%Y-%m-%d"), M=M, bandwidth=bandwidth, rows=rows)
    with open(os.path.join(out_dir, "skinny_gemm_probe.json"), "w") as fh:
        json.dump(record, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
