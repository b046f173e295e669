"""QLoRA (NF4 base, double quantization): lorakit vs PEFT + bitsandbytes, one GPU, one process.

Same work as /work/shared/bench/peft_baseline.py's QLoRA rows: random-weight bf16 Llama shapes (weights made layer
by layer on the GPU and quantized at once, so the 16-bit model never exists whole), sdpa attention, LoRA r=16
alpha=32 dropout 0 on q,k,v,o,gate,up,down, batch 4 x 2048, gradient checkpointing, AdamW lr 1e-4, 3 warm-up + 8
timed steps (CUDA events), tokens/s = batch x seq / median step, peak = torch.cuda.max_memory_allocated.

Before the timings, ``check`` compares the NF4 kernels in bf16 on the GPU with the reference (dequantize must be
bit-identical; the fused matmuls within the reference's own bf16 error), compares lorakit's quantization with
bitsandbytes' CUDA kernels when bitsandbytes is importable, and times the NF4 matmul paths per row count.

    python bench/qlora.py                          # check + 1b and 8b speed (lorakit; PEFT+bnb if importable)
    python bench/qlora.py --what speed --shape 8b  # one shape
    python bench/qlora.py --what 70b               # Llama-3.1-70B shape, batch 1 x 2048: peak memory (lorakit)
    python bench/qlora.py --shape tiny --device cpu --what speed   # smoke test of the script, no GPU

bitsandbytes is imported lazily: without it the PEFT rows are skipped with a note. JSON rows {case, system,
tokens_per_s, peak_gib, ...} go to $OUT/qlora.json (or bench/results/qlora.json when $OUT is unset).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback

import torch
from torch import nn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the GPU machine runs the checkout without installing it
from bench_common import ALPHA, LLAMA_SHAPES, RANK, TARGETS, time_steps  # noqa: E402

SHAPES = {**LLAMA_SHAPES,
          "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000)}
PEFT_BNB_ANCHORS = {"1b": 27161, "8b": 6597}  # ANCHORS.md, PEFT + bitsandbytes QLoRA, batch 4, checkpointing
RESULTS: list[dict] = []


def log(*a):
    print(*a, flush=True)


def write_json() -> None:
    folder = os.environ.get("OUT") or os.path.join(ROOT, "bench", "results")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "qlora.json")
    with open(path + ".tmp", "w") as f:
        json.dump(RESULTS, f, indent=1)
    os.replace(path + ".tmp", path)


def bnb_or_none():
    try:
        import bitsandbytes  # noqa: F401
        import bitsandbytes.functional  # noqa: F401

        return bitsandbytes
    except Exception as e:  # not installed in the GPU image unless carried in
        log(f"NOTE bitsandbytes not importable ({type(e).__name__}: {e}); PEFT+bnb rows and bnb checks skipped")
        return None


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def free(device):
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _init_(module: nn.Module, generator: torch.Generator) -> None:
    """Random weights like a trained Llama's scale: linear/embedding N(0, 0.02), norms 1."""
    with torch.no_grad():
        for name, param in module.named_parameters(recurse=False):
            if "norm" in type(module).__name__.lower():
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)


