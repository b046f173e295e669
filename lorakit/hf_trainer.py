"""transformers' ``Trainer`` (and anything that calls ``model.save_pretrained``) with a lorakit-injected model.

A PEFT user writes ``Trainer(model=model, ...)`` after ``lorakit.inject(model, config)`` and expects what PEFT gives:
small checkpoints, ``trainer.save_model(dir)`` writing an adapter folder that peft and ``lorakit.load_adapter`` read,
and ``resume_from_checkpoint`` / ``load_best_model_at_end`` working. Trainer saves through ``model.save_pretrained``,
so ``inject`` installs (lazily, on transformers models only) the instance method below in place of the class's:

- while the model holds lorakit adapters, ``save_pretrained(dir)`` writes PEFT's layout: the "default" adapter as
  ``dir/adapter_config.json`` + ``dir/adapter_model.safetensors``, any other adapter ``name`` in ``dir/name/`` (what
  ``PeftModel.save_pretrained`` writes), instead of the whole base under lorakit's internal names
  (``q_proj.base_layer.weight``, ``q_proj.adapters.default.lora_A``) that no loader maps back;
- in a Trainer checkpoint folder (``checkpoint-<step>``) it also writes ``model.safetensors`` holding only the
  trainable tensors under the model's own ``state_dict`` names: the stock ``Trainer._load_from_checkpoint`` (which
  reads adapter files only for a ``peft.PeftModel``) loads that file with ``load_state_dict(strict=False)``, so
  resuming restores the adapters (the frozen base is the one already in memory), and the installed
  ``load_state_dict`` keeps that load from reporting every frozen base weight as a missing key;
- after ``merge_and_unload`` (no adapters left) it is the class's own ``save_pretrained`` again (a whole model);
- ``generate(..., adapter_names=[...])`` (peft's per-row adapters, ``"__base__"`` for the base) runs inside
  ``lorakit.mixed_batch``;
- transformers' own peft methods (``model.load_adapter``, ``set_adapter``, ``disable_adapters``...: ``PEFT_MIXIN``)
  run lorakit's equivalent or name it, instead of putting peft's layers over lorakit's;
- under ``torchrun`` Trainer wraps the model in ``DistributedDataParallel``, which expects a gradient for every
  trainable tensor in every step unless ``find_unused_parameters`` is on (Trainer turns it off under gradient
  checkpointing, and TRL's ``SFTConfig`` checkpoints by default). A trainable adapter that is not active (a second
  injected adapter, ``set_adapter`` to another one) gets none, and the second step failed with "Expected to have
  finished reduction in the prior iteration before starting a new one". The model tells DDP to leave those tensors
  out (``_ddp_params_and_buffers_to_ignore``, read when DDP wraps it: :class:`DDPIgnored`), so they stay as
  they are, as on one process; a later change of the active adapters during training is refused in one line
  (:func:`check_ddp_adapters`), since DDP would then average the wrong tensors. The same list holds the buffers of
  a quantized (NF4) base: DDP broadcasts every buffer from process 0 before each forward, i.e. the whole 4-bit base
  in every step (lorakit keeps it in uint8 buffers; frozen and the same on every process).

Why a hook on the instance rather than a ``Trainer`` subclass: Trainer, TRL's ``SFTTrainer`` and user code all reach
the model through ``save_pretrained``, so one hook covers them all and the user keeps the classes they know; a subclass
would have to be mixed into every trainer class and would override Trainer's private methods.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from lorakit.errors import LorakitError

# transformers.trainer_utils.PREFIX_CHECKPOINT_DIR: Trainer saves step N to <output_dir>/checkpoint-N
CHECKPOINT_PREFIX = "checkpoint-"
TRAINER_WEIGHTS_NAME = "model.safetensors"  # transformers.utils.SAFE_WEIGHTS_NAME, what _load_from_checkpoint reads


def is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel`` (checked by class name: transformers is not imported)."""
    return any(cls.__name__ == "PreTrainedModel" and cls.__module__.startswith("transformers.")
               for cls in type(model).__mro__)


