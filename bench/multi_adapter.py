"""Many adapters in one batch: lorakit's stacked SGMV kernels vs PEFT's ``adapter_names=`` path, in one run.

For one Llama shape (random weights, bf16, sdpa; LoRA r=16, alpha=32 on q,k,v,o,gate,up,down):
  0. checks, each judged fairly: the fast path and the reference path in bf16 are both compared with a truth
     (float64 formula for the kernels; the reference path on a float32 copy of the model for logits), and the
     fast path's error must be within 2x the bf16 reference's own error (both reported). Kernels: prefill, decode
     and the device-built decode plan; model: a mixed batch's logits; decode attention: a sanity check;
  1. copy bandwidth (a large device-to-device copy: bytes read + bytes written over the time), then a sweep of
     SGMV tile configs (kernels alone, CUDA-graph timed); the fastest per plan kind is used below (``--no-sweep``);
  2. prefill, 64 sequences x 512 tokens, tokens/s: the base model, one adapter, mixed batches over 8 and 64
     adapters, for lorakit (``lorakit.mixed_batch``) and PEFT (``adapter_names=``). Only the last position's logits
     are computed (``logits_to_keep=1``, what serving needs), so the lm_head does not dilute the adapters' cost;
  3. decode, 64 sequences with 512 tokens of context in a static KV cache, one token per sequence per step:
     "graph" = one step captured in a CUDA graph (base and lorakit; graph vs eager logits reported), "eager" = the
     same step from Python (base, lorakit, PEFT). tokens/s and the fraction of the bandwidth bound, bound = (base
     weights + the adapters used + KV cache at the actual context) / copy bandwidth (base weights: every parameter
     but the input embedding table, of which a step reads 64 rows). All systems decode with ``decode_attention``
     (grouped-query attention that reads the static cache once instead of sdpa's repeat_kv copies);
  4. the SGMV kernels alone, decode-shaped (64 rows, 64 adapters) on each projection shape: GPU time from a CUDA
     graph vs their own bandwidth bound (adapter weights + x + y read and written), and the host time per call.

Both systems keep adapters in bf16 (PEFT: ``autocast_adapter_dtype=False``, its fastest option; lorakit's stacks
are bf16 for bf16 activations). Usage (about 2-3 min for 1b on an H200; --skip-peft saves about a minute):

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
import itertools
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
from bench_common import ALPHA, LLAMA_SHAPES, RANK, TARGETS, copy_bandwidth, graph_seconds, sync, time_fn  # noqa: E402

SHAPES = {**{k: LLAMA_SHAPES[k] for k in ("1b", "8b")},
          "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=256)}
BF16_TOLERANCE = (2e-2, 2e-2)  # tests/conftest.py TOLERANCE[torch.bfloat16]
ROWS: list[dict] = []
CHECKS: list[dict] = []


def log(*args):
    print(*args, flush=True)


# -- timing --------------------------------------------------------------------------------------------------------




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


# -- decode: static KV cache, one step captured in a CUDA graph ------------------------------------------------------

DECODE_ATTN = "lorakit_bench_decode"


def decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """sdpa for prefill; for one query token, grouped-query attention that reads the KV cache once.

    With a static cache the decode mask is never None, so transformers' sdpa path repeats K and V to all query
    heads (repeat_kv: for the 1b shape 4x the cache written and read again per layer, more bytes than the
    weights). Here q (B, H, 1, D) is viewed as (B, Hkv, H/Hkv, D) and multiplied with K / V directly.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    B, H, Q, D = query.shape
    Hkv = key.shape[1]
    if Q != 1 or H % Hkv:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    G, L = H // Hkv, key.shape[2]
    scale = scaling if scaling is not None else D ** -0.5
    scores = torch.matmul(query.reshape(B, Hkv, G, D), key.transpose(-1, -2)).float() * scale  # (B, Hkv, G, L)
    if attention_mask is not None:
        mask = attention_mask[..., -L:].reshape(attention_mask.shape[0], 1, 1, L)
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.float()
    out = torch.matmul(torch.softmax(scores, dim=-1).to(value.dtype), value)  # (B, Hkv, G, D)
    return out.reshape(B, H, 1, D).transpose(1, 2).contiguous(), None


