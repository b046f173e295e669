"""The static decoder on the families beyond Llama (Phi-3/4, Gemma, Gemma 2, Gemma 3 text): checks and speed, one run.

For each family, a random bf16 model of a modest real shape (8 layers of the released models' widths: Phi-3-mini,
Phi-4-mini (partial rotary), Gemma-2B, Gemma-2-2B, Gemma-3-4B; vocabularies as released), 8 LoRA adapters r=16 alpha=32 on every linear
projection (lora_B random, so that they move the logits), 32 rows of prompts of 96..320 tokens, rows on adapter
``i % 8`` except every 8th row (no adapter):

  1. check: each step's next-token logits of ``StaticDecoder.step`` (CUDA graph) vs transformers' decode of the
     same bf16 model (``lorakit.generation.decode``: its forward with lorakit's mixed batches), both fed the same
     tokens (transformers' argmax), and both vs a float32 copy of the model (the truth). Relative errors are the
     max abs difference over the truth's max abs logit. A family passes when the static decoder's error against
     the truth is within 2x transformers' own bf16 error plus 1e-2 (bf16 rounding over 8 layers; a wrong
     position, slot, norm or cap is O(0.1..1)), and the adapters move the logits by more than 4x the static
     decoder's difference from transformers (a wrong slot would be as large as that move);
  2. speed: median ms per decode step (32 rows, one token each) of ``decoder.step`` (host work, one upload, the
     graph replay, the rows' logits, as the server calls it) vs transformers' eager forward on its dynamic cache
     (``lorakit.generation.decode``), after warm-up steps.

Usage (GPU, about 2-4 minutes in all on an H200):

    python bench/static_families_check.py
    python bench/static_families_check.py --smoke    # CPU, float32, tiny shapes, TRITON_INTERPRET=1 (~3 min on 2 cores)

Writes ``$OUT/static_families_check.json`` (or bench/results/ when $OUT is unset; ``--smoke`` writes
``static_families_check_smoke.json``): one object per family with shape, errors, timings and ok. Exit status 1
when a check fails. Needs torch, triton and transformers only.
"""

from __future__ import annotations

import sys

if "--smoke" in sys.argv:  # before lorakit / triton are imported: the interpreter runs the kernels on the CPU
    import os

    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import copy
import json
import os
import statistics
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lorakit  # noqa: E402
from lorakit.decoding import StaticDecoder, static_decoding_unsupported  # noqa: E402
from lorakit.generation import decode, prefill  # noqa: E402

ADAPTERS, RANK, ALPHA = 8, 16, 32.0

# 8 layers of the released models' widths (their configs), vocabularies as released
SHAPES = {
    "phi3": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=32,
                 vocab_size=32064, max_position_embeddings=4096),
    # Phi-4-mini: model_type phi3, GQA, a quarter of each head passes unrotated
    "phi4_mini": dict(hidden_size=3072, intermediate_size=8192, num_attention_heads=24, num_key_value_heads=8,
                      vocab_size=200064, partial_rotary_factor=0.75, max_position_embeddings=4096),
    "gemma": dict(hidden_size=2048, intermediate_size=16384, num_attention_heads=8, num_key_value_heads=1,
                  head_dim=256, vocab_size=256000, max_position_embeddings=8192),
    "gemma2": dict(hidden_size=2304, intermediate_size=9216, num_attention_heads=8, num_key_value_heads=4,
                   head_dim=256, vocab_size=256000, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, sliding_window=4096, max_position_embeddings=8192),
    "gemma3_text": dict(hidden_size=2560, intermediate_size=10240, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=256, vocab_size=262208, query_pre_attn_scalar=256, sliding_window=1024,
                        max_position_embeddings=32768),
}
SMOKE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
             max_position_embeddings=256)


def log(message: str) -> None:
    print(message, flush=True)


