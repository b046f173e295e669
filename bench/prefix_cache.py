"""What the static decoder's prefix cache saves a server's prefills: on against off, in one run per shape.

Two workloads, on a random Llama-shaped model in bf16 (``StaticDecoder(max_batch=32, max_len=4096)``, prefix cache
sized to hold them), each prefilled with the cache on and then off (``decoder.prefix`` set aside), fresh tokens
for every timed repetition so nothing but the intended prefix is ever cached:

* ``system``: batches of 8 requests that share a 1,024-token system prompt (kept by one earlier request), each with
  its own 48-token question: the cache leaves each prompt's question and its last partial block to compute.
* ``cold``: the same, but the system prompt is new to the server (another one each repetition): the first prompt
  computes it, the 7 others (a second pass of the same prefill) copy it.
* ``chat``: 8 conversations, turn after turn: each turn re-sends the conversation so far (the previous prompt) and
  adds 256 tokens (an answer and a new question); the cache copies the previous prompt's full blocks.

Also checks, on the first ``system`` batch, that the logits with the cache equal those without (max difference,
and whether the greedy tokens agree). Prints one table; JSON to $OUT or bench/results/.

    python bench/prefix_cache.py --shape 1b
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

SYSTEM, QUESTION, BATCH, TURN, TURNS, REPS = 1024, 48, 8, 256, 6, 3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=("1b", "8b"))
    args = parser.parse_args()

    import torch

    from bench_common import LLAMA_SHAPES, random_llama, write_json
    from lorakit.decoding import StaticDecoder

    device, dtype = torch.device("cuda"), torch.bfloat16
    model = random_llama(LLAMA_SHAPES[args.shape], device, dtype)
    vocab = model.config.vocab_size
    decoder = StaticDecoder(model, max_batch=32, max_len=4096, prefix_cache=64 * 1024)
    decoder.warm_up()
    g = torch.Generator().manual_seed(0)

    def tokens(n):
        return torch.randint(10, vocab, (n,), generator=g).tolist()

    def prefill(prompts, cached: bool):
        cache = decoder.prefix
        if not cached:
            decoder.prefix = None
        try:
            rows = list(range(len(prompts)))
            torch.cuda.synchronize()
            started = time.perf_counter()
            logits = decoder.prefill(rows, prompts, [None] * len(prompts))
            torch.cuda.synchronize()
            decoder.release(rows)
            return logits, (time.perf_counter() - started) * 1e3
        finally:
            decoder.prefix = cache

    system = tokens(SYSTEM)
    prefill([system + tokens(QUESTION)], True)  # one earlier request kept the system prompt
    check = [system + tokens(QUESTION) for _ in range(BATCH)]
    on, _ = prefill(check, True)
    off, _ = prefill(check, False)
    max_diff = float((on - off).abs().max())
    argmax_agree = float((on.argmax(-1) == off.argmax(-1)).float().mean())
    rows = []
    for label, cached in (("on", True), ("off", False)):  # warm both paths' shapes once, untimed
        prefill([system + tokens(QUESTION) for _ in range(BATCH)], cached)
    for label, cached in (("on", True), ("off", False)):
        times = [prefill([system + tokens(QUESTION) for _ in range(BATCH)], cached)[1] for _ in range(REPS)]
        rows.append(dict(case="system", prefix_cache=label, prompts=BATCH, prompt_tokens=SYSTEM + QUESTION,
                         prefill_ms=round(statistics.median(times), 2)))
    for label, cached in (("on", True), ("off", False)):
        times = []
        for _ in range(REPS):
            fresh = tokens(SYSTEM)
            times.append(prefill([fresh + tokens(QUESTION) for _ in range(BATCH)], cached)[1])
        rows.append(dict(case="cold", prefix_cache=label, prompts=BATCH, prompt_tokens=SYSTEM + QUESTION,
                         prefill_ms=round(statistics.median(times), 2)))
    for label, cached in (("on", True), ("off", False)):
        conversations = [tokens(TURN) for _ in range(BATCH)]
        per_turn = []
        for turn in range(TURNS):
            conversations = [c + tokens(TURN) for c in conversations]
            per_turn.append(prefill(conversations, cached)[1])  # "on": each turn's prompt was kept by the last
        rows.append(dict(case="chat", prefix_cache=label, prompts=BATCH, turns=TURNS,
                         prompt_tokens=TURN * (TURNS + 1), prefill_ms_per_turn=[round(t, 2) for t in per_turn],
                         prefill_ms=round(sum(per_turn[1:]) / (TURNS - 1), 2)))
    print(f"\n{args.shape}: prefill of {BATCH} prompts, prefix cache on vs off (ms; median of {REPS} or mean of turns 2..)")
    print("| case | prompt tokens | off ms | on ms | speed-up |")
    print("|---|---|---|---|---|")
    for case in ("system", "cold", "chat"):
        on_row, off_row = (next(r for r in rows if r["case"] == case and r["prefix_cache"] == x) for x in ("on", "off"))
        speedup = off_row["prefill_ms"] / on_row["prefill_ms"]
        on_row["speedup"] = off_row["speedup"] = round(speedup, 2)
        print(f"| {case} | {on_row['prompt_tokens']} | {off_row['prefill_ms']} | {on_row['prefill_ms']} | {speedup:.2f}x |")
    print(f"check: max |logits on - off| = {max_diff:.3g}; greedy tokens agree on {argmax_agree:.0%} of rows "
          f"(hits {decoder.prefix.hits} of {decoder.prefix.queries} prompt tokens)")
    record = {"benchmark": "prefix_cache", "shape": args.shape, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "python": platform.python_version(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "max_abs_logit_diff": max_diff,
              "argmax_agreement": argmax_agree, "results": rows}
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    write_json(str(out / f"prefix_cache_{args.shape}.json"), record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
