"""Where a server's prefill time goes: ``lorakit.generation.prefill`` of small mixed-adapter batches, per call.

The serve benchmark on the static decoder spent 76-89% of its wall time in prefill once requests over 8 adapters
arrived together (~300 ms per call of 3-11 rows, against ~40 ms with one adapter). This times single calls the way
the engine makes them (a few newcomers, mixed adapters, prompts of varying length), each new (rows, length, adapter
mix) shape first ("cold") and then again ("warm"), so a one-time cost per shape (kernel compilation, row plans)
shows apart from the steady cost; then profiles one warm mixed call by operator.

    python bench/prefill_mixed_probe.py [--shape 1b] [--device cuda]

On CUDA it then times ``StaticDecoder.prefill`` against transformers' prefill + ``admit`` from a few short
prompts to a few long ones (the server's choice between them), with the two paths' logits compared.

Random-weight bf16 Llama shape, 8 adapters r=16 on all seven projections. Writes $OUT/prefill_mixed_probe.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_common import ALPHA, LLAMA_SHAPES, RANK, TARGETS, random_llama, sync, write_json  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="1b", choices=sorted(LLAMA_SHAPES) + ["tiny"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--adapters", type=int, default=8)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    import lorakit
    from lorakit.generation import prefill

    shape = LLAMA_SHAPES.get(args.shape) or dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                                                 num_attention_heads=4, num_key_value_heads=2, vocab_size=1000)
    model = random_llama(shape, device, dtype, max_positions=4096)
    cfg = model.config
    names = [f"a{i}" for i in range(args.adapters)]
    for name in names:
        lorakit.inject(model, lorakit.LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS), adapter=name,
                       trainable=False, dtype=dtype)
    gen = torch.Generator().manual_seed(1)

    def call(rows: int, length: int, mix: int) -> float:
        prompts = [torch.randint(0, cfg.vocab_size, (length - (i % 3),), generator=gen).tolist() for i in range(rows)]
        adapters = [names[i % min(mix, len(names))] for i in range(rows)]
        sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            logits, _ = prefill(model, prompts, adapters)
            logits.argmax(-1).tolist()  # the engine's device-to-host copy
        return time.perf_counter() - start

    call(2, 12, 1)  # the first call of the process (CUDA context, cuBLAS handles)
    rows_out = []
    print("| rows | prompt tokens | adapters in batch | cold ms | warm ms (median of 3) |\n|---|---|---|---|---|")
    for rows, length, mix in [(1, 20, 1), (4, 20, 1), (4, 20, 4), (8, 24, 8), (3, 31, 3), (11, 27, 8),
                              (8, 40, 1), (8, 40, 8), (16, 33, 8)]:
        cold = call(rows, length, mix)
        warm = sorted(call(rows, length, mix) for _ in range(3))[1]
        rows_out.append(dict(rows=rows, prompt_tokens=length, adapters=mix, cold_ms=round(cold * 1e3, 2),
                             warm_ms=round(warm * 1e3, 2)))
        print(f"| {rows} | {length} | {mix} | {cold * 1e3:.1f} | {warm * 1e3:.1f} |", flush=True)

    # the static decoder's own prefill against transformers' prefill + admit, warm, over growing token counts (the
    # server picks between them by the newcomers' total prompt tokens: lorakit.serve.engine.STATIC_PREFILL_MAX_TOKENS)
    compare = []
    if device.type == "cuda":
        from lorakit.decoding import StaticDecoder

        decoder = StaticDecoder(model, max_batch=32, max_len=2100)
        print("\n| rows x prompt tokens | transformers prefill + admit ms | decoder.prefill ms | logits rel diff |\n|---|---|---|---|")
        for rows, length in [(1, 20), (4, 20), (8, 24), (16, 33), (32, 40), (8, 128), (8, 256), (8, 512), (4, 1024), (2, 2048)]:
            prompts = [torch.randint(0, cfg.vocab_size, (length - (i % 3),), generator=gen).tolist() for i in range(rows)]
            adapters = [names[i % len(names)] for i in range(rows)]
            slots = list(range(rows))

            def via_transformers():
                with torch.no_grad():
                    logits, batch = prefill(model, prompts, adapters)
                    decoder.admit(slots, batch)
                    logits.argmax(-1).tolist()
                decoder.release(slots)
                return logits

            def via_decoder():
                logits = decoder.prefill(slots, prompts, adapters)
                logits.argmax(-1).tolist()
                decoder.release(slots)
                return logits

            timings = {}
            for label, fn in (("transformers", via_transformers), ("decoder", via_decoder)):
                out = fn()  # warm (compiles)
                runs = []
                for _ in range(3):
                    sync(device)
                    start = time.perf_counter()
                    fn()
                    runs.append(time.perf_counter() - start)
                timings[label] = (sorted(runs)[1], out)
            ref, ours = timings["transformers"][1].double(), timings["decoder"][1].double()
            err = ((ours - ref).abs().max() / ref.abs().max()).item()
            compare.append(dict(rows=rows, prompt_tokens=length, transformers_ms=round(timings["transformers"][0] * 1e3, 2),
                                decoder_ms=round(timings["decoder"][0] * 1e3, 2), logits_rel_diff=float(f"{err:.3e}")))
            print(f"| {rows} x {length} | {timings['transformers'][0] * 1e3:.1f} | {timings['decoder'][0] * 1e3:.1f} | {err:.2e} |",
                  flush=True)
        del decoder

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        call(8, 24, 8)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60)
    print(table)
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    record = dict(shape=args.shape, adapters=args.adapters, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  torch=torch.__version__, date=time.strftime("%Y-%m-%d"), calls=rows_out, static_vs_transformers=compare,
                  profile_top=table.splitlines()[:20])
    path = os.path.join(out_dir, "prefill_mixed_probe.json")
    write_json(path, record)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
