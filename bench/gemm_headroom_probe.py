"""Is there headroom above the decode step's GEMMs? Issue 7's decode target needs the weight-streaming GEMMs
(x (64, K) @ W^T, W (N, K) bf16, bound by reading W) well above the ~82% of the copy bandwidth they reach today.

For each Llama-3.1-8B (or -3.2-1B) projection shape this times, each in a CUDA graph of 20 calls that rotate over
enough copies of W to defeat the L2:

    read        a kernel that only reads W with the GEMM's tiling (sums each row): the ceiling for this pattern
    cublas      torch.mm
    rows        lorakit's rows GEMM with its default tiles (``lorakit.kernels.triton.rows_gemm``)
    splitk      the same loop over 1/SPLIT of K per program, float32 atomics into a zeroed (M, N) buffer
                (the memset is timed with it) - more programs, each reading less of x
    tma         W read through a Hopper tensor descriptor (TMA), with and without split-K

and checks every variant against a float32 product. Prints a table (fraction of the copy bandwidth, read+write as
every figure of issue 7) and writes $OUT/gemm_headroom_<shape>.json.

    python bench/gemm_headroom_probe.py --shape 8b
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import LLAMA_SHAPES, copy_bandwidth, graph_seconds, write_json  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from lorakit.kernels.triton.rows_gemm import rows_gemm  # noqa: E402


@triton.jit
def _read_rows(w_ptr, out_ptr, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n] = sum_k W[n, k] over BLOCK_N rows per program: the GEMM's read pattern with no math."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + offs_k[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for _ in range(0, tl.cdiv(K, BLOCK_K)):
        acc += tl.load(ptrs, mask=offs_n[:, None] < N, other=0.0).to(tl.float32)
        ptrs += BLOCK_K
    tl.store(out_ptr + offs_n, tl.sum(acc, axis=1), mask=offs_n < N)


@triton.jit
def _gemm_split(x_ptr, w_ptr, w_desc, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym, k_per_split,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                TMA: tl.constexpr, ATOMIC: tl.constexpr):
    """y (+)= x[:, ks] W[n-block, ks]^T for one K slice per program_id(1); K % BLOCK_K == 0, N % BLOCK_N == 0."""
    pid_n = tl.program_id(0)
    k0 = tl.program_id(1) * k_per_split
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[:, None].to(tl.int64) * stride_wn + (k0 + offs_k)[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in tl.range(0, k_per_split // BLOCK_K, num_stages=STAGES):
        x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
        if TMA:
            w = w_desc.load([pid_n * BLOCK_N, k0 + i * BLOCK_K])
        else:
            w = tl.load(w_ptrs)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=mask_m[:, None], sem="relaxed")
    else:
        tl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None])


def gemm_split(x, w, y32, y, block_n, block_k, warps, stages, split, tma):
    """One variant's call: y32 (float32, zeroed here) gets the split-K sum, or y (bf16) the product when split=1."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    M, K = x.shape
    N = w.shape[0]
    desc = TensorDescriptor.from_tensor(w, [block_n, block_k]) if tma else w
    atomic = split > 1
    if atomic:
        y32.zero_()
    out = y32 if atomic else y
    _gemm_split[(N // block_n, split)](x, w, desc, out, M, N, K, x.stride(0), w.stride(0), out.stride(0), K // split,
                                       BLOCK_M=max(16, triton.next_power_of_2(M)), BLOCK_N=block_n, BLOCK_K=block_k,
                                       STAGES=stages, TMA=tma, ATOMIC=atomic, num_warps=warps)
    return out


def shapes_of(name: str) -> dict[str, tuple[int, int]]:
    s = LLAMA_SHAPES[name]
    h, inter = s["hidden_size"], s["intermediate_size"]
    head = h // s["num_attention_heads"]
    return {"q/k/v": (h + 2 * s["num_key_value_heads"] * head, h), "o": (h, h), "gate/up": (2 * inter, h),
            "down": (h, inter)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("1b", "8b"), default="8b")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="fewer tiles (a smoke run)")
    args = parser.parse_args()
    device, dtype, M = torch.device("cuda"), torch.bfloat16, args.rows
    bandwidth = copy_bandwidth(device)
    sm = torch.cuda.get_device_properties(device).multi_processor_count
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s, {sm} SMs, M = {M}, bf16", flush=True)
    splits = (1, 2, 4) if not args.quick else (1, 2)
    tiles = list(itertools.product((32, 64, 128), (128, 256), (4,), (3, 4, 5))) if not args.quick else [(64, 128, 4, 3)]
    rows = []
    for name, (N, K) in shapes_of(args.shape).items():
        w_bytes = N * K * 2
        copies = max(2, -(-256 * 2**20 // w_bytes))
        ws = [torch.randn(N, K, device=device, dtype=dtype) / K**0.5 for _ in range(copies)]
        x = torch.randn(M, K, device=device, dtype=dtype)
        y = torch.empty(M, N, device=device, dtype=dtype)
        y32 = torch.empty(M, N, device=device, dtype=torch.float32)
        sums = torch.empty(N, device=device, dtype=torch.float32)
        truth = x.float() @ ws[0].float().t()
        scale = truth.abs().max().item()
        bound = w_bytes / bandwidth
        turn = itertools.cycle(range(copies))

        def record(variant, config, fn, check=None):
            try:
                err = float("nan") if check is None else ((check().float() - truth).abs().max().item() / scale)
                t = graph_seconds(fn, device, calls=20)
            except Exception as error:  # a tile that does not fit, or a feature this build lacks: say so, go on
                print(f"  {name} {variant} {config}: {type(error).__name__}: {str(error).splitlines()[0][:120]}",
                      flush=True)
                return
            rows.append(dict(shape=name, N=N, K=K, variant=variant, config=config, us=round(t * 1e6, 2),
                             fraction_of_copy=round(bound / t, 3), max_rel_err=err))

        for block_n, block_k in itertools.product((16, 32, 64, 128), (128, 256)):
            record("read", (block_n, block_k),
                   lambda: _read_rows[(triton.cdiv(N, block_n),)](ws[next(turn)], sums, N, K, K, BLOCK_N=block_n,
                                                                  BLOCK_K=block_k, num_warps=4))
        record("cublas", None, lambda: torch.mm(x, ws[next(turn)].t(), out=y), lambda: torch.mm(x, ws[0].t()))
        record("rows", "default", lambda: rows_gemm(x, ws[next(turn)], out=y, pdl=False),
               lambda: rows_gemm(x, ws[0], pdl=False))
        for (block_n, block_k, warps, stages), split, tma in itertools.product(tiles, splits, (False, True)):
            if N % block_n or K % (block_k * split):
                continue
            cfg = (block_n, block_k, warps, stages, split)
            record("tma" if tma else "splitk" if split > 1 else "ptr", cfg,
                   lambda: gemm_split(x, ws[next(turn)], y32, y, *cfg, tma),
                   lambda: gemm_split(x, ws[0], torch.empty_like(y32), torch.empty_like(y), *cfg, tma).clone())
        mine = [r for r in rows if r["shape"] == name]
        print(f"\n{name} ({N} x {K}, {w_bytes / 2**20:.0f} MB, bound {bound * 1e6:.1f} us)", flush=True)
        for variant in ("read", "cublas", "rows", "ptr", "splitk", "tma"):
            group = [r for r in mine if r["variant"] == variant]
            if group:
                best = min(group, key=lambda r: r["us"])
                print(f"  {variant:7s} best {best['us']:8.1f} us  {best['fraction_of_copy']:.1%}  {best['config']}  "
                      f"err {best['max_rel_err']:.1e}", flush=True)
        ws = x = y = y32 = None
        torch.cuda.empty_cache()
    print("\n| shape | read | cuBLAS | rows (default) | ptr | split-K | TMA (any split) |")
    print("|---|---|---|---|---|---|---|")
    for name in shapes_of(args.shape):
        cells = []
        for variant in ("read", "cublas", "rows", "ptr", "splitk", "tma"):
            group = [r for r in rows if r["shape"] == name and r["variant"] == variant]
            best = min(group, key=lambda r: r["us"]) if group else None
            cells.append(f"{best['us']:.1f} us ({best['fraction_of_copy']:.0%})" if best else "-")
        print(f"| {name} | " + " | ".join(cells) + " |")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"gemm_headroom_{args.shape}.json"),
               dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    date=time.strftime("%Y-%m-%d"), rows_m=M, bandwidth=bandwidth, sm_count=sm, results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