def use_decode_attention(config) -> None:
    """Register ``decode_attention`` (with sdpa's mask builder) and select it in ``config`` (shared by all systems)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(DECODE_ATTN, decode_attention)
    AttentionMaskInterface.register(DECODE_ATTN, sdpa_mask)
    config._attn_implementation = DECODE_ATTN


def cache_kwarg(model) -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.2x); use whichever this version takes."""
    params = inspect.signature(model.forward).parameters
    if "cache" in params and "past_key_values" not in params:
        return "cache"
    return "past_key_values"


def takes_cache_position(model) -> bool:
    """Older transformers index the static cache with ``cache_position``; newer ones keep a device counter."""
    return "cache_position" in inspect.signature(model.model.forward).parameters


def returned_cache(out):
    return getattr(out, "past_key_values", None) or getattr(out, "cache", None)


def static_cache(cfg, batch, max_len, device, dtype):
    from transformers import StaticCache

    params = inspect.signature(StaticCache.__init__).parameters
    kw = dict(config=cfg, max_cache_len=max_len)
    for name, value in (("max_batch_size", batch), ("batch_size", batch), ("device", device), ("dtype", dtype)):
        if name in params:
            kw[name] = value
    return StaticCache(**kw)


class Decoder:
    """Decode steps of ``forward`` over a static KV cache: prefill ids (B, S), then one token per row per step.

    ``graph()`` captures one step in a CUDA graph (after two eager warm-up steps on a side stream); replays then
    advance the cache through device counters only (the cache's own, or ``cache_position`` on older versions).
    """

    def __init__(self, forward, hf_model, cfg, ids, device, dtype, steps):
        self.forward, self.ids, self.device = forward, ids, device
        self.kwarg = cache_kwarg(hf_model)
        self.cache = static_cache(cfg, ids.shape[0], ids.shape[1] + steps + 32, device, dtype)
        self.pos = torch.zeros(1, dtype=torch.long, device=device) if takes_cache_position(hf_model) else None
        self.token = ids[:, -1:].contiguous()
        self.g, self.out = None, None

    def prefill(self):
        self.cache.reset()
        kw = {self.kwarg: self.cache, "use_cache": True, "logits_to_keep": 1}
        if self.pos is not None:
            kw["cache_position"] = torch.arange(self.ids.shape[1], device=self.device)
        self.forward(input_ids=self.ids, **kw)
        if self.pos is not None:
            self.pos.fill_(self.ids.shape[1])

    def step(self):
        kw = {self.kwarg: self.cache, "use_cache": True}
        if self.pos is not None:
            kw["cache_position"] = self.pos
        logits = self.forward(input_ids=self.token, **kw).logits
        if self.pos is not None:
            self.pos.add_(1)
        return logits

    def graph(self):
        self.prefill()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.g):
            self.out = self.step()

    def replay(self):
        self.g.replay()
        return self.out

    def graph_vs_eager(self, n=3) -> float:
        """max |graph - eager| / max |eager| of the logits after n steps from the same prefill."""
        self.prefill()
        for _ in range(n):
            eager = self.step()
        eager = eager.float().clone()
        self.prefill()
        for _ in range(n):
            self.replay()
        return ((self.out.float() - eager).abs().max() / eager.abs().max()).item()


def decode_seconds(decoder, steps, graph):
    """Median seconds of one decode step (eager or graph replay), from a fresh prefill."""
    decoder.prefill()
    fn = decoder.replay if graph else decoder.step
    return time_fn(fn, decoder.device, warm=3, reps=steps, budget_s=8.0)


# -- cases ---------------------------------------------------------------------------------------------------------

def prefill_tokens_per_s(forward, ids, device, budget_s):
    seconds = time_fn(lambda: forward(input_ids=ids, logits_to_keep=1), device, warm=1, reps=8, budget_s=budget_s)
    return ids.numel() / seconds


def record(case, system, adapters, tokens_per_s, base_tps, **extra):
    row = dict(case=case, system=system, adapters=adapters, tokens_per_s=round(tokens_per_s, 1),
               ratio_vs_base=round(tokens_per_s / base_tps, 4) if base_tps else None, **extra)
    ROWS.append(row)
    more = " ".join(f"{k}={v}" for k, v in extra.items())
    log(f"ROW {case:20s} {system:8s} adapters={adapters:3d} tok/s={tokens_per_s:12.1f} "
        f"vs_base={row['ratio_vs_base']} {more}")


