"""Training on several processes (``torchrun``): data parallel gradients, FSDP2 sharding, gathered state.

Two ways to spread a LoRA run over N processes (gloo on CPU, NCCL on GPUs), both giving the same adapter as one
process with the same global batch (``batch_size x grad_accum x N`` rows):

* data parallel (default): every process holds the whole base; after the backward pass the gradients of the
  trainable tensors (the adapter only) are summed over processes in a few flat buckets
  (:func:`all_reduce_gradients`), one all-reduce per bucket instead of one per tensor;
* ``--fsdp``: the frozen base is sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``) per decoder layer,
  then the decoder as the root unit (:func:`apply_fsdp`); each process stores 1/N of every sharded weight and
  gathers a layer's weights just before using it. FSDP2 reduce-scatters the sharded gradients as a *sum*
  (divide factor 1): the loss is already divided by the supervised tokens of the whole global batch.

Checkpoints stay in the single-process format whatever the layout: sharded tensors (adapter weights, AdamW moments)
are gathered with ``DTensor.full_tensor()`` on every process and written by rank 0 alone; on resume every process
reads the same files and keeps its own shard (:func:`to_local_layout`). This costs one gather of the adapter and
its optimizer state per checkpoint (for Llama-3.1-8B r=16: 42M values), and makes a checkpoint readable by any
process count, although a resume with another count is refused (the data order would differ).
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

from lorakit.errors import LorakitError

# Gradient buckets of at most 64 MiB: one all-reduce per bucket (Llama-3.1-8B r=16 on the seven projections has
# 168 MiB of float32 adapter gradients: 3 all-reduces instead of 448), and never a second copy of all gradients.
BUCKET_BYTES = 64 * 2**20


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without torch.distributed."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum ``value`` in place over all processes (a no-op on one). NCCL needs it on the process's GPU."""
    import torch.distributed as dist

    if world()[1] > 1:
        if dist.get_backend() == "nccl" and value.device.type != "cuda":
            moved = value.to(f"cuda:{torch.cuda.current_device()}")
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            value.copy_(moved.to(value.device))
        else:
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def rank0_clock() -> float:
    """Rank 0's ``time.time()`` in whole seconds, on every process (this process's on one): a run folder named from
    it (``runs/<date-time>``) is one folder for all processes, even when they get here on either side of a second.
    A collective: every process must call it."""
    import time

    now = torch.tensor([int(time.time()) if world()[0] == 0 else 0], dtype=torch.int64)
    return float(all_reduce_sum(now).item())


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for an FSDP2 (DTensor) parameter or state tensor."""
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor: ``full_tensor()`` of a DTensor (a collective: every process must call it), else itself."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def all_reduce_gradients(params: list[nn.Parameter], bucket_bytes: int = BUCKET_BYTES) -> int:
    """Sum the gradients of the replicated (non-sharded) ``params`` over processes; returns the all-reduce count.

    Gradients are copied into flat buckets (one dtype and device per bucket, at most ``bucket_bytes`` each),
    all-reduced, and copied back. A parameter without a gradient on this process (say an adapter that saw no
    supervised token here) joins with zeros, so every process sends the same buckets. FSDP-sharded parameters
    are left alone: FSDP2 reduce-scatters them itself.
    """
    if world()[1] == 1:
        return 0
    replicated = [p for p in params if not is_sharded(p)]
    for p in replicated:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    buckets: list[list[nn.Parameter]] = []
    sizes: list[int] = []
    for p in replicated:
        nbytes = p.grad.numel() * p.grad.element_size()
        last = buckets[-1] if buckets else None
        if (last is None or last[0].grad.dtype != p.grad.dtype or last[0].grad.device != p.grad.device
                or sizes[-1] + nbytes > bucket_bytes):
            buckets.append([p])
            sizes.append(nbytes)
        else:
            last.append(p)
            sizes[-1] += nbytes
    for bucket in buckets:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])  # (sum of numels,)
        all_reduce_sum(flat)
        offset = 0
        for p in bucket:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n
    return len(buckets)


def with_gradient_anywhere(params: list[nn.Parameter]) -> list[nn.Parameter]:
    """``params`` less the replicated ones that no process has a gradient for (one all-reduce of a flag each).

    What torch's DistributedDataParallel does for globally unused parameters: such a tensor keeps ``.grad = None``,
    so AdamW skips it as it would on one process, instead of being all-reduced as zeros and stepped (its moments
    would decay, its step count grow and its momentum move it: an expert no process routed a token to in this step
    drifted from the one-process run). A tensor used on some process only still joins with zeros elsewhere
    (:func:`all_reduce_gradients`). Sharded (FSDP2) parameters pass through: FSDP2 reduces them itself.
    """
    if world()[1] == 1:
        return params
    replicated = [p for p in params if not is_sharded(p)]
    flags = all_reduce_sum(torch.tensor([float(p.grad is not None) for p in replicated]))  # (replicated,)
    unused = {id(p) for p, flag in zip(replicated, flags.tolist()) if flag == 0}
    return [p for p in params if id(p) not in unused]


# -- FSDP2 ----------------------------------------------------------------------------------------------------------
def decoder_layers(model: nn.Module) -> tuple[nn.Module, list[nn.Module]]:
    """(the decoder module, its list of layers) of a transformers causal LM (``model.model.layers`` and kin)."""
    base = getattr(model, "get_decoder", None)
    decoder = base() if callable(base) else getattr(model, "model", None)
    for holder in (decoder, getattr(decoder, "decoder", None)):
        layers = getattr(holder, "layers", None) or getattr(holder, "h", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return decoder, list(layers)
    raise LorakitError(f"--fsdp: cannot find the decoder layers of {type(model).__name__} (expected model.layers); "
                       "train without --fsdp")


def _require_process_group() -> None:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise LorakitError("--fsdp needs several processes: launch with torchrun --nproc_per_node N -m lorakit train ...")


def fsdp_mesh(device: torch.device):
    """The 1-D device mesh over every process that :func:`apply_fsdp` shards over (all processes must call this)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    _require_process_group()
    return init_device_mesh(device.type, (dist.get_world_size(),))


