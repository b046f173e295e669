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
    _sync(device)
    first = time.perf_counter() - first
    for _ in range(warm - 1):
        step()
    _sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1000)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return statistics.median(times), min(times), max(times), first


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
