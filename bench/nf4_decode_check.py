"""The static decoder on an NF4 (QLoRA) base: checks and speed against the bf16 base and transformers, one run.

A random bf16 Llama-3.1-8B shape (32 layers; ``--layers 8`` if memory or time is tight), LoRA adapters r=16
alpha=32 on the seven projections (lora_B random, so that they move the logits), quantized to NF4 by lorakit
(``lorakit.quantize(model, "nf4")``: blocksize 64, double quantization; the adapters stay bf16; the head and
embeddings stay dense), 64 rows of 512-token prompts, rows on adapter ``i % n`` for n = 8 and 64, every 8th row
without an adapter:

  1. check: the first decode step's next-token logits of ``StaticDecoder.step`` on the NF4 model (CUDA graph, the
     fused NF4 rows GEMM) vs transformers' forward of the same NF4 model (``lorakit.generation.decode``: NF4Linear
     dequantizes, then cuBLAS), both vs a float32 copy of that NF4 model (the same 4-bit weights, float32 math:
     the truth). Relative errors: max abs difference over the truth's max abs logit. Passes when the static
     decoder is within 2x transformers' own bf16 error plus 1e-2 of the truth, and the adapters move the logits by
     more than 4x the static decoder's difference from transformers (a wrong slot would be as large as the move);
  2. a tile sweep of the NF4 rows GEMM for each projection group at 64 rows (BLOCK_N, columns per loop step,
     warps, pair-table or nibble lookups), each timed in a CUDA graph, beside the bf16 Triton rows GEMM and
     cuBLAS on the same shape; the best tiles go into ``lorakit.kernels.triton.nf4_rows.CONFIGS``;
  3. speed: median ms per decode step of ``decoder.step`` (host work, one upload, graph replay, the rows' logits)
     for the NF4 base (the default tiles, then the swept ones), the bf16 base (same shape, same adapters), and
     transformers' eager forward of the NF4 model; the fraction of each static step's bandwidth bound: (weight
     bytes the step reads + the adapters used + the KV cache at the context) / the copy bandwidth (bytes read +
     written of a 1 GiB device copy, as bench/multi_adapter.py). NF4 weight bytes: the packed 4-bit codes + the
     float32 block scales the decoder reads (its build decodes the double-quantized absmax once) + the dense head
     and norms; the stored absmax (uint8 + nested) is reported beside it.

Usage (GPU; about 4-6 minutes on an H200 with the 32-layer 8B shape, of which ~2 min the sweep):

    python bench/nf4_decode_check.py
    python bench/nf4_decode_check.py --layers 8 --no-sweep          # shorter
    python bench/nf4_decode_check.py --smoke    # CPU, float32, tiny shapes, TRITON_INTERPRET=1 (~4 min on 2 cores)

Writes ``$OUT/nf4_decode_check.json`` (or bench/results/ when $OUT is unset; ``--smoke`` writes
``nf4_decode_check_smoke.json``). Exit status 1 when a check fails. Needs torch, triton and transformers only (no
bitsandbytes).
"""

from __future__ import annotations

import sys

if "--smoke" in sys.argv:  # before lorakit / triton are imported: the interpreter runs the kernels on the CPU
    import os

    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import copy
import itertools
import os
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench_common import LLAMA_SHAPES, copy_bandwidth, graph_seconds, random_llama, time_fn, write_json  # noqa: E402

import lorakit  # noqa: E402
from lorakit.decoding import StaticDecoder, static_decoding_unsupported  # noqa: E402
from lorakit.generation import decode, prefill  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOKE_SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=256)


def log(*args):
    print(*args, flush=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# -- models ----------------------------------------------------------------------------------------------------------

def build(args, device, dtype):
    """(bf16 model, NF4 model): the same random weights and adapters; the NF4 one quantized by lorakit."""
    fields = dict(SMOKE_SHAPE) if args.smoke else dict(LLAMA_SHAPES["8b"])
    if args.layers:
        fields["num_hidden_layers"] = args.layers
    model = random_llama(fields, device, dtype, max_positions=max(2048, args.seq + args.steps + 64))
    model.config._attn_implementation = "sdpa"
    for i in range(max(args.adapters)):
        lorakit.inject(model, lorakit.LoraConfig(r=args.rank, alpha=2.0 * args.rank, target_modules=TARGETS),
                       adapter=f"a{i}", trainable=False, dtype=dtype)
    with torch.no_grad():
        for name, parameter in lorakit.lora_parameters(model):
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.02 if not args.smoke else 0.1)
    nf4 = copy.deepcopy(model)
    start = time.perf_counter()
    lorakit.quantize(nf4, "nf4")  # blocksize 64, double quant; the head stays dense
    sync(device)
    log(f"quantized to NF4 in {time.perf_counter() - start:.1f} s")
    return model, nf4