def fsdp_units(model: nn.Module) -> int:
    """How many FSDP2 units ``model`` holds (0: not sharded)."""
    from torch.distributed.fsdp import FSDPModule

    return sum(isinstance(module, FSDPModule) for module in model.modules())


def apply_fsdp(model: nn.Module, device: torch.device, mesh=None) -> int:
    """Shard ``model`` in place with FSDP2: each decoder layer, then the decoder (embeddings, final norm) as the root
    unit, then an untied output head on its own. Returns the number of FSDP units; a model already sharded (the
    runner shards while loading, :func:`lorakit.train.runner.load_sharded`) is left as it is.

    The decoder, not the whole LM, is the root because the loss (``lorakit.train.evaluate.loss_sum``) calls the
    decoder and the head separately; a tied head shares the embedding weight and stays whole on every process.
    Refused (one line) for NF4 bases: their weights are uint8 buffers, which FSDP2 does not shard. ``mesh``: from
    :func:`fsdp_mesh` (made here when None; making one is collective, so a caller sharding on one process at a time
    makes it first).
    """
    from torch.distributed.fsdp import fully_shard

    from lorakit import quant

    units = fsdp_units(model)
    if units:
        return units
    if mesh is None:
        _require_process_group()
    for name, module in model.named_modules():
        if quant.is_quantized(module):
            raise LorakitError(f"--fsdp cannot shard the NF4 base ({name} keeps its 4-bit weights in uint8 buffers, "
                               "which FSDP2 does not shard): drop --fsdp (data parallel holds the 4-bit base on each "
                               "device) or shard a 16-bit base (no --quantize nf4, not a 4-bit folder)")
    if mesh is None:
        mesh = fsdp_mesh(device)
    decoder, layers = decoder_layers(model)
    units = []
    for layer in layers:
        units.append(fully_shard(layer, mesh=mesh))
    units.append(fully_shard(decoder, mesh=mesh))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", 0)
    if head is not None and not tied and any(p.numel() for p in head.parameters()):
        units.append(fully_shard(head, mesh=mesh))
    # what no unit manages (a tied head's weight, buffers of unsharded modules) still lies where the model was
    # loaded (the CPU, under the runner's --fsdp): a whole copy on this process's device
    for module in model.modules():
        for name, tensor in list(module._parameters.items()) + list(module._buffers.items()):
            if tensor is not None and not is_sharded(tensor) and tensor.device != device and not tensor.is_meta:
                moved = tensor.detach().to(device)
                if name in module._parameters:
                    module._parameters[name] = nn.Parameter(moved, requires_grad=tensor.requires_grad)
                else:
                    module._buffers[name] = moved
    for unit in units:
        # the loss is already divided by the global batch's supervised tokens: sum, do not average, over processes
        unit.set_gradient_divide_factor(1.0)
        unit.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
        if hasattr(unit, "set_reduce_scatter_unused_params"):  # not in every torch 2.x
            # a trainable tensor used on some processes only (an expert module only their tokens reached) joins the
            # reduce-scatter with zeros elsewhere; without this the processes' collectives no longer matched (gloo:
            # "Connection reset by peer"; NCCL can hang)
            unit.set_reduce_scatter_unused_params(True)
    return len(units)


