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

Every launch also checks the adapter it trained (``adapter_check`` per row): after the timed steps the workers
save it through ``lorakit train``'s own torchrun path (``lorakit.train.loop.save_result``: FSDP shards gathered,
rank 0 writes the PEFT-format folder atomically) with the trained model's logits on a fixed tiny input; the
launcher then rebuilds the same random base in one process (every weight drawn from a generator seeded by its
name, so the FSDP shards and the whole model agree) and loads the folder with ``lorakit.load_adapter`` and with
``peft.PeftModel.from_pretrained`` (see ``check_saved_adapter``). Skipped, and said so, when the base does not fit
one GPU (70B). A failed check makes the script exit non-zero after the results are written.

    python bench/multi_gpu.py                         # ddp-8b at 1,2,4,8 GPUs and fsdp-70b at 4,8 (what is visible)
    python bench/multi_gpu.py --cases ddp-8b --gpus 1,2,4
    python bench/multi_gpu.py --smoke                 # CPU, gloo, tiny shape, 1 process: checks the script only
    python bench/multi_gpu.py --smoke --cases fsdp-tiny --gpus 2   # the same with 2 CPU processes (real shards)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

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
    "fsdp-8b": ("8b", "fsdp", 4, True, (1, 2, 4, 8)),  # FSDP2 where ddp-8b runs: the sharding's own cost
}
SMOKE_CASES = {"ddp-tiny": ("tiny", "ddp", 2, False, (1,)), "fsdp-tiny": ("tiny", "fsdp", 2, True, (1,))}


# ------------------------------------------------------------------------------------------------ model (shared)
ADAPTER_DIR = "adapter"  # under the --save folder: the trained adapter, PEFT format
REFERENCE_FILE = "reference.safetensors"  # under the --save folder: {"logits": the trained model's probe logits}
PROBE_SHAPE = (2, 12)  # (batch, tokens) of the fixed tiny input the adapter check runs: cheap even for 70B
CHECK_MEMORY_FACTOR = 3.3  # the check holds the bf16 base, then a float32 copy beside it: ~3x the bf16 bytes


def llama_config(shape: str, seq: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(8192, seq), tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    return cfg


def model_on_meta(cfg, dtype, lora: bool):
    """A ``LlamaForCausalLM`` of ``cfg`` on the meta device (no memory, no values), parameters in ``dtype``; with
    ``lora`` a LoRA r=RANK on TARGETS injected, its tensors in float32 (lorakit's default) whatever the base's."""
    import torch
    from transformers import LlamaForCausalLM

    import lorakit

    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(cfg)
            if lora:
                lorakit.inject(model, lorakit.LoraConfig(r=RANK, alpha=ALPHA, target_modules=TARGETS))
    finally:
        torch.set_default_dtype(prev)
    if lora:  # inject froze the base: what still needs a gradient is the adapter
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model


def fill_by_name(model) -> None:
    """Give every parameter values drawn from a generator seeded by its name (lorakit's ``.base_layer`` left out).

    So a worker's model (lorakit-wrapped, FSDP-sharded or not, any process count) and the plain transformers model
    the launcher rebuilds hold the same base values name for name, on the same device type and dtype: an FSDP
    process draws the whole tensor (one at a time, so at most the largest weight in transient memory) and keeps its
    own shard. Norm weights 1, lora_B N(0, 1e-3) (nonzero, so every adapter tensor has a gradient), else N(0, 0.02).
    """
    import zlib

    import torch
    from torch.distributed.tensor import DTensor, distribute_tensor

    with torch.no_grad():
        for name, p in model.named_parameters():
            key = name.replace(".base_layer", "")
            sharded = isinstance(p, DTensor)
            local = p.to_local() if sharded else p
            whole = torch.empty(p.shape, dtype=p.dtype, device=local.device) if sharded else p
            if "norm" in key:
                whole.fill_(1.0)
            else:
                gen = torch.Generator(device=local.device).manual_seed(zlib.crc32(key.encode()))
                whole.normal_(0.0, 1e-3 if key.endswith("lora_B") else 0.02, generator=gen)
            if sharded:  # this process's shard, cut locally (src_data_rank=None: no communication)
                mine = distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None).to_local()
                if mine.shape != local.shape:
                    raise RuntimeError(f"{name}: shard of shape {tuple(mine.shape)} for a local tensor of "
                                       f"{tuple(local.shape)}")
                local.copy_(mine)


