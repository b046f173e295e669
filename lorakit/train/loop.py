"""The training loop, as one Python function: ``train(model, tokenizer, train_data, config=TrainConfig(...))``.

Read top to bottom, one optimizer step is:

1. take ``grad_accum`` micro-batches of ``batch_size`` rows (this process's share of each global micro-batch);
2. count the supervised tokens N of the whole accumulated batch (summed over processes);
3. for each micro-batch, backward ``sum of its per-token losses / N``, so the accumulated gradient equals the
   gradient of the full batch's mean per-token loss, however the batch is split (into micro-batches or processes);
4. if the loss or the gradient is NaN/infinite, skip the step (counted; the run stops after ``max_bad_steps`` in a
   row); else clip the gradient norm, set the step's learning rate (:class:`lorakit.optim.Schedule`) and step AdamW;
5. log; validate every ``eval_every`` steps (keeping the best adapter, stopping early if asked); checkpoint every
   ``save_every`` steps and at the end.

Everything that decides the next step (trainable weights, optimizer state, random states, data position) is in
the checkpoint, so a run killed at any moment and resumed from its last checkpoint ends bit-identical (on CPU) to
one never stopped. Ctrl-C or SIGTERM loses nothing: the run stops at a step boundary, writes a checkpoint there and
raises :class:`lorakit.train.stopping.TrainingInterrupted` (a step cut midway is abandoned and redone on resume;
lorakit/train/stopping.py says how, also under torchrun).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from lorakit._progress import clock as _clock, show_bar  # noqa: F401 (show_bar: imported from here too)
from lorakit.errors import LorakitError
from lorakit.models.vocab_fit import check_ids_fit
from lorakit.optim import Schedule, build_optimizer
from lorakit.train.checkpoint import (checkpoint_name, find_checkpoint, latest_checkpoint, load_checkpoint, read_state,
                                      rng_state, save_checkpoint, set_rng_state, write_into_temp)
from lorakit.train.config import TrainConfig
from lorakit.train.distributed import (  # world is re-exported: the runner imports it from here
    all_reduce_gradients, all_reduce_sum, apply_fsdp, full_state, gather_objects, gathered_trainable,
    is_sharded, peer_gone, resume_command, sharded_grad_norm_and_clip, with_gradient_anywhere, world)
from lorakit.train.stopping import AgreedStop as _AgreedStop, StopRequest, TrainingInterrupted
from lorakit.train.batches import BatchIterator, Collator
from lorakit.train.data import (SupervisedDataset, build_dataset, pad_id_for, python_records, split_records,
                                validation_in_another_format, validation_in_training)
from lorakit.train.formats import validate_record
from lorakit.train.evaluate import autocast_context, dataset_loss, loss_sum, supervised_tokens, to_device
from lorakit.train.packing import check_packed_rows, sliding_window_layout, window_packed_masks
from lorakit.train.report import CURVE_NAME, METRICS_NAME, MetricsLog, plot_loss_curve
from lorakit._fs import temp_dir

ADAPTER_DIR = "adapter"
BEST_DIR = "best"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        steps: optimizer steps done (including skipped ones). total_steps: steps planned.
        stopped: "completed", "early_stopping".
        train_loss: mean per-token loss of the last step. best_val_loss / best_step: best validation (or None).
        skipped_steps: steps skipped for a NaN/infinite loss or gradient, or no supervised token.
        tokens: input tokens processed (all processes). seconds: wall time of this call's loop.
        out: the run folder (None without one). adapter_dir / checkpoint: where the final adapter / checkpoint went.
    """

    steps: int
    total_steps: int
    stopped: str
    train_loss: float | None
    best_val_loss: float | None
    best_step: int | None
    skipped_steps: int
    tokens: int
    seconds: float
    out: Path | None = None
    adapter_dir: Path | None = None
    checkpoint: Path | None = None
    val_losses: list[tuple[int, float]] = field(default_factory=list)


# -- the pieces of one step -----------------------------------------------------------------------------------------
def accumulate_gradients(model: nn.Module, micro_batches: Sequence[dict[str, torch.Tensor]], total_tokens: int,
                         device: torch.device, compute_dtype: torch.dtype | None = None,
                         offload_activations: bool = False) -> float:
    """Backward every micro-batch with weight 1 / ``total_tokens``; returns the sum of its per-token losses.

    Since each micro-batch contributes ``sum(token losses) / total_tokens``, the gradients that accumulate in
    ``.grad`` are exactly those of ``mean(token losses over the whole batch)``, whatever the split.
    """
    total = 0.0
    for batch in micro_batches:
        if supervised_tokens(batch["labels"]) == 0:
            continue  # contributes nothing; a forward would only cost time
        with autocast_context(device, compute_dtype), _activation_offload(offload_activations, device):
            summed = loss_sum(model, to_device(batch, device))
        (summed / total_tokens).backward()
        total += float(summed.detach())
    return total


@torch.no_grad()
def _first_rows_loss(model: nn.Module, dataset: SupervisedDataset, collator: Callable, device: torch.device,
                     compute_dtype: torch.dtype | None, batch_size: int) -> float:
    """Mean per-token loss (dropout off) of the training set's first global micro-batch of rows, each process its
    share, summed over the processes (every process must call it: under FSDP the forward is collective); inf when
    those rows hold no supervised token. Tells weights that give NaN everywhere from one batch that does."""
    rank = world()[0]
    # a full micro-batch on every process (train() checked the rows suffice): a forward each, as FSDP needs
    batch = collator([dataset[i] for i in range(rank * batch_size, (rank + 1) * batch_size)])
    was_training = model.training
    model.eval()
    try:
        with autocast_context(device, compute_dtype):
            summed = float(loss_sum(model, to_device(batch, device)))
    finally:
        model.train(was_training)
    tokens = supervised_tokens(batch["labels"])
    summed, tokens = (float(x) for x in all_reduce_sum(torch.tensor([summed, tokens], dtype=torch.float64)))
    return summed / tokens if tokens else float("inf")


def _activation_offload(enabled: bool, device: torch.device):
    """Saved activations go to (pinned) CPU memory and come back for backward: GPU memory for PCIe time."""
    if not enabled:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def _grad_norm_and_clip(params: list[nn.Parameter], max_norm: float | None) -> float:
    """Global L2 norm of the gradients (before clipping); clips to ``max_norm`` when it is set and > 0."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    if any(is_sharded(p) for p in grads):  # FSDP2: the norm needs the shards of every process
        return sharded_grad_norm_and_clip(grads, max_norm)
    limit = max_norm if max_norm else float("inf")
    return float(torch.nn.utils.clip_grad_norm_(grads, limit, error_if_nonfinite=False, foreach=False))


# -- setup helpers --------------------------------------------------------------------------------------------------
def as_dataset(data: Any, tokenizer: Any, config: TrainConfig, name: str, pack: bool) -> SupervisedDataset:
    """A :class:`SupervisedDataset` as is, or records / dicts (a pandas DataFrame, a ``datasets.Dataset``) tokenized
    with the config's length rules."""
    if isinstance(data, SupervisedDataset):
        return data
    if isinstance(data, (str, Path)):
        raise LorakitError(f"{name}: pass records or a dataset to train(); to read files use "
                           "lorakit.train.data.build_datasets(paths, tokenizer)")
    return build_dataset(python_records(data, name), tokenizer, config.max_length, config.overflow, pack=pack,
                         name=name, chat_template_kwargs=config.chat_template_kwargs)