def decode_cases(system, forward, hf_model, cfg, ids, args, device, dtype, n, bound_bytes, bandwidth, base_tps, modes):
    """Record decode rows for ``modes`` ("graph", "eager"); a failed graph capture is logged, eager still runs.
    Returns mode -> tokens/s of the modes that ran."""
    decoder = Decoder(forward, hf_model, cfg, ids, device, dtype, args.steps)
    context = ids.shape[1] + 4 + args.steps // 2  # average context over the timed steps
    bound = (bound_bytes + kv_bytes(cfg, ids.shape[0], context, dtype)) / bandwidth
    measured = {}
    for mode in modes:
        extra = {}
        try:
            if mode == "graph":
                decoder.graph()
                extra["graph_vs_eager_rel_err"] = float(f"{decoder.graph_vs_eager():.3e}")
            seconds = decode_seconds(decoder, args.steps, mode == "graph")
        except Exception as error:  # one failed case must not lose the others
            log(f"FAIL decode {system} adapters={n} {mode}: {type(error).__name__}: {error}")
            traceback.print_exc()
            continue
        record(f"decode-{args.shape}-{mode}", system, n, ids.shape[0] / seconds, base_tps.get(mode),
               fraction_of_bound=round(bound / seconds, 4), step_ms=round(seconds * 1e3, 3),
               bound_ms=round(bound * 1e3, 3), **extra)
        measured[mode] = ids.shape[0] / seconds
    decoder.g = decoder.out = None
    del decoder
    return measured


def static_decode_case(system, model, cfg, ids, args, device, dtype, n, bound_bytes, bandwidth, base_tps, overlap=None,
                       pdl="on", fuse="on"):
    """Decode with ``lorakit.decoding.StaticDecoder`` (fused GEMMs, grouped LoRA pairs, Triton attention, one CUDA
    graph per step on CUDA): tokens/s of ``decoder.step`` as a server calls it (host work, one upload, replay,
    the rows' logits). Also a check of its first step against transformers' decode (lorakit.generation, the same
    bf16 model and adapters): relative max diff, and how far the adapters move the logits (a wrong slot or
    position would be O(that)). pdl: "on" (the default), "off", or "prefetch" (on, and the Triton GEMMs read
    their first weight chunk before the wait). fuse: "on" (the default: rope + KV store expands the q/k/v LoRA
    itself) or "off" (a separate grouped expand)."""
    from lorakit.decoding import StaticDecoder
    from lorakit.kernels._triton import pdl_supported
    from lorakit.kernels.triton import rows_gemm
    from lorakit.generation import decode, prefill

    batch = ids.shape[0]
    names = [None] * batch if n == 0 else [f"a{i % n}" for i in range(batch)]
    prompts = ids.tolist()
    rows = list(range(batch))
    with torch.no_grad():
        logits, kv = prefill(model, prompts, names)
        first = logits.argmax(-1).tolist()
        default_prefetch, default_l2 = rows_gemm.PREFETCH, rows_gemm.L2_PREFETCH_CHUNKS
        rows_gemm.PREFETCH = pdl == "prefetch"
        if pdl.startswith("l2:"):  # on, and the GEMMs ask the L2 for their first N weight chunks before the wait
            rows_gemm.L2_PREFETCH_CHUNKS = int(pdl.split(":")[1])
        decoder = StaticDecoder(model, max_batch=batch, max_len=ids.shape[1] + args.steps + 16, lora_overlap=overlap,
                                pdl=pdl != "off", fuse_lora=fuse != "off")
        pdl_used = pdl if decoder.pdl and device.type == "cuda" and pdl_supported(device.index or 0) else "off"
        decoder.admit(rows, kv)
        ours = decoder.step(rows, first, names).double()
        theirs = decode(model, kv, first, names).double()
        scale = theirs.abs().max().item()
        err = (ours - theirs).abs().max().item() / scale
        agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
        del kv
        extra = dict(static_vs_transformers_rel_err=float(f"{err:.3e}"), argmax_agreement=round(agree, 4))
        if n:
            _, kv0 = prefill(model, prompts, [None] * batch)
            base_logits = decode(model, kv0, first, [None] * batch).double()
            del kv0
            moved = (theirs - base_logits).abs().max().item() / scale
            extra["adapters_move_logits_rel"] = float(f"{moved:.3e}")
            ok = err < moved / 4
        else:
            ok = err < 0.25  # bf16 rounding grows with depth (see check_decode_attention); a bug is O(1)
        log(f"CHECK static decoder vs transformers ({system}, {n} adapters, overlap {decoder.lora_overlap}, pdl {pdl_used}, fuse {fuse}): rel diff {err:.3e}, argmax agree "
            f"{agree:.3f} {'ok' if ok else 'MISMATCH'}")
        CHECKS.append(dict(check=f"static decoder vs transformers, {n} adapters", rel_diff=err, ok=ok))
        tokens = first

        def step():
            decoder.step(rows, tokens, names)

        seconds = time_fn(step, device, warm=2, reps=args.steps, budget_s=8.0)
    context = ids.shape[1] + 4 + args.steps // 2
    bound = (bound_bytes + kv_bytes(cfg, batch, context, dtype)) / bandwidth
    record(f"decode-{args.shape}-static", system, n, batch / seconds, base_tps, fraction_of_bound=round(bound / seconds, 4),
           step_ms=round(seconds * 1e3, 3), bound_ms=round(bound * 1e3, 3), lora_overlap=decoder.lora_overlap, pdl=pdl_used,
           fuse_lora=fuse if n else None, **extra)
    del decoder
    rows_gemm.PREFETCH, rows_gemm.L2_PREFETCH_CHUNKS = default_prefetch, default_l2
    return batch / seconds, ok


