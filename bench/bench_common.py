"""What every benchmark here shares: the Llama shapes, the LoRA setting of the measurements, and the step timer.

Imported by the scripts in this folder (``python bench/<script>.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import statistics
import time

import torch

# Llama-3.2-1B, Llama-3.1-8B and Llama-3.1-70B shapes (random weights: speed does not depend on the values)
LLAMA_SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
}
# the LoRA of every measurement in ANCHORS.md: r=16, alpha=32 on the seven projections
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 16, 32


def time_steps(step, device: str, warm: int = 3, reps: int = 8) -> tuple[float, float, float, float]:
    """Run ``step`` ``warm`` times, then time ``reps`` runs (CUDA events on GPU, a host clock on CPU).

    Returns (median, min, max) seconds of the timed runs and the seconds of the first call (compilation included).
    """
    first = time.perf_counter()
    step()
    sync(device)
    first = time.perf_counter() - first
    for _ in range(warm - 1):
        step()
    sync(device)
    times = _timed_runs(step, device, reps)
    return statistics.median(times), min(times), max(times), first


# -- timing shared by the kernel and decode benchmarks (device: a torch.device) ------------------------------------

def sync(device) -> None:
    """Wait for the GPU (``device``: a torch.device or a name such as "cuda")."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn, device, warm=2, reps=8, budget_s=10.0) -> float:
    """Median seconds of ``fn()`` (CUDA events on the GPU, a host clock elsewhere); the number of timed runs shrinks
    so that one case stays within ``budget_s``."""
    for _ in range(warm):
        fn()
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    reps = max(2, min(reps, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    return statistics.median(_timed_runs(fn, device, reps))


def _timed_runs(fn, device, reps: int) -> list[float]:
    """Seconds of each of ``reps`` calls of ``fn()``: CUDA events on the GPU, a host clock elsewhere."""
    times = []
    for _ in range(reps):
        if torch.device(device).type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return times


def copy_bandwidth(device) -> float:
    """Bytes per second of a large device-to-device copy, counting the bytes read and the bytes written."""
    n = (1 << 30) if device.type == "cuda" else (1 << 24)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = time_fn(lambda: dst.copy_(src), device, warm=3, reps=20)
    return 2 * n / seconds


def graph_seconds(fn, device, calls=10) -> float:
    """GPU seconds of one ``fn()``: ``calls`` calls captured in one CUDA graph, replays timed (no host overhead)."""
    if device.type != "cuda":
        return time_fn(fn, device, warm=1, reps=3, budget_s=1.0)
    stream = torch.cuda.Stream()  # warm up (Triton compiles here) off the capture stream, as PyTorch advises
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(calls):
            fn()
    seconds = time_fn(g.replay, device, warm=3, reps=20, budget_s=1.0) / calls
    del g
    return seconds


def write_json(path: str, record) -> None:
    """Write ``record`` as JSON to ``path`` atomically (a temp file in the same folder, then a rename)."""
    import json
    import os

    with open(path + ".tmp", "w") as handle:
        json.dump(record, handle, indent=1)
    os.replace(path + ".tmp", path)


def random_llama(fields: dict, device, dtype, max_positions: int = 8192):
    """A random-weight ``LlamaForCausalLM`` of the given config fields (seed 0), built directly on ``device`` in
    ``dtype``, in eval mode, with an untied head."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**fields, max_position_embeddings=max_positions, tie_word_embeddings=False)
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