def _validation_from_config(train_data: Any, config: TrainConfig) -> tuple[Any, Any]:
    """(training data, validation data) of a ``train()`` call given no ``val_data``: the config's ``val_data`` files
    (their validation split), or its ``val_fraction`` of the records held out with the seed ``lorakit train`` uses;
    else no validation set. Both were ignored without a word, and with them early stopping."""
    if config.val_data:
        from lorakit.train.sources import VALIDATION_SPLITS, read_many

        return train_data, read_many(config.val_data, split=VALIDATION_SPLITS)
    if config.val_fraction is None:
        return train_data, None
    if isinstance(train_data, SupervisedDataset):
        raise LorakitError("val_fraction holds out records, but train() was given a tokenized dataset; pass the "
                           "records, or val_data= (a dataset of held-out records) and no val_fraction")
    # validated first: each keeps its place in the data given ("training data[7]") whichever split it lands in
    records = [validate_record(record, f"training data[{i}]")
               for i, record in enumerate(python_records(train_data, "training data"))]
    return split_records(records, config.val_fraction, config.seed)


def dataset_fingerprint(dataset: SupervisedDataset) -> str:
    """A hash of the training rows' token ids and labels: a resume on other data (or tokenization) is refused."""
    digest = hashlib.sha256()
    for row in dataset.rows:
        digest.update(json.dumps([row["input_ids"], row["labels"], row.get("seq_lens")]).encode())
    return digest.hexdigest()[:16]


def run_identity(model: nn.Module, dataset: SupervisedDataset, config: TrainConfig, world_size: int) -> dict[str, Any]:
    """What must not change between a run and its resume (checked key by key, with the reason on refusal)."""
    from lorakit.io import base_fingerprint

    return {
        "model": base_fingerprint(model),
        "data": dataset_fingerprint(dataset),
        "processes": world_size,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "max_length": config.max_length,
        "pack": config.pack,
        "seed": config.seed,
        "full": config.full,
        "rank": None if config.full else config.rank,
        "adapter": None if config.full else json.dumps(config.lora_config().to_peft_dict(), sort_keys=True),
    }


_IDENTITY_HINTS = {
    "model": "another base model",
    "data": "other training data (or another --max-length / --overflow / tokenizer)",
    "batch_size": "another --batch-size",
    "grad_accum": "another --grad-accum",
    "processes": "another number of processes (torchrun --nproc_per_node)",
    "rank": "another --rank",
    "max_length": "another --max-length",
    "pack": "another --pack setting",
    "seed": "another --seed",
    "full": "--full switched",
    "adapter": "other adapter settings",
}


_ADDED_LATER = ("rank",)


def check_identity(saved: dict[str, Any], current: dict[str, Any], checkpoint: Path) -> None:
    for key, value in current.items():
        if key in _ADDED_LATER and key not in saved:
            continue  # a checkpoint from before this key existed (the adapter fingerprint still covers it)
        if saved.get(key) != value:
            shown = (f"{saved.get(key)!r} then, {value!r} now" if key not in ("adapter", "data", "model")
                     else _adapter_difference(saved.get(key), value) if key == "adapter"
                     else f"fingerprint {str(saved.get(key))[:16]} then, {str(value)[:16]} now")
            raise LorakitError(f"cannot resume from {checkpoint}: {_IDENTITY_HINTS.get(key, key)} ({key}: {shown}); "
                               "resume with the run's original settings, or start a new run with another --out")


# options a checkpoint's identity covers, compared on the run's config.yaml before the model loads (the identity
# check itself needs the loaded model and data; the paths of --model and --data may move, so they are left to it)
_RESUME_FIXED = ("batch_size", "max_length", "pack", "seed", "full", "rank", "alpha", "dropout", "targets", "exclude",
                 "variant", "init", "modules_to_save", "rank_pattern", "alpha_pattern",
                 "quantize", "dtype")  # the base's precision: the adapter would go on against other base weights


def check_resume_options(saved: dict[str, Any], config: TrainConfig, run_dir: Path) -> None:
    """Refuse, in seconds rather than after loading the model, a resume whose flags change what the run's
    checkpoints were trained with (``saved``: the run's config.yaml)."""
    for key in _RESUME_FIXED:
        if key in saved and saved[key] != getattr(config, key):
            hint = _IDENTITY_HINTS.get(key) if key not in ("rank", "full") else None
            raise LorakitError(f"cannot resume from {run_dir}: {hint or 'another --' + key.replace('_', '-')} ({key}: "
                               f"{saved[key]!r} then, {getattr(config, key)!r} now); resume with the run's original "
                               "settings, or start a new run with another --out")
    # the accumulation, which --grad-accum or --global-batch sets: a resume with another --global-batch was refused
    # only after the model had loaded, as "another --grad-accum", an option the user had not typed
    if "grad_accum" in saved or "global_batch" in saved:
        from lorakit.train.distributed import world

        processes = world()[1]
        try:
            then = accumulation_steps(config.replace(grad_accum=saved.get("grad_accum") or 1,
                                                     global_batch=saved.get("global_batch")), processes)
            now = accumulation_steps(config, processes)
        except (LorakitError, TypeError):
            return  # a global batch that does not divide: refused with its own line as the run starts
        if then != now:
            how = (f"--global-batch {config.global_batch} / (--batch-size {config.batch_size} x {processes} "
                   f"process{'es' * (processes != 1)})" if config.global_batch else f"--grad-accum {config.grad_accum}")
            raise LorakitError(f"cannot resume from {run_dir}: another gradient accumulation ({then} micro-batch"
                               f"{'es' * (then != 1)} per optimizer step then, {now} now: {how}); resume with the run's original settings, or "
                               "start a new run with another --out")


def _adapter_difference(saved: Any, current: str) -> str:
    """The adapter settings (PEFT config keys) that differ between a checkpoint and this run, e.g.
    ``use_dora: False then, True now``; the raw fingerprint when the saved one cannot be read."""
    try:
        before, now = json.loads(saved), json.loads(current)
    except (TypeError, ValueError):
        return f"fingerprint {str(saved)[:16]} then, {str(current)[:16]} now"
    keys = [k for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)]
    return ", ".join(f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in keys) or "settings differ"


