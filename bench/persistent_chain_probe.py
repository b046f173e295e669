"""Would a persistent decode kernel reach issue 7's 90%? A probe on the decode step's GEMM chain.

Issue 7's decode step (64 rows) is a chain of weight-streaming GEMMs (q/k/v, o, gate/up, down per layer) and small
kernels. bench/gemm_headroom_probe.py found each small GEMM loses 4-5 us to its kernel's ramp-up and drain, and
that no tile, split or load path inside one kernel recovers it: the remaining route is a persistent kernel that
never ends between GEMMs. This probe builds the smallest honest version of that and times it against today's path:

    persistent    ONE launch of one program per SM (``--ctas-per-sm``) running every GEMM of every layer. Each GEMM's
                  (column block x K chunk) iterations are split evenly over the programs (stream-K: a block whose
                  chunks span two programs gets two float32 atomic adds), so no program idles while another
                  finishes a last wave. Between GEMMs a grid barrier (an atomic counter, release / acquire at GPU
                  scope). Before waiting at it, a program asks the L2 for the first ``--prefetch`` chunks of its
                  share of the next weight, which no stage writes, so DRAM keeps streaming through the barrier.
                  Each GEMM's float32 output is zeroed in-kernel two stages ahead (timed with it).
    per-stage     the same kernel launched once per GEMM (kernel boundaries instead of barriers)
    rows+pdl      lorakit's decode GEMM (``lorakit.kernels.triton.rows_gemm``, PDL and its L2 prefetch: today's
                  step) chained the same way, bf16 in and out
    cublas        torch.mm chained the same way

The chain: x -> q/k/v -> its first `hidden` columns -> o -> gate/up -> its first `intermediate` columns -> down ->
next layer, with distinct random weights per layer (13 GB at 8B, past any cache). Every variant is checked against
a float32 product of its own inputs (per GEMM, first and last layer). Prints a table (ms per chain, fraction of
the weight-read bound at the measured copy bandwidth, as issue 7 counts it) and writes
$OUT/persistent_chain_<shape>.json.

    python bench/persistent_chain_probe.py --shape 8b
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
from lorakit.kernels._triton import programmatic_launches  # noqa: E402
from lorakit.kernels.triton.pdl import l2_prefetch  # noqa: E402
from lorakit.kernels.triton.rows_gemm import rows_gemm  # noqa: E402

GEMMS_PER_LAYER = 4  # q/k/v, o, gate/up, down
SPIN_LIMIT = 1 << 21  # polls before a barrier gives up and flags an error (a hang would cost the whole device call)


@triton.jit
def _stage(s, x0_ptr, wq_ptr, wo_ptr, wg_ptr, wd_ptr, yq_ptr, yo_ptr, yg_ptr, yd_ptr, M, H, QKV, INTER):
    """Stage s = 4 * layer + g: (x, x's row stride, W (N, K), y (M, N) float32, N, K) of GEMM g of that layer."""
    layer = s // 4
    g = s % 4
    if g == 0:
        if layer == 0:
            x = x0_ptr
        else:
            x = yd_ptr + (layer - 1) * M * H
        stride_x = H
        w = wq_ptr + layer.to(tl.int64) * QKV * H
        y = yq_ptr + layer * M * QKV
        n = QKV
        k = H
    elif g == 1:
        x = yq_ptr + layer * M * QKV
        stride_x = QKV
        w = wo_ptr + layer.to(tl.int64) * H * H
        y = yo_ptr + layer * M * H
        n = H
        k = H
    elif g == 2:
        x = yo_ptr + layer * M * H
        stride_x = H
        w = wg_ptr + layer.to(tl.int64) * 2 * INTER * H
        y = yg_ptr + layer * M * 2 * INTER
        n = 2 * INTER
        k = H
    else:
        x = yg_ptr + layer * M * 2 * INTER
        stride_x = 2 * INTER
        w = wd_ptr + layer.to(tl.int64) * H * INTER
        y = yd_ptr + layer * M * H
        n = H
        k = INTER
    return x, stride_x, w, y, n, k


@triton.jit
def _zero_share(y_ptr, count, pid, P, BLOCK: tl.constexpr):
    """Zero this program's 1/P of y[:count] (float32)."""
    start = pid * count // P
    end = (pid + 1) * count // P
    for off in range(start, end, BLOCK):
        offs = off + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < end)