def materialise(model, cfg, device) -> None:
    """Allocate ``model`` (built on meta; FSDP-sharded: each process its own shards) on ``device``, fill it by name,
    and rebuild the rotary embedding (its buffers were computed on meta)."""
    import torch
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model.to_empty(device=device)
    fill_by_name(model)
    with torch.device(device):
        model.model.rotary_emb = LlamaRotaryEmbedding(config=cfg)


def probe_logits(model, vocab: int, device, compute):
    """float32 CPU logits (PROBE_SHAPE + (vocab,)) of ``model`` on the fixed probe input, no gradient, under the
    training step's autocast (``compute``: bf16 on CUDA, None for plain float32). Every FSDP process must call it."""
    import torch

    from lorakit.train.evaluate import autocast_context

    ids = torch.randint(0, vocab, PROBE_SHAPE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad(), autocast_context(device, compute):
        return model(input_ids=ids.to(device), use_cache=False).logits.float().cpu()


# ------------------------------------------------------------------------------------------------ worker (one rank)
def build_model(shape: str, mode: str, device, seq: int, ckpt: bool):
    """A random-weight Llama of ``shape`` in bf16 (float32 on CPU) with a LoRA adapter, built on meta and then
    allocated on ``device`` (``fsdp``: sharded first, so no process ever holds the whole base), filled by name."""
    import torch

    from lorakit.train.distributed import apply_fsdp

    cfg = llama_config(shape, seq)
    torch.manual_seed(0)
    model = model_on_meta(cfg, torch.bfloat16 if device.type == "cuda" else torch.float32, lora=True)
    if mode == "fsdp":
        apply_fsdp(model, device)
    materialise(model, cfg, device)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def save_adapter_and_reference(model, folder: str, device, compute, sharded: bool) -> None:
    """Write the trained adapter to ``folder/adapter`` through the path ``lorakit train`` takes under torchrun
    (``lorakit.train.loop.save_result``: FSDP shards gathered on every process, rank 0 writes the PEFT-format folder
    atomically), then, from rank 0, ``folder/reference.safetensors``: the trained model's probe logits (for FSDP
    every process takes part in that forward; data parallel: rank 0 alone, its replica is the whole model)."""
    from pathlib import Path

    from safetensors.torch import save as safetensors_bytes

    from lorakit._fs import atomic_write_bytes
    from lorakit.train.distributed import barrier, world
    from lorakit.train.loop import save_result, trainable_adapter

    rank = world()[0]
    model.eval()
    save_result(model, None, Path(folder) / ADAPTER_DIR, trainable_adapter(model), write=rank == 0)
    if sharded or rank == 0:
        logits = probe_logits(model, model.config.vocab_size, device, compute)
    if rank == 0:
        atomic_write_bytes(Path(folder) / REFERENCE_FILE, safetensors_bytes({"logits": logits.contiguous()}))
    barrier()


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
    # on the device: NCCL reduces device tensors only (gloo, on the CPU, takes these too)
    median = torch.tensor(statistics.median(times), dtype=torch.float64, device=device)
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(median, op=dist.ReduceOp.MAX)  # the slowest process sets the pace
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    save_adapter_and_reference(model, args.save, device, compute, sharded=mode == "fsdp")  # after the timing
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


# ------------------------------------------------------------------------------------------------ adapter check
class CheckFailed(Exception):
    """One line: what the saved adapter got wrong."""


def tolerance(dtype) -> tuple[float, float]:
    """(rtol, atol) for ``dtype`` from the TOLERANCE table of tests/conftest.py, the project's one table. Read with
    ``ast``, not imported: importing conftest sets TRITON_INTERPRET=1, which would put later GPU launches on the
    Triton interpreter."""
    import ast

    path = os.path.join(ROOT, "tests", "conftest.py")
    with open(path, encoding="utf-8") as handle:
        tree = ast.parse(handle.read())
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(node, ast.Assign)
                                                                      else None)
        if isinstance(target, ast.Name) and target.id == "TOLERANCE" and isinstance(node.value, ast.Dict):
            for key, value in zip(node.value.keys, node.value.values):
                if isinstance(key, ast.Attribute) and key.attr == str(dtype).rpartition(".")[2]:
                    return tuple(ast.literal_eval(value))
    raise CheckFailed(f"{path} has no TOLERANCE entry for {dtype}")


def _close(what: str, actual, expected, dtype) -> None:
    import torch

    rtol, atol = tolerance(dtype)
    if not torch.allclose(actual, expected, rtol=rtol, atol=atol):
        raise CheckFailed(f"{what} differ beyond the {str(dtype).rpartition('.')[2]} tolerance (rtol {rtol}, atol "
                          f"{atol}): max abs difference {float((actual - expected).abs().max()):.3g}")