def adapter_bytes(model, name="a0") -> int:
    return sum(p.numel() * p.element_size() for _, p in lorakit.lora_parameters(model, name))


def dense_bytes(model) -> int:
    """Bytes of the dense parameters a step reads: all but the input embeddings and the adapters (NF4 buffers are
    buffers, not parameters, so for the NF4 model this is the head, the norms and any biases)."""
    embed = model.get_input_embeddings().weight
    embed = getattr(embed, "weight", embed)
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters()
               if p is not embed and ".adapters." not in n and "embed_tokens" not in n)


def nf4_bytes(decoder) -> tuple[int, int]:
    """(bytes the decoder reads: packed + float32 scales, bytes stored: packed + uint8 absmax + nested state)."""
    read = stored = 0
    for layer in decoder.weights:
        for fused in layer.values():
            for member, module in zip(fused.nf4, fused.members):
                read += member.packed.numel() + member.scales.numel() * 4
                stored += module.memory_bytes() - module.code.numel() * 4 - (
                    module.nested_code.numel() * 4 if module.nested_code is not None else 0)
    return read, stored


def kv_bytes(cfg, batch, context, dtype) -> int:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return (2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * head_dim
            * torch.empty(0, dtype=dtype).element_size())


def row_names(n, batch):
    return [None if i % 8 == 7 else f"a{i % n}" for i in range(batch)]


# -- 1. check ------------------------------------------------------------------------------------------------------

def check(nf4, args, prompts, n, truth_model, device, dtype):
    """The first static step on the NF4 model vs transformers' forward of it and vs the float32 truth."""
    names = row_names(n, len(prompts))
    rows = list(range(len(prompts)))
    with torch.no_grad():
        logits, kv = prefill(nf4, prompts, names)
        first = logits.argmax(-1).tolist()
        decoder = StaticDecoder(nf4, max_batch=len(prompts), max_len=args.seq + args.steps + 16)
        decoder.admit(rows, kv)
        ours = decoder.step(rows, first, names).double()
        theirs = decode(nf4, kv, first, names).double()
        _, truth_kv = prefill(truth_model, prompts, names)
        truth = decode(truth_model, truth_kv, first, names).double()
        del truth_kv
        _, base_kv = prefill(nf4, prompts, [None] * len(prompts))
        base = decode(nf4, base_kv, first, [None] * len(prompts)).double()
        del base_kv
    scale = truth.abs().max().item()
    err = (ours - truth).abs().max().item() / scale
    ref_err = (theirs - truth).abs().max().item() / scale
    diff = (ours - theirs).abs().max().item() / scale
    moved = (theirs - base).abs().max().item() / scale
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    tol = 1e-2 if dtype == torch.bfloat16 else 1e-4
    ok = err <= 2 * ref_err + tol and diff < moved / 4
    log(f"CHECK NF4 static vs transformers ({n} adapters): static vs fp32 {err:.3e}, transformers vs fp32 {ref_err:.3e}, "
        f"static vs transformers {diff:.3e}, adapters move {moved:.3e}, argmax agree {agree:.3f} "
        f"{'ok' if ok else 'MISMATCH'}")
    return dict(adapters=n, static_vs_fp32_rel=float(f"{err:.3e}"), transformers_vs_fp32_rel=float(f"{ref_err:.3e}"),
                static_vs_transformers_rel=float(f"{diff:.3e}"), adapters_move_rel=float(f"{moved:.3e}"),
                argmax_agreement=round(agree, 4), ok=ok), decoder, kv, first


# -- 2. sweep ------------------------------------------------------------------------------------------------------

def sweep_configs(smoke):
    if smoke:
        return [(32, 64, 2, 4, 3), (16, 32, 1, 4, 2)]
    # (BLOCK_N, CHUNK, UNROLL, warps, stages): 10 tiles x 3 member counts (q/k/v, gate/up, one) = 30 compiles
    return ([(bn, 64, unroll, 4, 3) for bn, unroll in itertools.product((16, 32, 64), (2, 4))]
            + [(32, 64, 2, 4, 4), (16, 64, 2, 4, 4), (64, 64, 2, 8, 3), (128, 64, 2, 8, 3)])