def build(family: str, layers: int, smoke: bool, device, dtype):
    """A random model of ``family`` (transformers' own classes), eval mode, on device in dtype."""
    import transformers

    config_cls, model_cls = {
        "phi3": ("Phi3Config", "Phi3ForCausalLM"), "phi4_mini": ("Phi3Config", "Phi3ForCausalLM"), "gemma": ("GemmaConfig", "GemmaForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    }[family]
    shape = dict(SHAPES[family])
    if smoke:
        keep = {k: v for k, v in shape.items()
                if k in ("attn_logit_softcapping", "final_logit_softcapping", "partial_rotary_factor")}
        shape = dict(SMOKE, **keep)
        if not family.startswith("phi"):
            shape["head_dim"] = 24  # not hidden / heads, as in the released Gemmas
        if family in ("gemma2", "gemma3_text"):
            shape.update(query_pre_attn_scalar=24, sliding_window=64)
    shape["num_hidden_layers"] = layers
    if family.startswith("phi"):
        shape["pad_token_id"] = 0
    if family == "gemma2":  # its soft-capping runs in the eager attention only (transformers' SDPA has none)
        shape["attn_implementation"] = "eager"
    if family == "gemma3_text":  # the released pattern: five local layers, then a global one
        shape["layer_types"] = ["full_attention" if (i + 1) % 6 == 0 else "sliding_attention" for i in range(layers)]
    config = getattr(transformers, config_cls)(**shape)
    torch.manual_seed(0)
    with torch.device(device):
        model = getattr(transformers, model_cls)(config)
    model = model.to(dtype).eval()
    with torch.no_grad():  # norm weights of a trained model are not all 0 (Gemma) / 1: make their form matter
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.add_(torch.randn_like(p) * 0.2)
    return model


def add_adapters(model, smoke: bool) -> list[str]:
    names = [f"a{i}" for i in range(ADAPTERS if not smoke else 3)]
    rank = RANK if not smoke else 4
    for name in names:
        lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=ALPHA if not smoke else 8.0), adapter=name)
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(model):
            if name.endswith("lora_B"):  # zero at init
                p.normal_(0, 0.02 if not smoke else 0.1)
    return names


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