def _same_tensors(who: str, loaded: dict, files: dict) -> None:
    import torch

    if set(loaded) != set(files):
        extra, missing = sorted(set(loaded) - set(files)), sorted(set(files) - set(loaded))
        raise CheckFailed(f"{who} holds other adapter keys than the file: {len(missing)} missing (e.g. "
                          f"{missing[:1]}), {len(extra)} extra (e.g. {extra[:1]})")
    for key, tensor in files.items():
        if not torch.equal(loaded[key].detach().cpu(), tensor):
            raise CheckFailed(f"{who}'s {key} differs from the file's tensor")


def check_saved_adapter(shape: str, seq: int, folder: str, device) -> None:
    """Load the adapter a launch saved under ``folder`` into a rebuilt base in this one process; raise CheckFailed.

    The base is rebuilt as the workers built it (meta, then filled by name: bf16 on CUDA, float32 on CPU). Checked:
    lorakit.load_adapter and peft.PeftModel.from_pretrained (on a plain transformers model) both load it and hold
    exactly the file's tensors; lorakit's logits under the training autocast match the trained model's (the
    reference the workers wrote: so the saved adapter is the trained one, and the rebuilt base the workers' base);
    in float32 (the bf16 base cast up exactly), lorakit's and PEFT's logits agree and differ from the base's (an
    adapter that changes nothing fails).
    """
    import copy

    import torch
    from safetensors.torch import load_file

    import lorakit
    from lorakit.io import CONFIG_NAME, WEIGHTS_NAME, adapter_state_dict

    adapter_dir = os.path.join(folder, ADAPTER_DIR)
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not os.path.isfile(os.path.join(adapter_dir, name)):
            raise CheckFailed(f"the workers wrote no {name} in {adapter_dir}")
    files = load_file(os.path.join(adapter_dir, WEIGHTS_NAME))  # our own file: safetensors, no pickle
    if not files:
        raise CheckFailed("the adapter file holds no tensor")
    reference = load_file(os.path.join(folder, REFERENCE_FILE))["logits"]
    cuda = device.type == "cuda"
    compute = torch.bfloat16 if cuda else None
    cfg = llama_config(shape, seq)
    base = model_on_meta(cfg, torch.bfloat16 if cuda else torch.float32, lora=False)
    materialise(base, cfg, device)
    base.eval()

    ours = copy.deepcopy(base)
    name = lorakit.load_adapter(ours, adapter_dir)
    _same_tensors("lorakit", adapter_state_dict(ours, name)[0], files)
    _close("lorakit's logits and the trained model's (the reference)",
           probe_logits(ours, cfg.vocab_size, device, compute), reference, compute or torch.float32)
    ours.float()
    adapted = probe_logits(ours, cfg.vocab_size, device, None)
    with lorakit.disable_adapters(ours):
        plain = probe_logits(ours, cfg.vocab_size, device, None)
    del ours

    from peft import PeftModel, get_peft_model_state_dict  # optional dependency: only this check needs it

    theirs = PeftModel.from_pretrained(base.float(), adapter_dir)
    _same_tensors("PEFT", get_peft_model_state_dict(theirs), files)
    _close("lorakit's and PEFT's float32 logits", adapted, probe_logits(theirs, cfg.vocab_size, device, None),
           torch.float32)
    rtol, atol = tolerance(torch.float32)
    if torch.allclose(adapted, plain, rtol=rtol, atol=atol):
        raise CheckFailed(f"the adapter does not change the logits (max abs change "
                          f"{float((adapted - plain).abs().max()):.3g}, within the float32 tolerance)")


def adapter_check(shape: str, seq: int, folder: str, smoke: bool) -> str:
    """"ok", "skipped: ..." or "failed: <one line>" for the adapter a launch saved under ``folder``."""
    import torch

    if smoke:
        device = torch.device("cpu")
    else:
        device = torch.device("cuda", 0)
        on_meta = model_on_meta(llama_config(shape, seq), torch.bfloat16, lora=False)
        params = sum(p.numel() for p in on_meta.parameters())
        if CHECK_MEMORY_FACTOR * 2 * params > torch.cuda.mem_get_info(device)[0]:
            return "skipped: base does not fit one GPU"
    try:
        check_saved_adapter(shape, seq, folder, device)
        return "ok"
    except Exception as error:  # any failure is the check's result: reported per row, the script exits non-zero
        if not isinstance(error, CheckFailed):
            traceback.print_exc()
        lines = str(error).strip().splitlines() or [""]
        kind = "" if isinstance(error, CheckFailed) else f"{type(error).__name__}: "
        return f"failed: {kind}{lines[0]}"[:400]
    finally:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # give the next launch's rank 0 its GPU back


