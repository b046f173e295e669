"""What choosing the next token costs the serving engine per decode step, by sampling option: greedy, temperature,
top-p, top-k, min-p, presence / frequency and repetition penalties, all of them, seeded or not.

    python bench/sampling_overhead.py [--rows 32] [--vocab 128256] [--prompt 256] [--steps 64]
    python bench/sampling_overhead.py --root /path/to/other/checkout   # the same cases on another lorakit

Each case builds ``--rows`` requests as lorakit.serve.engine.Request (prompts of ``--prompt`` random tokens) and runs
``Engine._choose`` (the engine's own per-step choice: its logits processing, then the greedy pick or the batched
draw) on fixed random bf16 logits for ``--steps`` steps, feeding each chosen token back as the engine does
(``Engine._accept``'s bookkeeping of answers, counts and seen tokens). It reports milliseconds per step, after
a warm-up, with the device synchronised: the time a decode step of that many rows spends beyond the model's
forward. Writes bench/results/sampling_overhead.json (or $OUT/sampling_overhead.json) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = {  # name -> (params, request fields, RowOptions fields)
    "greedy": ({}, {}, {}),
    "temperature": ({"temperature": 0.8}, {}, {}),
    "top_p": ({"temperature": 0.8, "top_p": 0.95}, {}, {}),
    "top_k": ({"temperature": 0.8, "top_k": 50}, {}, {}),
    "min_p": ({"temperature": 0.8}, {}, {"min_p": 0.05}),
    "presence_frequency": ({"temperature": 0.8}, {"presence": 0.2, "frequency": 0.1}, {}),
    "repetition": ({"temperature": 0.8}, {}, {"repetition_penalty": 1.1}),
    "greedy_repetition": ({}, {}, {"repetition_penalty": 1.1}),
    "all": ({"temperature": 0.8, "top_p": 0.95, "top_k": 50}, {"presence": 0.2}, {"min_p": 0.05,
                                                                                 "repetition_penalty": 1.1}),
}


def run_case(name: str, rows: int, vocab: int, prompt: int, steps: int, seeded: bool, device) -> float:
    import torch

    from lorakit.generation import SamplingParams
    from lorakit.serve.engine import Engine, Request

    params, fields, options = CASES[name]
    row_options = None
    if options:
        from lorakit.serve.sampling import RowOptions

        row_options = RowOptions(**options)
    generator = torch.Generator(device=device).manual_seed(0)
    requests = []
    for i in range(rows):
        sampling = SamplingParams(max_new_tokens=steps + 8, seed=i if seeded else None, **params)
        extra = dict(fields, **({"options": row_options} if row_options is not None else {}))
        request = Request(torch.randint(0, vocab, (prompt,), generator=generator, device=device).tolist(), None,
                          sampling, lambda token, info: True, lambda reason: None, **extra)
        if seeded and sampling.temperature:
            request.generator = sampling.generator(device)
        requests.append(request)
    logits = torch.randn(rows, vocab, generator=generator, device=device).to(torch.bfloat16) * 3

    def step() -> None:
        tokens, _ = Engine._choose(requests, logits)
        for request, token in zip(requests, tokens):  # Engine._accept's bookkeeping, without its stop checks
            request.tokens.append(token)
            if hasattr(request, "counts") and (request.presence or request.frequency):  # before the history rows
                request.counts[token] = request.counts.get(token, 0) + 1
            if getattr(request, "seen", None) is not None and token not in request.seen:
                request.seen.add(token)
                request.unseen.append(token)

    for _ in range(4):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / steps


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32, help="requests in the decode step")
    parser.add_argument("--vocab", type=int, default=128256, help="vocabulary size (Llama 3's by default)")
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per request (a repetition penalty's)")
    parser.add_argument("--steps", type=int, default=64, help="timed steps per case")
    parser.add_argument("--root", type=Path, default=ROOT, help="the lorakit checkout to import (default: this one)")
    parser.add_argument("--tag", default="", help="a label for the JSON file and the table (e.g. 'before')")
    args = parser.parse_args()
    sys.path.insert(0, str(args.root))
    import torch

    import lorakit

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for name in CASES:
        for seeded in (False, True):
            if not CASES[name][0].get("temperature") and seeded:
                continue
            ms = run_case(name, args.rows, args.vocab, args.prompt, args.steps, seeded, device)
            results.append({"case": name, "seeded": seeded, "ms_per_step": round(ms, 3)})
            print(f"{args.tag:8s} {name:20s} {'seeded' if seeded else '':7s} {ms:8.3f} ms/step", flush=True)
    record = {"benchmark": "sampling_overhead", "tag": args.tag, "lorakit": str(Path(lorakit.__file__).parent),
              "rows": args.rows, "vocab": args.vocab, "prompt": args.prompt, "steps": args.steps,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "python": platform.python_version(),
              "time": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results}
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"sampling_overhead{'_' + args.tag if args.tag else ''}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
