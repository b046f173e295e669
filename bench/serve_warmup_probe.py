"""What a server's first batches of each shape cost after the static decoder's warm-up: light against full.

A server's first batch of a shape not seen before waited for Triton to compile that shape's kernels and for the
decoder to capture its CUDA graph (up to 1.4 s on an H200, docs/PERFORMANCE.md). ``StaticDecoder.warm_up()`` now
runs every prefill bucket, the eager and long-prompt passes, on the base model and through a placeholder adapter
(``full``); ``warm_up(full=False)`` is the earlier one-token warm-up (``light``).

Each mode runs in its own process with an empty Triton cache (``TRITON_CACHE_DIR``), as a fresh server would:
a random Llama-shaped model in bf16, ``StaticDecoder(max_batch=32, max_len=1024)``, the warm-up (timed), then 8
adapters injected (as the server does on their first request) and a server's life: prefills of 1 / 8 / 32
prompts of 12 / 40 / 300 tokens on the base model, one adapter and 8 adapters, each followed by 4 steps. The
whole list runs twice; the first round's time over the second's is what a request paid for a first shape.

    python bench/serve_warmup_probe.py --shape 1b        # both modes, one table; JSON to $OUT or bench/results/
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

STEPS = 4


def events():
    """(adapters, prompts, tokens per prompt) of the server's life, in order."""
    return [(adapters, n, length) for adapters in (0, 1, 8) for n in (1, 8, 32) for length in (12, 40, 300)
            if n * length <= 32 * 300]


def child(shape: str, mode: str) -> dict:
    import torch

    import lorakit
    from bench_common import LLAMA_SHAPES
    from lorakit.decoding import StaticDecoder
    from transformers import LlamaConfig, LlamaForCausalLM

    device, dtype = torch.device("cuda"), torch.bfloat16
    cfg = LlamaConfig(**LLAMA_SHAPES[shape], max_position_embeddings=8192, tie_word_embeddings=False)
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with device:
        model = LlamaForCausalLM(cfg).eval()
    torch.set_default_dtype(torch.float32)
    decoder = StaticDecoder(model, max_batch=32, max_len=1024)
    if os.environ.get("CUDA_LAUNCH_BLOCKING") == "1":  # --debug: say what runs before each prefill
        prefill = decoder.prefill

        def said(rows, prompts, names):
            print(f"prefill {[len(p) for p in prompts]} through {sorted(set(map(repr, names)))}", flush=True)
            return prefill(rows, prompts, names)

        decoder.prefill = said
    torch.cuda.synchronize()
    started = time.perf_counter()
    decoder.warm_up(full=mode == "full")
    torch.cuda.synchronize()
    warm_up_s = time.perf_counter() - started
    for i in range(8):
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                                  "gate_proj", "up_proj", "down_proj"]),
                       adapter=f"a{i}", trainable=False, dtype=dtype)
    with torch.no_grad():
        for name, parameter in lorakit.lora_parameters(model):
            if name.endswith("lora_B"):
                parameter.normal_(0, 0.02)

    def timed(fn):
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        return out, (time.perf_counter() - t) * 1e3

    rounds = []
    for _ in range(2):
        rows_out = []
        for adapters, n, length in events():
            print(f"event: {adapters} adapters x {n} prompts x {length} tokens", flush=True)
            names = [None if adapters == 0 else f"a{j % adapters}" for j in range(n)]
            prompts = [[1 + (7 * j + k) % 1000 for k in range(length)] for j in range(n)]
            rows = list(range(n))
            logits, prefill_ms = timed(lambda: decoder.prefill(rows, prompts, names))
            tokens = logits.argmax(-1).tolist()
            step_ms = []
            for _ in range(STEPS):
                out, ms = timed(lambda: decoder.step(rows, tokens, names))
                tokens = out.argmax(-1).tolist()
                step_ms.append(ms)
            decoder.release(rows)
            rows_out.append(dict(adapters=adapters, prompts=n, tokens=length, prefill_ms=round(prefill_ms, 2),
                                 first_step_ms=round(step_ms[0], 2), step_ms=round(min(step_ms), 3)))
        rounds.append(rows_out)
    return dict(mode=mode, warm_up_s=round(warm_up_s, 2), first=rounds[0], second=rounds[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1b", choices=("1b", "8b"))
    parser.add_argument("--modes", default="light,full")
    parser.add_argument("--debug", action="store_true", help="CUDA_LAUNCH_BLOCKING=1 (timings meaningless): find a failing launch")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.shape, args.child)), flush=True)
        return 0
    import torch

    results = []
    for mode in args.modes.split(","):
        with tempfile.TemporaryDirectory() as cache:  # a fresh server: nothing compiled yet
            env = dict(os.environ, TRITON_CACHE_DIR=cache, **({"CUDA_LAUNCH_BLOCKING": "1"} if args.debug else {}))
            done = subprocess.run([sys.executable, __file__, "--shape", args.shape, "--child", mode], env=env,
                                  capture_output=True, text=True)
        if os.environ.get("OUT"):  # each child's whole output, for a failure's first traceback
            Path(os.environ["OUT"], f"serve_warmup_probe_{args.shape}_{mode}.log").write_text(done.stdout + done.stderr)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(done.stdout[-3000:], done.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"the {mode} run failed")
        results.append(json.loads(line[7:]))
    print(f"\n{args.shape}: first-round time over second-round time of each event (ms), per warm-up mode")
    print("| mode | warm-up s | prefill excess, sum / worst ms | first-step excess, sum / worst ms | worst event |")
    print("|---|---|---|---|---|")
    for r in results:
        pre = [a["prefill_ms"] - b["prefill_ms"] for a, b in zip(r["first"], r["second"])]
        step = [a["first_step_ms"] - b["first_step_ms"] for a, b in zip(r["first"], r["second"])]
        worst = max(range(len(pre)), key=lambda i: pre[i] + step[i])
        e = r["first"][worst]
        r["prefill_excess_ms"], r["first_step_excess_ms"] = round(sum(pre), 1), round(sum(step), 1)
        print(f"| {r['mode']} | {r['warm_up_s']} | {sum(pre):.0f} / {max(pre):.0f} | {sum(step):.0f} / {max(step):.0f} | "
              f"{e['adapters']} adapters x {e['prompts']} prompts x {e['tokens']} tokens: "
              f"{e['prefill_ms']:.0f} + {e['first_step_ms']:.0f} ms |")
    record = {"benchmark": "serve_warmup_probe", "shape": args.shape, "device": torch.cuda.get_device_name(),
              "torch": torch.__version__, "python": platform.python_version(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "results": results}
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"serve_warmup_probe_{args.shape}.json").write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