def run_system(system, model, hf_model, cfg, args, device, dtype, base, bandwidth):
    """Prefill and decode for one system over 1, 8 and 64 adapters (``model`` already holds the 64 adapters)."""
    import lorakit

    batch, seq = args.batch, args.seq
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)
    per_adapter = adapter_bytes(cfg, dtype)
    # lorakit: CUDA graph of a step (and eager for comparison); PEFT: eager only (its mixed path syncs the host)
    modes = ("graph", "eager") if system == "lorakit" and device.type == "cuda" else ("eager",)
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
            if not args.static_only:
                with torch.no_grad(), (lorakit.mixed_batch(model, ctx) if ctx is not None else _null()):
                    tps = prefill_tokens_per_s(forward, ids, device, args.budget)
                    record(f"prefill-{args.shape}", system, n, tps, base["prefill"])
                    decode_cases(system, forward, hf_model, cfg, ids, args, device, dtype, n,
                                 base["weights"] + min(n, batch) * per_adapter, bandwidth, base["decode"], modes)
            if system == "lorakit" and args.static:
                for overlap, pdl, fuse in itertools.product(args.overlap.split(","), args.pdl.split(","),
                                                            args.fuse.split(",")):
                    tps, ok = static_decode_case(system, model, cfg, ids, args, device, dtype, n,
                                                 base["weights"] + min(n, batch) * per_adapter, bandwidth,
                                                 base.get("static"), overlap=overlap or None, pdl=pdl, fuse=fuse)
                    base["static_ok"] = base.get("static_ok", True) and ok
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


# -- checks: kernel and reference both against a float64 / float32 truth ------------------------------------------

def judge(label, err_fast, err_ref, dtype, factor=2.0) -> bool:
    """The fast path may be at most ``factor`` x as far from the truth as the reference in the same dtype.

    Errors are relative to the truth's largest magnitude. The reference's error is floored at the dtype's unit
    roundoff (eps / 2: one rounding of the output), which no path can beat; in float32 on the CPU smoke run the
    reference path *is* the truth's path, so its own error is 0."""
    floor = torch.finfo(dtype).eps / 2
    allowed = factor * max(err_ref, floor)
    ok = err_fast <= allowed
    log(f"CHECK {label}: fast err {err_fast:.3e}, reference err {err_ref:.3e} (both vs the truth, relative to its max; "
        f"allowed {factor:g} x max(reference, {floor:.1e}) = {allowed:.3e}) {'ok' if ok else 'MISMATCH'}")
    CHECKS.append(dict(check=label, fast_err=err_fast, reference_err=err_ref, allowed=allowed, ok=ok))
    return ok