def check_fsdp_base(model: str, quantize: str | None, quantization: Any) -> None:
    """Refuse ``--fsdp`` over several processes on a 4-bit base before it loads (:func:`apply_fsdp` refuses it too,
    after minutes of loading a large one), naming what made it 4-bit: ``--quantize`` or the folder itself
    (``quantization``: its config.json's ``quantization_config``, None for a 16-bit folder)."""
    keep = "drop --fsdp (data parallel holds the 4-bit base whole on each process)"
    if quantize:
        raise LorakitError(f"--fsdp cannot shard an NF4 base (--quantize {quantize}: its 4-bit weights are uint8 "
                           f"buffers, which FSDP2 does not shard): {keep}, or drop --quantize {quantize}")
    if quantization:
        method = quantization.get("quant_method", "quantized") if isinstance(quantization, dict) else "quantized"
        raise LorakitError(f"--fsdp cannot shard {model}: it is a 4-bit folder ({method}, quantization_config in its "
                           f"config.json) whose uint8 weights FSDP2 does not shard: {keep}, or shard its 16-bit "
                           "original with --fsdp")


def _processes(count: int) -> str:
    return f"{count} process" + "es" * (count != 1)


def check_resume_processes(resume_from: Path, run_dir: Path, world_size: int) -> None:
    """Refuse, before the model loads, resuming a checkpoint of another number of processes (the data order and each
    process's random state depend on it), with the command that resumes it. A missing or damaged checkpoint is left
    to the loop, which names it."""
    from lorakit.train.checkpoint import find_checkpoint, read_state

    try:
        checkpoint = find_checkpoint(resume_from)
        saved = read_state(checkpoint).get("identity", {}).get("processes")
    except (LorakitError, AttributeError):
        return
    if not isinstance(saved, int) or isinstance(saved, bool) or saved == world_size:
        return
    # a checkpoint the user named (an earlier one than the latest, say) stays the one resumed: `--resume RUN` would
    # continue from the run's latest checkpoint instead
    named = resume_from if (resume_from / "state.json").is_file() else None
    raise LorakitError(f"cannot resume from {checkpoint}: it was trained on {_processes(saved)} and this is "
                       f"{_processes(world_size)} (the data order and each process's random state depend on the count); "
                       f"resume with `{resume_command(run_dir, saved, named)}`, or start a new run with another --out")