def build_base(shape: str, device: str, quantize_linear, seed: int = 0):
    """A bf16 Llama whose decoder layers are materialised one at a time on ``device`` and handed to
    ``quantize_linear(layer)`` right away (peak: the quantized model + one 16-bit layer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.models.quantized_loading import _parameters_on_meta

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with _parameters_on_meta():
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    generator = torch.Generator(device).manual_seed(seed)
    for layer in model.model.layers:
        layer.to_empty(device=device)
        for module in layer.modules():
            _init_(module, generator)
        quantize_linear(layer)
    for module in (model.model.embed_tokens, model.model.norm, model.lm_head):
        module.to_empty(device=device)
        _init_(module, generator)
    model.model.rotary_emb.to(device)
    return model, cfg


def quantize_lorakit(layer):
    from lorakit.quant.quantize import quantize

    quantize(layer, "nf4", skip=())


def quantize_bnb(layer):
    import bitsandbytes as bnb

    for parent in list(layer.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            new = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                    compute_dtype=torch.bfloat16, compress_statistics=True, quant_type="nf4",
                                    device="meta")
            new.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                           quant_type="nf4", blocksize=64, module=new).to(child.weight.device)
            if child.bias is not None:
                new.bias = nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, new)
            del child


def build(system: str, shape: str, device: str, ckpt: bool):
    """-> (call, model, cfg, trainable params, info). system: lorakit | lorakit-plain | peft+bnb."""
    if system.startswith("lorakit"):
        import lorakit

        model, cfg = build_base(shape, device, quantize_lorakit)
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        torch.manual_seed(1)
        lorakit.inject(model, lorakit.LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS))
        info = {}
        if system == "lorakit":  # the product: fused norms/SwiGLU and a loss that never builds the full logits
            from lorakit.models.fast import use_fast_kernels

            try:
                info["fast_kernels"] = str(use_fast_kernels(model, require_cuda=(device == "cuda")))
            except Exception as e:  # keep measuring QLoRA itself if the fast-model layer is broken
                info["fast_kernels"] = f"fast kernels not used: {type(e).__name__}: {e}"
        call = model
    else:
        from peft import LoraConfig, get_peft_model

        model, cfg = build_base(shape, device, quantize_bnb)
        model.is_loaded_in_4bit = True  # what from_pretrained(..., BitsAndBytesConfig) sets; PEFT dispatches on it
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        torch.manual_seed(1)
        call = get_peft_model(model, LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS))
        info = {}
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return call, model, cfg, params, info


def chunked_lm_loss(model, ids, chunk=1024):
    """Mean next-token loss without the (tokens, vocab) logits: checkpointed chunks of the head (used only when
    lorakit.kernels.linear_cross_entropy is not there)."""
    from torch.utils.checkpoint import checkpoint

    hidden = model.model(input_ids=ids).last_hidden_state[:, :-1].reshape(-1, model.config.hidden_size)
    labels = ids[:, 1:].reshape(-1)
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk):
        def piece(h, y):
            return nn.functional.cross_entropy(model.lm_head(h).float(), y, reduction="sum")
        total = total + checkpoint(piece, hidden[start:start + chunk], labels[start:start + chunk], use_reentrant=False)
    return total / labels.numel()


def run_case(system, shape, device, bs, seq, ckpt, warm, reps):
    tag = f"{shape} b{bs}x{seq}{' ckpt' if ckpt else ''}"
    free(device)
    t0 = time.time()
    call, model, cfg, params, info = build(system, shape, device, ckpt)
    build_s = time.time() - t0
    weights_gib = torch.cuda.memory_allocated() / 2**30 if device == "cuda" else float("nan")
    ids = torch.randint(0, cfg.vocab_size, (bs, seq), device=device)
    opt = torch.optim.AdamW(params, lr=1e-4)
    # the 70B head would build (2048, 128256) float32 logits (1 GiB + its gradient): never materialise them
    fused_loss = "fused linear cross-entropy on" in info.get("fast_kernels", "")

    def step():
        if shape == "70b" and not fused_loss:
            loss = chunked_lm_loss(model, ids)
        else:
            loss = call(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    med, lo, hi, _ = time_steps(step, device, warm=warm, reps=reps)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
    tok_s = bs * seq / med
    row = dict(case=tag, system=system, shape=shape, batch=bs, seq=seq, ckpt=ckpt, tokens_per_s=round(tok_s, 1),
               peak_gib=round(peak, 2), weights_gib=round(weights_gib, 2), step_ms=round(med * 1000, 1),
               step_min_ms=round(lo * 1000, 1), step_max_ms=round(hi * 1000, 1), timed_steps=reps,
               build_s=round(build_s, 1), trainable=sum(p.numel() for p in params), **info)
    anchor = PEFT_BNB_ANCHORS.get(shape)
    if anchor and bs == 4 and ckpt:
        row["vs_peft_bnb_anchor"] = round(tok_s / anchor, 3)
    log(f"ROW {tag:22s} {system:14s} tok/s={tok_s:9.0f} step={med*1000:8.1f}ms peak={peak:6.1f}GiB "
        f"weights={weights_gib:5.1f}GiB build={build_s:5.1f}s")
    del step, opt, call, model, params, ids
    free(device)
    return row


def run_speed(shapes, device, systems, bs, seq, steps):
    for shape in shapes:
        rows = {}
        for system in systems:
            try:
                rows[system] = run_case(system, shape, device, bs, seq, True, 3, steps)
                RESULTS.append(rows[system])
            except Exception as e:
                log(f"FAIL {shape} {system}: {type(e).__name__}: {e}")
                traceback.print_exc()
                RESULTS.append(dict(case=f"{shape} b{bs}x{seq} ckpt", system=system, error=f"{type(e).__name__}: {e}"))
                free(device)
            write_json()
        if "lorakit" in rows and "peft+bnb" in rows:
            rows["lorakit"]["vs_peft_bnb"] = round(rows["lorakit"]["tokens_per_s"] / rows["peft+bnb"]["tokens_per_s"], 3)
            rows["lorakit"]["peak_vs_peft_bnb"] = round(rows["lorakit"]["peak_gib"] / rows["peft+bnb"]["peak_gib"], 3)
        write_json()


def run_70b(device, seq, steps):
    try:
        RESULTS.append(run_case("lorakit", "70b", device, 1, seq, True, 1, steps))
    except Exception as e:
        log(f"FAIL 70b lorakit: {type(e).__name__}: {e}")
        traceback.print_exc()
        RESULTS.append(dict(case=f"70b b1x{seq} ckpt", system="lorakit", error=f"{type(e).__name__}: {e}"))
    write_json()


# ------------------------------------------------------------------------------------------------------- checks

def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_kernels(device):
    """bf16 on the GPU: Triton dequantize bit-identical to the reference; fused matmuls (forward, input grad) within
    2x the reference's own bf16 error from the float64 truth + one bf16 rounding (2^-8); bitsandbytes agreement."""
    from lorakit.kernels import nf4 as K
    from lorakit.quant.nf4 import quantize_nf4

    torch.manual_seed(0)
    ok_all = True
    for shape in [(4096, 4096), (14336, 4096), (4096, 14336), (1000, 333)]:
        weight = (torch.randn(shape, device=device) * 0.02).to(torch.bfloat16)
        w = quantize_nf4(weight)
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            same = torch.equal(K.dequantize_nf4(w, dtype), K.dequantize_nf4(w, dtype, force_reference=True))
            ok_all &= same
            RESULTS.append(dict(case="kernel-check", system="nf4-dequantize", shape=list(shape), dtype=str(dtype),
                                identical=same))
            log(f"CHECK dequantize {shape} {dtype}: {'identical' if same else 'DIFFERENT (FAIL)'}")
        truth_w = K.dequantize_nf4(w, torch.float64, force_reference=True)
        for rows in (1, 16, 77):
            x = torch.randn(rows, shape[1], device=device, dtype=torch.bfloat16)
            g = torch.randn(rows, shape[0], device=device, dtype=torch.bfloat16)
            for label, fast, ref, truth in [
                ("forward", K.nf4_matmul(x, w, mode="fused"), K.nf4_matmul(x, w, mode="reference"),
                 x.double() @ truth_w.T),
                ("grad_input", K.nf4_matmul_grad_input(g, w, mode="fused"),
                 K.nf4_matmul_grad_input(g, w, mode="reference"), g.double() @ truth_w)]:
                ef, er = _rel(fast, truth), _rel(ref, truth)
                good = ef <= 2 * er + 2 ** -8
                ok_all &= good
                RESULTS.append(dict(case="kernel-check", system=f"nf4-fused-{label}", shape=list(shape), rows=rows,
                                    fast_rel_err=ef, ref_bf16_rel_err=er, ok=good))
                log(f"CHECK fused {label:10s} {shape} rows={rows:3d} fast={ef:.2e} ref={er:.2e} {'ok' if good else 'FAIL'}")
    bnb = bnb_or_none()
    if bnb is not None:
        import bitsandbytes.functional as BF

        for shape in [(4096, 4096), (14336, 4096), (1000, 333)]:
            weight = (torch.randn(shape, device=device) * 0.02).to(torch.bfloat16)
            packed, state = BF.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
            ours = quantize_nf4(weight)
            packed_diff = (packed.reshape(-1) != ours.packed).float().mean().item()
            absmax_diff = (state.absmax != ours.absmax).float().mean().item()
            # reading bnb's own state through lorakit's kernel must give exactly bnb's values
            theirs = K.NF4Weight(packed.reshape(-1), state.absmax, state.state2.absmax, state.offset.reshape(()).float(),
                                 state.code, state.state2.code, shape, 64, 256)
            same = torch.equal(K.dequantize_nf4(theirs, torch.bfloat16), BF.dequantize_4bit(packed, state))
            ok_all &= same
            RESULTS.append(dict(case="bnb-check", system="nf4", shape=list(shape), packed_bytes_differ=packed_diff,
                                absmax_codes_differ=absmax_diff, offset_equal=bool(torch.equal(state.offset, ours.offset)),
                                dequantize_of_bnb_state_identical=same))
            log(f"CHECK vs bnb CUDA {shape}: packed differ {packed_diff:.2e}, absmax codes differ {absmax_diff:.2e}, "
                f"dequantize(bnb state) {'identical' if same else 'DIFFERENT (FAIL)'}")
    log(f"CHECK all {'ok' if ok_all else 'FAIL'}")
    RESULTS.append(dict(case="kernel-check", system="all", ok=bool(ok_all)))
    write_json()


