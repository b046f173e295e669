"""Where an NF4 decode GEMM's time goes: variants of the inner loop of ``lorakit.kernels.triton.nf4_rows``, timed.

An exploration bench, not a library path: each MODE changes one thing of the loop so that the cost of each step
(the nibble interleave, the code lookup, the scale, the dot) shows as a difference of times on the same shape.

  0  nibbles interleaved back to column order, tl.gather from the code in registers, one dot (the first
     rewrite of the library kernel)
  1  nibbles kept apart: x split into its even / odd columns (one load, tl.split), two dots, tl.gather lookup
     (the library kernel now)
  2  as 1, the lookup a 15-select tree
  3  as 1, the lookup from global memory (code[q], L1-cached gathers)
  4  as 1 without a lookup (q itself as the value: WRONG numbers, the floor of everything but the lookup)
  5  the bytes straight into the dot (WRONG numbers: the floor of the load + dot pipeline)

Usage (GPU): python bench/nf4_gemm_variants.py   (~1-2 min; prints a table, writes $OUT/nf4_gemm_variants.json)
       python bench/nf4_gemm_variants.py --dequantize   (the Triton dequantize kernel alone, both code lookups,
       as a fraction of the copy bandwidth; writes $OUT/nf4_dequantize_speed.json)
       python bench/nf4_gemm_variants.py --gemv   (the 1-4 row matrix-vector kernel: tile sweep, beside the others;
       writes $OUT/nf4_gemv_speed.json)
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import graph_seconds  # noqa: E402

from lorakit.kernels.nf4 import decode_absmax  # noqa: E402
from lorakit.kernels.nf4_rows import NF4Rows, nf4_rows_linear_reference  # noqa: E402
from lorakit.quant.nf4 import quantize_nf4  # noqa: E402
from lorakit.kernels.triton.nf4_rows import nf4_rows_gemm  # noqa: E402


@triton.jit
def _select16(q, code_ptr):
    """code[q] for q in [0, 16) as a tree of selects on q's bits: 15 selects per value, no memory access."""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    c = [tl.load(code_ptr + i) for i in tl.static_range(16)]
    low = tl.where(b2, tl.where(b1, tl.where(b0, c[7], c[6]), tl.where(b0, c[5], c[4])),
                   tl.where(b1, tl.where(b0, c[3], c[2]), tl.where(b0, c[1], c[0])))
    high = tl.where(b2, tl.where(b1, tl.where(b0, c[15], c[14]), tl.where(b0, c[13], c[12])),
                    tl.where(b1, tl.where(b0, c[11], c[10]), tl.where(b0, c[9], c[8])))
    return tl.where((q & 8) != 0, high, low)


