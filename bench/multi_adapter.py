"""Many adapters in one batch: lorakit's stacked SGMV kernels vs PEFT's ``adapter_names=`` path, in one run.

For one Llama shape (random weights, bf16, sdpa; LoRA r=16, alpha=32 on q,k,v,o,gate,up,down):
  0. checks: the Triton kernels vs the reference in bf16 (prefill and decode plans, mixed ranks, rows without
     adapter), and a lorakit mixed batch through the kernels vs the same batch through the reference path;
  1. copy bandwidth (a large device-to-device copy: bytes read + bytes written over the time);
  2. prefill, 64 sequences x 512 tokens, tokens/s: the base model, one adapter, mixed batches over 8 and 64
     adapters, for lorakit (``lorakit.mixed_batch``) and PEFT (``adapter_names=``). Only the last position's logits
     are computed (``logits_to_keep=1``, what serving needs), so the lm_head does not dilute the adapters' cost;
  3. decode, 64 sequences with 512 tokens of context in a KV cache, one token per sequence per step: tokens/s and
     the fraction of the bandwidth bound, bound = (base weights + the adapters used + KV cache read per step) /
     copy bandwidth (base weights: every parameter but the input embedding table, of which a step reads 64 rows);
  4. the SGMV kernels alone, decode-shaped (64 rows, 64 adapters) on each projection shape: fraction of their own
     bandwidth bound (adapter weights + x + y read and written).

Both systems keep adapters in bf16 (PEFT: ``autocast_adapter_dtype=False``, its fastest option; lorakit's stacks
are bf16 for bf16 activations). Usage (about 2 min for 1b, 4 for 8b on an H200):

    python bench/multi_adapter.py --shape 1b      # or --shape 8b
    TRITON_INTERPRET=1 python bench/multi_adapter.py --shape tiny --device cpu   # smoke test of the script

Writes ``$OUT/multi_adapter_<shape>.json`` (or bench/results/ when $OUT is unset): a list of objects with case,
system, adapters, tokens_per_s, ratio_vs_base and, for decode, fraction_of_bound.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import json
import os
import statistics
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32.0
BF16_TOLERANCE = (2e-2, 2e-2)  # tests/conftest.py TOLERANCE[torch.bfloat16]
ROWS: list[dict] = []


def log(*args):
    print(*args, flush=True)


# -- timing --------------------------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, warm=2, reps=8, budget_s=10.0):
    """Median seconds of ``fn()``; the number of timed runs shrinks so that one case stays within ``budget_s``."""
    for _ in range(warm):
        fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    once = time.perf_counter() - start
    reps = max(2, min(reps, int(budget_s / max(once, 1e-6))))
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            times.append(s.elapsed_time(e) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy, counting the bytes read and the bytes written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, warm=3, reps=20)
    del src, dst
    return 2 * n / seconds


# -- models --------------------------------------------------------------------------------------------------------

def make_model(shape, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model.eval(), cfg


def base_bytes(model) -> int:
    """Bytes of base weights a decode step reads: every parameter except the input embedding table."""
    embed = model.get_input_embeddings().weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if p is not embed)


def adapter_bytes(cfg, dtype) -> int:
    """Bytes of one r=16 adapter on the seven projections of every layer."""
    d, f, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    in_out = [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]
    return L * sum(RANK * (i + o) for i, o in in_out) * torch.tensor([], dtype=dtype).element_size()


def kv_bytes(cfg, batch, context, dtype) -> int:
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    return 2 * cfg.num_hidden_layers * batch * context * cfg.num_key_value_heads * head_dim * torch.tensor([], dtype=dtype).element_size()


def lorakit_model(model, n_adapters, dtype):
    import lorakit

    for i in range(n_adapters):
        lorakit.inject(model, lorakit.LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS), adapter=f"a{i}",
                       trainable=False, dtype=dtype)
    with torch.no_grad():  # B starts at zero; random B so that every adapter changes the output
        for name, parameter in lorakit.lora_parameters(model):
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.02)
    return model


def peft_model(model, n_adapters):
    from peft import LoraConfig, get_peft_model

    def config():
        return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS, init_lora_weights=False)

    pm = get_peft_model(model, config(), adapter_name="a0", autocast_adapter_dtype=False)
    for i in range(1, n_adapters):
        pm.add_adapter(f"a{i}", config())
    return pm.eval()


def cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use whichever this version takes."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params and "past_key_values" not in params:
        return "cache"
    return "past_key_values"


def returned_cache(out):
    return getattr(out, "past_key_values", None) or getattr(out, "cache", None)


# -- cases ---------------------------------------------------------------------------------------------------------

def prefill_tokens_per_s(forward, ids, device, budget_s):
    seconds = time_fn(lambda: forward(input_ids=ids, logits_to_keep=1), device, warm=1, reps=8, budget_s=budget_s)
    return ids.numel() / seconds


def decode_step_seconds(forward, kwarg, ids, device, steps):
    """Prefill ids (B, S) into a fresh cache, then time single-token steps (median of ``steps``)."""
    out = forward(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = returned_cache(out)
    token = ids[:, -1:].contiguous()

    def step():
        forward(input_ids=token, use_cache=True, **{kwarg: cache})

    seconds = time_fn(step, device, warm=3, reps=steps, budget_s=8.0)
    return seconds, cache


def record(case, system, adapters, tokens_per_s, base_tps, **extra):
    row = dict(case=case, system=system, adapters=adapters, tokens_per_s=round(tokens_per_s, 1),
               ratio_vs_base=round(tokens_per_s / base_tps, 4) if base_tps else None, **extra)
    ROWS.append(row)
    more = " ".join(f"{k}={v}" for k, v in extra.items())
    log(f"ROW {case:14s} {system:8s} adapters={adapters:3d} tok/s={tokens_per_s:12.1f} "
        f"vs_base={row['ratio_vs_base']} {more}")


def run_system(system, model, cfg, args, device, dtype, base, bandwidth):
    """Prefill and decode for one system over 1, 8 and 64 adapters (``model`` already holds the 64 adapters)."""
    import lorakit

    batch, seq = args.batch, args.seq
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    kwarg = cache_kwarg(model)
    shape = args.shape
    per_adapter = adapter_bytes(cfg, dtype)
    context = seq + 3 + args.steps // 2  # average context over the timed steps
    for n in (1, 8, 64):
        names = [f"a{i % n}" for i in range(batch)]
        if system == "lorakit":
            if n == 1:
                lorakit.set_adapter(model, "a0")
                forward, ctx = model, None
            else:
                forward, ctx = model, names
        else:
            if n == 1:
                model.set_adapter("a0")
                forward = model
            else:
                def forward(_names=names, **kw):
                    return model(adapter_names=_names, **kw)
            ctx = None
        try:
            with torch.no_grad(), (lorakit.mixed_batch(model, ctx) if ctx is not None else _null()):
                tps = prefill_tokens_per_s(forward, ids, device, args.budget)
                record(f"prefill-{shape}", system, n, tps, base["prefill"])
                seconds, cache = decode_step_seconds(forward, kwarg, ids, device, args.steps)
                del cache
            read = base["weights"] + min(n, batch) * per_adapter + kv_bytes(cfg, batch, context, dtype)
            bound = read / bandwidth
            record(f"decode-{shape}", system, n, batch / seconds, base["decode"], fraction_of_bound=round(bound / seconds, 4),
                   step_ms=round(seconds * 1e3, 3), bound_ms=round(bound * 1e3, 3))
        except Exception as error:  # one failed case must not lose the others
            log(f"FAIL {system} adapters={n}: {type(error).__name__}: {error}")
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


# -- checks and kernel-only numbers ----------------------------------------------------------------------------------

def check_kernels(device, dtype) -> bool:
    """Triton SGMV vs the reference (float32 math on the same bf16 data), prefill and decode plans."""
    from lorakit.kernels._triton import triton_usable
    from lorakit.kernels.multi_lora import multi_lora_delta, multi_lora_delta_reference

    ok = True
    torch.manual_seed(1)
    for label, d_in, d_out, rows_fn in [
        ("prefill", 1000, 1500, lambda: torch.arange(24).repeat_interleave(40) - 1),  # slot -1 first, long segments
        ("decode", 2048, 520, lambda: torch.randperm(64)),
    ]:
        slots = 64
        ranks = torch.tensor([(4, 8, 16)[i % 3] for i in range(slots)], dtype=torch.int32, device=device)
        A = torch.zeros(slots, 16, d_in, device=device, dtype=dtype)
        B = torch.zeros(slots, d_out, 16, device=device, dtype=dtype)
        for s in range(slots):
            r = int(ranks[s])
            A[s, :r] = (torch.randn(r, d_in, device=device) / d_in**0.5).to(dtype)
            B[s, :, :r] = torch.randn(d_out, r, device=device).to(dtype)
        scalings = torch.rand(slots, device=device) + 0.5
        slot_of_row = rows_fn().to(device)
        x = torch.randn(slot_of_row.numel(), d_in, device=device).to(dtype)
        with torch.no_grad():
            fast = multi_lora_delta(x, A, B, scalings, slot_of_row, ranks)
            ref = multi_lora_delta_reference(x.float(), A.float(), B.float(), scalings, slot_of_row, ranks)
        rtol, atol = BF16_TOLERANCE if dtype == torch.bfloat16 else (1e-5, 1e-5)
        close = torch.allclose(fast.float(), ref, rtol=rtol, atol=atol)
        ok &= close and triton_usable(x)
        log(f"CHECK kernels {label:8s} {dtype} triton={triton_usable(x)} max_abs_err={(fast.float() - ref).abs().max().item():.3e} "
            f"max_ref={ref.abs().max().item():.2f} {'ok' if close else 'MISMATCH'}")
    return ok


def check_model(model, cfg, device) -> bool:
    """A lorakit mixed batch through the kernels equals the same batch through the reference path."""
    import lorakit

    names = [f"a{i}" for i in range(6)] + [None, "a1"]
    ids = torch.randint(0, cfg.vocab_size, (len(names), 16), device=device)
    with torch.no_grad(), lorakit.mixed_batch(model, names):
        fast = model(input_ids=ids).logits.float()
        os.environ["LORAKIT_DISABLE_TRITON"] = "1"
        try:
            ref = model(input_ids=ids).logits.float()
        finally:
            del os.environ["LORAKIT_DISABLE_TRITON"]
    with torch.no_grad(), lorakit.disable_adapters(model):
        base = model(input_ids=ids).logits.float()
    # logits of a random bf16 model: compare relative to their scale (the reference itself runs in bf16)
    err = ((fast - ref).abs().max() / ref.abs().max()).item()
    moved = ((ref - base).abs().max() / ref.abs().max()).item()
    ok = err < BF16_TOLERANCE[0] and moved > err
    log(f"CHECK model mixed batch kernels vs reference: max rel err {err:.3e} (adapters move logits by {moved:.3e}) {'ok' if ok else 'MISMATCH'}")
    return ok


def kernel_decode_rows(cfg, device, dtype, bandwidth, batch):
    """The SGMV pair alone on each projection shape: 64 rows, each its own adapter (decode)."""
    from lorakit.kernels.multi_lora import multi_lora_add_, plan_rows

    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    slots = batch
    plan = plan_rows(torch.arange(batch), device=device)
    esize = torch.tensor([], dtype=dtype).element_size()
    for proj, (d_in, d_out) in zip(TARGETS, [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]):
        A = torch.randn(slots, RANK, d_in, device=device).to(dtype)
        B = torch.randn(slots, d_out, RANK, device=device).to(dtype)
        scalings = torch.ones(slots, device=device)
        ranks = torch.full((slots,), RANK, dtype=torch.int32, device=device)
        x = torch.randn(batch, d_in, device=device).to(dtype)
        y = torch.zeros(batch, d_out, device=device, dtype=dtype)
        seconds = time_fn(lambda: multi_lora_add_(y, x, A, B, scalings, ranks, plan), device, warm=5, reps=50, budget_s=1.0)
        read = (A.numel() + B.numel() + x.numel() + 2 * y.numel()) * esize
        bound = read / bandwidth
        ROWS.append(dict(case=f"kernel-decode-{proj}", system="lorakit", adapters=slots, tokens_per_s=round(batch / seconds, 1),
                         ratio_vs_base=None, fraction_of_bound=round(bound / seconds, 4), us=round(seconds * 1e6, 2)))
        log(f"ROW kernel-decode {proj:9s} {d_in}->{d_out}: {seconds * 1e6:8.1f} us, bound {bound * 1e6:7.1f} us, "
            f"fraction {bound / seconds:.3f}")


# -- main ----------------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per case")
    parser.add_argument("--budget", type=float, default=10.0, help="seconds of timed prefill runs per case")
    parser.add_argument("--skip-peft", action="store_true")
    args = parser.parse_args()
    if args.shape == "tiny":
        args.batch, args.seq, args.steps, args.budget = min(args.batch, 64), min(args.seq, 16), min(args.steps, 3), 1.0
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the Triton interpreter has no bf16
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, f"multi_adapter_{args.shape}.json")
    t_start = time.time()

    import transformers

    log(f"torch {torch.__version__} transformers {transformers.__version__} device "
        f"{torch.cuda.get_device_name(0) if device.type == 'cuda' else 'cpu'} shape {args.shape} dtype {dtype}")
    checks_ok = check_kernels(device, dtype)
    bandwidth = copy_bandwidth(device)
    log(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s (read + write)")
    ROWS.append(dict(case="copy-bandwidth", system="device", adapters=0, tokens_per_s=None, ratio_vs_base=None,
                     bytes_per_s=bandwidth))

    model, cfg = make_model(args.shape, device, dtype)
    base = {"weights": base_bytes(model)}
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    with torch.no_grad():
        base["prefill"] = prefill_tokens_per_s(model, ids, device, args.budget)
        record(f"prefill-{args.shape}", "base", 0, base["prefill"], base["prefill"])
        seconds, cache = decode_step_seconds(model, cache_kwarg(model), ids, device, args.steps)
        del cache
    context = args.seq + 3 + args.steps // 2
    bound = (base["weights"] + kv_bytes(cfg, args.batch, context, dtype)) / bandwidth
    base["decode"] = args.batch / seconds
    record(f"decode-{args.shape}", "base", 0, base["decode"], base["decode"], fraction_of_bound=round(bound / seconds, 4),
           step_ms=round(seconds * 1e3, 3), bound_ms=round(bound * 1e3, 3))

    lk = lorakit_model(copy.deepcopy(model), 64, dtype)
    log(f"lorakit: 64 adapters injected ({time.time() - t_start:.0f}s)")
    checks_ok &= check_model(lk, cfg, device)
    run_system("lorakit", lk, cfg, args, device, dtype, base, bandwidth)
    del lk
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    kernel_decode_rows(cfg, device, dtype, bandwidth, args.batch)

    if not args.skip_peft:
        try:
            pm = peft_model(model, 64)
            log(f"peft: 64 adapters added ({time.time() - t_start:.0f}s)")
            run_system("peft", pm, cfg, args, device, dtype, base, bandwidth)
        except Exception as error:
            log(f"FAIL peft: {type(error).__name__}: {error}")
            traceback.print_exc()

    ROWS.append(dict(case="checks", system="lorakit", adapters=64, tokens_per_s=None, ratio_vs_base=None, ok=bool(checks_ok)))
    with open(out_path + ".tmp", "w") as f:
        json.dump(ROWS, f, indent=1)
    os.replace(out_path + ".tmp", out_path)

    log("")
    log(f"{'case':16s} {'system':8s} {'adapters':>8s} {'tokens/s':>12s} {'vs base':>8s} {'of bound':>9s}")
    for row in ROWS:
        if row.get("tokens_per_s") is None or row["case"].startswith("kernel"):
            continue
        fraction = row.get("fraction_of_bound")
        log(f"{row['case']:16s} {row['system']:8s} {row['adapters']:8d} {row['tokens_per_s']:12.1f} "
            f"{row['ratio_vs_base'] if row['ratio_vs_base'] is not None else '':>8} {fraction if fraction is not None else '':>9}")
    log(f"checks {'ok' if checks_ok else 'FAILED'}; wrote {out_path} in {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
