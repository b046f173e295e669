"""What chunked prefill buys a server: the stall long prompts cause the rows decoding beside them, chunked vs not.

One run per shape on a random Llama-shaped model in bf16 with 4 adapters (rank 16, all seven projections), the
serving engine (``lorakit.serve.engine.Engine``, in process: no HTTP) over one ``StaticDecoder(max_batch=32,
max_len=8192)`` (prefix cache off: every prompt is fresh anyway). For each ``prefill_chunk`` (0 = off: newcomers
prefilled whole, those over 2,048 tokens in all through transformers' forward; else that many prompt tokens a step):

* 16 short requests (128-token prompts, 4 adapters) start and decode greedily (``--new`` tokens each);
* once all are decoding, 4 long prompts (``--long`` tokens each, on adapters) arrive at once.

Reported per setting: the short rows' inter-token gaps that overlap the long prompts' prefill (from their arrival
to the last one's first token; p50, p99, max:
the stall a client streaming tokens sees), the long requests' time to first token (mean, max), the wall time of
the whole workload and its output tokens/s. Also the raw cost of one long prompt's prefill through the decoder
whole, in chunks of 512 and 2,048 (the chunks' sum: what chunking costs the long prompt itself), and through
transformers' forward. Prints a table; JSON to $OUT or bench/results/.

    python bench/chunked_prefill.py --shape 1b
    LORAKIT_DISABLE_TRITON=1 python bench/chunked_prefill.py --shape tiny --device cpu --long 300 --new 40  # a check
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHORT, SHORT_PROMPT, LONGS, ADAPTERS, RANK = 16, 128, 4, 4, 16
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _percentile(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=("tiny", "1b", "8b"))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--long", type=int, default=6144, help="tokens of each long prompt")
    parser.add_argument("--new", type=int, default=384, help="tokens each short request generates")
    parser.add_argument("--chunks", default="0,512,2048", help="prefill_chunk settings to compare")
    args = parser.parse_args()

    import torch

    import lorakit
    from bench_common import LLAMA_SHAPES, random_llama, sync, write_json
    from lorakit.decoding import StaticDecoder
    from lorakit.generation import SamplingParams, prefill
    from lorakit.serve.engine import Engine, Request

    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    shapes = {**LLAMA_SHAPES, "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=256)}
    model = random_llama(shapes[args.shape], device, dtype)
    for i in range(ADAPTERS):
        lorakit.inject(model, lorakit.LoraConfig(r=RANK, alpha=2 * RANK, target_modules=TARGETS), adapter=f"a{i}",
                       trainable=False, dtype=dtype)
    with torch.no_grad():
        for name, parameter in lorakit.lora_parameters(model):
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.02)
    vocab = model.config.vocab_size
    decoder = StaticDecoder(model, max_batch=32, max_len=max(8192, args.long + 64), prefix_cache=0)
    decoder.warm_up()
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    def timed(fn):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        return (time.perf_counter() - started) * 1e3

    # -- check: a prompt prefilled in chunks (a graphed one, one through the decode kernels, a long one through
    # per-prompt attention after the earlier chunks) gives the logits of the same prompt prefilled whole, and the
    # steps after it too (bf16: both run the same kernels, in other groupings)
    # (both sides are fed the whole side's greedy tokens: a near tie that bf16 rounding breaks otherwise sends
    # the two down different continuations)
    prompt = tokens(min(1000, args.long))
    sides, fed = [], []
    for ends in ([len(prompt)], [e for e in (100, 300) if e < len(prompt)] + [len(prompt)]):
        logits = None
        for end in ends:
            logits = decoder.prefill([1], [prompt], ["a1"], upto=[end])
        seq = [logits]
        for i in range(4):
            if not sides:
                fed.append(seq[-1].argmax(-1).tolist())
            seq.append(decoder.step([1], fed[i], ["a1"]))
        decoder.release([1])
        sides.append(torch.cat(seq))
    check = {"max_abs_logit_diff": float((sides[0] - sides[1]).abs().max()),
             "max_abs_logit": float(sides[0].abs().max()),
             "argmax_agreement": float((sides[0].argmax(-1) == sides[1].argmax(-1)).float().mean())}

    # -- one long prompt's prefill, whole and chunked (the chunks one after another), and through transformers
    raw = {}
    for label, chunk in (("decoder whole", None), ("decoder chunks of 512", 512), ("decoder chunks of 2048", 2048)):
        def run(chunk=chunk):
            prompt = tokens(args.long)
            ends = [len(prompt)] if chunk is None else list(range(chunk, len(prompt), chunk)) + [len(prompt)]
            for end in ends:
                decoder.prefill([0], [prompt], ["a0"], upto=[end])
            decoder.release([0])

        run()  # compiles this path's shapes
        raw[label] = statistics.median(timed(run) for _ in range(3))
    prefill(model, [tokens(args.long)], ["a0"])
    raw["transformers forward"] = statistics.median(
        timed(lambda: prefill(model, [tokens(args.long)], ["a0"])) for _ in range(3))
    from lorakit.adapter_stack import drop_stack_caches

    drop_stack_caches(model)

    # -- the serving workload
    rows = []
    for chunk, timed_run in ((int(c), timed_run) for c in args.chunks.split(",") for timed_run in (False, True)):
        # each setting runs twice, the first untimed: a batch shape seen for the first time compiles kernels
        engine = Engine(model, threading.RLock(), max_batch=32, decoder=decoder, prefill_chunk=chunk)
        stamps: dict[str, list[float]] = {}
        decoding, finished = threading.Semaphore(0), threading.Semaphore(0)

        def request(name, prompt, new, adapter):
            stamps[name] = []

            def on_token(token, info):
                if not stamps[name]:
                    decoding.release()
                stamps[name].append(time.perf_counter())
                return True

            return Request(prompt=prompt, adapter=adapter, params=SamplingParams(max_new_tokens=new),
                           on_token=on_token, on_finish=lambda reason: finished.release())

        try:
            started = time.perf_counter()
            for i in range(SHORT):
                engine.submit(request(f"s{i}", tokens(SHORT_PROMPT), args.new, f"a{i % ADAPTERS}"))
            for _ in range(SHORT):
                decoding.acquire()
            arrived = time.perf_counter()
            for i in range(LONGS):
                engine.submit(request(f"l{i}", tokens(args.long), 16, f"a{i % ADAPTERS}"))
            for _ in range(SHORT + LONGS):
                finished.acquire()
            wall = time.perf_counter() - started
        finally:
            engine.close()
        if not timed_run:
            continue
        last_first = max(stamps[f"l{i}"][0] for i in range(LONGS))
        gaps = [(b - a) * 1e3 for i in range(SHORT) for a, b in zip(stamps[f"s{i}"], stamps[f"s{i}"][1:])
                if b >= arrived and a <= last_first]  # the gaps that overlap the long prompts' prefill
        ttft = [(stamps[f"l{i}"][0] - arrived) * 1e3 for i in range(LONGS)]
        out_tokens = sum(len(v) for v in stamps.values())
        rows.append(dict(case=f"serve_{args.shape}", prefill_chunk=chunk, short_requests=SHORT, long_prompts=LONGS,
                         long_tokens=args.long, itl_p50_ms=round(_percentile(gaps, 0.5), 2),
                         itl_p99_ms=round(_percentile(gaps, 0.99), 2), itl_max_ms=round(max(gaps, default=0), 2),
                         gaps_counted=len(gaps), long_ttft_mean_ms=round(statistics.mean(ttft), 1),
                         long_ttft_max_ms=round(max(ttft), 1), wall_s=round(wall, 3),
                         output_tokens_per_s=round(out_tokens / wall, 1)))
    print(f"\n{args.shape}: one {args.long}-token prompt's prefill on adapter a0 (ms, median of 3)")
    print("| path | ms |")
    print("|---|---|")
    for label, ms in raw.items():
        print(f"| {label} | {ms:.1f} |")
    print(f"\n{args.shape}: {SHORT} short requests decoding {args.new} tokens when {LONGS} prompts of {args.long} "
          "tokens arrive (short rows' inter-token gaps while those prefill; long prompts' time to first token)")
    print("| prefill_chunk | gap p50 ms | gap p99 ms | gap max ms | long TTFT mean ms | long TTFT max ms | wall s | out tok/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['prefill_chunk'] or 'off'} | {r['itl_p50_ms']} | {r['itl_p99_ms']} | {r['itl_max_ms']} | "
              f"{r['long_ttft_mean_ms']} | {r['long_ttft_max_ms']} | {r['wall_s']} | {r['output_tokens_per_s']} |")
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    print(f"check: chunks 100 + 200 + 700 vs whole, prefill and 4 steps: max |logit diff| "
          f"{check['max_abs_logit_diff']:.3g} (max |logit| {check['max_abs_logit']:.3g}); greedy tokens agree on "
          f"{check['argmax_agreement']:.0%}")
    record = {"benchmark": "chunked_prefill", "check": check, "shape": args.shape, "device": name,
              "torch": torch.__version__, "python": platform.python_version(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
              "prefill_ms": {k: round(v, 2) for k, v in raw.items()}, "results": rows}
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    write_json(str(out / f"chunked_prefill_{args.shape}.json"), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