def time_matmul_paths(device):
    """ms per NF4 matmul (8B MLP shape 14336 x 4096, bf16) by row count: fused kernel vs dequantize + cuBLAS (and
    bitsandbytes' matmul_4bit when importable); where the lines cross sets kernels.nf4.FUSED_MAX_ROWS."""
    from lorakit.kernels import nf4 as K
    from lorakit.quant.nf4 import quantize_nf4

    weight = (torch.randn(14336, 4096, device=device) * 0.02).to(torch.bfloat16)
    w = quantize_nf4(weight)
    bnb = bnb_or_none()
    if bnb is not None:
        import bitsandbytes.functional as BF

        packed, state = BF.quantize_4bit(weight, quant_type="nf4", compress_statistics=True)
    for rows in (1, 8, 16, 32, 64, 128, 8192):
        x = torch.randn(rows, 4096, device=device, dtype=torch.bfloat16)
        row = dict(case="nf4-matmul-ms", system="lorakit", rows=rows)
        for mode in ("fused", "dequantize"):
            row[mode] = round(time_steps(lambda: K.nf4_matmul(x, w, mode=mode), device, warm=3, reps=20)[0] * 1e3, 4)
        if bnb is not None:
            row["bnb_matmul_4bit"] = round(time_steps(lambda: bnb.matmul_4bit(x, packed.t(), state), device, 3, 20)[0] * 1e3, 4)
        RESULTS.append(row)
        log(f"MATMUL rows={rows:5d} " + " ".join(f"{k}={v}ms" for k, v in row.items() if k not in ("case", "system", "rows")))
    write_json()


