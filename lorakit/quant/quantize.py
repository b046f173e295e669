"""Quantize a model's linear layers to NF4 in memory.

``quantize(model, "nf4")`` replaces ``nn.Linear`` modules in place by ``NF4Linear`` (not the output head by default),
one at a time, dropping each dense weight as soon as its layer is quantized. Loading a checkpoint straight into NF4
(never holding the 16-bit model) is ``lorakit.models.quantized_loading.load_quantized``.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.quant import is_conv1d
from lorakit.quant.nf4 import NF4Linear

QUANT_TYPES = ("nf4",)
DEFAULT_SKIP = ("lm_head",)


def check_quant_type(quant: str) -> str:
    """Normalise and validate a quantization name; refuses anything but the supported types by name."""
    name = str(quant).lower()
    if name not in QUANT_TYPES:
        raise LorakitError(f"unknown quantization {quant!r}; lorakit supports: {', '.join(QUANT_TYPES)}")
    return name


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """``skip`` entries match a full module path, its last component, or a path suffix (``"mlp.down_proj"``)."""
    return any(name == s or name.endswith("." + s) or name.split(".")[-1] == s for s in skip)


def _output_head_names(model: nn.Module) -> set[str]:
    """Paths of the output head when its weight is tied to the input embeddings (never quantized: it is shared)."""
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    if get_out is None or get_in is None:
        return set()
    try:
        head, embed = get_out(), get_in()
    except (NotImplementedError, AttributeError):
        return set()
    if head is None or embed is None or getattr(head, "weight", None) is not getattr(embed, "weight", None):
        return set()
    return {name for name, module in model.named_modules() if module is head}


@torch.no_grad()
def quantize(model: nn.Module, quant: str = "nf4", *, skip: Iterable[str] = DEFAULT_SKIP, blocksize: int = 64,
             double_quant: bool = True, device: torch.device | str | None = None) -> nn.Module:
    """Replace the model's ``nn.Linear`` (and transformers ``Conv1D``) modules by ``NF4Linear``, in place.

    Args:
        quant: ``"nf4"`` (the only type; anything else raises ``LorakitError``).
        skip: module names left dense (default: the output head ``lm_head``; a head tied to the embeddings is
            always left dense).
        blocksize / double_quant: bitsandbytes' defaults for QLoRA (64, True).
        device: quantize on this device (e.g. ``"cuda"`` for a model still on the CPU): each layer is moved,
            quantized and its dense weight dropped, so the dense model never has to fit on the device.
    Returns:
        the same model. Non-finite weights raise ``LorakitError`` naming the module, before anything changes.
    """
    check_quant_type(quant)
    skip = tuple(skip or ())
    heads = _output_head_names(model)
    # every (parent, attribute) pointing at a module, so a module shared by two paths is replaced in both
    targets: dict[int, tuple[str, nn.Module, list[tuple[nn.Module, str]]]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent.named_children():
            path = f"{parent_name}.{child_name}" if parent_name else child_name
            if not (isinstance(child, nn.Linear) or is_conv1d(child)) or _skipped(path, skip) or path in heads:
                continue
            entry = targets.setdefault(id(child), (path, child, []))
            entry[2].append((parent, child_name))
    for path, module, _ in targets.values():  # refuse before changing anything
        from lorakit.quant.nf4 import check_finite

        check_finite(module.weight, path)
    for key in list(targets):
        path, module, parents = targets.pop(key)
        weight = module.weight.detach()
        weight = weight.T if is_conv1d(module) else weight
        if device is not None:
            weight = weight.to(device)
        bias = module.bias.detach().to(weight.device) if module.bias is not None else None
        quantized = NF4Linear.from_weight(weight.contiguous(), bias, blocksize=blocksize, double_quant=double_quant,
                                          name=path)
        quantized.train(module.training)
        for parent, attribute in parents:
            setattr(parent, attribute, quantized)
        del module, weight, bias, parents  # the dense weight goes as soon as nothing else holds it
    if device is not None:  # what was skipped or is not linear (embeddings, norms, the head) follows to the device
        model.to(device)
    return model