def resume_command(run_dir: Path, processes: int | None = None, checkpoint: Path | None = None) -> str:
    """The command that continues the run in ``run_dir`` on ``processes`` processes (default: this run's count):
    a resume must use the run's own count (:func:`check_resume_processes`). ``checkpoint``: resume from that one
    rather than the run's latest."""
    import shlex

    processes = world()[1] if processes is None else processes
    resume = f"lorakit train --resume {shlex.quote(str(checkpoint or run_dir))}"
    return f"torchrun --nproc_per_node {processes} -m {resume}" if processes > 1 else resume


@contextlib.contextmanager
def gathered_trainable(model: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Inside: every sharded trainable parameter is replaced by its whole value (so ``save_adapter`` and checkpoint
    writers see plain tensors); yields ``{name: whole tensor}`` of all trainable parameters. Restores the sharded
    parameters on exit. Every process must enter (the gather is a collective); the order is the model's."""
    from lorakit.inject import unwrap

    model = unwrap(model)  # a torch.compile'd model: checkpoint names without its _orig_mod. (load_checkpoint's)
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    values: dict[str, torch.Tensor] = {}
    try:
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            if is_sharded(p):
                whole = p.detach().full_tensor()
                owner_name, _, leaf = name.rpartition(".")
                owner = model.get_submodule(owner_name) if owner_name else model
                swapped.append((owner, leaf, p))
                owner._parameters[leaf] = nn.Parameter(whole, requires_grad=True)
                values[name] = whole
            else:
                values[name] = p.detach()
        yield values
    finally:
        for owner, leaf, p in reversed(swapped):
            owner._parameters[leaf] = p


def full_state(obj: Any) -> Any:
    """``obj`` (an optimizer state dict, say) with every DTensor replaced by its whole value (collective)."""
    if isinstance(obj, torch.Tensor):
        return full(obj)
    if isinstance(obj, dict):
        return {k: full_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(full_state(v) for v in obj)
    return obj


def to_local_layout(value: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A whole tensor read from a checkpoint, laid out as ``like`` (a DTensor: this process's shard of it)."""
    if not is_sharded(like):
        return value
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(value.to(device=like.device, dtype=like.dtype), like.device_mesh, like.placements)


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every process, in rank order (in-memory pickling between this run's own processes)."""
    import torch.distributed as dist

    if world()[1] == 1:
        return [obj]
    out: list[Any] = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    import torch.distributed as dist

    if world()[1] > 1:
        dist.barrier()


# what a collective raises when another process of the group is gone (gloo; NCCL's aborted communicator)
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "remote worker crashing",
              "NCCL communicator was aborted")


def peer_gone(error: BaseException) -> bool:
    """True when ``error`` (from a collective) says another process of this run has ended (killed, out of memory)."""
    return world()[1] > 1 and any(text in str(error) for text in _PEER_GONE)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def sharded_grad_norm_and_clip(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Global L2 norm of the gradients of ``params`` (sharded or replicated, after the reduction), before clipping;
    clips in place to ``max_norm`` when it is set and > 0. Every process gets the same norm."""
    sharded = torch.zeros((), dtype=torch.float64)
    replicated = torch.zeros((), dtype=torch.float64)
    for p in params:
        if p.grad is None:
            continue
        if is_sharded(p.grad):
            sharded += p.grad.to_local().double().pow(2).sum().cpu()  # this process's shard only
        else:
            replicated += p.grad.double().pow(2).sum().cpu()  # the same on every process
    total = float((all_reduce_sum(sharded) + replicated).sqrt())
    if max_norm and math.isfinite(total) and total > max_norm:
        factor = max_norm / (total + 1e-6)  # torch.nn.utils.clip_grad_norm_'s rule
        for p in params:
            if p.grad is not None:
                p.grad.mul_(factor)
    return total
