"""Does programmatic dependent launch (PDL, Hopper's griddepcontrol) close the gaps between a decode step's kernels?

A decode step at M=64 rows is ~10 kernels per layer, each bound by reading its weight; the small ones lose a fixed
4-6 us each to launch, ramp-up and tail (bench/skinny_gemm_probe.py, bench/l2_prefetch_probe.py). With PDL a kernel
is scheduled while the previous one drains: its programs start, load what does not depend on the previous kernel
(their weights), and only then wait (``gdc_wait``) for the previous kernel's results.

This times one Llama layer's GEMM chain (q/k/v, o, gate/up, down, each followed by a small row-wise kernel like the
step's rope / add+RMSNorm / SwiGLU), repeated over the model's layers with distinct weights, in one CUDA graph:

    cublas        torch.mm + the small Triton kernel (today's step)
    triton        a weight-streaming Triton GEMM + the small kernel
    triton+pdl    both launched with PDL (wait at the top, dependents released at the top)
    +prefetch     as triton+pdl, and each GEMM program loads its first weight chunk before it waits
    +l2:N         as triton+pdl, and each GEMM program asks the L2 for its first N weight chunks before it waits
                  (``--l2 2,4,8``: no shared memory or registers held, unlike +prefetch)

and checks every variant's final activations against torch.mm's in float32. The GEMM is lorakit's own
(``lorakit.kernels.triton.rows_gemm``). The recorded run (bench/results/pdl_probe_{8b,1b}_h200.json) came from this
script's first version, whose kernels released their dependents before waiting and whose +prefetch mode did not fit
in shared memory (it now drops a pipeline stage, as lorakit does).

    python bench/pdl_probe.py --shape 8b      # prints a table, writes $OUT/pdl_probe_<shape>.json
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import LLAMA_SHAPES, copy_bandwidth, graph_seconds, write_json  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from lorakit.kernels._triton import pdl_launch  # noqa: E402
from lorakit.kernels.triton import pdl as device_pdl  # noqa: E402
from lorakit.kernels.triton.pdl import pdl_enter  # noqa: E402
from lorakit.kernels.triton.rows_gemm import rows_gemm  # noqa: E402  (the GEMM: lorakit's, with its PDL switches)


@triton.jit
def _row_scale(x_ptr, y_ptr, N, stride_x, stride_y, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """y[row, :N] = x[row, :N] / rms(x[row, :N]): the step's small row-wise kernels (RMSNorm and kin)."""
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    pdl_enter(PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=offs < N, other=0.0).to(tl.float32)
    scale = tl.rsqrt(tl.sum(x * x, axis=0) / N + 1e-6)
    tl.store(y_ptr + row * stride_y + offs, (x * scale).to(y_ptr.dtype.element_ty), mask=offs < N)


CONFIG = {  # (N, K) -> (block_n, block_k, warps, stages): bench/skinny_gemm_probe.py's best on the H200
    "8b": {"qkv": (64, 128, 4, 4), "o": (32, 256, 4, 4), "gu": (64, 128, 4, 3), "down": (32, 256, 4, 4)},
    "1b": {"qkv": (32, 256, 4, 4), "o": (16, 256, 4, 4), "gu": (64, 128, 4, 3), "down": (16, 256, 4, 4)},
}