@triton.jit
def _gemm_share(x_ptr, stride_x, w_ptr, y_ptr, M, N, K, pid, P, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """y (M, N) float32 += x[:, :K] (float32, rounded to W's dtype) @ W (N, K)^T over this program's 1/P of the
    (column block, K chunk) iterations, block-major. N % BLOCK_N == 0 and K % BLOCK_K == 0 (checked by the host)."""
    kiters = K // BLOCK_K
    total = (N // BLOCK_N) * kiters
    it = pid * total // P
    end = (pid + 1) * total // P
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    while it < end:
        block = it // kiters
        k0 = it - block * kiters
        k1 = tl.minimum(kiters, k0 + end - it)
        cols = block * BLOCK_N + offs_n
        x_ptrs = x_ptr + offs_m[:, None] * stride_x + (k0 * BLOCK_K + offs_k)[None, :]
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * K + (k0 * BLOCK_K + offs_k)[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in tl.range(k0, k1, num_stages=STAGES):
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs)
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        tl.atomic_add(y_ptr + offs_m[:, None] * N + cols[None, :], acc, mask=mask_m[:, None], sem="relaxed")
        it += k1 - k0


@triton.jit
def _gemm_tiles(x_ptr, stride_x, w_ptr, y_ptr, M, N, K, pid, P, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_K: tl.constexpr, STAGES: tl.constexpr):
    """y (M, N) = x[:, :K] @ W (N, K)^T for column blocks pid, pid + P, ...: whole-K tiles, plain stores in y's dtype
    (lorakit's rows GEMM, looped: the last wave leaves programs idle, as separate launches do)."""
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    for block in range(pid, N // BLOCK_N, P):
        cols = block * BLOCK_N + offs_n
        x_ptrs = x_ptr + offs_m[:, None] * stride_x + offs_k[None, :]
        w_ptrs = w_ptr + cols[:, None].to(tl.int64) * K + offs_k[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in tl.range(0, K // BLOCK_K, num_stages=STAGES):
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs)
            acc = tl.dot(x.to(w.dtype), tl.trans(w), acc)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        tl.store(y_ptr + offs_m[:, None] * N + cols[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None])


@triton.jit
def _prefetch_share(w_ptr, N, K, pid, P, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, CHUNKS: tl.constexpr,
                    LINE: tl.constexpr, STREAM_K: tl.constexpr):
    """Ask the L2 for the first CHUNKS K chunks of this program's share of W (N, K): one pointer per 128-byte line."""
    if STREAM_K:
        kiters = K // BLOCK_K
        it = pid * ((N // BLOCK_N) * kiters) // P
        block = it // kiters
        k0 = it - block * kiters
    else:
        block = tl.minimum(pid, N // BLOCK_N - 1)
        k0 = 0
    rows = (block * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64) * K
    lines = tl.arange(0, BLOCK_K // LINE) * LINE
    for c in tl.static_range(CHUNKS):
        cols = tl.minimum((k0 + c) * BLOCK_K + lines, K - 1)
        l2_prefetch(w_ptr + rows[:, None] + cols[None, :])


@triton.jit
def _grid_sync(counter_ptr, target, error_ptr, SPIN: tl.constexpr):
    """Wait until every program has arrived (the counter reaches target). Writes before it are visible after it."""
    tl.debug_barrier()  # the whole program's writes are issued before its arrival is released
    tl.atomic_add(counter_ptr, 1, sem="release", scope="gpu")
    seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    polls = 0
    failed = tl.atomic_add(error_ptr, 0, sem="relaxed", scope="gpu")
    while (seen < target) & (polls < SPIN) & (failed == 0):  # once one barrier gave up, none waits again
        seen = tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
        polls += 1
        if polls % 1024 == 0:
            failed = tl.atomic_add(error_ptr, 0, sem="relaxed", scope="gpu")
    if seen < target:
        tl.atomic_xchg(error_ptr, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _chain(x0_ptr, wq_ptr, wo_ptr, wg_ptr, wd_ptr, yq_ptr, yo_ptr, yg_ptr, yd_ptr, counter_ptr, error_ptr,
           M, H, QKV, INTER, LAYERS, first_stage, last_stage,
           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
           BARRIER: tl.constexpr, PREFETCH: tl.constexpr, LINE: tl.constexpr, SPIN: tl.constexpr,
           STREAM_K: tl.constexpr):
    """Stages [first_stage, last_stage) of the chain. BARRIER: one persistent launch (grid barriers between stages,
    and the first two outputs zeroed here); otherwise one launch per stage (outputs 0 and 1 zeroed by the host).
    STREAM_K: float32 atomics over an even split of each GEMM's iterations; otherwise whole column blocks (no zeroing).
    """
    pid = tl.program_id(0)
    P = tl.num_programs(0)
    n_stages = LAYERS * 4
    syncs = 0
    if BARRIER and STREAM_K:
        for z in range(first_stage, tl.minimum(first_stage + 2, n_stages)):
            _, _, _, yz, nz, _ = _stage(z, x0_ptr, wq_ptr, wo_ptr, wg_ptr, wd_ptr, yq_ptr, yo_ptr, yg_ptr, yd_ptr,
                                        M, H, QKV, INTER)
            _zero_share(yz, M * nz, pid, P, 1024)
    if BARRIER:
        syncs += 1
        _grid_sync(counter_ptr, syncs * P, error_ptr, SPIN)
    for s in range(first_stage, last_stage):
        if STREAM_K and s + 2 < n_stages:  # nothing reads or writes stage s+2's output before two barriers from now
            _, _, _, yz, nz, _ = _stage(s + 2, x0_ptr, wq_ptr, wo_ptr, wg_ptr, wd_ptr, yq_ptr, yo_ptr, yg_ptr,
                                        yd_ptr, M, H, QKV, INTER)
            _zero_share(yz, M * nz, pid, P, 1024)
        x, stride_x, w, y, n, k = _stage(s, x0_ptr, wq_ptr, wo_ptr, wg_ptr, wd_ptr, yq_ptr, yo_ptr, yg_ptr, yd_ptr,
                                         M, H, QKV, INTER)
        if STREAM_K:
            _gemm_share(x, stride_x, w, y, M, n, k, pid, P, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
        else:
            _gemm_tiles(x, stride_x, w, y, M, n, k, pid, P, BLOCK_M, BLOCK_N, BLOCK_K, STAGES)
        if BARRIER:
            if s + 1 < last_stage:
                if PREFETCH > 0:
                    _, _, wn, _, nn, kn = _stage(s + 1, x0_ptr, wq_ptr, wo_ptr, wg_ptr, wd_ptr, yq_ptr, yo_ptr,
                                                 yg_ptr, yd_ptr, M, H, QKV, INTER)
                    _prefetch_share(wn, nn, kn, pid, P, BLOCK_N, BLOCK_K, PREFETCH, LINE, STREAM_K)
                syncs += 1
                _grid_sync(counter_ptr, syncs * P, error_ptr, SPIN)


class Chain:
    """The chain's weights, stacked per projection, and float32 outputs of every (layer, GEMM).

    wq (L, QKV, H), wo (L, H, H), wg (L, 2 I, H), wd (L, H, I) in ``dtype``; yq (L, M, QKV) ... and x0 (M, H) in
    ``out_dtype``: float32 for the stream-K kernel's atomics, or ``dtype`` for whole column blocks."""

    def __init__(self, hidden: int, inter: int, qkv: int, layers: int, rows: int, device, dtype, seed: int = 0,
                 out_dtype=torch.float32):
        g = torch.Generator(device=device).manual_seed(seed)

        def weight(n, k):
            return (torch.randn(layers, n, k, device=device, dtype=dtype, generator=g) / k**0.5).contiguous()

        self.H, self.I, self.QKV, self.L, self.M = hidden, inter, qkv, layers, rows
        self.wq, self.wo, self.wg, self.wd = weight(qkv, hidden), weight(hidden, hidden), weight(2 * inter, hidden), \
            weight(hidden, inter)
        self.stream_k = out_dtype == torch.float32
        self.x0 = torch.randn(rows, hidden, device=device, generator=g).to(out_dtype)
        self.yq = torch.zeros(layers, rows, qkv, device=device, dtype=out_dtype)
        self.yo = torch.zeros(layers, rows, hidden, device=device, dtype=out_dtype)
        self.yg = torch.zeros(layers, rows, 2 * inter, device=device, dtype=out_dtype)
        self.yd = torch.zeros(layers, rows, hidden, device=device, dtype=out_dtype)
        self.counter = torch.zeros(1, dtype=torch.int32, device=device)
        self.error = torch.zeros(1, dtype=torch.int32, device=device)

    def weight_bytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in (self.wq, self.wo, self.wg, self.wd))

    def gemm(self, layer: int, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x (M, K) float32, W (N, K), y (M, N) float32) of GEMM g of ``layer`` as the kernel reads and writes them."""
        H, I = self.H, self.I
        if g == 0:
            return (self.x0 if layer == 0 else self.yd[layer - 1]), self.wq[layer], self.yq[layer]
        if g == 1:
            return self.yq[layer][:, :H], self.wo[layer], self.yo[layer]
        if g == 2:
            return self.yo[layer], self.wg[layer], self.yg[layer]
        return self.yg[layer][:, :I], self.wd[layer], self.yd[layer]


def run_chain(c: Chain, programs: int, config: tuple[int, int, int, int], barrier: bool, prefetch: int,
              first: int = 0, last: int | None = None):
    """Run stages [first, last) of the chain with ``programs`` programs: one launch (barrier) or one per stage.
    Returns the last launch's compiled kernel."""
    block_n, block_k, warps, stages = config
    last = GEMMS_PER_LAYER * c.L if last is None else last
    for n, k in ((c.QKV, c.H), (c.H, c.H), (2 * c.I, c.H), (c.H, c.I)):
        if n % block_n or k % block_k:
            raise ValueError(f"a ({n}, {k}) weight does not tile by ({block_n}, {block_k})")
    line = 128 // c.wq.element_size()
    common = dict(BLOCK_M=max(16, triton.next_power_of_2(c.M)), BLOCK_N=block_n, BLOCK_K=block_k, STAGES=stages,
                  LINE=line, SPIN=SPIN_LIMIT, STREAM_K=c.stream_k, num_warps=warps)
    args = (c.x0, c.wq, c.wo, c.wg, c.wd, c.yq, c.yo, c.yg, c.yd, c.counter, c.error, c.M, c.H, c.QKV, c.I, c.L)
    if barrier:
        c.counter.zero_()
        return _chain[(programs,)](*args, first, last, BARRIER=True, PREFETCH=prefetch, **common)
    for s in range(first, min(first + 2, last) if c.stream_k else first):  # the launches zero stage s+2 themselves
        c.gemm(s // 4, s % 4)[2].zero_()
    for s in range(first, last):
        kernel = _chain[(programs,)](*args, s, s + 1, BARRIER=False, PREFETCH=0, **common)
    return kernel


def check_chain(c: Chain, layers: list[int]) -> float:
    """Largest error of any checked GEMM's output against float32 x (rounded to W's dtype) @ W^T, over its scale."""
    worst = 0.0
    for layer in layers:
        for g in range(GEMMS_PER_LAYER):
            x, w, y = c.gemm(layer, g)
            truth = x.to(w.dtype).float() @ w.float().t()
            worst = max(worst, ((y.float() - truth).abs().max() / truth.abs().max().clamp_min(1e-30)).item())
    return worst


def torch_chain(c: Chain, gemm, outs: list[torch.Tensor]) -> None:
    """The same chain with ``gemm(x, w, out)`` per projection, in W's dtype: outs[4 * layer + g] (M, N)."""
    x = c.x0.to(c.wq.dtype)
    for layer in range(c.L):
        q = gemm(x, c.wq[layer], outs[4 * layer])
        o = gemm(q[:, :c.H], c.wo[layer], outs[4 * layer + 1])
        gu = gemm(o, c.wg[layer], outs[4 * layer + 2])
        x = gemm(gu[:, :c.I], c.wd[layer], outs[4 * layer + 3])


def torch_chain_error(c: Chain, outs: list[torch.Tensor], layers: list[int]) -> float:
    worst = 0.0
    for layer in layers:
        xs = [c.x0.to(c.wq.dtype) if layer == 0 else outs[4 * layer - 1], outs[4 * layer][:, :c.H],
              outs[4 * layer + 1], outs[4 * layer + 2][:, :c.I]]
        for g, w in enumerate((c.wq[layer], c.wo[layer], c.wg[layer], c.wd[layer])):
            truth = xs[g].float() @ w.float().t()
            err = (outs[4 * layer + g].float() - truth).abs().max() / truth.abs().max().clamp_min(1e-30)
            worst = max(worst, err.item())
    return worst


def max_programs_per_sm(c: Chain, config, prefetch: int) -> int:
    """How many programs of the persistent kernel fit on one SM at once (shared memory and registers)."""
    kernel = run_chain(c, 1, config, barrier=True, prefetch=prefetch, first=0, last=1)  # compiles
    torch.cuda.synchronize()
    props = torch.cuda.get_device_properties(c.x0.device)
    smem = getattr(props, "shared_memory_per_multiprocessor", 228 * 1024)
    threads = config[2] * 32
    by_smem = smem // max(1, kernel.metadata.shared + 1024)
    by_regs = 65536 // max(1, kernel.n_regs * threads)
    return max(0, min(by_smem, by_regs, 2048 // threads))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=("1b", "8b"), default="8b")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--layers", type=int, default=0, help="layers in the chain (0: the model's)")
    parser.add_argument("--configs", default="64x128x4x4,64x128x4x3,32x256x4x3,64x256x8x3",
                        help="BLOCK_NxBLOCK_KxWARPSxSTAGES, comma-separated")
    parser.add_argument("--prefetch", default="0,1,2", help="L2 chunks prefetched before each barrier")
    parser.add_argument("--ctas-per-sm", default="1,2")
    parser.add_argument("--modes", default="stream-k,tiles",
                        help="stream-k (float32 atomics, even split) and/or tiles (whole column blocks, bf16 outputs)")
    args = parser.parse_args()
    device, dtype = torch.device("cuda"), torch.bfloat16
    shape = LLAMA_SHAPES[args.shape]
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    qkv = hidden + 2 * shape["num_key_value_heads"] * (hidden // shape["num_attention_heads"])
    layers = args.layers or shape["num_hidden_layers"]
    bandwidth = copy_bandwidth(device)
    sm = torch.cuda.get_device_properties(device).multi_processor_count
    chains = {mode: Chain(hidden, inter, qkv, layers, args.rows, device, dtype,
                          out_dtype=torch.float32 if mode == "stream-k" else dtype)
              for mode in args.modes.split(",")}  # same seed: the same weights
    c = next(iter(chains.values()))
    bound = c.weight_bytes() / bandwidth
    print(f"{args.shape}: {layers} layers, {c.weight_bytes() / 1e9:.2f} GB of weights, copy bandwidth "
          f"{bandwidth / 1e12:.2f} TB/s, bound {bound * 1e3:.3f} ms, {sm} SMs, M = {args.rows}", flush=True)
    checked = [0, layers - 1]
    rows = []

    def record(variant, detail, fn, check):
        try:
            fn()
            torch.cuda.synchronize()
            err = check()
            t = graph_seconds(fn, device, calls=2)
        except Exception as error:  # a tile that does not fit: say so, go on
            print(f"  {variant} {detail}: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
            return
        rows.append(dict(variant=variant, detail=detail, ms=round(t * 1e3, 4), fraction_of_bound=round(bound / t, 4),
                         max_rel_err=err))
        print(f"  {variant:20s} {detail:28s} {t * 1e3:8.3f} ms  {bound / t:6.1%}  err {err:.1e}", flush=True)

    outs = [torch.empty(args.rows, n, device=device, dtype=dtype)
            for _ in range(layers) for n in (qkv, hidden, 2 * inter, hidden)]
    record("cublas", "torch.mm", lambda: torch_chain(c, lambda x, w, o: torch.mm(x, w.t(), out=o), outs),
           lambda: torch_chain_error(c, outs, checked))

    def rows_pdl():
        with programmatic_launches():
            torch_chain(c, lambda x, w, o: rows_gemm(x, w, out=o), outs)

    record("rows+pdl", "lorakit default", rows_pdl, lambda: torch_chain_error(c, outs, checked))
    for (mode, c), text in itertools.product(chains.items(), args.configs.split(",")):
        config = tuple(int(v) for v in text.split("x"))
        try:
            fit = max_programs_per_sm(c, config, 0)
        except Exception as error:
            print(f"  {mode} config {text}: {type(error).__name__}: {str(error).splitlines()[0][:160]}", flush=True)
            continue
        for per_sm in (int(v) for v in args.ctas_per_sm.split(",")):
            if per_sm > fit:
                print(f"  {mode} config {text}: {per_sm} programs per SM do not fit (at most {fit})", flush=True)
                continue
            programs = per_sm * sm
            record(f"per-stage {mode}", f"{text} P={programs}",
                   lambda: run_chain(c, programs, config, barrier=False, prefetch=0),
                   lambda: check_chain(c, checked))
            for prefetch in (int(v) for v in args.prefetch.split(",")):
                c.error.zero_()
                record(f"persistent {mode}", f"{text} P={programs} l2:{prefetch}",
                       lambda: run_chain(c, programs, config, barrier=True, prefetch=prefetch),
                       lambda: check_chain(c, checked))
                if c.error.item():
                    print("  a grid barrier gave up waiting: the timing above is not valid", flush=True)
                    rows[-1]["barrier_timed_out"] = True
    print(f"\n| {args.shape} GEMM chain, {layers} layers, M = {args.rows} | ms | of bound | max rel err |")
    print("|---|---|---|---|")
    for variant in ("cublas", "rows+pdl", "per-stage tiles", "persistent tiles", "per-stage stream-k",
                    "persistent stream-k"):
        group = [r for r in rows if r["variant"] == variant and not r.get("barrier_timed_out")]
        if group:
            best = min(group, key=lambda r: r["ms"])
            print(f"| {variant} ({best['detail']}) | {best['ms']:.3f} | {best['fraction_of_bound']:.1%} | "
                  f"{best['max_rel_err']:.1e} |")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, f"persistent_chain_{args.shape}.json"),
               dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                    date=time.strftime("%Y-%m-%d"), rows_m=args.rows, layers=layers, bandwidth=bandwidth,
                    weight_bytes=c.weight_bytes(), bound_s=bound, sm_count=sm, results=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