def trainable_adapter(model: nn.Module) -> str | None:
    """The name of the adapter being trained (the active one with trainable tensors), or None when none has any.

    Before, it was the first adapter with trainable tensors in parameter order: with two trainable adapters (two
    ``inject`` calls, the second one active), the active one trained and the other, untouched, was saved as the
    run's adapter. A trainable adapter that is not active gets no gradient, and two active trainable adapters would
    train together but save as one: both are refused in one line."""
    from lorakit.adapters import active_adapters, lora_parameters

    trainable: dict[str, None] = {}
    for name, parameter in lora_parameters(model):
        if parameter.requires_grad:
            parts = name.split(".")
            for marker in ("adapters", "copies"):
                if marker in parts:
                    trainable[parts[parts.index(marker) + 1]] = None
                    break
    if not trainable:
        return None
    active = active_adapters(model)
    chosen = [name for name in trainable if name in active]
    if len(chosen) == 1:
        return chosen[0]
    if not chosen:
        raise LorakitError(f"adapter {next(iter(trainable))!r} is trainable but not active (active: "
                           f"{', '.join(map(repr, active)) or 'none'}), so training would not change it; call "
                           "lorakit.set_adapter(model, NAME) with the adapter to train first")
    raise LorakitError(f"adapters {', '.join(map(repr, chosen))} are all active and trainable, but train() trains and "
                       "saves one adapter; call lorakit.set_adapter(model, NAME) with the one to train (or freeze the "
                       "others: inject(..., trainable=False))")


def _check_quantized(model: nn.Module, quantize: str) -> None:
    """``TrainConfig(quantize="nf4")`` acts where the runner loads the model (load_base(..., quantize=)); a model given
    to ``train`` is used as it is. A dense one then trained 16-bit, silently, the QLoRA asked for (and its memory
    saving) not there: refused in one line, before anything changes. (A model already 4-bit, as the runner passes
    it, or one loaded through bitsandbytes, is what was asked for.)"""
    from lorakit import quant
    from lorakit.inject import check_model

    check_model(model)
    if any(quant.is_quantized(module) or quant.holds_bnb_weight(module) for module in model.modules()):
        return
    raise LorakitError(f"TrainConfig(quantize={quantize!r}) applies when the model is loaded (lorakit train --model, or "
                       f"lorakit.load_base(folder, quantize={quantize!r})); this model is already loaded with dense "
                       f"weights and would train as it is: call lorakit.quantize(model, {quantize!r}) before train(), "
                       "or drop quantize")


def prepare_model(model: nn.Module, config: TrainConfig) -> str | None:
    """Inject the config's adapter (when the model has none) or unfreeze everything for ``--full``.

    Returns the trained adapter's name (None for full fine-tuning).
    """
    from lorakit.inject import adapter_names, inject

    if config.full:
        if adapter_names(model):
            raise LorakitError("--full trains the base weights, but this model holds adapters; pass a plain base model")
        for module in model.modules():
            from lorakit import quant

            if quant.is_quantized(module):
                raise LorakitError("--full cannot train a quantized base; load it without quantize")
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return None
    if not adapter_names(model):
        _check_patterns(model, config)
        inject(model, config.lora_config())
    name = trainable_adapter(model)
    if name is None:
        raise LorakitError("the model's adapters are frozen; inject one with trainable=True or let train() inject it")
    return name


def _check_patterns(model: nn.Module, config: TrainConfig) -> None:
    """Every rank_pattern / alpha_pattern key must be a regular expression that matches a module this config
    adapts (as PEFT matches them: the end of the module's path); a typo would silently keep the default rank."""
    import re

    import warnings

    from lorakit.inject import find_targets

    patterns = [("rank_pattern", key) for key in config.rank_pattern] + [("alpha_pattern", key) for key in config.alpha_pattern]
    if not patterns:
        return
    with warnings.catch_warnings():  # inject() right after gives the same warnings once
        warnings.simplefilter("ignore")
        paths = list(find_targets(model, config.lora_config()))
    for option, key in patterns:
        try:
            matcher = re.compile(rf"(.*\.)?({key})$")
        except re.error as error:
            raise LorakitError(f"{option} key {key!r} is not a valid regular expression ({error}); write a module name "
                               "such as 'q_proj' or a pattern such as 'layers\\.0\\.self_attn\\.q_proj'") from None
        if not any(matcher.match(path) for path in paths):
            names = sorted({path.rsplit(".", 1)[-1] for path in paths})
            raise LorakitError(f"{option} key {key!r} matches none of the adapted modules (named {', '.join(names)}); "
                               "fix the key in the config file or adapt that module with --targets")


def _enable_fast_kernels(model: nn.Module, device: torch.device, log: Callable[[str], None],
                         compile_layers: bool = False) -> None:
    """lorakit's fused kernels on CUDA, if that module exists and accepts the model; any failure falls back."""
    if device.type != "cuda":
        if compile_layers:  # said, not silently dropped: the user asked for it
            log(f"--compile-layers compiles lorakit's fused kernels on CUDA only; this {device.type} run trains eagerly")
        return
    try:
        from lorakit.models.fast import use_fast_kernels
    except ImportError:
        return
    try:
        log(str(use_fast_kernels(model, compile="layers" if compile_layers else None)))
    except Exception as error:  # an optional speed-up must never stop training
        try:
            from lorakit.models.fast import disable_fast_kernels

            disable_fast_kernels(model)
        except Exception:
            pass
        log(f"fast kernels not used ({type(error).__name__}: {error}); training with the reference path")


def _enable_checkpointing(model: nn.Module) -> None:
    # transformers >= 5.2x renamed it (the old name warns, FutureWarning, on every run); older ones have only the old
    enable = getattr(model, "activation_checkpointing_enable", None)
    keyword = "activation_checkpointing_kwargs"
    if enable is None:
        enable, keyword = getattr(model, "gradient_checkpointing_enable", None), "gradient_checkpointing_kwargs"
    if enable is None:
        raise LorakitError(f"{type(model).__name__} does not support gradient checkpointing; drop --gradient-checkpointing")
    try:
        enable(**{keyword: {"use_reentrant": False}})
    except (ValueError, TypeError) as error:
        raise LorakitError(f"gradient checkpointing is not available for this model ({error})") from None


