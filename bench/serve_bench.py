"""End-to-end benchmark of ``lorakit serve``: requests/s and generated tokens/s for 1, 8 and 32 concurrent
clients over 1 and 8 adapters, through the real server process and real HTTP (httpx).

    python bench/serve_bench.py [--model smollm2-135m] [--max-tokens 16] [--requests 32]
    python bench/serve_bench.py --random-from DIR [--shape 1b]   # random weights: a GPU machine has no model files

--random-from DIR takes config.json and the tokenizer from DIR (e.g. a copy of SmolLM2's folder without weights),
optionally resizes it to a Llama shape of bench_common.py, and writes random bf16 weights once: the speed of a
forward pass does not depend on the values, only the generated text does (random weights rarely emit end-of-text,
so most requests generate their full max_tokens).

Adapters: r=16 on every linear layer of the model, with random non-zero B (speed does not depend on the
values). Each client sends greedy /v1/completions requests back to back until the case's requests are done. Two
last cases (8 adapters; 8 and 32 clients) send sampled requests with OpenAI's and vLLM's options instead (SAMPLED:
temperature, top_p, top_k, min_p, repetition and presence penalties, a seed per request): what the per-row logits
processing costs against the greedy cases beside them.
``--system-words N`` puts one shared passage of N words before every prompt (a system prompt that every request
repeats: what the static decoder's prefix cache is for); ``--server-arg`` passes a flag on to ``lorakit serve``
(``--server-arg=--prefix-cache-tokens=0``: the same run without it).
Writes bench/results/serve_bench.json (or $OUT/serve_bench.json) and prints a table; docs/PERFORMANCE.md holds
the numbers of a recorded run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain LoRA in one sentence.",
           "List three prime numbers.", "What is 12 times 7?", "Name a famous painter.", "Say hello in Spanish.",
           "What colour is the sky?"]


def make_random_model(source: Path, shape: str | None, folder: Path) -> str:
    """A HF folder with ``source``'s config (resized to ``shape``) and tokenizer files and random bf16 weights."""
    import shutil

    import torch
    import transformers

    from bench_common import LLAMA_SHAPES

    folder.mkdir(parents=True)
    for item in source.iterdir():
        if item.is_file() and not item.name.endswith((".safetensors", ".bin", ".pt", ".gguf")):
            shutil.copy(item, folder / item.name)
    config = transformers.AutoConfig.from_pretrained(source)
    if shape:
        dims = dict(LLAMA_SHAPES[shape], vocab_size=config.vocab_size)  # keep the tokenizer's vocabulary
        for key, value in dims.items():
            setattr(config, key, value)
        config.head_dim = config.hidden_size // config.num_attention_heads
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(folder)
    return str(folder)


def make_adapters(model_name: str, folder: Path, count: int, rank: int) -> None:
    import torch

    import lorakit

    model, _ = lorakit.load_base(model_name, device="cpu")
    for index in range(count):
        name = f"bench{index}"
        lorakit.inject(model, lorakit.LoraConfig(r=rank, alpha=2 * rank), adapter=name)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for key, parameter in lorakit.lora_parameters(model, name):
                if key.endswith("lora_B"):
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 1e-3)
        lorakit.save_adapter(model, folder / name, adapter=name)
        lorakit.delete_adapter(model, name)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


SAMPLED = {"temperature": 0.8, "top_p": 0.95, "top_k": 50, "min_p": 0.05, "repetition_penalty": 1.1,
           "presence_penalty": 0.2}