def install(model: nn.Module) -> None:
    """Give a transformers model the adapter-aware ``save_pretrained``, ``load_state_dict`` and
    ``print_trainable_parameters``, and the check of TRL's fused LM head (``lorakit.trl_support``) (idempotent).

    Partials rather than bound methods: a bound method in the instance dict does not survive pickling (torch.save of
    the whole model) because unpickling evaluates ``getattr(model, name)`` before the model has its attributes back.
    """
    if not is_transformers_model(model):
        return
    if "save_pretrained" not in vars(model):
        model.save_pretrained = functools.partial(save_pretrained, model)
    if "load_state_dict" not in vars(model):
        model.load_state_dict = functools.partial(load_state_dict, model)
    if "generate" not in vars(model) and hasattr(type(model), "generate"):
        model.generate = functools.partial(generate, model)
    if "print_trainable_parameters" not in vars(model) and not hasattr(type(model), "print_trainable_parameters"):
        model.print_trainable_parameters = functools.partial(print_trainable_parameters, model)
    for name in PEFT_MIXIN:  # transformers' own peft integration, by habit: see PEFT_MIXIN
        if name not in vars(model) and hasattr(type(model), name):
            setattr(model, name, functools.partial(peft_mixin_method, model, name))
    # transformers >= 5.23: activation_checkpointing_enable, whose deprecated alias gradient_checkpointing_enable warns
    # (FutureWarning) and, once overridden on the instance, becomes the entry point that the new name calls: so the
    # new name is the one wrapped there, and the old one stays the class's alias of it
    name = next((n for n in ("activation_checkpointing_enable", "gradient_checkpointing_enable") if hasattr(model, n)), None)
    if name is not None and not any(n in vars(model) for n in ("activation_checkpointing_enable",
                                                                "gradient_checkpointing_enable")):
        setattr(model, name, functools.partial(checkpointing_enable, model, name))
    from lorakit.trl_support import install_fused_head_check

    install_fused_head_check(model)  # TRL's trainers read lm_head.weight directly: an adapter there would never train
    if DDP_IGNORE not in vars(model):  # a list the user set stays theirs
        setattr(model, DDP_IGNORE, DDPIgnored(model))
    if not any(hook is check_ddp_adapters for hook in getattr(model, "_forward_pre_hooks", {}).values()):
        model.register_forward_pre_hook(check_ddp_adapters)


# transformers' PeftAdapterMixin, on every PreTrainedModel: the calls a transformers user makes by habit on a model
# holding lorakit adapters. Its load_adapter / add_adapter wrapped lorakit's layers in peft's (q_proj.base_layer became
# peft's Linear; k_proj too), loaded part of the file into them (a table of MISSING keys: those stayed random) and
# froze every lorakit adapter; the others failed with "The version of PEFT you are using is not compatible", which is
# not the cause (with a newer peft: "No adapter loaded"). Here: the lorakit call that does it, in one line.
PEFT_MIXIN = {
    "load_adapter": "lorakit.load_adapter(model, folder, adapter=name)",
    "add_adapter": "lorakit.inject(model, lorakit.LoraConfig(...), adapter=name)",
    "set_adapter": None, "active_adapters": None,  # lorakit's functions of the same names do what these do
    "disable_adapters": "`with lorakit.disable_adapters(model):` (the adapters are on again after the block)",
    "enable_adapters": "`with lorakit.disable_adapters(model):` (the adapters are on again after the block)",
    "delete_adapter": "lorakit.delete_adapter(model, name)",
    "get_adapter_state_dict": "lorakit.save_adapter(model, folder, adapter=name), which writes it as peft does",
}