@triton.jit
def _variant(x_ptr, packed_ptr, scales_ptr, code_ptr, y_ptr, M, N, K, MODE: tl.constexpr, BLOCKSIZE: tl.constexpr,
             UNROLL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    HALF: tl.constexpr = BLOCKSIZE // 2
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows64 = offs_n.to(tl.int64)
    byte_ptrs = packed_ptr + rows64[:, None] * (K // 2) + tl.arange(0, HALF)[None, :]
    scale_ptrs = scales_ptr + rows64 * (K // BLOCKSIZE)
    x_ptrs = x_ptr + offs_m[:, None] * K + tl.arange(0, BLOCKSIZE)[None, :]
    table = tl.load(code_ptr + tl.arange(0, 16)[None, :] + 0 * offs_n[:, None])  # (BLOCK_N, 16)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCKSIZE * UNROLL):
        for u in tl.static_range(UNROLL):
            k = k0 + u * BLOCKSIZE
            byte = tl.load(byte_ptrs + k // 2, mask=mask_n[:, None], other=0).to(tl.int32)
            scale = tl.load(scale_ptrs + k // BLOCKSIZE, mask=mask_n, other=0.0)[:, None]
            x = tl.load(x_ptrs + k, mask=mask_m[:, None], other=0.0)
            if MODE == 0:
                w = tl.gather(table, tl.interleave(byte >> 4, byte & 15), 1) * scale
                acc = tl.dot(x, tl.trans(w.to(x_ptr.dtype.element_ty)), acc)
            else:
                x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, HALF, 2)))
                hi = byte >> 4
                lo = byte & 15
                if MODE == 1:
                    w_hi = tl.gather(table, hi, 1)
                    w_lo = tl.gather(table, lo, 1)
                elif MODE == 2:
                    w_hi = _select16(hi, code_ptr)
                    w_lo = _select16(lo, code_ptr)
                elif MODE == 3:
                    w_hi = tl.load(code_ptr + hi)
                    w_lo = tl.load(code_ptr + lo)
                elif MODE == 4:
                    w_hi = hi.to(tl.float32)
                    w_lo = lo.to(tl.float32)
                else:
                    w_hi = byte.to(tl.float32)
                    w_lo = w_hi
                if MODE != 5:
                    w_hi = w_hi * scale
                    w_lo = w_lo * scale
                acc = tl.dot(x_even, tl.trans(w_hi.to(x_ptr.dtype.element_ty)), acc)
                acc = tl.dot(x_odd, tl.trans(w_lo.to(x_ptr.dtype.element_ty)), acc)
    mask = mask_m[:, None] & mask_n[None, :]
    tl.store(y_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def run_variant(x, member, mode, block_n, unroll, warps, stages):
    M, K = x.shape
    N = member.out_features
    y = torch.empty(M, N, dtype=x.dtype, device=x.device)
    _variant[(triton.cdiv(N, block_n),)](x, member.packed, member.scales, member.code, y, M, N, K, MODE=mode,
                                         BLOCKSIZE=member.blocksize, UNROLL=unroll, BLOCK_M=max(16, triton.next_power_of_2(M)),
                                         BLOCK_N=block_n, num_warps=warps, num_stages=stages)
    return y


def dequantize_rows(device, dtype):
    """Triton dequantize (``lorakit.kernels.nf4.dequantize_nf4``) of the 8B projection shapes, both code lookups,
    with the float32 scales the static decoder reads and with double quantization (QLoRA training's layers), as a
    fraction of the copy bandwidth (bytes: packed + scales + the dense output)."""
    from bench_common import copy_bandwidth

    from lorakit.kernels.nf4 import NF4Weight, dequantize_nf4, dequantize_nf4_reference
    from lorakit.kernels.triton import nf4 as triton_nf4

    bandwidth = copy_bandwidth(device)
    rows = []
    for name, (N, K) in {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}.items():
        q = quantize_nf4(torch.randn(N, K, device=device, dtype=dtype) * 0.02, blocksize=64)
        plain = NF4Weight(q.packed, decode_absmax(q), None, None, q.code, None, (N, K), 64)
        for label, w in (("float32 scales", plain), ("double quantized", q)):
            truth = dequantize_nf4_reference(w.packed, decode_absmax(w), w.code, (N, K), 64, dtype)
            scale_bytes = w.absmax.numel() * w.absmax.element_size()
            moved = w.packed.numel() + scale_bytes + N * K * 2
            for lut in ("load", "gather"):
                triton_nf4.DEQUANTIZE_LUT = lut
                exact = bool(torch.equal(dequantize_nf4(w, dtype), truth))
                t = graph_seconds(lambda: dequantize_nf4(w, dtype), device)
                rows.append(dict(shape=name, N=N, K=K, scales=label, lut=lut, us=round(t * 1e6, 2), exact=exact,
                                 fraction_of_copy_bandwidth=round(moved / t / bandwidth, 3)))
                print(rows[-1], flush=True)
    triton_nf4.DEQUANTIZE_LUT = "load"
    print("\n| shape | scales | lookup | us | of the copy bandwidth | bit-exact |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['scales']} | {r['lut']} | {r['us']} | {r['fraction_of_copy_bandwidth']} | {r['exact']} |")
    return rows


def gemv_rows(device, dtype):
    """The matrix-vector kernel (``lorakit.kernels.triton.nf4_gemv``) on the 8B projection groups at 1, 2 and 4
    rows: a tile sweep at 1 row, the best tile at 2 and 4, beside the tensor-core kernel (default tiles), Triton
    dequantize + cuBLAS and bf16 cuBLAS; the fraction of the NF4 bound (packed bytes + float32 scales + x + y over
    the copy bandwidth)."""
    import itertools

    from bench_common import copy_bandwidth

    from lorakit.kernels import nf4_rows
    from lorakit.kernels.triton.nf4_gemv import nf4_gemv

    bandwidth = copy_bandwidth(device)
    configs = ([(bn, nb, lut, w, 3) for bn, nb, lut, w in itertools.product((8, 16, 32), (32, 64), ("load", "gather"), (4,))]
               + [(4, 64, "load", 2, 3), (16, 128, "load", 4, 3), (16, 64, "load", 8, 3), (32, 64, "load", 8, 3),
                  (16, 32, "load", 2, 4), (64, 32, "load", 8, 3)])
    out = []
    for name, sizes, K in (("qkv", (4096, 1024, 1024), 4096), ("o", (4096,), 4096), ("gate_up", (14336, 14336), 4096),
                           ("down", (4096,), 14336)):
        members = []
        for n in sizes:
            q = quantize_nf4(torch.randn(n, K, device=device, dtype=dtype) * 0.02, blocksize=64)
            members.append(NF4Rows(q.packed, decode_absmax(q), q.code, n, 64))
        weights = [(m.packed, m.scales, m.code, m.out_features) for m in members]
        N = sum(sizes)
        dense = torch.randn(N, K, device=device, dtype=dtype)
        nf4_bytes = sum(m.packed.numel() + m.scales.numel() * 4 for m in members)
        best = None
        for rows in (1, 2, 4):
            x = torch.randn(rows, K, device=device, dtype=dtype)
            truth = nf4_rows.nf4_rows_linear_reference(x.float(), members)
            times = {}
            for config in (configs if rows == 1 else [best]):
                try:
                    got = nf4_gemv(x, weights, 64, config=config, pdl=False)
                    error = float((got.float() - truth).abs().max() / truth.abs().max())
                    times[config] = (graph_seconds(lambda c=config: nf4_gemv(x, weights, 64, config=c, pdl=False),
                                                   device), error)
                except Exception as exc:
                    print(f"  gemv {name} {config}: {type(exc).__name__}: {str(exc)[:100]}", flush=True)
            if rows == 1:
                best = min(times, key=lambda c: times[c][0])
            t, error = times[best]
            saved = nf4_rows.MAX_FUSED_ROWS, nf4_rows.MAX_GEMV_ROWS
            nf4_rows.MAX_FUSED_ROWS = nf4_rows.MAX_GEMV_ROWS = 0
            t_deq = graph_seconds(lambda: nf4_rows.nf4_rows_linear(x, members), device)
            nf4_rows.MAX_FUSED_ROWS, nf4_rows.MAX_GEMV_ROWS = saved
            t_dot = graph_seconds(lambda: nf4_rows_gemm(x, weights, 64, pdl=False), device)
            t_bf16 = graph_seconds(lambda: x @ dense.t(), device)
            bound = (nf4_bytes + (x.numel() + rows * N) * 2) / bandwidth
            row = dict(group=name, N=N, K=K, rows=rows, gemv_config=best, gemv_us=round(t * 1e6, 2),
                       gemv_rel_error=round(error, 5), gemv_fraction_of_bound=round(bound / t, 3),
                       dot_kernel_us=round(t_dot * 1e6, 2), dequantize_blas_us=round(t_deq * 1e6, 2),
                       bf16_cublas_us=round(t_bf16 * 1e6, 2),
                       sweep_us={str(c): round(v[0] * 1e6, 2) for c, v in sorted(times.items(), key=lambda kv: kv[1][0])})
            print(row, flush=True)
            out.append(row)
    print("\n| group | rows | GEMV us (tile) | of NF4 bound | tensor-core kernel us | dequantize + cuBLAS us | bf16 cuBLAS us |"
          "\n|---|---|---|---|---|---|---|")
    for r in out:
        print(f"| {r['group']} | {r['rows']} | {r['gemv_us']} {r['gemv_config']} | {r['gemv_fraction_of_bound']} | "
              f"{r['dot_kernel_us']} | {r['dequantize_blas_us']} | {r['bf16_cublas_us']} |")
    return out


def write_rows(name: str, rows: list) -> None:
    """``rows`` with the run's versions, device and date, as JSON in $OUT (or bench/results/)."""
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    meta = dict(torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    with open(os.path.join(out_dir, name), "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)


def main() -> int:
    device = torch.device("cuda")
    dtype = torch.bfloat16
    if "--gemv" in sys.argv:
        write_rows("nf4_gemv_speed.json", gemv_rows(device, dtype))
        return 0
    if "--dequantize" in sys.argv:
        write_rows("nf4_dequantize_speed.json", dequantize_rows(device, dtype))
        return 0
    rows_out = []
    shapes = {"qkv": (6144, 4096), "down": (4096, 14336)}
    for name, (N, K) in shapes.items():
        dense = torch.randn(N, K, device=device, dtype=dtype) * 0.02
        q = quantize_nf4(dense, blocksize=64)

        member = NF4Rows(q.packed, decode_absmax(q), q.code, N, 64)
        for M in (1, 64):
            x = torch.randn(M, K, device=device, dtype=dtype)
            truth = nf4_rows_linear_reference(x.float(), [member])
            t_lib = graph_seconds(lambda: nf4_rows_gemm(x, [(member.packed, member.scales, member.code, N)], 64,
                                                        pdl=False), device)
            t_dense = graph_seconds(lambda: x @ dense.t(), device)
            base = dict(shape=name, N=N, K=K, rows=M)
            rows_out.append(dict(base, variant="library default", us=round(t_lib * 1e6, 2)))
            rows_out.append(dict(base, variant="bf16 cuBLAS", us=round(t_dense * 1e6, 2)))
            for mode in range(6):
                best = None
                for block_n, unroll, warps, stages in ((32, 2, 4, 3), (64, 2, 4, 3), (64, 4, 8, 3), (16, 2, 4, 4),
                                                       (128, 2, 8, 3)):
                    try:
                        y = run_variant(x, member, mode, block_n, unroll, warps, stages)
                        err = float((y.float() - truth).abs().max() / truth.abs().max())
                        t = graph_seconds(lambda: run_variant(x, member, mode, block_n, unroll, warps, stages), device)
                    except Exception as error:
                        print(f"  {name} M={M} mode {mode} {(block_n, unroll, warps, stages)}: {type(error).__name__}: "
                              f"{str(error)[:100]}", flush=True)
                        continue
                    if best is None or t < best[0]:
                        best = (t, (block_n, unroll, warps, stages), err)
                if best:
                    rows_out.append(dict(base, variant=f"mode {mode}", us=round(best[0] * 1e6, 2), config=best[1],
                                         rel_error=round(best[2], 5)))
            for r in rows_out:
                if r["shape"] == name and r["rows"] == M:
                    print(r, flush=True)
    print("\n| shape | rows | variant | us | rel error |\n|---|---|---|---|---|")
    for r in rows_out:
        print(f"| {r['shape']} | {r['rows']} | {r['variant']} {r.get('config', '')} | {r['us']} | {r.get('rel_error', '')} |")
    write_rows("nf4_gemm_variants.json", rows_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