def sweep(decoder, batch, bandwidth, device, dtype, smoke):
    """Time each projection group's NF4 GEMM under each tile config at ``batch`` rows, and the dequantize + BLAS
    path at 1, 16 and ``batch`` rows; set the best tiles in CONFIGS. Returns the rows."""
    from lorakit.kernels import nf4_rows
    from lorakit.kernels.rows_linear import rows_linear_reference
    from lorakit.kernels.triton import nf4_rows as triton_nf4
    from lorakit.kernels.triton.rows_gemm import rows_gemm

    out = []
    layer = decoder.weights[0]
    sm = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8
    for group, fused in layer.items():
        members = [(m.packed, m.scales, m.code, m.out_features) for m in fused.nf4]
        K, N, bs = fused.in_features, sum(fused.splits), fused.nf4[0].blocksize
        x = torch.randn(batch, K, device=device, dtype=dtype)
        r = torch.randn(batch, N, device=device, dtype=dtype) if group in ("o", "down") else None
        weight_bytes = sum(m.packed.numel() + m.scales.numel() * 4 for m in fused.nf4)
        io_bytes = (x.numel() + N * batch * (2 if r is not None else 1)) * x.element_size()
        truth = nf4_rows.nf4_rows_linear_reference(x.float(), fused.nf4, None if r is None else r.float())
        times, errors = {}, {}
        for config in sweep_configs(smoke):
            try:
                got = triton_nf4.nf4_rows_gemm(x, members, bs, r, config=config, pdl=False)
                errors[config] = float((got.float() - truth).abs().max() / truth.abs().max())
                times[config] = graph_seconds(lambda c=config: triton_nf4.nf4_rows_gemm(x, members, bs, r, config=c,
                                                                                         pdl=False), device)
            except Exception as error:  # a tile that does not fit (shared memory): skip it
                log(f"  sweep {group} {config}: {type(error).__name__}: {str(error)[:120]}")
        default = triton_nf4.nf4_rows_config(N, K, bs, sm)
        if default not in times:
            times[default] = graph_seconds(lambda: triton_nf4.nf4_rows_gemm(x, members, bs, r, config=default,
                                                                            pdl=False), device)
        best = min(times, key=times.get)
        block_m = max(16, 1 << (batch - 1).bit_length())
        triton_nf4.CONFIGS[(N, K, bs, block_m)] = best
        # the two paths of nf4_rows_linear at fewer rows: the fused kernel (default tiles) and dequantize + BLAS
        by_rows = {}
        saved = nf4_rows.MAX_FUSED_ROWS
        for rows in sorted({1, 16, batch}):
            xr, rr = x[:rows].contiguous(), None if r is None else r[:rows].contiguous()
            entry = {}
            for path, limit in (("fused", nf4_rows.KERNEL_MAX_ROWS), ("dequantize", 0)):
                nf4_rows.MAX_FUSED_ROWS = limit  # (the GEMV's rows are left to its own rule)
                entry[path] = round(graph_seconds(lambda: nf4_rows.nf4_rows_linear(xr, fused.nf4, rr), device) * 1e6, 2)
            by_rows[rows] = entry
        nf4_rows.MAX_FUSED_ROWS = saved
        dense = torch.randn(N, K, device=device, dtype=dtype)
        t_rows = graph_seconds(lambda: rows_gemm(x, dense, r, pdl=False), device) if device.type == "cuda" else None
        t_blas = graph_seconds(lambda: rows_linear_reference(x, dense, r), device)
        row = dict(group=group, N=N, K=K, rows=batch, best_config=list(best), best_us=round(times[best] * 1e6, 2),
                   best_error=errors.get(best), default_config=list(default), default_us=round(times[default] * 1e6, 2),
                   bf16_rows_gemm_us=None if t_rows is None else round(t_rows * 1e6, 2),
                   bf16_cublas_us=round(t_blas * 1e6, 2), paths_us_by_rows=by_rows,
                   nf4_fraction_of_bound=round((weight_bytes + io_bytes) / bandwidth / times[best], 4),
                   max_error=max(errors.values()) if errors else None,
                   all_us={str(list(c)): round(t * 1e6, 2) for c, t in sorted(times.items(), key=lambda kv: kv[1])})
        log(f"SWEEP {group:8s} N={N:6d} K={K:6d}: best {best} {row['best_us']:.1f} us (default {row['default_us']:.1f}), "
            f"bf16 rows_gemm {row['bf16_rows_gemm_us']} us, cuBLAS {row['bf16_cublas_us']:.1f} us, "
            f"{row['nf4_fraction_of_bound']:.1%} of the NF4 bound; by rows {by_rows}; max rel error {row['max_error']}")
        out.append(row)
    return out