def timed(fn, device, warm: int, reps: int) -> float:
    """Median ms of fn() over reps calls after warm calls."""
    for _ in range(warm):
        fn()
    samples = []
    for _ in range(reps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def run_family(family: str, args, device, dtype) -> dict:
    smoke = args.smoke
    model = build(family, args.layers, smoke, device, dtype)
    names_pool = add_adapters(model, smoke)
    batch, context = args.batch, args.context
    generator = torch.Generator().manual_seed(1)
    vocab = model.config.vocab_size
    low, high = (context * 3 // 16, context * 10 // 16) if not smoke else (3, 9)
    prompts = [torch.randint(1, vocab, (int(torch.randint(low, high + 1, (1,), generator=generator)),),
                             generator=generator).tolist() for _ in range(batch)]
    names = [None if i % 8 == 7 or (smoke and i == batch - 1) else names_pool[i % len(names_pool)]
             for i in range(batch)]
    reason = static_decoding_unsupported(model, context)
    if reason is not None:
        return dict(family=family, ok=False, error=reason)
    rows = list(range(batch))
    truth_model = copy.deepcopy(model).float()  # the same (bf16-valued) weights, float32 arithmetic
    with torch.no_grad():
        logits, kv = prefill(model, prompts, names)
        _, kv_truth = prefill(truth_model, prompts, names)
        decoder = StaticDecoder(model, max_batch=batch, max_len=context)
        decoder.admit(rows, kv)
        _, kv_base = prefill(model, prompts, [None] * batch)
        errors, ref_errors, differences, moves = [], [], [], []
        tokens = logits.argmax(-1).tolist()
        for _ in range(args.check_steps):
            ours = decoder.step(rows, tokens, names)
            theirs = decode(model, kv, tokens, names)
            truth = decode(truth_model, kv_truth, tokens, names)
            base = decode(model, kv_base, tokens, [None] * batch)
            errors.append(relative(ours, truth))
            ref_errors.append(relative(theirs, truth))
            differences.append(relative(ours, theirs))
            moves.append(relative(theirs, base))
            tokens = theirs.argmax(-1).tolist()
        del truth_model, kv_truth, kv_base
        err, ref_err, diff, moved = max(errors), max(ref_errors), max(differences), min(moves)
        ok = err <= 2 * ref_err + 1e-2 and moved > 4 * diff
        log(f"CHECK {family}: static vs float32 {err:.3e}, transformers bf16 vs float32 {ref_err:.3e}, static vs "
            f"transformers {diff:.3e}, adapters move the logits {moved:.3e} -> {'ok' if ok else 'MISMATCH'}")

        step_tokens = tokens

        def static_step():
            decoder.step(rows, step_tokens, names)

        def transformers_step():
            decode(model, kv, step_tokens, names)

        reps = args.steps
        static_ms = timed(static_step, device, warm=3, reps=reps)
        transformers_ms = timed(transformers_step, device, warm=3, reps=reps)
    params = sum(p.numel() for p in model.parameters())
    result = dict(family=family, layers=args.layers, hidden=model.config.hidden_size, params=params, batch=batch,
                  context=context, adapters=len(names_pool), rank=RANK if not smoke else 4,
                  static_vs_fp32_rel=float(f"{err:.3e}"), transformers_vs_fp32_rel=float(f"{ref_err:.3e}"),
                  static_vs_transformers_rel=float(f"{diff:.3e}"), adapters_move_rel=float(f"{moved:.3e}"),
                  static_ms=round(static_ms, 3), transformers_eager_ms=round(transformers_ms, 3),
                  speedup=round(transformers_ms / static_ms, 2), graph=decoder.use_graph, ok=ok)
    del decoder, model, kv
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, tiny shapes, TRITON_INTERPRET=1")
    parser.add_argument("--families", default=",".join(SHAPES))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 8; smoke 2)")
    parser.add_argument("--batch", type=int, default=None, help="rows (default 32; smoke 3)")
    parser.add_argument("--context", type=int, default=None, help="tokens per cache row (default 512; smoke 16)")
    parser.add_argument("--check-steps", type=int, default=None, help="checked steps (default 4; smoke 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per system (default 20; smoke 1)")
    args = parser.parse_args()
    smoke = args.smoke
    defaults = dict(layers=(2, 8), batch=(3, 32), context=(16, 512), check_steps=(2, 4), steps=(1, 20))
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if smoke else full)
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    if not smoke and not torch.cuda.is_available():
        log("no CUDA device: run with --smoke on the CPU")
        return 2
    results = []
    for family in args.families.split(","):
        start = time.perf_counter()
        try:
            results.append(run_family(family, args, device, dtype))
        except Exception as error:  # one family's failure must not hide the others' numbers
            log(f"FAIL {family}: {type(error).__name__}: {error}")
            results.append(dict(family=family, ok=False, error=f"{type(error).__name__}: {error}"))
        log(f"{family}: {time.perf_counter() - start:.1f} s")
    log("")
    log("| family | layers x hidden | rows x context | static vs fp32 | transformers vs fp32 | static vs transformers "
        "| static ms/step | transformers eager ms/step | speedup | ok |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        if "error" in r:
            log(f"| {r['family']} | | | | | | | | | {r['error']} |")
            continue
        log(f"| {r['family']} | {r['layers']} x {r['hidden']} | {r['batch']} x {r['context']} | "
            f"{r['static_vs_fp32_rel']:.2e} | {r['transformers_vs_fp32_rel']:.2e} | {r['static_vs_transformers_rel']:.2e} "
            f"| {r['static_ms']:.2f} | {r['transformers_eager_ms']:.2f} | {r['speedup']:.2f}x | {r['ok']} |")
    meta = dict(torch=torch.__version__, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                dtype=str(dtype), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    try:
        import transformers
        import triton

        meta.update(transformers=transformers.__version__, triton=triton.__version__)
    except ImportError:
        pass
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "static_families_check_smoke.json" if smoke else "static_families_check.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(dict(meta=meta, results=results), f, indent=1)
    os.replace(tmp, path)
    log(f"wrote {path}")
    return 0 if all(r.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
