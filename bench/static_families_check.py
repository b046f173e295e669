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

Then, for each sliding-window family (Mistral-7B widths, Gemma-2-2B, Gemma-3-4B; 8 layers; a window of 1024, the
released Gemma 3's, scaled down from 4096 for the other two so that 2048-token rows outgrow it), the long-context
case: 64 rows of prompts of 1100..1900 tokens (all longer than the window) prefilled by the decoder itself
(``StaticDecoder.prefill``: windowed causal attention per prompt), then greedy steps towards 2048 tokens:

  3. check: the decoder's logits (prefill and each step) of every 4th row vs transformers' bf16 forward over the
     row's whole sequence (no cache: its own sliding-window mask) and a float32 copy of it (the truth); passes as
     in 1., and when the window moves the truth's logits (the same float32 model with the window turned off) by
     more than 4x the decoder's error;
  4. speed: median ms per step of ``decoder.step`` at that context vs transformers' decode of 64 rows of one
     prompt length (1500) on its dynamic cache; and the attention alone (``decode_attention`` of one layer, the
     rows' lengths) with the window vs without it (the kernel reads only the window's keys).

Usage (GPU, about 4-7 minutes in all on an H200):

    python bench/static_families_check.py
    python bench/static_families_check.py --smoke    # CPU, float32, tiny shapes, TRITON_INTERPRET=1 (~7 min on 2 cores)
    python bench/static_families_check.py --families none --long-families gemma3_text   # one long case only
    python bench/static_families_check.py --families llama,phi3 --long-families none --variants   # DoRA, lora_bias

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
    # Llama-3.2-1B's widths: with --variants, the Llama path's DoRA and lora_bias rows
    "llama": dict(hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
                  vocab_size=128256, max_position_embeddings=4096),
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
# the long-context cases' families: the sliding-window ones; Mistral at Mistral-7B's widths
LONG_SHAPES = {
    "mistral": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                    vocab_size=32000, max_position_embeddings=32768, sliding_window=4096),
    "gemma2": SHAPES["gemma2"],
    "gemma3_text": SHAPES["gemma3_text"],
}
SMOKE = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
             max_position_embeddings=256)


def log(message: str) -> None:
    print(message, flush=True)


def build(family: str, layers: int, smoke: bool, device, dtype, window: int | None = None):
    """A random model of ``family`` (transformers' own classes), eval mode, on device in dtype; ``window``: its
    sliding window instead of the released one (the long-context cases)."""
    import transformers

    config_cls, model_cls = {
        "phi3": ("Phi3Config", "Phi3ForCausalLM"), "phi4_mini": ("Phi3Config", "Phi3ForCausalLM"), "gemma": ("GemmaConfig", "GemmaForCausalLM"),
        "gemma2": ("Gemma2Config", "Gemma2ForCausalLM"), "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
        "mistral": ("MistralConfig", "MistralForCausalLM"), "llama": ("LlamaConfig", "LlamaForCausalLM"),
    }[family]
    shape = dict(SHAPES.get(family) or LONG_SHAPES[family])
    if smoke:
        keep = {k: v for k, v in shape.items()
                if k in ("attn_logit_softcapping", "final_logit_softcapping", "partial_rotary_factor")}
        shape = dict(SMOKE, **keep)
        if not family.startswith("phi"):
            shape["head_dim"] = 24  # not hidden / heads, as in the released Gemmas
        if family in ("gemma2", "gemma3_text"):
            shape.update(query_pre_attn_scalar=24, sliding_window=64)
    if window is not None:
        shape["sliding_window"] = window
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


def add_adapters(model, smoke: bool, variants: bool = False) -> list[str]:
    """The adapters rows decode on; with ``variants`` they cycle through plain LoRA, DoRA and peft's lora_bias (a
    bias on lora_B, random like B so that it moves the logits)."""
    import warnings

    names = [f"a{i}" for i in range(ADAPTERS if not smoke else 3)]
    rank = RANK if not smoke else 4
    kinds = ({}, {"variant": "dora"}, {"lora_bias": True}) if variants else ({},)
    for i, name in enumerate(names):
        with warnings.catch_warnings():  # lora_bias on layers without a bias of their own: peft's warning
            warnings.simplefilter("ignore")
            lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=ALPHA if not smoke else 8.0, **kinds[i % len(kinds)]),
                           adapter=name)
    with torch.no_grad():
        for name, p in lorakit.lora_parameters(model):
            if name.endswith(("lora_B", "lora_bias")):  # zero at init
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
    names_pool = add_adapters(model, smoke, args.variants)
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


def forward_rows(model, sequences, names) -> torch.Tensor:
    """transformers' forward over each whole sequence alone (its own sliding-window mask, no padding; lorakit
    routes the row's adapter): next-token logits (rows, V) float32."""
    return torch.cat([prefill(model, [seq], [name])[0] for seq, name in zip(sequences, names)])


