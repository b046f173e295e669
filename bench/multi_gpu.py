"""Multi-GPU LoRA training through torchrun: data parallel (DDP-style adapter all-reduce) and FSDP2, scaling.

Cases (random bf16 weights, sdpa attention, LoRA r=16 alpha=32 dropout 0 on q,k,v,o,gate,up,down, seq 2048,
AdamW, 3 warm-up + 8 timed steps, the median step time of the slowest process):

* ``ddp-8b``: Llama-3.1-8B shape, batch 4 x 2048 per GPU, gradient checkpointing, the whole base on every GPU;
  only the adapter's gradients are all-reduced (lorakit.train.distributed.all_reduce_gradients, 64 MiB buckets);
* ``fsdp-70b``: Llama-3.1-70B shape, batch 1 x 2048 per GPU, gradient checkpointing, the base sharded with FSDP2
  (lorakit.train.distributed.apply_fsdp: per decoder layer, then the decoder, then the head), built on the meta
  device so no process ever holds the whole 141 GB base.

Each GPU count is one ``torchrun --nproc_per_node N`` launch of this file (``--worker``); the launcher collects
tokens/s per GPU, peak memory per GPU (``torch.cuda.max_memory_allocated``, max over processes), ``gpus`` and
``scaling_efficiency`` = (tokens/s per GPU at N) / (tokens/s per GPU at the fewest GPUs measured), writes
$OUT/multi_gpu.json (bench/results/ when $OUT is unset) and appends a table to docs/PERFORMANCE.md (GPU runs only).

    python bench/multi_gpu.py                         # ddp-8b at 1,2,4,8 GPUs and fsdp-70b at 4,8 (what is visible)
    python bench/multi_gpu.py --cases ddp-8b --gpus 1,2,4
    python bench/multi_gpu.py --smoke                 # CPU, gloo, tiny shape, 1 process: checks the script only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

# On shared multi-GPU hosts a program that uses NVLink multicast (NVLS) can take the GPUs out of service for
# everyone: keep NCCL, torch symmetric memory and NVSHMEM off it. Set before torch or NCCL initialise, and
# inherited by the torchrun workers.
os.environ["NCCL_NVLS_ENABLE"] = "0"
os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] = "1"
os.environ["NVSHMEM_DISABLE_NVLS"] = "1"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # the GPU machine runs the checkout without installing it
from bench_common import ALPHA, LLAMA_SHAPES, RANK, TARGETS  # noqa: E402

SHAPES = {**{k: LLAMA_SHAPES[k] for k in ("8b", "70b")},
          "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=1000)}
# case -> (shape, mode, batch per GPU, gradient checkpointing, default GPU counts)
CASES = {
    "ddp-8b": ("8b", "ddp", 4, True, (1, 2, 4, 8)),
    "fsdp-70b": ("70b", "fsdp", 1, True, (4, 8)),
}
SMOKE_CASES = {"ddp-tiny": ("tiny", "ddp", 2, False, (1,)), "fsdp-tiny": ("tiny", "fsdp", 2, True, (1,))}


# ------------------------------------------------------------------------------------------------ worker (one rank)
def build_model(shape: str, mode: str, device, seq: int, ckpt: bool):
    """A random-weight Llama of ``shape`` in bf16 with a LoRA adapter, sharded for ``fsdp`` (built on meta)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    import lorakit
    from lorakit.train.distributed import apply_fsdp

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(8192, seq), tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if mode == "fsdp" else device):
            model = LlamaForCausalLM(cfg)
            lorakit.inject(model, lorakit.LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS))
    finally:
        torch.set_default_dtype(prev)
    for p in model.parameters():  # adapters in float32 (lorakit's default), the base in bf16
        if p.requires_grad:
            p.data = p.data.float()
    if mode == "fsdp":
        apply_fsdp(model, device)
        model.to_empty(device=device)  # each process allocates its own shards only
        torch.manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                local = p.to_local() if hasattr(p, "to_local") else p
                if name.endswith("lora_B"):
                    local.normal_(0, 1e-3)  # nonzero, so every adapter tensor has a gradient
                elif "norm" in name:
                    local.fill_(1.0)
                else:
                    local.normal_(0, 0.02)
        with torch.device(device):
            model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)  # its buffers were on meta
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    from lorakit.optim import build_optimizer
    from lorakit.train.distributed import all_reduce_gradients, all_reduce_sum, world
    from lorakit.train.loop import _enable_fast_kernels, _grad_norm_and_clip, accumulate_gradients

    cuda = torch.cuda.is_available() and not args.cpu
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world_size = world()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    shape, mode, batch, ckpt = args.shape, args.mode, args.batch, args.ckpt
    t0 = time.perf_counter()
    model = build_model(shape, mode, device, args.seq, ckpt)
    build_s = time.perf_counter() - t0
    if mode == "ddp" and cuda and not ckpt:
        _enable_fast_kernels(model, device, lambda m: print(m, flush=True) if rank == 0 else None)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, 1e-4, 0.0, None, (0.9, 0.999), 1e-8)
    vocab = SHAPES[shape]["vocab_size"]
    gen = torch.Generator().manual_seed(1000 + rank)  # each process its own rows, as a real run's shard
    ids = torch.randint(0, vocab, (batch, args.seq), generator=gen).to(device)
    micro = {"input_ids": ids, "labels": ids.clone()}
    global_tokens = int(all_reduce_sum(torch.tensor(batch * (args.seq - 1))))
    compute = torch.bfloat16 if cuda else None

    def step() -> None:
        accumulate_gradients(model, [micro], global_tokens, device, compute)
        all_reduce_gradients(params)  # no-op for FSDP-sharded tensors (reduce-scattered by FSDP2)
        _grad_norm_and_clip(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    median = torch.tensor(statistics.median(times), dtype=torch.float64)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, dtype=torch.float64)
    if world_size > 1:
        dist.all_reduce(median, op=dist.ReduceOp.MAX)  # the slowest process sets the pace
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        per_gpu = batch * args.seq / float(median)
        row = {"case": args.case, "mode": mode, "shape": shape, "gpus": world_size, "batch_per_gpu": batch,
               "seq": args.seq, "gradient_checkpointing": ckpt, "step_s": round(float(median), 4),
               "tokens_per_s_per_gpu": round(per_gpu, 1), "tokens_per_s": round(per_gpu * world_size, 1),
               "peak_gib_per_gpu": round(float(peak), 2), "build_s": round(build_s, 1),
               "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
        with open(args.result, "w") as handle:
            json.dump(row, handle)
        print(json.dumps(row), flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------------- launcher
def launch(case: str, spec, gpus: int, args) -> dict | None:
    shape, mode, batch, ckpt, _ = spec
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "row.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               os.path.abspath(__file__), "--worker", "--case", case, "--shape", shape, "--mode", mode,
               "--batch", str(batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--result", result] + (["--ckpt"] if ckpt else []) + (["--cpu"] if args.smoke else [])
        print(f"== {case} on {gpus} GPU(s): {' '.join(cmd[3:6])} ...", flush=True)
        done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1" if args.smoke else
                                        os.environ.get("OMP_NUM_THREADS", "4")}, timeout=args.timeout)
        if done.returncode != 0 or not os.path.isfile(result):
            print(f"!! {case} at {gpus} GPU(s) failed (exit {done.returncode})", flush=True)
            return {"case": case, "gpus": gpus, "error": f"exit {done.returncode}"}
        with open(result) as handle:
            return json.load(handle)


def add_efficiency(rows: list[dict]) -> None:
    """scaling_efficiency = tokens/s per GPU at N GPUs / tokens/s per GPU at the fewest GPUs of the same case."""
    for case in {r["case"] for r in rows}:
        ok = sorted((r for r in rows if r["case"] == case and "error" not in r), key=lambda r: r["gpus"])
        for r in ok:
            r["scaling_efficiency"] = round(r["tokens_per_s_per_gpu"] / ok[0]["tokens_per_s_per_gpu"], 3)
            r["efficiency_base_gpus"] = ok[0]["gpus"]


def write_outputs(rows: list[dict], smoke: bool) -> None:
    folder = os.environ.get("OUT") or os.path.join(ROOT, "bench", "results")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "multi_gpu_smoke.json" if smoke else "multi_gpu.json")
    with open(path + ".tmp", "w") as handle:
        json.dump(rows, handle, indent=1)
    os.replace(path + ".tmp", path)
    print(f"JSON: {path}")
    lines = ["| case | GPUs | batch/GPU | tokens/s per GPU | tokens/s total | peak GiB per GPU | scaling efficiency |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['gpus']} | - | failed ({r['error']}) | - | - | - |")
        else:
            lines.append(f"| {r['case']} | {r['gpus']} | {r['batch_per_gpu']} x {r['seq']} | "
                         f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tokens_per_s']:,.0f} | {r['peak_gib_per_gpu']} | "
                         f"{r.get('scaling_efficiency', '-')} |")
    print("\n".join(lines))
    if smoke:
        return
    device = next((r["device"] for r in rows if "device" in r), "GPU")
    section = ("\n## Multi-GPU LoRA training (bench/multi_gpu.py)\n\n"
               f"{time.strftime('%Y-%m-%d')}, {device}, torchrun, random bf16 weights, LoRA r={RANK} on the seven "
               "projections, seq 2048, gradient checkpointing; ddp = whole base per GPU with the adapter gradients "
               "all-reduced, fsdp = FSDP2-sharded base; scaling efficiency = tokens/s per GPU relative to the fewest "
               "GPUs measured. Raw rows: bench/results/multi_gpu.json.\n\n" + "\n".join(lines) + "\n")
    with open(os.path.join(ROOT, "docs", "PERFORMANCE.md"), "a", encoding="utf-8") as handle:
        handle.write(section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=None, help="comma-separated: " + ", ".join(CASES))
    parser.add_argument("--gpus", default=None, help="comma-separated GPU counts (default: each case's, up to visible)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per launch")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shape, 1 process")
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("case", "shape", "mode", "result"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cpu", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.smoke:
        args.seq, args.steps, args.warmup = 64, 2, 1
        cases = SMOKE_CASES
    else:
        import torch

        visible = torch.cuda.device_count()
        if visible == 0:
            sys.exit("no CUDA GPU visible; run with --smoke for the CPU check of the script")
        cases = {k: v for k, v in CASES.items() if args.cases is None or k in args.cases.split(",")}
    rows = []
    for case, spec in cases.items():
        counts = [int(g) for g in args.gpus.split(",")] if args.gpus else list(spec[4])
        if not args.smoke:
            skipped = [g for g in counts if g > visible]
            if skipped:
                print(f"-- {case}: skipping {skipped} GPUs ({visible} visible)", flush=True)
            counts = [g for g in counts if g <= visible]
        for gpus in counts:
            rows.append(launch(case, spec, gpus, args))
    add_efficiency(rows)
    write_outputs(rows, args.smoke)


if __name__ == "__main__":
    main()