def peft_mixin_method(self: nn.Module, name: str, *args, **kwargs):
    """``model.<name>`` of transformers' peft integration on a model holding lorakit layers (see ``PEFT_MIXIN``):
    ``set_adapter`` / ``active_adapters`` run lorakit's, the others are refused naming lorakit's call. A model
    without lorakit layers (after ``merge_and_unload``) gets the class's method again."""
    from lorakit.inject import adapter_hosts

    if not adapter_hosts(self):
        return getattr(type(self), name)(self, *args, **kwargs)
    if PEFT_MIXIN[name] is None:
        import lorakit.adapters

        return getattr(lorakit.adapters, name)(self, *args, **kwargs)
    raise LorakitError(f"model.{name} is transformers' peft integration, which does not know lorakit's adapters (its "
                       f"load_adapter / add_adapter put peft's layers over them); on a lorakit model use "
                       f"{PEFT_MIXIN[name]}")


def generate(self: nn.Module, *args, adapter_names: list[str] | None = None, **kwargs):
    """The class's ``generate``, also taking peft's ``adapter_names`` (one adapter per batch row, ``"__base__"`` for
    the base alone), run as ``lorakit.mixed_batch``; transformers refused it as an unused model kwarg."""
    if adapter_names is None:
        return type(self).generate(self, *args, **kwargs)
    from lorakit.adapters import mixed_batch

    names = [None if name == "__base__" else name for name in adapter_names] \
        if isinstance(adapter_names, (list, tuple)) else adapter_names  # anything else: mixed_batch says what it takes
    prompts = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else kwargs.get("inputs")))
    rows = prompts.shape[0] if isinstance(prompts, torch.Tensor) and prompts.dim() >= 2 else None
    if isinstance(names, list) and rows is not None and len(names) != rows:
        # mixed_batch spreads k x len(names) rows k to a name (beams, num_return_sequences), so 2 prompts with one
        # name ran that adapter on both without a word; peft refuses a list that is not one name per prompt
        raise LorakitError(f"adapter_names has {len(names)} names for {rows} prompts (input rows); give one per "
                           "prompt (\"__base__\" for the base alone)")
    with mixed_batch(self, names):
        return type(self).generate(self, *args, **kwargs)


def checkpointing_enable(self: nn.Module, name: str, options: dict | None = None, **kwargs):
    """The class's ``name`` (``activation_checkpointing_enable``, or ``gradient_checkpointing_enable`` before
    transformers 5.2x; Trainer's ``gradient_checkpointing=True`` calls it) as transformers 5.x runs it on any version:
    ``use_reentrant=False`` unless asked otherwise, and with reentrant checkpointing the embeddings' output made to
    require grad (a frozen base's never does, and a reentrant checkpoint then gives its layers' adapters no gradient).
    transformers 4.x defaults to reentrant and does the latter for peft models only, so backward failed there with
    "element 0 of tensors does not require grad". ``options``: the checkpoint options, given positionally or under
    the method's own keyword."""
    keyword = name.replace("_enable", "_kwargs")  # activation_checkpointing_kwargs / gradient_checkpointing_kwargs
    options = {"use_reentrant": False, **((options if options is not None else kwargs.pop(keyword, None)) or {})}
    result = getattr(type(self), name)(self, **{keyword: options}, **kwargs)
    if options["use_reentrant"] and hasattr(self, "enable_input_require_grads"):
        self.enable_input_require_grads()
    return result


