"""Checks of a ``lorakit train`` run that read no weights, run before the model loads.

The runner repeats each of them on the loaded model (so the Python API and resumed runs stay checked); here they
only come first, from the model folder's ``config.json`` and the environment, so a mistake costs a second instead
of a model load (minutes for a large base).
"""

from __future__ import annotations

import importlib
import json
import os
from typing import Any

from lorakit.errors import LorakitError
from lorakit.train.config import TrainConfig


def local_config(model: str) -> dict | None:
    """The ``config.json`` of a local model folder as a dict; None for an embedded name or an unreadable file (those
    are named by ``load_base`` itself, in one line)."""
    from lorakit.models.hub_cache import local_model_folder

    path = local_model_folder(model) / "config.json"  # an org/name id: its snapshot in the Hugging Face cache
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):
        return None
    return data if isinstance(data, dict) else None


def config_context(config: dict) -> int | None:
    """The most positions a model's ``config.json`` declares (a multimodal one in its ``text_config``), or None."""
    from lorakit.models.loading import _CONTEXT_KEYS

    for source in (config.get("text_config"), config):
        for key in _CONTEXT_KEYS:
            value = source.get(key) if isinstance(source, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_rank(rank: int, model_config: dict, flag: str = "--rank") -> None:
    """Refuse a rank above every size (``*_size``) of a model's config: a layer's update has rank at most
    min(in, out), so it only allocates parameters, up to running out of memory (1e9 on a 32-wide model: an allocator
    traceback). Below that it is not an error: peft accepts a rank above a layer's size, and inject warns."""
    sizes = (model_config.get("text_config") or model_config) if isinstance(model_config, dict) else {}
    largest = max((v for k, v in sizes.items() if k.endswith("_size") and isinstance(v, int)
                   and not isinstance(v, bool)), default=None)
    if largest is not None and rank > largest:
        raise LorakitError(f"{flag} {rank} is above every size of this model (the largest in its config.json is "
                           f"{largest}), and a layer's update has rank at most min(in, out): lower {flag} (e.g. 16)")


def check_before_loading(config: TrainConfig, given: set[str]) -> None:
    """Refuse what the options, the environment and ``config.json`` already tell: a ``--max-length`` (given, not
    the default, which is lowered instead) beyond the model's context, a ``--global-batch`` the processes cannot
    share, ``--fsdp`` over processes on a 4-bit base, ``--tensorboard`` without its package, and a ``--targets`` /
    ``--exclude`` / ``--modules-to-save`` name that matches no module (found on the model built empty, on the meta
    device)."""
    from lorakit.commands._args import check_model_arg, check_writable
    from lorakit.train.loop import accumulation_steps

    check_model_arg(config.model)  # a file, or an adapter folder, where the base model's folder goes
    check_writable(config.out or "runs")  # the run folder (default: runs/<date-time>) is made after the model loads
    accumulation_steps(config, int(os.environ.get("WORLD_SIZE", "1") or 1))
    if config.tensorboard:
        try:
            importlib.import_module("torch.utils.tensorboard")  # what the run's metrics log imports
        except ImportError:
            raise LorakitError("--tensorboard needs the tensorboard package: pip install tensorboard (or drop "
                               "--tensorboard; metrics.jsonl has the same numbers)") from None
    model_config = local_config(config.model)
    quantization = (model_config or {}).get("quantization_config")
    check_4bit_base(config, quantization)
    if config.fsdp and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from lorakit.train.distributed import check_fsdp_base

        check_fsdp_base(config.model, config.quantize, quantization)
    if model_config is None:
        return
    limit = config_context(model_config)
    if "max_length" in given and limit is not None and config.max_length > limit:
        raise LorakitError(f"--max-length {config.max_length} is longer than the model's context of {limit} tokens "
                           f"(max_position_embeddings in its config.json); pass --max-length {limit} or less")
    if not config.full:
        check_rank(config.rank, model_config)
    # layer names only (q_proj): a full path (model.layers.0...) can differ between the class built here and the one
    # a loader picks for a multimodal family, so paths are checked on the loaded model, as before
    names = {key: [v for v in getattr(config, key) or [] if "." not in v] or None
             for key in ("targets", "exclude", "modules_to_save")}
    if any(names.values()):
        empty = empty_model(config.model)
        if empty is not None:
            from lorakit.train.runner import check_module_names

            check_module_names(empty, config.replace(**names))


def check_4bit_base(config: TrainConfig, quantization: Any) -> None:
    """Refuse ``--full`` and ``--init pissa`` on a 4-bit folder (its config.json has a ``quantization_config``): both
    need the dense weights. ``TrainConfig`` refuses them with ``--quantize``; the loaded model refused a 4-bit folder
    only after the load and in the Python API's terms ("load it without quantize") to a user who gave no --quantize."""
    if not quantization or config.quantize:
        return
    where = f"{config.model} is a 4-bit folder"
    if config.full:
        raise LorakitError(f"--full trains every weight, and the weights of a 4-bit base cannot train ({where}): "
                           "train on its 16-bit original, or drop --full to train an adapter on it (QLoRA)")
    if config.init == "pissa":
        raise LorakitError(f"--init pissa starts the adapter from the base's dense weights, which a 4-bit base does "
                           f"not keep ({where}): use --init default, or train on its 16-bit original")


def empty_model(folder: str) -> Any:
    """The model of ``folder``'s config.json with no weights (every tensor on the meta device: no memory, no time),
    for its module names; None where transformers cannot build it from the config alone (then the names are checked
    after loading, as before)."""
    import torch
    import transformers

    try:
        # trust_remote_code=False: never the folder's own code (unset, transformers may ask on a terminal to run it)
        model_config = transformers.AutoConfig.from_pretrained(os.path.expanduser(folder), local_files_only=True,
                                                               trust_remote_code=False)
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(model_config, trust_remote_code=False)
    except Exception:  # an architecture only a loader knows (remote code, a quantized layout): not this check's job
        return None


def check_batch_fits(config: TrainConfig, count: int, world_size: int, *, what: str = "training examples",
                     records: int | None = None) -> None:
    """Refuse batch sizes the training data cannot fill: a ``--batch-size`` (x processes) above ``count`` examples,
    a global batch (batch size x grad accum x processes, or ``--global-batch``) above it (the loader cycles the
    data, so one optimizer step would go through it several times: 64x in one report), and a ``--val-fraction``
    that leaves fewer training records than one batch.

    Args:
        count: training examples (rows once tokenized and packed: ``what`` says which). Before tokenizing it is
            the records left after ``--val-fraction`` holds its share out (an upper bound: drops and packing only
            lower it; chats split per assistant turn are counted per turn by the caller).
        records: all the records read, before ``--val-fraction``; None after tokenizing (the split is done).
    """
    from lorakit.train.loop import accumulation_steps

    micro = config.batch_size * world_size
    times = "" if world_size == 1 else f" x {world_size} processes"
    if records is not None and config.val_fraction is not None and count < micro:
        raise LorakitError(f"--val-fraction {config.val_fraction} holds out {records - count} of {records} records, "
                           f"leaving {count} for training, fewer than one batch (--batch-size {config.batch_size}"
                           f"{times}); lower --val-fraction (e.g. 0.1) or add data")
    held = f" (after --val-fraction {config.val_fraction} holds out {records - count})" if (
        records is not None and config.val_fraction is not None) else ""
    if micro > count:
        fix = (f"use --batch-size {count // world_size} or less" if count >= world_size else
               "add data or use fewer processes")
        raise LorakitError(f"--batch-size {config.batch_size}{times} is more than the {count} {what}{held}; {fix}")
    accum = accumulation_steps(config, world_size)
    per_step = micro * accum
    if per_step <= count:
        return
    cycles = f"one optimizer step would go through them {per_step / count:.1f} times"
    if config.global_batch is not None:
        raise LorakitError(f"--global-batch {config.global_batch} is more than the {count} {what}{held}: {cycles}; "
                           f"use --global-batch {count // micro * micro} or less (a multiple of --batch-size "
                           f"{config.batch_size}{times})")
    raise LorakitError(f"--batch-size {config.batch_size} x --grad-accum {accum}{times} = {per_step} examples per "
                       f"optimizer step is more than the {count} {what}{held}: {cycles}; use --grad-accum "
                       f"{count // micro} or less")


def example_bound(records: list) -> int:
    """The most training examples ``records`` can give before tokenizing: one per record, but one per assistant turn
    for a chat (a template that rewrites earlier turns trains each turn as its own example)."""
    bound = 0
    for record in records:
        messages = record.fields.get("messages") if getattr(record, "shape", None) == "messages" else None
        turns = sum(1 for m in messages or () if isinstance(m, dict) and m.get("role") == "assistant")
        bound += max(1, turns)
    return bound