def check_kernels(device, dtype) -> bool:
    """SGMV kernels and the reference (math in the stack's dtype, as PEFT) on the same bf16 data, each compared
    with the float64 formula of that data: max |err| / max |truth|."""
    from lorakit.kernels._triton import triton_usable
    from lorakit.kernels.multi_lora import multi_lora_add_, multi_lora_delta, multi_lora_delta_reference, plan_rows_device

    ok = triton_usable(torch.zeros(1, device=device))
    torch.manual_seed(1)
    for label, d_in, d_out, rows_fn in [
        ("prefill", 1000, 1500, lambda: torch.arange(24).repeat_interleave(40) - 1),  # slot -1 first, long segments
        ("decode", 2048, 520, lambda: torch.randperm(64)),
        ("decode-device-plan", 2048, 520, lambda: torch.randperm(80) % 65 - 1),  # repeats and rows without adapter
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
            if label == "decode-device-plan":
                fast = multi_lora_add_(torch.zeros(x.shape[0], d_out, device=device, dtype=dtype), x, A, B, scalings,
                                       ranks, plan_rows_device(slot_of_row))
            else:
                fast = multi_lora_delta(x, A, B, scalings, slot_of_row, ranks)
            ref = multi_lora_delta_reference(x, A, B, scalings, slot_of_row, ranks)
            truth = multi_lora_delta_reference(x.double(), A.double(), B.double(), scalings.double(), slot_of_row, ranks)
        scale = truth.abs().max().item()
        ok &= judge(f"kernels {label} {dtype} (max_truth {scale:.1f})", (fast.double() - truth).abs().max().item() / scale,
                    (ref.double() - truth).abs().max().item() / scale, dtype)
    return ok


def check_model(model, cfg, device) -> bool:
    """Logits of a lorakit mixed batch: the kernels (bf16) and the reference path (bf16), each vs the reference path
    on a float32 copy of the same model (the same bf16 weights, float32 math): the truth. Also the adapters must
    move the logits by more than 4x the kernels' error (else the check could not see a wrong adapter)."""
    import lorakit

    names = [f"a{i}" for i in range(6)] + [None, "a1"]
    ids = torch.randint(0, cfg.vocab_size, (len(names), 16), device=device)

    def logits(m, reference):
        if reference:
            os.environ["LORAKIT_DISABLE_TRITON"] = "1"
        try:
            with torch.no_grad(), lorakit.mixed_batch(m, names):
                return m(input_ids=ids).logits.double()
        finally:
            os.environ.pop("LORAKIT_DISABLE_TRITON", None)

    fast_dtype = next(model.parameters()).dtype
    # the truth: float32 math for a bf16 model (float64 for the float32 CPU smoke run, where float32 is the path
    # under test); deep-copied before any mixed batch, so no stack caches are copied
    truth_model = copy.deepcopy(model).to(torch.float64 if fast_dtype == torch.float32 else torch.float32)
    truth = logits(truth_model, True)
    del truth_model
    gc.collect()
    fast, ref = logits(model, False), logits(model, True)
    with torch.no_grad(), lorakit.disable_adapters(model):
        base = model(input_ids=ids).logits.double()
    scale = truth.abs().max().item()
    moved = (truth - base).abs().max().item() / scale
    err_fast, err_ref = (fast - truth).abs().max().item() / scale, (ref - truth).abs().max().item() / scale
    ok = judge(f"model mixed batch logits (adapters move them by {moved:.3e})", err_fast, err_ref, fast_dtype)
    return ok and moved > 4 * err_fast


def check_decode_attention(model, cfg, device, dtype, args) -> bool:
    """The bench's decode attention on a static cache vs transformers' sdpa on a dynamic cache (bf16 both): a
    sanity check (a wrong mask moves logits by O(1); rounding by 1e-2 to 6e-2 of their scale, growing with depth)."""
    ids = torch.randint(0, cfg.vocab_size, (4, 32), device=device)
    previous = cfg._attn_implementation
    with torch.no_grad():
        decoder = Decoder(model, model, cfg, ids, device, dtype, 8)
        decoder.prefill()
        for _ in range(3):
            ours = decoder.step().double()
        cfg._attn_implementation = "sdpa"
        try:
            kwarg = cache_kwarg(model)
            cache = returned_cache(model(input_ids=ids, use_cache=True))
            for _ in range(3):
                theirs = model(input_ids=ids[:, -1:], use_cache=True, **{kwarg: cache}).logits.double()
        finally:
            cfg._attn_implementation = previous
    err = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    # bf16 rounding grows with depth: 3.2e-2 on the 16-layer 1B shape, 5.8e-2 on the 32-layer 8B shape, where the
    # bf16 reference path itself is 6.2e-2 from a float32 model (the model check below, same run); a wrong mask or
    # position moves logits by O(1), so 0.25 still tells the two apart on every shape
    ok = err < 0.25
    log(f"CHECK decode attention (static cache, grouped) vs sdpa (dynamic cache): max rel diff {err:.3e} {'ok' if ok else 'MISMATCH'}")
    CHECKS.append(dict(check="decode attention vs sdpa", rel_diff=err, ok=ok))
    return ok


# -- the kernels alone ---------------------------------------------------------------------------------------------


def projection_shapes(cfg):
    d, f = cfg.hidden_size, cfg.intermediate_size
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    return list(zip(TARGETS, [(d, d), (d, kv), (d, kv), (d, d), (d, f), (d, f), (f, d)]))


def kernel_operands(d_in, d_out, rows, slots, device, dtype):
    A = torch.randn(slots, RANK, d_in, device=device).to(dtype) / d_in**0.5
    B = torch.randn(slots, d_out, RANK, device=device).to(dtype) * 0.01
    scalings = torch.ones(slots, device=device)
    ranks = torch.full((slots,), RANK, dtype=torch.int32, device=device)
    x = torch.randn(rows, d_in, device=device).to(dtype)
    y = torch.zeros(rows, d_out, device=device, dtype=dtype)
    return A, B, scalings, ranks, x, y


def sweep(cfg, device, dtype, args):
    """Time a few tile configs of the SGMV pair alone (decode: 64 rows, 64 adapters, device plan; prefill: 64 x 512
    rows, 64 adapters) summed over the seven projection shapes; keep the fastest in ``sgmv.CONFIGS``."""
    from lorakit.kernels.multi_lora import multi_lora_add_, plan_batch, plan_rows_device
    from lorakit.kernels.triton import sgmv

    candidates = {
        "decode": [dict(block_k=256, block_n=256, num_warps=4, programs_per_sm=4),
                   dict(block_k=64, block_n=128, num_warps=4, programs_per_sm=2),  # the first run's tiles
                   dict(block_k=128, block_n=128, num_warps=4, programs_per_sm=4),
                   dict(block_k=512, block_n=256, num_warps=4, programs_per_sm=8),
                   dict(block_k=256, block_n=512, num_warps=8, programs_per_sm=8),
                   dict(block_k=128, block_n=256, num_warps=4, programs_per_sm=8)],
        "prefill": [dict(block_k=64, block_n=128, num_warps=4, programs_per_sm=0),
                    dict(block_k=64, block_n=64, num_warps=4, programs_per_sm=0),  # the first run's tiles
                    dict(block_k=128, block_n=128, num_warps=4, programs_per_sm=0),
                    dict(block_k=128, block_n=128, num_warps=8, programs_per_sm=0),
                    dict(block_k=64, block_n=256, num_warps=8, programs_per_sm=0),
                    dict(block_k=32, block_n=128, num_warps=4, programs_per_sm=0)],
    }
    plans = {"decode": plan_rows_device(torch.arange(args.batch, device=device, dtype=torch.int32)),
             "prefill": plan_batch(list(range(args.batch)), args.seq, device)}
    chosen = {}
    for kind, configs in candidates.items():
        plan = plans[kind]
        default = dict(sgmv.CONFIGS[kind])
        results = []
        for config in configs:
            sgmv.CONFIGS[kind] = config
            total = 0.0
            try:
                for _, (d_in, d_out) in projection_shapes(cfg):
                    A, B, scalings, ranks, x, y = kernel_operands(d_in, d_out, plan.num_rows, args.batch, device, dtype)
                    with torch.no_grad():
                        # prefill: as the model runs it when every row has an adapter (the delta is written, the
                        # base GEMM adds onto it); decode: accumulated into y
                        total += graph_seconds(lambda: multi_lora_add_(y, x, A, B, scalings, ranks, plan,
                                                                       accumulate=kind == "decode"),
                                               device, calls=10 if kind == "decode" else 2)
                    del A, B, x, y
            except Exception as error:
                log(f"FAIL sweep {kind} {config}: {type(error).__name__}: {error}")
                total = float("inf")
            results.append((total, config))
            log(f"SWEEP {kind:8s} {config}: {total * 1e6:9.1f} us for the 7 projections of one layer")
        best = min(results, key=lambda r: r[0])
        sgmv.CONFIGS[kind] = best[1] if best[0] < float("inf") else default
        chosen[kind] = dict(config=sgmv.CONFIGS[kind], us=round(best[0] * 1e6, 2),
                            default=default, default_us=round(next(t for t, c in results if c == default) * 1e6, 2)
                            if default in [c for _, c in results] else None)
        log(f"SWEEP {kind}: using {sgmv.CONFIGS[kind]} ({best[0] * 1e6:.1f} us; default {default})")
    ROWS.append(dict(case="sgmv-config", system="lorakit", adapters=args.batch, tokens_per_s=None, ratio_vs_base=None, **chosen))


def kernel_decode_rows(cfg, device, dtype, bandwidth, batch):
    """The SGMV pair alone on each projection shape, 64 rows each with its own adapter (decode, device plan): GPU
    time from a CUDA graph (bandwidth fraction) and the host time of one eager call (Python + 2 launches)."""
    from lorakit.kernels.multi_lora import multi_lora_add_, plan_rows_device

    plan = plan_rows_device(torch.arange(batch, device=device, dtype=torch.int32))
    esize = torch.tensor([], dtype=dtype).element_size()
    for proj, (d_in, d_out) in projection_shapes(cfg):
        A, B, scalings, ranks, x, y = kernel_operands(d_in, d_out, batch, batch, device, dtype)
        with torch.no_grad():
            fn = lambda: multi_lora_add_(y, x, A, B, scalings, ranks, plan)  # noqa: E731
            seconds = graph_seconds(fn, device)
            sync(device)
            start = time.perf_counter()
            for _ in range(50):
                fn()
            host = (time.perf_counter() - start) / 50  # launches queue asynchronously: this is the host's cost
            sync(device)
        read = (A.numel() + B.numel() + x.numel() + 2 * y.numel()) * esize
        bound = read / bandwidth
        ROWS.append(dict(case=f"kernel-decode-{proj}", system="lorakit", adapters=batch, tokens_per_s=round(batch / seconds, 1),
                         ratio_vs_base=None, fraction_of_bound=round(bound / seconds, 4), us=round(seconds * 1e6, 2),
                         host_us=round(host * 1e6, 2)))
        log(f"ROW kernel-decode {proj:9s} {d_in}->{d_out}: GPU {seconds * 1e6:7.1f} us (graph), bound {bound * 1e6:6.1f} us, "
            f"fraction {bound / seconds:.3f}; host {host * 1e6:6.1f} us per eager call")


# -- main ----------------------------------------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20, help="timed decode steps per case")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timed prefill runs per case")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--no-sweep", action="store_true", help="keep sgmv.CONFIGS as they are (no tile sweep)")
    parser.add_argument("--no-static", dest="static", action="store_false",
                        help="skip the lorakit.decoding.StaticDecoder decode cases")
    parser.add_argument("--overlap", default="",
                        help="comma-separated StaticDecoder lora_overlap modes to measure (lora, serial, off; "
                             "empty: the decoder's default)")
    parser.add_argument("--fuse", default="on",
                        help="comma-separated StaticDecoder fuse_lora modes: on (the default: rope + KV store expands "
                             "the q/k/v LoRA itself), off")
    parser.add_argument("--static-only", action="store_true",
                        help="only the StaticDecoder decode cases (no prefill, no transformers decode, no PEFT)")
    parser.add_argument("--pdl", default="on",
                        help="comma-separated programmatic-dependent-launch modes of the StaticDecoder cases: on (the "
                             "default), off, prefetch (on, GEMMs read their first weight chunk before the wait), "
                             "l2:N (on, GEMMs ask the L2 for their first N weight chunks before the wait)")
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
    if not args.no_sweep and device.type == "cuda":
        sweep(SimpleConfig(**SHAPES[args.shape]), device, dtype, args)

    model, cfg = make_model(args.shape, device, dtype)
    use_decode_attention(cfg)  # one config object: base, lorakit (deep copy) and PEFT all decode with it
    checks_ok &= check_decode_attention(model, cfg, device, dtype, args)
    base = {"weights": base_bytes(model), "decode": {}}
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), device=device)
    modes = ("graph", "eager") if device.type == "cuda" else ("eager",)
    with torch.no_grad():
        if args.static_only:
            base["prefill"], measured = None, {}
        else:
            base["prefill"] = prefill_tokens_per_s(model, ids, device, args.budget)
            record(f"prefill-{args.shape}", "base", 0, base["prefill"], base["prefill"])
            measured = decode_cases("base", model, model, cfg, ids, args, device, dtype, 0, base["weights"], bandwidth, {},
                                    modes)
        if args.static:
            base["static"] = None
            for pdl in args.pdl.split(","):  # the first mode's is the base the adapters' cases are compared with
                tps, ok = static_decode_case("base", model, cfg, ids, args, device, dtype, 0, base["weights"], bandwidth,
                                             None, pdl=pdl)
                base["static"] = base["static"] or tps
                base["static_ok"] = base.get("static_ok", True) and ok
                ROWS[-1]["ratio_vs_base"] = round(tps / base["static"], 4)
    for row in ROWS:  # each decode mode of a system is compared with the base in the same mode
        if row["system"] == "base" and row["case"].startswith("decode"):
            row["ratio_vs_base"] = 1.0
    base["decode"] = measured

    lk = lorakit_model(copy.deepcopy(model), 64, dtype)
    log(f"lorakit: 64 adapters injected ({time.time() - t_start:.0f}s)")
    checks_ok &= check_model(lk, cfg, device)
    run_system("lorakit", lk, lk, cfg, args, device, dtype, base, bandwidth)
    del lk
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if not args.static_only:
        kernel_decode_rows(cfg, device, dtype, bandwidth, args.batch)

    if not args.skip_peft and not args.static_only:
        try:
            pm = peft_model(model, 64)
            log(f"peft: 64 adapters added ({time.time() - t_start:.0f}s)")
            run_system("peft", pm, model, cfg, args, device, dtype, base, bandwidth)
        except Exception as error:
            log(f"FAIL peft: {type(error).__name__}: {error}")
            traceback.print_exc()

    from lorakit.kernels.triton import sgmv

    checks_ok &= base.get("static_ok", True)
    ROWS.append(dict(case="checks", system="lorakit", adapters=64, tokens_per_s=None, ratio_vs_base=None, ok=bool(checks_ok),
                     details=CHECKS, sgmv_configs=sgmv.CONFIGS))
    with open(out_path + ".tmp", "w") as f:
        json.dump(ROWS, f, indent=1)
    os.replace(out_path + ".tmp", out_path)

    log("")
    log(f"{'case':22s} {'system':14s} {'adapters':>8s} {'tokens/s':>12s} {'vs base':>8s} {'of bound':>9s} {'step ms':>8s}")
    for row in ROWS:
        if row.get("tokens_per_s") is None or row["case"].startswith("kernel"):
            continue
        fraction = row.get("fraction_of_bound")
        system = row["system"] + (f"/{row['lora_overlap']}" if row.get("lora_overlap") not in (None, "off") else "") \
            + (f"/pdl-{row['pdl']}" if row.get("pdl") not in (None, "on") else "") \
            + (f"/fuse-{row['fuse_lora']}" if row.get("fuse_lora") not in (None, "on") else "")
        log(f"{row['case']:22s} {system:14s} {row['adapters']:8d} {row['tokens_per_s']:12.1f} "
            f"{row['ratio_vs_base'] if row['ratio_vs_base'] is not None else '':>8} {fraction if fraction is not None else '':>9} "
            f"{row.get('step_ms', ''):>8}")
    log(f"checks {'ok' if checks_ok else 'FAILED'}; wrote {out_path} in {time.time() - t_start:.0f}s")


class SimpleConfig:
    """The few config fields ``projection_shapes`` reads, before the model exists."""

    def __init__(self, **fields):
        self.__dict__.update(fields)


if __name__ == "__main__":
    main()