def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, *args, is_main_process: bool = True,
                    state_dict: dict | None = None, selected_adapters: list[str] | None = None, **kwargs) -> None:
    """Write the model's adapters in PEFT's folder layout (see the module docstring); a plain model saves as usual.

    Args:
        save_directory: the folder; the "default" adapter goes in it, adapter ``name`` in ``save_directory/name``.
        is_main_process: only the main process writes (Trainer passes this under torch.distributed).
        state_dict: when it holds every trainable tensor under the model's names, those values are saved (as
            transformers does; Trainer passes the gathered ones under DeepSpeed / FSDP); else the model's own.
        selected_adapters: the adapters to write (default: all, as PEFT does).
    """
    from lorakit.inject import adapter_names
    from lorakit.io import save_adapter

    names = adapter_names(self)
    if not names:  # merged and unloaded (or adapters deleted): a plain transformers model again
        if state_dict is None:
            _refuse_quantized_save(self)
            _refuse_wrapped_save(self)
        return type(self).save_pretrained(self, save_directory, *args, is_main_process=is_main_process,
                                          state_dict=state_dict, **kwargs)
    if kwargs.get("push_to_hub"):
        raise LorakitError("save_pretrained(push_to_hub=True) is not supported on a lorakit model: save the adapter "
                           "to a folder, then upload that folder with huggingface_hub.upload_folder")
    unknown = [n for n in (selected_adapters or []) if n not in names]
    if unknown:
        raise LorakitError(f"selected_adapters names {unknown[0]!r}, which this model does not have; it has: "
                           f"{', '.join(names)}")
    trainable = {n: p for n, p in self.named_parameters() if p.requires_grad}
    given = state_dict is not None and all(n in state_dict for n in trainable)
    sharded = next((n for n, p in trainable.items() if _is_sharded(p)), None)
    if sharded and not given:  # each process holds a slice: writing it would save a wrong adapter without a word
        raise LorakitError(f"save_pretrained: the adapter parameter {sharded} is sharded (FSDP / DeepSpeed ZeRO-3) and "
                           "no whole state_dict was passed; train with `lorakit train --fsdp` (it gathers the adapters), "
                           "or use ZeRO-2 / DDP with Trainer")
    if isinstance(save_directory, str) and not save_directory.strip():  # Path("") would be the current folder
        raise LorakitError("save_pretrained: the folder is empty (''); give the folder to write, e.g. 'my-adapter'")
    if not is_main_process:
        return
    root = Path(save_directory)
    with _values_from(self, {n: state_dict[n] for n in trainable} if given else {}):
        for name in selected_adapters or names:
            save_adapter(self, root if name == "default" else root / name, adapter=name)
        if root.name.startswith(CHECKPOINT_PREFIX):
            _save_trainable(self, root / TRAINER_WEIGHTS_NAME)


def guard_quantized_save(model: nn.Module) -> None:
    """Give a transformers model holding NF4 layers (``lorakit.quantize``, ``load_base(..., quantize="nf4")``) the
    ``save_pretrained`` above, which refuses to write them. The class's own wrote lorakit's 4-bit buffers
    (``weight_packed``, ``absmax``...) in a folder that ``AutoModelForCausalLM.from_pretrained`` loads with freshly
    initialised linear layers (only a load report says so): e.g. ``merge_and_unload`` on a 4-bit model, then
    ``save_pretrained``, as the README's Trainer section says works after merging."""
    if is_transformers_model(model) and "save_pretrained" not in vars(model):
        model.save_pretrained = functools.partial(save_pretrained, model)


def _refuse_quantized_save(model: nn.Module) -> None:
    from lorakit import quant

    layer = next((path for path, module in model.named_modules() if quant.is_quantized(module)), None)
    if layer is not None:
        raise LorakitError(f"save_pretrained would write lorakit's 4-bit buffers ({layer!r} is NF4), which transformers "
                           "loads as random weights: save the 4-bit model with lorakit.save_quantized(model, tokenizer, "
                           "folder), or call lorakit.dequantize(model) first for a 16-bit folder")


def _refuse_wrapped_save(model: nn.Module) -> None:
    """``delete_adapter`` of the last adapter leaves the layers wrapped (``q_proj.base_layer``): the class's
    ``save_pretrained`` then wrote every adapted weight under that name, which transformers does not read (it loaded
    those layers with random weights); ``merge_and_unload`` unwraps them (with no adapter left it merges nothing)."""
    from lorakit.inject import adapter_hosts

    wrapped = next(iter(adapter_hosts(model)), None)
    if wrapped is not None:
        raise LorakitError(f"save_pretrained: this model has no adapters left, but its layers are still wrapped (e.g. "
                           f"{wrapped!r}), so its weights would be saved under lorakit's names (base_layer), which "
                           "transformers does not read: call model = lorakit.merge_and_unload(model) first (with no "
                           "adapter left it only unwraps the layers)")