# -- 3. speed ------------------------------------------------------------------------------------------------------

def static_ms(model, prompts, names, args, device):
    """Median ms of ``decoder.step`` over fresh rows prefilled by transformers."""
    rows = list(range(len(prompts)))
    with torch.no_grad():
        logits, kv = prefill(model, prompts, names)
        decoder = StaticDecoder(model, max_batch=len(prompts), max_len=args.seq + args.steps + 16)
        decoder.admit(rows, kv)
        del kv
        tokens = logits.argmax(-1).tolist()
        seconds = time_fn(lambda: decoder.step(rows, tokens, names), device, warm=2, reps=args.steps, budget_s=8.0)
    decoder = None  # its KV cache goes before the next case
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, tiny shapes, TRITON_INTERPRET=1")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the 8B's 32; smoke 2)")
    parser.add_argument("--batch", type=int, default=None, help="rows (default 64; smoke 4)")
    parser.add_argument("--seq", type=int, default=None, help="prompt tokens per row (default 512; smoke 12)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 20; smoke 2)")
    parser.add_argument("--adapters", default=None, help="comma-separated adapter counts (default 8,64; smoke 2,3)")
    parser.add_argument("--no-sweep", action="store_true", help="keep the default NF4 tiles (no sweep)")
    args = parser.parse_args()
    smoke = args.smoke
    for key, small, full in (("batch", 4, 64), ("seq", 12, 512), ("steps", 2, 20), ("adapters", "2,3", "8,64")):
        if getattr(args, key) is None:
            setattr(args, key, small if smoke else full)
    args.adapters = [int(a) for a in str(args.adapters).split(",")]
    args.rank = 4 if smoke else 16
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16  # the interpreter has no bf16
    if not smoke and not torch.cuda.is_available():
        log("no CUDA device: run with --smoke on the CPU")
        return 2
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, "nf4_decode_check_smoke.json" if smoke else "nf4_decode_check.json")
    import transformers
    import triton

    meta = dict(torch=torch.__version__, triton=triton.__version__, transformers=transformers.__version__,
                device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", dtype=str(dtype),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), batch=args.batch, seq=args.seq,
                rank=args.rank)
    log(meta)
    result = dict(meta=meta, checks=[], sweep=[], speed=[])
    bandwidth = copy_bandwidth(device)
    result["copy_bandwidth_bytes_per_s"] = bandwidth
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + written)")
    model, nf4 = build(args, device, dtype)
    cfg = model.config
    meta.update(layers=cfg.num_hidden_layers, hidden=cfg.hidden_size, intermediate=cfg.intermediate_size)
    reason = static_decoding_unsupported(nf4, args.seq + args.steps + 16)
    if reason is not None:
        log(f"FAIL the static decoder refuses the NF4 model: {reason}")
        return 1
    torch.manual_seed(1)
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.seq)).tolist()
    context = args.seq + 4 + args.steps // 2  # the average context over the timed steps
    per_adapter = adapter_bytes(model)
    ok = True

    # 1. checks (one float32 copy of the NF4 model: the truth)
    truth_model = copy.deepcopy(nf4).float() if dtype != torch.float32 else nf4
    nf4_decoder = None
    for n in args.adapters:
        try:
            row, nf4_decoder, kv, _ = check(nf4, args, prompts, n, truth_model, device, dtype)
            del kv
        except Exception as error:
            traceback.print_exc()
            row = dict(adapters=n, ok=False, error=f"{type(error).__name__}: {error}")
        result["checks"].append(row)
        ok &= row["ok"]
    del truth_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    read_bytes, stored_bytes = nf4_bytes(nf4_decoder) if nf4_decoder is not None else (0, 0)
    result.update(nf4_weight_bytes_read=read_bytes, nf4_weight_bytes_stored=stored_bytes,
                  nf4_dense_bytes=dense_bytes(nf4), bf16_dense_bytes=dense_bytes(model), adapter_bytes=per_adapter)
    log(f"weights a step reads: NF4 {(read_bytes + dense_bytes(nf4)) / 1e9:.2f} GB (packed + float32 scales "
        f"{read_bytes / 1e9:.2f}, stored with the double-quantized absmax {stored_bytes / 1e9:.2f}), "
        f"bf16 {dense_bytes(model) / 1e9:.2f} GB")

    # 2. speed with the default tiles, the sweep, speed with the swept tiles
    def bound_ms(weights, n):
        return (weights + min(n, args.batch) * per_adapter + kv_bytes(cfg, args.batch, context, dtype)) / bandwidth * 1e3

    def speed(system, model_, weights, n, label=None):
        try:
            ms = static_ms(model_, prompts, row_names(n, args.batch), args, device)
        except Exception as error:
            traceback.print_exc()
            result["speed"].append(dict(system=label or system, adapters=n, error=f"{type(error).__name__}: {error}"))
            return None
        bound = bound_ms(weights, n)
        row = dict(system=label or system, adapters=n, step_ms=round(ms, 3), bound_ms=round(bound, 3),
                   fraction_of_bound=round(bound / ms, 4), tokens_per_s=round(args.batch / ms * 1e3, 1))
        log(f"ROW {row}")
        result["speed"].append(row)
        return ms

    del nf4_decoder
    nf4_weights = read_bytes + dense_bytes(nf4)
    for n in args.adapters:
        speed("nf4-static", nf4, nf4_weights, n, "nf4-static-default-tiles")
    from lorakit.kernels import nf4_rows

    saved = nf4_rows.MAX_FUSED_ROWS, nf4_rows.MAX_GEMV_ROWS
    nf4_rows.MAX_FUSED_ROWS = nf4_rows.MAX_GEMV_ROWS = 0  # every row count: Triton dequantize + the BLAS
    for n in args.adapters:
        speed("nf4-static", nf4, nf4_weights, n, "nf4-static-dequantize-blas")
    nf4_rows.MAX_FUSED_ROWS, nf4_rows.MAX_GEMV_ROWS = saved
    if not args.no_sweep:
        result["sweep"] = sweep(StaticDecoder(nf4, max_batch=args.batch, max_len=16), args.batch, bandwidth, device,
                                dtype, smoke)
        for n in args.adapters:
            speed("nf4-static", nf4, nf4_weights, n, "nf4-static-swept-tiles")
    for n in args.adapters:
        speed("bf16-static", model, dense_bytes(model), n)
    # transformers' eager forward of the NF4 model (NF4Linear: Triton dequantize + cuBLAS per projection)
    for n in args.adapters:
        names = row_names(n, args.batch)
        try:
            with torch.no_grad():
                logits, kv = prefill(nf4, prompts, names)
                tokens = logits.argmax(-1).tolist()
                seconds = time_fn(lambda: decode(nf4, kv, tokens, names), device, warm=1, reps=3, budget_s=10.0)
            row = dict(system="nf4-transformers", adapters=n, step_ms=round(seconds * 1e3, 3),
                       tokens_per_s=round(args.batch / seconds, 1))
            kv = None
        except Exception as error:
            traceback.print_exc()
            row = dict(system="nf4-transformers", adapters=n, error=f"{type(error).__name__}: {error}")
        log(f"ROW {row}")
        result["speed"].append(row)

    result["ok"] = bool(ok)
    log("")
    log(f"| system | adapters | ms/step | bound ms | fraction of bound | tokens/s |  ({cfg.num_hidden_layers} layers, "
        f"{args.batch} rows x {args.seq} context)")
    log("|---|---|---|---|---|---|")
    for r in result["speed"]:
        if "error" in r:
            log(f"| {r['system']} | {r['adapters']} | {r['error'][:60]} | | | |")
        else:
            log(f"| {r['system']} | {r['adapters']} | {r['step_ms']:.2f} | {r.get('bound_ms', '')} | "
                f"{r.get('fraction_of_bound', '')} | {r['tokens_per_s']:.0f} |")
    log("")
    for r in result["checks"]:
        log(f"check {r}")
    write_json(out_path, result)
    log(f"wrote {out_path}; checks {'ok' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