def set_window(model, window: int) -> None:
    """Change the sliding window transformers masks with (config and attention modules)."""
    model.config.sliding_window = window
    for layer in model.model.layers:
        if getattr(layer.self_attn, "sliding_window", None):
            layer.self_attn.sliding_window = window


def kernel_us(fn, device, calls: int = 20) -> float:
    """Microseconds per ``fn()``: on CUDA the replay of a graph of ``calls`` calls (no launch or Python cost),
    median of 10 replays; elsewhere host-timed."""
    if device.type != "cuda":
        return timed(fn, device, warm=1, reps=3) * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return timed(graph.replay, device, warm=2, reps=10) * 1e3 / calls


def run_long(family: str, args, device, dtype) -> dict:
    """The long-context case of a sliding-window family (module docstring, 3. and 4.)."""
    from lorakit.kernels.decode_attention import decode_attention

    smoke = args.smoke
    window, context, batch = args.long_window, args.long_context, args.long_batch
    model = build(family, args.layers, smoke, device, dtype, window=window)
    names_pool = add_adapters(model, smoke, args.variants)
    reason = static_decoding_unsupported(model, context)
    if reason is not None:
        return dict(family=family, ok=False, error=reason)
    margin = (context - window) // 8
    low, high = window + 1 + margin, context - margin - args.check_steps - args.steps - 5
    if high < low:
        return dict(family=family, ok=False, error=f"context {context} leaves no room past window {window}")
    generator = torch.Generator().manual_seed(2)
    vocab = model.config.vocab_size
    prompts = [torch.randint(1, vocab, (int(torch.randint(low, high + 1, (1,), generator=generator)),),
                             generator=generator).tolist() for _ in range(batch)]
    names = [None if i % 8 == 7 else names_pool[i % len(names_pool)] for i in range(batch)]
    rows = list(range(batch))
    checked = list(range(0, batch, 4))
    truth_model = copy.deepcopy(model).float()
    sequences = [list(p) for p in prompts]
    errors, ref_errors, differences = [], [], []
    with torch.no_grad():
        decoder = StaticDecoder(model, max_batch=batch, max_len=context)
        windows = [layer.window for layer in decoder.parts.layers]  # transformers' layer types, read by lorakit
        started = time.perf_counter()
        ours = decoder.prefill(rows, prompts, names)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        prefill_s = time.perf_counter() - started
        index = torch.tensor(checked, device=ours.device)
        for step in range(args.check_steps + 1):
            subset, sub_names = [sequences[i] for i in checked], [names[i] for i in checked]
            theirs = forward_rows(model, subset, sub_names)
            truth = forward_rows(truth_model, subset, sub_names)
            mine = ours.index_select(0, index)
            errors.append(relative(mine, truth))
            ref_errors.append(relative(theirs, truth))
            differences.append(relative(mine, theirs))
            if step == 0:  # what the window does to the truth: the same float32 model attending everything
                set_window(truth_model, 1 << 30)
                moved = relative(forward_rows(truth_model, subset, sub_names), truth)
                set_window(truth_model, window)
            if step == args.check_steps:
                break
            tokens = ours.argmax(-1).tolist()
            for seq, token in zip(sequences, tokens):
                seq.append(token)
            ours = decoder.step(rows, tokens, names)
        del truth_model
        err, ref_err, diff = max(errors), max(ref_errors), max(differences)
        ok = err <= 2 * ref_err + 1e-2 and moved > 4 * err
        log(f"CHECK long {family} (window {window}, {batch} rows of {low}..{high} tokens): static vs float32 "
            f"{err:.3e}, transformers bf16 vs float32 {ref_err:.3e}, static vs transformers {diff:.3e}, the window "
            f"moves the truth {moved:.3e} -> {'ok' if ok else 'MISMATCH'}")

        step_tokens = tokens
        static_ms = timed(lambda: decoder.step(rows, step_tokens, names), device, warm=3, reps=args.steps)
        # the attention alone, one sliding layer at the rows' lengths: the kernel reads the window vs everything
        layer = next(i for i, w in enumerate(windows) if w)
        parts = decoder.parts
        lengths = torch.tensor([len(seq) for seq in sequences], dtype=torch.int32, device=device)
        q = torch.randn(batch, parts.heads, parts.head_dim, dtype=dtype, device=device)
        kc, vc, scale = decoder.k_cache[layer], decoder.v_cache[layer], parts.layers[layer].scaling
        softcap = {} if parts.layers[layer].softcap is None else {"softcap": parts.layers[layer].softcap}
        windowed_us = kernel_us(lambda: decode_attention(q, kc, vc, lengths, scale, window=window, **softcap), device)
        full_us = kernel_us(lambda: decode_attention(q, kc, vc, lengths, scale, **softcap), device)
        mean_length = round(statistics.mean(len(seq) for seq in sequences))
        del decoder
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # transformers: 64 rows of one length (no padding), decoding on its dynamic cache (sliding layers cropped)
        flat = [[1 + (7 * i + j) % (vocab - 1) for j in range(mean_length)] for i in range(batch)]
        _, kv = prefill(model, flat, names)
        transformers_ms = timed(lambda: decode(model, kv, step_tokens, names), device, warm=3, reps=args.steps)
        del kv
    result = dict(family=family, layers=args.layers, hidden=model.config.hidden_size, window=window, batch=batch,
                  context=context, prompt_tokens=[low, high], mean_length=mean_length,
                  sliding_layers=sum(1 for w in windows if w), static_vs_fp32_rel=float(f"{err:.3e}"),
                  transformers_vs_fp32_rel=float(f"{ref_err:.3e}"), static_vs_transformers_rel=float(f"{diff:.3e}"),
                  window_moves_rel=float(f"{moved:.3e}"), static_prefill_s_with_compile=round(prefill_s, 3),
                  static_ms=round(static_ms, 3), transformers_eager_ms=round(transformers_ms, 3),
                  speedup=round(transformers_ms / static_ms, 2), attention_window_us=round(windowed_us, 2),
                  attention_full_us=round(full_us, 2), attention_speedup=round(full_us / windowed_us, 2), ok=ok)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, float32, tiny shapes, TRITON_INTERPRET=1")
    parser.add_argument("--families", default=",".join(f for f in SHAPES if f != "llama"))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default 8; smoke 2)")
    parser.add_argument("--batch", type=int, default=None, help="rows (default 32; smoke 3)")
    parser.add_argument("--context", type=int, default=None, help="tokens per cache row (default 512; smoke 16)")
    parser.add_argument("--check-steps", type=int, default=None, help="checked steps (default 4; smoke 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per system (default 20; smoke 1)")
    parser.add_argument("--variants", action="store_true",
                        help="adapters cycle through LoRA, DoRA and lora_bias (peft's bias on lora_B), not LoRA only")
    parser.add_argument("--long-families", default=",".join(LONG_SHAPES),
                        help="sliding-window families of the long-context case ('none': skip it)")
    parser.add_argument("--long-window", type=int, default=None, help="their sliding window (default 1024; smoke 8)")
    parser.add_argument("--long-context", type=int, default=None, help="tokens per row (default 2048; smoke 40)")
    parser.add_argument("--long-batch", type=int, default=None, help="rows (default 64; smoke 3)")
    args = parser.parse_args()
    smoke = args.smoke
    defaults = dict(layers=(2, 8), batch=(3, 32), context=(16, 512), check_steps=(2, 4), steps=(1, 20),
                    long_window=(8, 1024), long_context=(40, 2048), long_batch=(3, 64))
    for key, (small, full) in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, small if smoke else full)
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    if not smoke and not torch.cuda.is_available():
        log("no CUDA device: run with --smoke on the CPU")
        return 2
    results, long_results = [], []
    for cases, run, out in ((args.families, run_family, results), (args.long_families, run_long, long_results)):
        for family in [f for f in cases.split(",") if f and f != "none"]:
            start = time.perf_counter()
            try:
                out.append(run(family, args, device, dtype))
            except Exception as error:  # one family's failure must not hide the others' numbers
                log(f"FAIL {family}: {type(error).__name__}: {error}")
                out.append(dict(family=family, ok=False, error=f"{type(error).__name__}: {error}"))
            log(f"{family}{' (long)' if run is run_long else ''}: {time.perf_counter() - start:.1f} s")
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
    if long_results:
        log("")
        log("| long context | window (sliding layers) | rows x prompt tokens | static vs fp32 | transformers vs fp32 "
            "| window moves fp32 | static ms/step | transformers eager ms/step | speedup | attention us window / all "
            "| ok |")
        log("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in long_results:
            if "error" in r:
                log(f"| {r['family']} | | | | | | | | | | {r['error']} |")
                continue
            log(f"| {r['family']} | {r['window']} ({r['sliding_layers']}/{r['layers']}) | {r['batch']} x "
                f"{r['prompt_tokens'][0]}..{r['prompt_tokens'][1]} | {r['static_vs_fp32_rel']:.2e} | "
                f"{r['transformers_vs_fp32_rel']:.2e} | {r['window_moves_rel']:.2e} | {r['static_ms']:.2f} | "
                f"{r['transformers_eager_ms']:.2f} | {r['speedup']:.2f}x | {r['attention_window_us']:.1f} / "
                f"{r['attention_full_us']:.1f} ({r['attention_speedup']:.2f}x) | {r['ok']} |")
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
        json.dump(dict(meta=meta, results=results, long_context=long_results), f, indent=1)
    os.replace(tmp, path)
    log(f"wrote {path}")
    return 0 if all(r.get("ok") for r in results + long_results) else 1


if __name__ == "__main__":
    sys.exit(main())