def load_state_dict(self: nn.Module, state_dict, strict: bool = True, assign: bool = False):
    """``nn.Module.load_state_dict``, except that a non-strict load of an adapter-only state dict (no frozen tensor
    in it: what a Trainer checkpoint's ``model.safetensors`` holds) does not count the frozen base as missing.

    Trainer's ``resume_from_checkpoint`` and ``load_best_model_at_end`` call ``load_state_dict(checkpoint, False)`` and
    log every missing key: without this, every frozen base weight (hundreds of names) was reported as missing on each
    resume although nothing was wrong. What stays reported: a missing trainable tensor (an adapter the checkpoint
    lacks), unexpected keys, and every missing key of a state dict that holds frozen tensors (a whole-model file with
    some weights absent). ``strict=True`` is untouched: it still raises on the missing base. A trainable tensor of
    another shape (a checkpoint of another rank) raises one LorakitError line instead of torch's line per tensor.

    Returns:
        torch's ``_IncompatibleKeys(missing_keys, unexpected_keys)``.
    """
    trainable = {name: parameter for name, parameter in self.named_parameters() if parameter.requires_grad}
    differ = [name for name, parameter in trainable.items()
              if name in state_dict and tuple(getattr(state_dict[name], "shape", ())) != tuple(parameter.shape)]
    if differ:  # a checkpoint of other adapter settings (rank): torch's error lists every tensor, one line each
        name = differ[0]
        raise LorakitError(f"the state dict's {name} has shape {tuple(state_dict[name].shape)}, this model's is "
                           f"{tuple(trainable[name].shape)} ({len(differ)} adapter tensor(s) differ): it was saved with "
                           "other adapter settings; inject the LoraConfig that wrote it (its adapter_config.json has "
                           "r, target_modules) before resuming from it")
    result = type(self).load_state_dict(self, state_dict, strict=strict, assign=assign)
    if strict or not result.missing_keys:
        return result
    unexpected = set(result.unexpected_keys)
    if trainable and all(key in trainable for key in state_dict if key not in unexpected):  # adapter-only: the base
        result.missing_keys[:] = [key for key in result.missing_keys if key in trainable]  # is the one in memory
    return result


@contextlib.contextmanager
def _values_from(model: nn.Module, values: dict[str, torch.Tensor]) -> Iterator[None]:
    """Inside: each named trainable parameter reads ``values[name]``, as transformers' ``save_pretrained(state_dict=)``
    saves the given tensors rather than the model's (Trainer passes the gathered ones under DeepSpeed / FSDP)."""
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    try:
        for name, value in values.items():
            owner_name, _, leaf = name.rpartition(".")
            owner = model.get_submodule(owner_name) if owner_name else model
            swapped.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = nn.Parameter(value.detach(), requires_grad=True)
        yield
    finally:
        for owner, leaf, parameter in reversed(swapped):
            owner._parameters[leaf] = parameter


def _is_sharded(parameter: nn.Parameter) -> bool:
    """An FSDP2 DTensor, a DeepSpeed ZeRO-3 parameter (``ds_id`` set), or an empty local slice (FSDP1)."""
    return type(parameter).__name__ == "DTensor" or hasattr(parameter, "ds_id") or parameter.numel() == 0


def _save_trainable(model: nn.Module, path: Path) -> None:
    """The trainable tensors under the model's own names, for Trainer's resume (``load_state_dict(strict=False)``)."""
    from safetensors.torch import save as safetensors_bytes

    from lorakit._fs import atomic_write_bytes

    tensors = {name: p.detach().contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={"format": "pt"}))


def print_trainable_parameters(self: nn.Module) -> None:
    """PEFT's habit: print the trainable share (quantized bases count their logical size)."""
    from lorakit.inject import trainable_report

    report = trainable_report(self)
    print(f"trainable params: {report.trainable:,} || all params: {report.total:,} || "
          f"trainable%: {100 * report.share:.4f}")