# ---------------------------------------------------------------------------------------------------- launcher
def launch(case: str, spec, gpus: int, args) -> dict | None:
    shape, mode, batch, ckpt, _ = spec
    with tempfile.TemporaryDirectory() as tmp:
        result = os.path.join(tmp, "row.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               os.path.abspath(__file__), "--worker", "--case", case, "--shape", shape, "--mode", mode,
               "--batch", str(batch), "--seq", str(args.seq), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--result", result, "--save", tmp] + (["--ckpt"] if ckpt else []) + (["--cpu"] if args.smoke else [])
        print(f"== {case} on {gpus} GPU(s): {' '.join(cmd[3:6])} ...", flush=True)
        done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1" if args.smoke else
                                        os.environ.get("OMP_NUM_THREADS", "4")}, timeout=args.timeout)
        if done.returncode != 0 or not os.path.isfile(result):
            print(f"!! {case} at {gpus} GPU(s) failed (exit {done.returncode})", flush=True)
            return {"case": case, "gpus": gpus, "error": f"exit {done.returncode}",
                    "adapter_check": "not run: the launch failed"}
        with open(result) as handle:
            row = json.load(handle)
        started = time.perf_counter()
        row["adapter_check"] = adapter_check(shape, args.seq, tmp, args.smoke)
        print(f"-- {case} at {gpus} GPU(s): adapter check {row['adapter_check']} "
              f"({time.perf_counter() - started:.1f} s)", flush=True)
        return row


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
    lines = ["| case | GPUs | batch/GPU | tokens/s per GPU | tokens/s total | peak GiB per GPU | scaling efficiency "
             "| adapter check |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        check = r.get("adapter_check", "-").replace("|", "/")
        if "error" in r:
            lines.append(f"| {r['case']} | {r['gpus']} | - | failed ({r['error']}) | - | - | - | {check} |")
        else:
            lines.append(f"| {r['case']} | {r['gpus']} | {r['batch_per_gpu']} x {r['seq']} | "
                         f"{r['tokens_per_s_per_gpu']:,.0f} | {r['tokens_per_s']:,.0f} | {r['peak_gib_per_gpu']} | "
                         f"{r.get('scaling_efficiency', '-')} | {check} |")
    print("\n".join(lines))
    if smoke:
        return
    device = next((r["device"] for r in rows if "device" in r), "GPU")
    section = ("\n## Multi-GPU LoRA training (bench/multi_gpu.py)\n\n"
               f"{time.strftime('%Y-%m-%d')}, {device}, torchrun, random bf16 weights, LoRA r={RANK} on the seven "
               "projections, seq 2048, gradient checkpointing; ddp = whole base per GPU with the adapter gradients "
               "all-reduced, fsdp = FSDP2-sharded base; scaling efficiency = tokens/s per GPU relative to the fewest "
               "GPUs measured; adapter check = the adapter the run saved (lorakit's torchrun save path) loads in one "
               "process in lorakit and in PEFT with the same tensors, lorakit's logits match the trained model's and "
               "PEFT's, and it changes the base's logits. Raw rows: bench/results/multi_gpu.json.\n\n"
               + "\n".join(lines) + "\n")
    with open(os.path.join(ROOT, "docs", "PERFORMANCE.md"), "a", encoding="utf-8") as handle:
        handle.write(section)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=None, help="comma-separated: " + ", ".join(CASES)
                        + " (with --smoke: " + ", ".join(SMOKE_CASES) + ")")
    parser.add_argument("--gpus", default=None, help="comma-separated GPU counts (default: each case's, up to visible)")
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per launch")
    parser.add_argument("--smoke", action="store_true", help="CPU, gloo, tiny shape, 1 process")
    # worker-only arguments
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    for name in ("case", "shape", "mode", "result", "save"):
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
        cases = {k: v for k, v in SMOKE_CASES.items() if args.cases is None or k in args.cases.split(",")}
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
    failed = [f"{r['case']} at {r['gpus']}: {r['adapter_check']}" for r in rows
              if r["adapter_check"] != "ok" and not r["adapter_check"].startswith("skipped")]
    if failed:
        sys.exit("adapter check failed (results written): " + "; ".join(failed))


if __name__ == "__main__":
    main()
