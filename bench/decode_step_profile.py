"""Host cost of the serving decode step: ms per ``lorakit.generation.decode`` call, and where the time goes.

The server (``lorakit serve``) decodes every running request in one eager forward pass per step; this measures
that step alone (no HTTP), for 1 row / 1 adapter and 32 rows over 8 adapters, on a random-weight model built from a
config folder (default: SmolLM2-135M's shape), then profiles it with cProfile (host functions by own time) and
torch.profiler (GPU time vs wall time), so one run shows whether the step is bound by the host or by the GPU.

    python bench/decode_step_profile.py --config .gpu_assets/smol [--shape 1b] [--context 128]

Writes $OUT/decode_step_profile.json (or bench/results/).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(config_dir: str, shape: str | None, device: str, adapters: int):
    import transformers

    import lorakit
    from bench_common import LLAMA_SHAPES

    config = transformers.AutoConfig.from_pretrained(config_dir)
    if shape:
        for key, value in dict(LLAMA_SHAPES[shape], vocab_size=config.vocab_size).items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).to(device).eval()
    for index in range(adapters):
        lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32), adapter=f"a{index}")
        with torch.no_grad():
            for key, parameter in lorakit.lora_parameters(model, f"a{index}"):
                if key.endswith("lora_B"):
                    parameter.normal_(std=1e-3)
    return model, config


def step_ms(model, rows: int, adapters: int, context: int, steps: int, device: str) -> tuple[float, object]:
    from lorakit.generation import decode, prefill

    names = [f"a{i % adapters}" for i in range(rows)]
    _, batch = prefill(model, [[1 + (i % 50)] * context for i in range(rows)], names)
    tokens = [7] * rows

    def run(n):
        for _ in range(n):
            decode(model, batch, tokens, names)
        if device == "cuda":
            torch.cuda.synchronize()

    run(3)
    start = time.perf_counter()
    run(steps)
    ms = (time.perf_counter() - start) / steps * 1e3
    return ms, lambda n: run(n)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / ".gpu_assets" / "smol"))
    parser.add_argument("--shape", default=None)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--top", type=int, default=22)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    model, config = build(args.config, args.shape, args.device, 8)
    results = []
    if args.device == "cuda":  # which attention backend sdpa takes matters for the host: time each allowed set
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sets = {"default": None, "no-cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
                "efficient": [SDPBackend.EFFICIENT_ATTENTION], "math": [SDPBackend.MATH],
                "cudnn": [SDPBackend.CUDNN_ATTENTION]}
        for label, backends in sets.items():
            try:
                if backends is None:
                    ms, _ = step_ms(model, 32, 8, args.context, args.steps, args.device)
                else:
                    with sdpa_kernel(backends):
                        ms, _ = step_ms(model, 32, 8, args.context, args.steps, args.device)
                print(f"sdpa backends {label:10s}: {ms:7.2f} ms/step (32 rows, 8 adapters)", flush=True)
                results.append({"rows": 32, "adapters": 8, "sdpa": label, "step_ms": round(ms, 3)})
            except Exception as error:
                print(f"sdpa backends {label:10s}: failed: {type(error).__name__}: {str(error)[:100]}", flush=True)
    for rows, adapters in ((1, 1), (32, 8)):
        ms, run = step_ms(model, rows, adapters, args.context, args.steps, args.device)
        gpu_ms = None
        if args.device == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                run(5)
            gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 5 / 1e3
        profiler = cProfile.Profile()
        profiler.enable()
        run(5)
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(args.top)
        print(f"\n== rows {rows}, adapters {adapters}: {ms:.2f} ms/step wall, GPU busy {gpu_ms} ms/step", flush=True)
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip())[-4000:], flush=True)
        results.append({"rows": rows, "adapters": adapters, "context": args.context, "step_ms": round(ms, 3),
                        "gpu_ms": None if gpu_ms is None else round(gpu_ms, 3)})
    record = {"benchmark": "decode_step_profile", "layers": config.num_hidden_layers, "hidden": config.hidden_size,
              "shape": args.shape or Path(args.config).name, "device": args.device if args.device != "cuda" else
              torch.cuda.get_device_name(), "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              "results": results}
    out = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_step_profile.json").write_text(json.dumps(record, indent=2) + "\n")
    print("\n| rows | adapters | sdpa backends | step ms (wall) | GPU busy ms |\n|---|---|---|---|---|")
    for r in results:
        print(f"| {r['rows']} | {r['adapters']} | {r.get('sdpa', 'default')} | {r['step_ms']:.2f} | {r.get('gpu_ms', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