def compute_dtype_for(model: nn.Module, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA (fp16 if the base is fp16); None (plain float32) elsewhere."""
    if device.type != "cuda":
        return None
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return torch.float16 if torch.float16 in dtypes and torch.bfloat16 not in dtypes else torch.bfloat16


def accumulation_steps(config: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step: ``--grad-accum``, or ``--global-batch / (--batch-size x processes)``.

    The global batch is batch size x accumulation x processes; with ``--global-batch`` the same command gives the
    same global batch (and so the same training) on any number of processes that divides it.
    """
    if config.global_batch is None:
        return config.grad_accum
    per_step = config.batch_size * world_size
    if config.global_batch % per_step:
        raise LorakitError(f"--global-batch {config.global_batch} is not a multiple of --batch-size {config.batch_size} "
                           f"x {world_size} processes = {per_step}; choose a global batch (or batch size) so that it is")
    return config.global_batch // per_step


def total_steps_for(config: TrainConfig, rows: int, world_size: int) -> int:
    if config.max_steps:
        return config.max_steps
    micro_per_epoch = rows // (config.batch_size * world_size)
    if micro_per_epoch == 0:
        raise LorakitError(f"the training set has {rows} row{'s' * (rows != 1)}, fewer than one global micro-batch of "
                           f"{config.batch_size * world_size}; lower --batch-size or add data")
    return max(1, math.ceil(config.epochs * micro_per_epoch / config.grad_accum))


def _atomic_folder(final: Path, write: Callable[[Path], Any], again: str = "try again") -> Path:
    """Let ``write`` fill a temporary folder, then swap it in for ``final`` (never half a folder under ``final``).

    A failed write (a full disk) is one line naming ``final`` (not the hidden temporary folder) and ending with
    ``again``, what to do once there is room."""
    tmp, old = temp_dir(final), None
    try:
        write_into_temp(write, tmp)
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as error:
        _put_back(old, final, tmp)
        raise LorakitError(f"writing {final} failed ({error.strerror or error}); free disk space and {again}") from None
    except BaseException:
        _put_back(old, final, tmp)
        raise
    return final


def _put_back(old: Path | None, final: Path, tmp: Path) -> None:
    """After a failed or interrupted swap: the previous folder back under ``final`` if it was moved aside and the new
    one never came (a Ctrl-C between the two renames left no ``best/`` at all, and the next run removed the hidden
    ``.best.old``), and the temporary folder removed."""
    if old is not None and old.is_dir() and not final.exists():
        os.replace(old, final)
    shutil.rmtree(tmp, ignore_errors=True)


def saved_tokenizer(tokenizer: Any, records: Sequence[Any], full: bool) -> Any:
    """The tokenizer saved with the run's result: into RUN/model for full fine-tuning (``tokenizer`` itself), and
    beside an adapter (RUN/adapter, RUN/best, each checkpoint's adapter folder) only when the run trained its
    Alpaca or question/answer ``records`` (:class:`lorakit.train.formats.Record`) in their prompt format on a
    tokenizer without a chat template; else None (no tokenizer files beside the adapter, as before).

    That tokenizer is a copy given a chat template in the prompt format
    (:func:`lorakit.train.formats.with_frame_template`; the run's system text included), as transformers' Trainer
    and trl save their tokenizer beside an adapter: a folder copied out of its run (no results.json beside it) or a
    full run's model still asks ``lorakit generate`` / ``merge`` / ``serve`` and transformers' apply_chat_template
    in the format the answers were trained after. ``tokenizer`` itself is left as it is (training and its scores
    go on with it)."""
    import copy

    from lorakit.train.formats import PROMPT_FRAMES, frame_of_template, with_frame_template
    from lorakit.train.report import prompt_style

    template = getattr(tokenizer, "chat_template", None) if tokenizer is not None else None
    if tokenizer is not None and (not template or frame_of_template(template)):  # (a run on a framed one: again)
        style = prompt_style(records)
        if style["prompt_format"] in PROMPT_FRAMES:
            return with_frame_template(copy.deepcopy(tokenizer), style["prompt_format"], style["system_prompt"])
    return tokenizer if full else None


def save_result(model: nn.Module, tokenizer: Any, folder: Path, adapter: str | None, write: bool = True,
                again: str = "try again") -> Path:
    """The adapter in PEFT's format, with ``tokenizer`` beside it unless None (:func:`saved_tokenizer`), or, for
    full fine-tuning, the whole model + tokenizer; written atomically (the tokenizer's files inside the same
    temporary folder, swapped in together).

    Under FSDP every process must call this (the sharded adapter is gathered); only those with ``write`` write.
    """
    from lorakit.io import save_adapter

    if adapter is not None:
        def write_adapter(tmp: Path) -> None:
            save_adapter(model, tmp, adapter=adapter)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)

        with gathered_trainable(model):
            if write:
                _atomic_folder(folder, write_adapter, again)
        return folder
    if not write:
        return folder

    def write_model(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)

    return _atomic_folder(folder, write_model, again)