def system_passage(words: int) -> str:
    """A fixed passage of ``words`` words (the same for every request and run)."""
    vocabulary = ("adapter rank matrix model token weight layer batch server request prompt answer cache memory "
                  "kernel gradient").split()
    return " ".join(vocabulary[(7 * i + i // 16) % len(vocabulary)] for i in range(words)) + "\n\n"


def run_case(url: str, clients: int, adapters: list[str], requests: int, max_tokens: int, sampled: bool = False,
             system: str = "") -> dict:
    import httpx

    latencies: list[float] = []
    tokens = [0]
    errors: list[str] = []
    lock = threading.Lock()
    counter = iter(range(requests))

    def client(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"model": adapters[i % len(adapters)], "prompt": system + PROMPTS[i % len(PROMPTS)],
                        "max_tokens": max_tokens, **({**SAMPLED, "seed": i} if sampled else {"temperature": 0})}
                start = time.perf_counter()
                response = http.post("/v1/completions", json=body)
                elapsed = time.perf_counter() - start
                with lock:
                    if response.status_code != 200:
                        errors.append(response.text[:200])
                    else:
                        latencies.append(elapsed)
                        tokens[0] += response.json()["usage"]["completion_tokens"]

    before = httpx.get(url + "/health", timeout=10).json()
    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - start
    after = httpx.get(url + "/health", timeout=10).json()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, e.g. {errors[0]}")
    # the engine's own split of this case's time (servers without these fields report nothing)
    phase = {k: after[k] - before[k] for k in ("prefill_s", "prefill_calls", "prefill_rows", "decode_s", "decode_steps",
                                               "prefix_cache_hit_tokens", "prefix_cache_query_tokens")
             if k in after and k in before}
    if phase:
        phase["prefill_share"] = round(phase["prefill_s"] / wall, 3)
        phase["decode_share"] = round(phase["decode_s"] / wall, 3)
        phase["rows_per_prefill"] = round(phase["prefill_rows"] / max(phase["prefill_calls"], 1), 2)
        phase["ms_per_decode_step"] = round(1e3 * phase["decode_s"] / max(phase["decode_steps"], 1), 3)
        phase = {k: round(v, 3) if isinstance(v, float) else v for k, v in phase.items()}
    return {"clients": clients, "adapters": len(adapters), "requests": requests, "max_tokens": max_tokens,
            "sampling": "sampled" if sampled else "greedy",
            "wall_s": round(wall, 3), "requests_per_s": round(requests / wall, 3),
            "tokens_per_s": round(tokens[0] / wall, 2), "generated_tokens": tokens[0],
            "latency_p50_s": round(statistics.median(latencies), 3),
            "latency_max_s": round(max(latencies), 3), **phase}


def main() -> int:
    import httpx

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--requests", type=int, default=32, help="requests per case (at least the client count)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--random-from", type=Path, default=None,
                        help="folder with config.json + tokenizer: serve random weights of that model (see above)")
    parser.add_argument("--shape", default=None, help="with --random-from: resize to this Llama shape (1b, 8b)")
    parser.add_argument("--decoder", choices=("auto", "static", "transformers"), default="auto",
                        help="the server's --decoder (static: lorakit.decoding on CUDA); the JSON file is named after it")
    parser.add_argument("--nf4", action="store_true",
                        help="serve the model quantized to NF4 first (`lorakit quantize`: a QLoRA user's 4-bit folder); "
                             "the adapters are made on the 16-bit model")
    parser.add_argument("--system-words", type=int, default=0,
                        help="a shared passage of this many words before every prompt (a repeated system prompt)")
    parser.add_argument("--server-arg", action="append", default=[],
                        help="a flag passed on to lorakit serve, e.g. --server-arg=--prefix-cache-tokens=0 (repeatable)")
    parser.add_argument("--tag", default="", help="added to the JSON file's name")
    args = parser.parse_args()
    system = system_passage(args.system_words) if args.system_words else ""
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_from:
            args.model = make_random_model(args.random_from, args.shape, Path(tmp) / "model")
        adapters_model = args.model
        if args.nf4:
            subprocess.run([sys.executable, "-m", "lorakit", "quantize", "--model", str(args.model), "--out",
                            str(Path(tmp) / "model-nf4")], cwd=ROOT, check=True)
            args.model = str(Path(tmp) / "model-nf4")
        folder = Path(tmp) / "adapters"
        make_adapters(adapters_model, folder, 8, args.rank)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server_log = open(Path(tmp) / "server.log", "w")  # shown when a case fails: the server's own traceback
        server = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", args.model, "--adapters", str(folder),
                                   "--port", str(port), "--max-loaded", "8", "--max-batch", "32", "--name", "base",
                                   "--decoder", args.decoder, *args.server_arg],
                                  cwd=ROOT, stdout=server_log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if httpx.get(url + "/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                time.sleep(0.5)
            names = [f"bench{i}" for i in range(8)]
            run_case(url, 8, names, 8, 2, system=system)  # warm-up: loads all 8 adapters
            results = []
            cases = [(adapters, clients, False) for adapters in (1, 8) for clients in (1, 8, 32)]
            for adapters, clients, sampled in cases + [(8, 8, True), (8, 32, True)]:
                requests = max(args.requests, clients) if clients > 1 else max(2, args.requests // 8)
                result = run_case(url, clients, names[:adapters], requests, args.max_tokens, sampled, system)
                results.append(result)
                print(f"{adapters} adapter(s), {clients:2d} clients, {result['sampling']}: "
                      f"{result['requests_per_s']:7.2f} req/s "
                      f"{result['tokens_per_s']:8.1f} tok/s  p50 {result['latency_p50_s']:.2f} s  prefill "
                      f"{result.get('prefill_share', 0):.0%} of wall ({result.get('rows_per_prefill', 0)} rows/call), "
                      f"decode {result.get('decode_share', 0):.0%} ({result.get('ms_per_decode_step', 0)} ms/step)",
                      flush=True)
        except BaseException:
            server_log.flush()
            lines = (Path(tmp) / "server.log").read_text(errors="replace").splitlines(True)
            first = next((i for i, line in enumerate(lines) if line.startswith("Traceback")), max(0, len(lines) - 60))
            print("--- the server's log from its first traceback (60 lines) ---\n" + "".join(lines[first:first + 60]),
                  file=sys.stderr)
            raise
        finally:
            server.terminate()
            server.wait(timeout=30)
            server_log.close()
    import torch

    model_name = f"random {args.shape or args.random_from.name}" if args.random_from else args.model
    record = {"benchmark": "serve_bench", "model": model_name + (" (NF4)" if args.nf4 else ""), "decoder": args.decoder,
              "rank": args.rank, "system_words": args.system_words, "server_args": args.server_arg,
              "max_tokens": args.max_tokens,
              "device": "cpu" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
              "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "torch": torch.__version__, "time": time.strftime("%Y-%m-%d %H:%M:%S"),
              # other work on the machine slows every case alike; a load average above the CPU count means a busy machine
              "load_average_at_end": list(os.getloadavg()), "results": results}
    out_dir = Path(os.environ.get("OUT") or ROOT / "bench" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "".join(f"_{part}" for part in (args.shape, "nf4" if args.nf4 else None,
                                          None if args.decoder == "auto" else args.decoder, args.tag or None) if part)
    name = f"serve_bench{tag}.json"  # one file per shape and decoder: runs in one session do not overwrite each other
    (out_dir / name).write_text(json.dumps(record, indent=2) + "\n")
    print("\n| adapters | clients | sampling | requests | req/s | tokens/s | p50 latency s | prefill share | decode ms/step |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['adapters']} | {r['clients']} | {r['sampling']} | {r['requests']} | {r['requests_per_s']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['latency_p50_s']:.2f} | {r.get('prefill_share', '')} | {r.get('ms_per_decode_step', '')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