def summary():
    rows = [r for r in RESULTS if "tokens_per_s" in r]
    if not rows:
        return
    log("\n| case | system | tokens/s | peak GiB | vs PEFT+bnb |")
    log("|---|---|---|---|---|")
    for r in rows:
        log(f"| {r['case']} | {r['system']} | {r['tokens_per_s']:,.0f} | {r['peak_gib']:.1f} | {r.get('vs_peft_bnb', '')} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--what", default="all", choices=["all", "check", "speed", "70b"])
    parser.add_argument("--shape", default="both", choices=["both", "1b", "8b", "tiny"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--systems", default="lorakit,peft+bnb",
                        help="comma list of lorakit (fast kernels), lorakit-plain (QLoRA layers only), peft+bnb")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    import transformers

    log("versions torch", torch.__version__, "transformers", transformers.__version__,
        "gpu", torch.cuda.get_device_name(0) if args.device == "cuda" else "none")
    systems = [s for s in args.systems.split(",") if s]
    if "peft+bnb" in systems and bnb_or_none() is None:
        systems.remove("peft+bnb")
        RESULTS.append(dict(case="peft+bnb", system="peft+bnb", skipped="bitsandbytes not importable"))
    t = time.time()
    if args.what in ("all", "check") and args.device == "cuda":
        check_kernels(args.device)
        time_matmul_paths(args.device)
        log(f"-- checks took {time.time() - t:.0f}s")
    if args.what in ("all", "speed"):
        shapes = ["1b", "8b"] if args.shape == "both" else [args.shape]
        run_speed(shapes, args.device, systems, args.batch, args.seq, args.steps)
    if args.what == "70b":
        run_70b(args.device, args.seq, min(args.steps, 3))
    log(f"-- total {time.time() - t:.0f}s")
    summary()
    write_json()


if __name__ == "__main__":
    main()