def row_scale(x, y, pdl):
    M, N = x.shape
    _row_scale[(M,)](x, y, N, x.stride(0), y.stride(0), BLOCK=triton.next_power_of_2(N), PDL=pdl,
                     num_warps=8, **pdl_launch(pdl))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("1b", "8b"), default="8b")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--layers", type=int, default=None, help="default: the model's")
    parser.add_argument("--l2", default="", help="comma-separated L2 prefetch chunk counts to add as +l2:N modes")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape = LLAMA_SHAPES[args.shape]
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    head = h // shape["num_attention_heads"]
    n_qkv = h + 2 * shape["num_key_value_heads"] * head
    layers = args.layers or shape["num_hidden_layers"]
    M = args.rows
    bandwidth = copy_bandwidth(device)
    torch.manual_seed(0)
    weights = [dict(qkv=torch.randn(n_qkv, h, device=device, dtype=dtype) / h**0.5,
                    o=torch.randn(h, h, device=device, dtype=dtype) / h**0.5,
                    gu=torch.randn(2 * inter, h, device=device, dtype=dtype) / h**0.5,
                    down=torch.randn(h, inter, device=device, dtype=dtype) / inter**0.5) for _ in range(layers)]
    weight_bytes = sum(w.numel() * w.element_size() for layer in weights for w in layer.values())
    x0 = torch.randn(M, h, device=device, dtype=dtype)
    xh, xn = torch.empty_like(x0), torch.empty_like(x0)
    y_qkv = torch.empty(M, n_qkv, device=device, dtype=dtype)
    y_gu = torch.empty(M, 2 * inter, device=device, dtype=dtype)
    y_gu_n = torch.empty(M, inter, device=device, dtype=dtype)
    cfg = CONFIG[args.shape]

    def chain(mode):
        pdl = mode in ("triton+pdl", "+prefetch") or mode.startswith("+l2:")
        prefetch = mode == "+prefetch"
        l2 = int(mode.split(":")[1]) if mode.startswith("+l2:") else 0

        def mm(x, w, y, name):
            if mode == "cublas":
                torch.mm(x, w.t(), out=y)
            else:
                block_n, block_k, warps, stages = cfg[name]  # the early chunk costs a stage of shared memory
                rows_gemm(x, w, out=y, config=(block_n, block_k, warps, stages - prefetch), pdl=pdl, prefetch=prefetch,
                          l2_chunks=l2)

        def run():
            xh.copy_(x0)
            for w in weights:
                row_scale(xh, xn, pdl)
                mm(xn, w["qkv"], y_qkv, "qkv")
                row_scale(y_qkv[:, :h], xn, pdl)  # stands for rope + attention's output
                mm(xn, w["o"], xh, "o")
                row_scale(xh, xn, pdl)
                mm(xn, w["gu"], y_gu, "gu")
                row_scale(y_gu[:, :inter], y_gu_n, pdl)  # stands for SwiGLU
                mm(y_gu_n, w["down"], xh, "down")
            return xh
        return run

    l2_modes = [f"+l2:{n}" for n in args.l2.split(",") if n]
    modes = ["cublas", "triton"] + (["triton+pdl", "+prefetch"] + l2_modes if device_pdl.gdc_wait is not None else [])
    results, reference = [], None
    for mode in modes:
        run = chain(mode)
        try:
            out = run().float().clone()
            seconds = graph_seconds(run, device, calls=1)  # the buffers then hold the last replay's results
            replayed = xh.float().clone()
        except Exception as error:  # PDL not supported by this Triton / driver: say so and go on
            print(f"{mode}: {type(error).__name__}: {str(error).splitlines()[0][:200]}", flush=True)
            continue
        if reference is None:
            reference = out
        scale = reference.abs().max().item()
        err = max((out - reference).abs().max().item(), (replayed - reference).abs().max().item()) / scale
        bound = weight_bytes / bandwidth
        results.append(dict(mode=mode, us_per_layer=round(seconds / layers * 1e6, 2), ms=round(seconds * 1e3, 3),
                            fraction_of_weight_bound=round(bound / seconds, 3), max_rel_err_vs_cublas=err))
        print(f"{mode}: {seconds * 1e3:.3f} ms, {seconds / layers * 1e6:.1f} us/layer, "
              f"{bound / seconds:.1%} of the weights' bound, rel err {err:.1e}", flush=True)
    print(f"\n{args.shape}, M = {M}, {layers} layers, weights {weight_bytes / 2**30:.2f} GiB, "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("| mode | ms | us / layer | of the weights' bound | max rel err vs cuBLAS |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['mode']} | {r['ms']:.3f} | {r['us_per_layer']:.1f} | {r['fraction_of_weight_bound']:.1%} | "
              f"{r['max_rel_err_vs_cublas']:.1e} |")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"pdl_probe_{args.shape}.json"),
               dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    date=time.strftime("%Y-%m-%d"), shape=args.shape, rows=M, layers=layers,
                    bandwidth=bandwidth, weight_bytes=weight_bytes, results=results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