# -- the loop -------------------------------------------------------------------------------------------------------
def train(model: nn.Module, tokenizer: Any, train_data: Any = None, config: TrainConfig | None = None, *,
          val_data: Any = None, out: str | os.PathLike | None = None, resume: str | os.PathLike | None = None,
          log: Callable[[str], None] | None = None, on_step: Callable[[int, dict], None] | None = None) -> TrainResult:
    """Fine-tune ``model`` on ``train_data``: LoRA (injected from ``config`` unless the model already has a trainable
    adapter) or, with ``config.full``, every weight.

    Args:
        model: a causal LM (transformers), on the device to train on.
        tokenizer: its tokenizer (pad id, and saved beside a fully fine-tuned model).
        train_data: a :class:`lorakit.train.data.SupervisedDataset`, or records / dicts in one of the three shapes
            (a DataFrame, a ``datasets.Dataset``); None: the files of ``config.data``.
        config: the options (default ``TrainConfig()``).
        val_data: validation data (same kinds), for the periodic validation loss; None for none.
        out: the run folder (checkpoints, metrics.jsonl, loss_curve.png, adapter/); default ``config.out``;
            None: nothing is written.
        resume: a checkpoint, or a run folder whose latest checkpoint to continue from.
        log: where one-line messages go (default: print to stderr, on process 0 only).
        on_step: called as ``on_step(step, metrics)`` after each step (tests, notebooks).
    Returns:
        a :class:`TrainResult`. The model is left in eval mode holding the final weights. The exact-match score
        before and after training (``eval_examples``, ``samples``) is ``lorakit train``'s, not this function's:
        call :func:`lorakit.train.evaluate.score_generations` on held-out records before and after.
    Raises:
        TrainingInterrupted: (a KeyboardInterrupt) Ctrl-C or SIGTERM stopped the run; with ``out``, a checkpoint at
            the step it stopped at is written first (``.checkpoint``), and ``resume=out`` continues from it as if
            never stopped. The model holds the weights of that step (a step cut midway is dropped, not half-applied).
            A second Ctrl-C while it saves stops at once; the checkpoint being written is then left out whole.
    """
    config = config or TrainConfig()
    if config.quantize:
        _check_quantized(model, config.quantize)
    rank, world_size = world()
    main = rank == 0
    if log is None:
        log = (lambda message: print(message, file=sys.stderr, flush=True)) if main else (lambda message: None)
    # expanded: train(..., out="~/runs/nb") saved its adapter through the expanded path and the rest under './~'
    out = Path(out).expanduser() if out is not None else (Path(config.out).expanduser() if config.out else None)
    if out is None and resume is not None:
        # the resumed run's own folder, as `lorakit train --resume RUN` does: train(..., resume=RUN) alone (the form
        # TrainingInterrupted's message gives) trained to the end and wrote nothing, no checkpoint, metrics or adapter
        out = find_checkpoint(resume).parent.parent
    device = next(model.parameters()).device
    if config.fsdp and torch.cuda.is_available() and world_size > 1:  # the base may wait on the CPU until sharded
        device = torch.device("cuda", torch.cuda.current_device())
    grad_accum = accumulation_steps(config, world_size)
    if out is not None:
        _check_out_folder(out, fresh=resume is None)
    # the data first: a bad record (or too few) is refused before the model is changed (an adapter injected, every
    # weight unfrozen), else a notebook's next call, with the data fixed, trained that adapter and not its config's
    if train_data is None:  # train(model, tok, config=TrainConfig(data=["train.jsonl"])): the config's files
        if not config.data:
            raise LorakitError("train() was given no training data: pass the records (train_data), or data=[files] in "
                               "the TrainConfig")
        from lorakit.train.sources import read_many

        train_data = read_many(config.data)
    if val_data is None:  # TrainConfig(val_fraction=0.1) or val_data=[files] from Python: as lorakit train does
        train_data, val_data = _validation_from_config(train_data, config)
    train_ds = as_dataset(train_data, tokenizer, config, "training data", config.pack)
    val_ds = as_dataset(val_data, tokenizer, config, "validation data", False) if val_data is not None else None
    if val_ds is None and config.early_stopping_patience:  # else it would never stop early, without a word
        raise LorakitError(f"early_stopping_patience={config.early_stopping_patience} needs a validation set; pass "
                           "val_data= (or set val_fraction in the TrainConfig)")
    global_micro = config.batch_size * world_size
    if len(train_ds) < global_micro:
        raise LorakitError(f"the training set has {len(train_ds)} row{'s' * (len(train_ds) != 1)}, fewer than one micro-batch of {global_micro} "
                           f"(--batch-size {config.batch_size} x {world_size} processes); lower --batch-size or add data")
    from lorakit.train.preflight import check_batch_fits

    # lorakit train refuses (runner) an accumulation the rows cannot fill; train() from Python cycled the data
    # without a word, one optimizer step going through some rows twice or more (3 rows, batch 1 x grad_accum 5)
    check_batch_fits(config, len(train_ds), world_size, what="training rows")

    torch.manual_seed(config.seed)  # adapter init and dropout; a resume restores the saved states instead
    adapter = prepare_model(model, config)
    if world_size > 1:  # under torchrun: how the processes share the work, and the batch one optimizer step sees
        units = f", {apply_fsdp(model, device)} sharded units" if config.fsdp else ""  # one line, not a second
        log(f"{'FSDP2' if config.fsdp else 'data parallel'} over {world_size} processes{units}: global batch "
            f"{config.batch_size * grad_accum * world_size} rows per optimizer step (--batch-size {config.batch_size} "
            f"x {grad_accum} accumulation x {world_size} processes)")
    elif config.fsdp:
        log("--fsdp on one process: nothing to shard, the whole model stays on this device")
    compute_dtype = compute_dtype_for(model, device)
    if config.fast_kernels and not config.fsdp:  # the fused kernels read whole weights, which FSDP keeps sharded
        _enable_fast_kernels(model, device, log, compile_layers=config.compile_layers)
    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    params = [p for p in model.parameters() if p.requires_grad]
    half = [name for name, p in model.named_parameters() if p.requires_grad and p.dtype == torch.float16]
    if half:  # AdamW's eps (1e-8) and squared gradients underflow in float16: the first step writes NaN
        raise LorakitError(f"{len(half)} trainable tensors are float16 (e.g. {half[0]}), which AdamW turns to NaN; "
                           "train them in float32 or bfloat16 (load the base with dtype float32/bfloat16, or keep "
                           "adapters float32)")
    from lorakit.inject import trainable_report

    log(str(trainable_report(model)))

    if train_ds is not train_data:  # tokenized here from records: say what `lorakit train` says of its data
        log(f"training data: {train_ds.summary}")
        if train_ds.summary.drop_note():
            log(train_ds.summary.drop_note())
    if val_ds is not None and val_ds is not val_data:
        log(f"validation data: {val_ds.summary}")
        if val_ds.summary.drop_note():
            log(f"validation data: {val_ds.summary.drop_note()}")
    check_ids_fit(model, tokenizer, [("training", train_ds), ("validation", val_ds)])  # else IndexError mid-step
    overlap = validation_in_training(train_ds, val_ds) if val_ds is not None and main else None
    if overlap:
        warnings.warn(overlap, stacklevel=2)
    other_format = validation_in_another_format(train_ds, val_ds, tokenizer) if val_ds is not None and main else None
    if other_format:
        warnings.warn(other_format, stacklevel=2)
    # what is saved with the adapter folders / RUN/model: the prompt format of Alpaca records as a chat template
    kept_tokenizer = saved_tokenizer(tokenizer, train_ds.records, adapter is None)
    pad_id = pad_id_for(tokenizer)
    collator = Collator(pad_id, pad_to_multiple_of=8 if device.type == "cuda" else None,
                        mask_dtype=compute_dtype or torch.float32)
    if config.pack:  # refused here, before any step, for layer kinds a packed mask cannot confine
        sliding_window_layout(model)
    batches = BatchIterator(train_ds, global_micro, collate_fn=collator, seed=config.seed)
    left_out = len(train_ds) % global_micro
    if left_out and (config.max_steps is None or config.max_steps * grad_accum > len(train_ds) // global_micro):
        # micro-batches stay full: a small set would otherwise lose a share of every epoch without a word (a step is
        # grad_accum micro-batches: --max-steps 2 with accumulation 2 reaches the epoch's end at 3 per epoch)
        log(f"each epoch trains on {len(train_ds) - left_out} of the {len(train_ds)} rows, in full micro-batches of "
            f"{global_micro}; the {left_out} left out change with each epoch's shuffle")
    total_steps = total_steps_for(config.replace(grad_accum=grad_accum, global_batch=None), len(train_ds), world_size)
    warmup = config.warmup_steps if config.warmup_steps is not None else round(config.warmup_ratio * total_steps)
    if config.warmup_steps is not None and warmup > total_steps:  # a silent clamp read as a bug in the lr curve
        log(f"--warmup-steps {warmup} is longer than the run ({total_steps} steps): the learning rate warms up over "
            "the whole run and reaches its peak at the last step")
    schedule = Schedule(config.schedule, min(warmup, total_steps), total_steps, config.min_lr_ratio)
    optimizer = build_optimizer(model, config.learning_rate, config.weight_decay, config.loraplus_ratio,
                                (config.adam_beta1, config.adam_beta2), config.adam_eps)
    eval_every = config.eval_every if config.eval_every is not None else max(1, total_steps // 4)
    eval_batch = config.eval_batch_size or 2 * config.batch_size
    identity = run_identity(model, train_ds, config.replace(grad_accum=grad_accum, global_batch=None), world_size)

    step, skipped, bad_in_row, tokens_seen, resumed_at, resumed_loss = 0, 0, 0, 0, None, None
    stopped_early = pending_validation = False
    best_val, best_step, since_best = None, None, 0
    val_losses: list[tuple[int, float]] = []
    resumed_checkpoint = None
    if resume is not None:
        checkpoint = resumed_checkpoint = find_checkpoint(resume)
        check_identity(read_state(checkpoint).get("identity", {}), identity, checkpoint)
        state = load_checkpoint(checkpoint, model, optimizer, rank=rank)
        batches.load_state_dict(state["data"])
        step, skipped, tokens_seen = int(state["step"]), int(state["skipped_steps"]), int(state["tokens"])
        resumed_at = step
        best_val, best_step, since_best = state.get("best_val_loss"), state.get("best_step"), int(state.get("since_best", 0))
        val_losses = [tuple(v) for v in state.get("val_losses", [])]
        bad_in_row = int(state.get("bad_in_row", 0))  # --max-bad-steps counts in a row across the resume
        resumed_loss = state.get("train_loss")  # so a resume with nothing left to do still reports it
        pending_validation = bool(state.get("pending_validation"))  # stopped while validating at this step
        if step > total_steps:  # "nothing to do" here would rewrite results.json without the run's loss
            raise LorakitError(f"cannot resume: checkpoint {checkpoint} is at step {step}, past this run's end at "
                               f"step {total_steps}; give --max-steps above {step} to train further, or use the "
                               "adapter the run saved")
        if step >= total_steps:
            log(f"checkpoint {checkpoint} is at step {step}, the end of this run ({total_steps} steps); nothing to do "
                "(raise --max-steps or --epochs to train further)")
        elif config.early_stopping_patience and since_best >= config.early_stopping_patience:
            # the run stopped early here (its last checkpoint): the uninterrupted run would not train on either
            stopped_early = True
            log(f"checkpoint {checkpoint} is where the run stopped early at step {step}: no better validation loss for "
                f"{since_best} validations (best at step {best_step}); nothing to do (raise "
                "--early-stopping-patience to train further)")
        else:
            log(f"resuming from {checkpoint} at step {step} of {total_steps}")
        if state.get("optimizer_changes"):
            log(f"optimizer settings changed since the checkpoint, applied from step {step + 1}: "
                + "; ".join(state["optimizer_changes"]))
    if out is not None and main:
        _remove_stale_temporaries(out)
    try:
        metrics = MetricsLog(out, config.tensorboard, resume_step=step if resume is not None else None) if (out and main) else None
    except OSError as error:  # a folder that cannot be made after all (a read-only or special file system)
        raise LorakitError(f"cannot write the run folder {out}: {error.strerror or error}; give another out") from None

    def checkpoint_state(pending_validation: bool) -> dict[str, Any]:
        state = {"data": batches.state_dict(), "skipped_steps": skipped, "tokens": tokens_seen, "identity": identity,
                 "best_val_loss": best_val, "best_step": best_step, "since_best": since_best, "val_losses": val_losses,
                 "total_steps": total_steps, "train_loss": last_loss,
                 "bad_in_row": bad_in_row}
        if pending_validation:  # stopped while validating this step: the resume validates it first
            state["pending_validation"] = True
        return state

    def write_checkpoint(pending_validation: bool = False) -> Path | None:
        """Every process gathers (sharded tensors, random states); rank 0 alone writes."""
        nonlocal checkpointed_at
        if out is None:
            return None
        rngs = gather_objects(rng_state())
        with gathered_trainable(model) as trainable:
            opt_state = full_state(optimizer.state_dict())
            checkpointed_at = None if pending_validation else step
            if not main:
                return None
            writer = (lambda path: save_result(model, kept_tokenizer, path, adapter)) if adapter is not None else None
            return save_checkpoint(out / CHECKPOINTS_DIR, step, model, optimizer, checkpoint_state(pending_validation),
                                   writer, keep=config.keep_checkpoints, trainable=trainable, optimizer_state=opt_state,
                                   rank_rngs=rngs)

    rows_per_epoch = batches.batches_per_epoch * batches.batch_size

    def _bad_steps_error(what: str, last_bad: int) -> LorakitError:
        return LorakitError(f"{bad_in_row} step{'s' * (bad_in_row != 1)} in a row had a NaN or infinite {what} (last "
                            f"at step {last_bad}); lower --lr (now {config.learning_rate:g}), keep --max-grad-norm on, "
                            "or check the data")

    def _broken_weights(what: str, last_bad: int) -> LorakitError | None:
        """After ``bad_in_row`` steps in a row skipped for a non-finite loss or gradient, up to step ``last_bad``: the
        error to stop with when the weights themselves give a non-finite loss (on the first training rows too),
        else None (the batches were to blame). A skipped step leaves the weights alone, so an update that broke them
        (a learning rate far too high) made every later step NaN: skipping cannot recover, and resuming from a
        checkpoint written since (they hold the same weights) fails the same way."""
        if math.isfinite(_first_rows_loss(model, train_ds, collator, device, compute_dtype, config.batch_size)):
            return None
        first_bad = last_bad - bad_in_row + 1
        if first_bad <= 1:  # no update before the streak: the model as given (the data, the dtype) is to blame
            return _bad_steps_error(what, last_bad)
        lr = f"--lr (now {config.learning_rate:g})"
        if config.loraplus_ratio and config.loraplus_ratio != 1:  # lora_B's rate, the likelier culprit
            lr += (f" or --loraplus-ratio (now {config.loraplus_ratio:g}: lora_B's learning rate "
                   f"{config.learning_rate * config.loraplus_ratio:g})")
        best = (f"; {out / BEST_DIR} holds the adapter of the best validation loss (step {best_step})"
                if out is not None and best_step is not None and adapter is not None else "")
        return LorakitError(f"{bad_in_row} steps in a row had a NaN or infinite {what} (last at step {last_bad}); lower "
                            f"{lr} and start a new run with --max-grad-norm on: the weights give a NaN or infinite loss "
                            f"on other training rows too, so the update of step {first_bad - 1} broke them (no adapter "
                            f"is saved; the checkpoints from step {first_bad - 1} on hold the same weights, so resuming "
                            f"from them does not help){best}")

    def validation_due() -> bool:
        return val_ds is not None and bool(eval_every) and step > 0 and (step % eval_every == 0 or step == total_steps)

    def validate() -> None:
        """The validation loss at ``step`` (a stop may cut it: the resume runs it again), then, uncut, what it
        changes: the best loss and adapter, early stopping, its metrics line."""
        nonlocal best_val, best_step, since_best, stopped, validated_at
        val_loss, _ = dataset_loss(model, val_ds, eval_batch, collator, device, compute_dtype)
        model.train()
        with stop.uncut():
            # a NaN first loss would stay the best for good ('x < nan' is never true)
            improved = math.isfinite(val_loss) and (best_val is None or val_loss < best_val)
            if improved and out is not None and adapter is not None:  # first: if it fails, the state is as it was
                save_result(model, kept_tokenizer, out / BEST_DIR, adapter, write=main,
                            again=_once_there_is_room(out))
            val_losses.append((step, val_loss))
            if improved:
                best_val, best_step, since_best = val_loss, step, 0
            else:
                since_best += 1
            if metrics is not None:
                metrics.write({"kind": "val", "step": step, "val_loss": val_loss, "val_ppl": _ppl(val_loss),
                               "best": improved})
            note = " (best)" if improved else "" if math.isfinite(val_loss) else " (not finite: not a best)"
            progress.write(f"step {step}: validation loss {val_loss:.4f}{note}")
            validated_at = step
            if config.early_stopping_patience and since_best >= config.early_stopping_patience:
                stopped = "early_stopping"
                log(f"early stopping at step {step}: no better validation loss for {since_best} validations "
                    f"(best {best_val:.4f} at step {best_step})")

    # the bar and its lines (validation losses) on process 0 only: under torchrun every process printed them
    progress = _progress_bar(show_bar(config.progress), total_steps, step, log) if main else _NoBar(quiet=True)
    model.train()
    started, last_loss, last_checkpoint = time.perf_counter(), resumed_loss, None
    stopped = "early_stopping" if stopped_early else "completed"
    validated_at = None if pending_validation else step  # the step whose validation (if due) is done
    checkpointed_at = resumed_at  # the step of the last checkpoint written (None: none yet)
    # packed rows carry a 4D mask, which drops the model's sliding window unless it is put back (train/packing.py)
    windows = window_packed_masks(model) if config.pack else None
    if config.pack and not getattr(model, "_lorakit_fast_kernels", None):  # lorakit's fused path is Llama-shaped
        try:
            check_packed_rows(model, collator, device, compute_dtype)
        except BaseException:
            if windows is not None:
                windows.remove()
            raise
    # Ctrl-C / SIGTERM: a checkpoint at the step boundary, then TrainingInterrupted (lorakit/train/stopping.py)
    stop = StopRequest(together=world_size > 1, announce=main)
    what = "loss"  # what the last skipped step had non-finite: "loss" or "gradient"
    step_start: tuple[dict, Any] | None = None  # (data position, random states) where the step being computed began
    computing = False  # inside a step, before its optimizer update: a stop abandons it
    try:
        stop.__enter__()
        try:
            if pending_validation and stopped == "completed":
                validate()  # the one the stopped run was cut in
                resumed_at = checkpointed_at = None  # what it changed goes into the next checkpoint
            while step < total_steps and stopped == "completed":
                step_start, computing = (batches.state_dict(), rng_state()), True
                step_began, too_many = time.perf_counter(), None
                micro, real_tokens = [], 0
                for _ in range(grad_accum):
                    indices = batches.next_indices()
                    items = [train_ds[i] for i in indices[rank * config.batch_size:(rank + 1) * config.batch_size]]
                    real_tokens += sum(len(item["input_ids"]) for item in items)  # not the padding (a packed batch's
                    micro.append(collator(items))                                 # 4D mask does not tell it apart)
                # one all-reduce: supervised tokens, input tokens, how many processes were sent a stop signal, and
                # how many a SIGTERM (the stop is said as SIGTERM's then, on every process)
                counts = torch.tensor([sum(supervised_tokens(b["labels"]) for b in micro), real_tokens,
                                       int(stop.signum is not None), int(stop.signum == signal.SIGTERM)])
                n_tokens, n_inputs, stopping, terminated = (int(c) for c in all_reduce_sum(counts))  # (4,) int64
                if stopping:
                    raise _AgreedStop(stopping, signal.SIGTERM if terminated else signal.SIGINT)
                entry: dict[str, Any] = {"kind": "train", "step": step + 1,
                                         # of the rows an epoch trains (full micro-batches): with 39 rows
                                         # in batches of 8 the end of --epochs 1 read 0.82, not 1.0
                                         "epoch": round(batches.epoch + batches.index / rows_per_epoch, 4)}
                if n_tokens == 0:
                    summed = grad_norm = None
                else:
                    summed = accumulate_gradients(model, micro, n_tokens, device, compute_dtype,
                                                  config.offload_activations)
                    summed = float(all_reduce_sum(torch.tensor(summed, dtype=torch.float64)))
                    # replicated (non-FSDP) trainable tensors that some process has a gradient for; bucketed
                    all_reduce_gradients(with_gradient_anywhere(params))
                    grad_norm = _grad_norm_and_clip(params, config.max_grad_norm)
                with stop.uncut():  # the update and its counters: all or nothing
                    if summed is None:
                        skipped += 1
                        log(f"step {step + 1}: the batch has no supervised token (every label is masked); step skipped")
                        entry.update(skipped="no supervised token")
                    else:
                        loss = summed / n_tokens
                        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                            skipped += 1
                            bad_in_row += 1
                            what = "loss" if not math.isfinite(loss) else "gradient"
                            log(f"step {step + 1}: {what} is {loss if what == 'loss' else grad_norm}; step skipped "
                                f"({bad_in_row} in a row, stop at {config.max_bad_steps})")
                            entry.update(skipped=f"non-finite {what}")
                            if bad_in_row >= config.max_bad_steps:  # raised once the step's metrics line is written
                                too_many = _broken_weights(what, step + 1) or _bad_steps_error(what, step + 1)
                        else:
                            bad_in_row = 0
                            factor = schedule.apply(optimizer, step)
                            optimizer.step()
                            last_loss = loss
                            entry.update(loss=loss, lr=config.learning_rate * factor, grad_norm=grad_norm)
                        optimizer.zero_grad(set_to_none=True)
                    step += 1
                    tokens_seen += n_inputs
                    computing = False
                    elapsed = time.perf_counter() - step_began
                    entry.update(tokens=n_inputs, supervised_tokens=n_tokens,
                                 tokens_per_s=n_inputs / max(elapsed, 1e-9), step_seconds=elapsed)
                    if metrics is not None and (step % config.log_every == 0 or step == total_steps or "skipped" in entry):
                        metrics.write(entry)
                    if too_many is not None:
                        raise too_many
                    progress.update(1)
                    progress.set_postfix_str(_postfix(entry), refresh=False)

                if validation_due():
                    validate()
                if on_step is not None:
                    on_step(step, entry)
                if stopped != "completed" or step == total_steps:
                    break
                if config.save_every and step % config.save_every == 0:
                    with stop.uncut():
                        last_checkpoint = write_checkpoint()
            if bad_in_row and stopped == "completed" and step != resumed_at:
                # the run ended inside a streak of skipped steps, fewer than --max-bad-steps: when the weights give
                # a NaN loss on other rows too, RUN/adapter (and the 'done' line, exit 0) would be that broken model
                broken = _broken_weights(what, step)
                if broken is not None:
                    raise broken
            if step > 0 and step != resumed_at:  # the end of the run (a resume with nothing left to do wrote it already)
                with stop.uncut():
                    last_checkpoint = write_checkpoint()
        except KeyboardInterrupt as error:
            if stop.together and not isinstance(error, _AgreedStop) or stop.signals > 1:
                raise  # a second signal, or one process alone: at once, nothing saved
            stop.acted = True  # from here on a signal aborts the save
            if computing and step_start is not None:  # back to where the abandoned step began
                batches.load_state_dict(step_start[0])
                set_rng_state(*step_start[1])
                optimizer.zero_grad(set_to_none=True)
            pending = validation_due() and validated_at != step
            # not at step 0 (nothing trained: a new run's folder is then removed), nor again at a step written
            # already, periodically or the one this run resumed from (a same-step rewrite swaps folders)
            wrote = out is not None and step > 0 and checkpointed_at != step
            if wrote:
                write_checkpoint(pending_validation=pending)
            # also the barrier (the others wait for rank 0's write: torchrun ends every process once one exits):
            # how many processes got a signal, counted again now that torchrun's signals to each have all come (at
            # the step's all-reduce a Ctrl-C passed on to every process could have reached only some)
            signalled = int(all_reduce_sum(torch.tensor([int(stop.signum is not None)]))[0])
            saved = (None if out is None or step == 0 else resumed_checkpoint if not wrote and step == resumed_at
                     else out / CHECKPOINTS_DIR / checkpoint_name(step))
            signum = error.signum if isinstance(error, _AgreedStop) else stop.signum or signal.SIGINT
            everywhere = signalled == world_size  # then no process need wait for rank 0 to say it (lorakit.cli)
            raise TrainingInterrupted(step, total_steps, saved, signum, world_size, everywhere) from None
    except RuntimeError as error:
        if not peer_gone(error):
            raise
        # a process killed outright (SIGKILL, the out-of-memory killer) said nothing, and this one's traceback from
        # inside gloo did not name the run's checkpoint: one line that does (torchrun's report names the process)
        last = latest_checkpoint(out / CHECKPOINTS_DIR) if out is not None else None
        then = (f"the last checkpoint is {last}; continue with: {resume_command(out)}" if last is not None
                else "it had written no checkpoint yet")
        # a process that failed on its own mistake has said it above (runner keeps its group up until it has), so
        # "killed" alone would mislead: both causes are named
        raise LorakitError(f"another process of this run ended after step {step} (its own error, if it had one, is "
                           f"printed above; else it was killed or ran out of memory: torchrun's report names it); "
                           f"{then}") from None
    finally:
        stop.__exit__()
        if windows is not None:
            windows.remove()
        progress.close()
        if metrics is not None:
            metrics.close()
    seconds = time.perf_counter() - started
    model.eval()

    adapter_dir = None
    if out is not None:
        adapter_dir = save_result(model, kept_tokenizer, out / (ADAPTER_DIR if adapter is not None else MODEL_DIR), adapter,
                                  write=main, again=_once_there_is_room(out))
    if out is not None and main:
        try:
            plot_loss_curve(out / METRICS_NAME, out / CURVE_NAME,
                            title=f"{'full fine-tuning' if config.full else config.variant} on {config.model}")
        except LorakitError as error:  # a picture of metrics.jsonl: the run's result is saved, so say it and go on
            log(f"{error}; no loss curve, the same numbers are in {out / METRICS_NAME}")
    return TrainResult(step, total_steps, stopped, last_loss, best_val, best_step, skipped, tokens_seen, seconds, out,
                       adapter_dir, last_checkpoint, val_losses)


def _check_out_folder(out: Path, fresh: bool) -> None:
    """Before anything is read or changed: ``out`` must be a folder that can be made (a file there, or above it, was
    an OSError traceback once the run started writing), and a new run (``fresh``: no ``resume``) into a folder that
    holds another run's checkpoints or adapters is refused, as ``lorakit train`` refuses it: its steps were appended
    to the earlier run's metrics.jsonl (one loss curve of two runs), and the earlier run's checkpoints and best/
    adapter stayed beside the new ones, read as this run's."""
    existing = next(folder for folder in (out, *out.absolute().parents) if folder.exists())
    if not existing.is_dir():
        where = "is a file" if existing == out else f"is inside {existing}, a file"
        raise LorakitError(f"out={str(out)!r} {where}; give a folder for the run")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise LorakitError(f"out={str(out)!r}: {existing} is not writable; give another folder for the run")
    held = [name for name in (CHECKPOINTS_DIR, ADAPTER_DIR, BEST_DIR, MODEL_DIR) if (out / name).is_dir()
            and any((out / name).iterdir())] if fresh else []
    if held:
        raise LorakitError(f"out={str(out)!r} holds an earlier run ({', '.join(f'{name}/' for name in held)}); pass "
                           f"resume={str(out)!r} to continue it, or another out (or remove the folder) to start again")


def _remove_stale_temporaries(out: Path) -> None:
    """Hidden folders and files a killed run left half-written in its run folder (``.adapter.x1y2.tmp``, a
    ``.best.old`` of a swap, ``.metrics.jsonl.x1y2.tmp``): only lorakit's own names; checkpoints/ cleans its own."""
    from lorakit.train.report import CURVE_NAME

    if not out.is_dir():
        return
    for name in (ADAPTER_DIR, BEST_DIR, MODEL_DIR, METRICS_NAME, CURVE_NAME, "results.json"):
        for path in [*out.glob(f".{name}.*.tmp"), *out.glob(f".{name}.*.old"), *out.glob(f".{name}.tmp"),
                     out / f".{name}.old"]:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            elif path.exists() or path.is_symlink():
                path.unlink(missing_ok=True)


def _once_there_is_room(out: Path) -> str:
    """What to do after a full disk stopped the run: resume from its last checkpoint (a resume with nothing left to
    train still writes the final adapter), or, before the first one, start it again."""
    from lorakit.train.checkpoint import latest_checkpoint

    last = latest_checkpoint(out / CHECKPOINTS_DIR)
    return f"continue with --resume {out} (from {last.name})" if last is not None else "start the run again"


def _ppl(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


def _postfix(entry: dict[str, Any]) -> str:
    if "loss" not in entry:
        return f"skipped ({entry.get('skipped')})"
    return f"loss={entry['loss']:.4f} lr={entry['lr']:.2e} tok/s={entry['tokens_per_s']:.0f}"


class _NoBar:
    def __init__(self, quiet: bool = False) -> None:
        self.quiet = quiet

    def update(self, n: int) -> None: ...
    def set_postfix_str(self, text: str, refresh: bool = True) -> None: ...
    def write(self, text: str) -> None:
        if not self.quiet:
            print(text, file=sys.stderr, flush=True)
    def close(self) -> None: ...


class _ProgressLines(_NoBar):
    """--no-progress, or by default when stderr is not a terminal (a log file, a batch job): instead of a redrawn
    bar, a plain line now and then, through ``log``: at the first and last step, every tenth of the run and at least
    every ``every_s`` seconds. Example::

        step 40/400: loss=2.3104 lr=1.95e-04 tok/s=5210, 0:01:20 elapsed, 0:12:00 left

    The time left is the mean time of this call's steps (a resume's earlier steps are not counted) times the steps
    left; it includes validations and checkpoints, which a per-step rate would not."""

    def __init__(self, total: int, initial: int, log: Callable[[str], None], every_s: float = 60.0) -> None:
        super().__init__()
        self.total, self.n, self.first, self.log, self.every_s = total, initial, initial, log, every_s
        self.started = self.last_time = time.perf_counter()
        self.last_step = initial

    def write(self, text: str) -> None:
        # through log like every other line: the validation losses went straight to stderr, past train(log=...)
        self.log(text)

    def update(self, n: int) -> None:
        self.n += n

    def set_postfix_str(self, text: str, refresh: bool = True) -> None:
        now = time.perf_counter()
        due = (self.n == self.first + 1 or self.n >= self.total or self.n - self.last_step >= max(1, self.total // 10)
               or now - self.last_time >= self.every_s)
        if not due:
            return
        elapsed = now - self.started
        left = elapsed / max(self.n - self.first, 1) * max(self.total - self.n, 0)
        self.log(f"step {self.n}/{self.total}: {text}, {_clock(elapsed)} elapsed, {_clock(left)} left")
        self.last_step, self.last_time = self.n, now


def _progress_bar(enabled: bool, total: int, initial: int, log: Callable[[str], None] | None = None):
    """A tqdm bar with loss, tokens/s and time left (tqdm's own remaining-time estimate); plain lines if disabled."""
    if not enabled:
        return _ProgressLines(total, initial, log) if log is not None else _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="training", unit="step", dynamic_ncols=True,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps "
                           "[{elapsed}<{remaining}{postfix}]")