# -- DistributedDataParallel ----------------------------------------------------------------------------------------
DDP_IGNORE = "_ddp_params_and_buffers_to_ignore"  # what torch's DistributedDataParallel reads from the module it wraps


def idle_adapter_tensors(model: nn.Module) -> list[str]:
    """Names (as ``model.named_parameters`` gives them) of the trainable adapter tensors that a forward of ``model``
    does not use now: adapters that are not active or are merged (every adapter while they are disabled), and every
    ``modules_to_save`` copy but the one that runs (the last active)."""
    from lorakit.inject import adapter_hosts
    from lorakit.layers import ModulesToSave

    idle: list[str] = []
    for path, host in adapter_hosts(model).items():
        copies = isinstance(host, ModulesToSave)
        container, kind = (host.copies, "copies") if copies else (host.adapters, "adapters")
        used = set() if host.disabled else {n for n in host.active if n not in host.merged}
        if copies and used:
            used = {host.active[-1]}
        for name in container.keys():
            if name in used:
                continue
            prefix = f"{path}.{kind}.{name}" if path else f"{kind}.{name}"
            idle += [n for n, p in container[name].named_parameters(prefix=prefix) if p.requires_grad]
    return idle


def quantized_base_buffers(model: nn.Module) -> list[str]:
    """Names of the buffers of quantized base layers (NF4's packed weights, block scales and code tables)."""
    from lorakit import quant

    return [name for path, module in model.named_modules() if quant.is_quantized(module)
            for name, _ in module.named_buffers(prefix=path)]


class DDPIgnored:
    """``model._ddp_params_and_buffers_to_ignore``: DistributedDataParallel reads it once, when it wraps the model,
    and leaves the tensors it names out of its gradient all-reduce and of its broadcasts (at start-up, and of buffers
    before every forward). Iterating computes them at that moment (not at ``inject``: the user may add or switch
    adapters after it): :func:`idle_adapter_tensors`, remembered in ``idle`` for :func:`check_ddp_adapters`, and
    :func:`quantized_base_buffers`. Holds the model (a reference cycle, as the other hooks here; it survives
    deepcopy and pickling)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.idle: tuple[str, ...] | None = None  # None: no DDP has read it yet

    def __iter__(self):
        self.idle = tuple(idle_adapter_tensors(self.model))
        return iter(self.idle + tuple(quantized_base_buffers(self.model)))


def check_ddp_adapters(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook: once DDP has read the idle tensors, refuse a training forward that uses another set.

    Costs a dict lookup while no DDP wrapped the model; after, one walk over the adapter hosts per training forward
    (cached paths; no tensor work).

    Raises:
        LorakitError: the active (or merged, or disabled) adapters changed since DDP wrapped the model.
    """
    state = vars(model).get(DDP_IGNORE)
    if not isinstance(state, DDPIgnored) or state.idle is None:
        return None
    if not (model.training and torch.is_grad_enabled()):
        return None
    import torch.distributed as dist

    if not dist.is_initialized():  # the group (and the DDP built on it) is gone: a one-process run may switch freely
        return None
    from lorakit.inject import adapter_hosts

    if any(host.row_adapters is not None for host in adapter_hosts(model).values()):
        return None  # lorakit.mixed_batch: the rows decide; not a training setup DDP can follow
    now = tuple(idle_adapter_tensors(model))
    if now == state.idle:
        return None
    woken = [n for n in state.idle if n not in now]
    name = woken[0] if woken else next(n for n in now if n not in state.idle)
    what = ("is used now, but DistributedDataParallel leaves it out of its gradient all-reduce (it was idle when DDP "
            "wrapped the model), so the processes would train it apart" if woken else
            "is idle now, but DistributedDataParallel waits for its gradient (it was in use when DDP wrapped the model)")
    raise LorakitError(f"the adapters in use changed after DistributedDataParallel wrapped the model: {name} {what}; "
                       "call lorakit.set_adapter (or disable / merge) before the Trainer starts and keep it during "
                       "training")
